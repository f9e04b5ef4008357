"""mmfm.radio.step_batches: batches built ahead on a thread equal the ones built on demand, resume exactly, and
hand a failure to the trainer's thread."""

from __future__ import annotations

import pytest
import torch

from mmfm.radio.distill import DataConfig, PartitionConfig, RadioTrainConfig, SampleStream, StudentConfig
from mmfm.radio.step_batches import StepBatches
from mmfm.radio.teachers import TeacherSpec


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mmfm.data.synth import write_synthetic

    d = tmp_path_factory.mktemp("imgs")
    write_synthetic("images", 40, d, seed=0, image_size=72, samples_per_shard=16)
    return str(d)


def _cfg(shards: str) -> RadioTrainConfig:
    # two partitions, two resolutions and a 2x2 mosaic: batches of 3, 3 and 2 * 4 samples
    return RadioTrainConfig(
        seed=3, teachers=[TeacherSpec(name="t", family="toy")], student=StudentConfig(patch_size=8),
        data=DataConfig(train_shards=shards, shuffle_buffer=8),
        partitions=[PartitionConfig("low", [32, 48], 0.5, 3),
                    PartitionConfig("high", [64], 0.5, 2, mosaic_k=2, mosaic_prob=0.5)])


def _drain(batches: StepBatches) -> list:
    with batches:
        return list(batches)


def _same(a, b) -> None:
    assert (a.index, a.plan, a.skipped) == (b.index, b.plan, b.skipped)
    assert a.stream_state == b.stream_state
    torch.testing.assert_close(a.student, b.student, rtol=0, atol=0)
    torch.testing.assert_close(a.units, b.units, rtol=0, atol=0)


def test_prefetched_batches_equal_on_demand_ones_and_resume_exactly(shards):
    cfg = _cfg(shards)
    n = 14  # more samples than one epoch of 40: the stream wraps into epoch 1
    ref = _drain(StepBatches(cfg, SampleStream(shards, 8, 0), 0, n, prefetch=0, workers=1))
    got = _drain(StepBatches(cfg, SampleStream(shards, 8, 0), 0, n, prefetch=3, workers=3))
    assert len(ref) == len(got) == n
    assert {b.plan.mosaic_k for b in ref} == {1, 2} and len({b.plan.resolution for b in ref}) == 3
    for a, b in zip(ref, got):
        _same(a, b)
    # resume: a fresh stream loaded with batch j's saved position continues with batch j + 1
    j = 6
    stream = SampleStream(shards, 8, 0)
    stream.load_state_dict(ref[j].stream_state)
    for a, b in zip(ref[j + 1:], _drain(StepBatches(cfg, stream, j + 1, n, prefetch=2, workers=2))):
        _same(a, b)


def test_decode_workers_resume_exactly_across_epochs(shards):
    # decoding in 2 DataLoader processes (ShardDataset.loader): another sample order than in-thread decoding,
    # but a stream resumed from a batch's saved position, with the same worker count, continues exactly
    cfg = _cfg(shards)
    n = 12  # 12 micro-steps read more than the 40 samples of one epoch
    ref = _drain(StepBatches(cfg, SampleStream(shards, 8, 0, decode_workers=2), 0, n, prefetch=2, workers=2))
    assert ref[-1].stream_state["epoch"] >= 1
    for j in (3, 7):  # resumed in epoch 0 (3 shards of 16 + 8: uneven streams); both continue into epoch 1
        stream = SampleStream(shards, 8, 0, decode_workers=2)
        stream.load_state_dict(ref[j].stream_state)
        resumed = _drain(StepBatches(cfg, stream, j + 1, n, prefetch=2, workers=2))
        for a, b in zip(ref[j + 1:], resumed, strict=True):
            _same(a, b)
    in_thread = _drain(StepBatches(cfg, SampleStream(shards, 8, 0), 0, 2, prefetch=0, workers=1))
    assert not torch.equal(in_thread[0].units, ref[0].units)  # the worker split changes the order


class _FailingStream:
    """A stream whose third ``take`` raises, as a shard that cannot be opened does (ShardError)."""

    def __init__(self, inner: SampleStream) -> None:
        self.inner, self.calls = inner, 0
        self.skipped = 0

    def take(self, n: int):
        self.calls += 1
        if self.calls == 3:
            raise OSError("cannot open shard /data/missing.tar")
        return self.inner.take(n)

    def state_dict(self):
        return self.inner.state_dict()


def test_a_failure_on_the_producer_thread_reaches_the_trainer(shards):
    cfg = _cfg(shards)
    batches = StepBatches(cfg, _FailingStream(SampleStream(shards, 8, 0)), 0, 10, prefetch=2, workers=2)
    assert next(batches).index == 0 and next(batches).index == 1
    with pytest.raises(RuntimeError, match="micro-step 2 failed: cannot open shard /data/missing.tar") as err:
        next(batches)
    assert isinstance(err.value.__cause__, OSError)
    assert not batches._thread.is_alive()


def test_close_stops_a_producer_waiting_on_a_full_queue(shards):
    batches = StepBatches(_cfg(shards), SampleStream(shards, 8, 0), 0, 50, prefetch=1, workers=1)
    next(batches)
    batches.close()
    assert not batches._thread.is_alive()


def test_bad_arguments_are_named(shards):
    with pytest.raises(ValueError, match="prefetch >= 0 and workers >= 1"):
        StepBatches(_cfg(shards), SampleStream(shards, 8, 0), 0, 1, prefetch=-1)


def test_bench_radio_data_tiny_runs(load_script, tmp_path):
    import json

    out = tmp_path / "row.json"
    assert load_script("bench_radio_data").main(["--tiny", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["row"]
    assert set(row) == {"on_demand_build_ms", "threads_build_ms", "loop_on_demand_ms", "loop_prefetch_ms",
                        "loop_prefetch_decode_workers_ms", "threads_decode_threads_build_ms",
                        "loop_prefetch_decode_threads_ms"}
    assert all(v > 0 for v in row.values())
    loops = [v for k, v in row.items() if k.startswith("loop_")]
    assert min(loops) >= 5.0  # no loop step is shorter than the simulated 5 ms GPU step
