"""EpochBatcher: full batches across epochs, and exact continuation from its state."""

from __future__ import annotations

import pytest
from PIL import Image

from mmfm.data.batching import EpochBatcher
from mmfm.data.schemas import ImageSample
from mmfm.data.shards import read_shards, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = [ImageSample(key=f"k{i:03d}", image=Image.new("RGB", (8, 8), (i, 0, 0)), label=i) for i in range(10)]
    return write_shards(samples, out, samples_per_shard=4)


def keys(batch):
    return [s.key for s in batch]


def test_batches_cross_epochs_and_drop_the_tail(shards):
    batcher = EpochBatcher(read_shards(shards, shuffle_buffer=4, seed=1), batch_size=3)
    epoch0 = [keys(next(batcher)) for _ in range(3)]  # 9 of 10 samples, tail of 1 dropped
    assert len({k for b in epoch0 for k in b}) == 9
    next(batcher)
    assert batcher.epoch == 1


def test_resume_continues_with_exactly_the_next_batches(shards):
    reference = EpochBatcher(read_shards(shards, shuffle_buffer=4, seed=2), batch_size=3)
    expected = [keys(next(reference)) for _ in range(7)]
    first = EpochBatcher(read_shards(shards, shuffle_buffer=4, seed=2), batch_size=3)
    got = [keys(next(first)) for _ in range(4)]
    state = first.state_dict()
    second = EpochBatcher(read_shards(shards, shuffle_buffer=4, seed=2), batch_size=3)
    second.load_state_dict(state)
    got += [keys(next(second)) for _ in range(3)]
    assert got == expected


def test_too_few_samples_is_a_clear_error(shards):
    with pytest.raises(RuntimeError, match="no full batch of 50"):
        next(EpochBatcher(read_shards(shards), batch_size=50))
