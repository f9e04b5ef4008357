"""Shard writing/reading: plain-webdataset compatibility, splitting, deterministic shuffles,
exact resume (num_workers 0 and 2), and fault tolerance (corrupt image, missing key, truncated tar)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmfm.data.schemas import ConversationSample, ImageSample, Message, Region, RegionSample
from mmfm.data.shards import ShardError, expand_urls, read_shards, write_shards


def _image(i: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _samples(n: int) -> list[ImageSample]:
    return [ImageSample(key=f"s{i:05d}", image=_image(i), caption=f"caption {i}", label=i % 7) for i in range(n)]


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """40 samples in 8 shards of 5."""
    return write_shards(_samples(40), tmp_path / "shards", samples_per_shard=5)


def _labels(dataset) -> list[str]:
    return [s.key for s in dataset]


ALL_KEYS = [f"s{i:05d}" for i in range(40)]


def test_write_layout_and_roundtrip(shards):
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(8)]
    out = list(read_shards(shards))
    assert [s.key for s in out] == ALL_KEYS
    ref = _samples(40)
    for got, want in zip(out, ref):
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))  # PNG is lossless
        assert (got.caption, got.label) == (want.caption, want.label)


def test_write_empty_creates_nothing(tmp_path):
    assert write_shards([], tmp_path / "empty") == []
    assert list((tmp_path / "empty").iterdir()) == []


def test_write_rejects_duplicate_and_dotted_keys(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards(_samples(2) + _samples(1), tmp_path / "dup")
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([ImageSample(key="a.b", image=_image(0))], tmp_path / "dot")


def test_plain_webdataset_reads_mmfm_shards(shards):
    url = str(shards[0].parent / "shard-{000000..000007}.tar")
    ds = wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "json")
    rows = list(ds)
    assert [k for k, _, _ in rows] == ALL_KEYS
    key, image, meta = rows[3]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(_image(3)))
    assert meta == {"caption": "caption 3", "label": 3}


def test_region_and_conversation_schemas(tmp_path):
    regions = [RegionSample(key=f"r{i}", image=_image(i, 16), caption="two boxes",
                            regions=[Region((0, 0, 4, 4), "a"), Region((2, 3, 9, 12.5), "b")]) for i in range(3)]
    convs = [ConversationSample(key=f"c{i}", images=[_image(i), _image(i + 9)],
                                messages=[Message("user", "<image><image> same?"), Message("assistant", "no")],
                                answers=["no"] * 10, category="relation") for i in range(3)]
    write_shards(regions, tmp_path / "r")
    write_shards(convs, tmp_path / "c", image_format="png")
    got_r = list(read_shards(tmp_path / "r", schema="regions"))
    assert [r.box for r in got_r[1].regions] == [(0.0, 0.0, 4.0, 4.0), (2.0, 3.0, 9.0, 12.5)]
    got_c = list(read_shards(tmp_path / "c", schema=ConversationSample))
    assert len(got_c[2].images) == 2 and got_c[2].messages[1].content == "no"
    assert np.array_equal(np.asarray(got_c[2].images[1]), np.asarray(_image(11)))
    auto = list(read_shards([tmp_path / "r", tmp_path / "c"], schema="auto"))
    assert sorted(type(s).__name__ for s in auto) == ["ConversationSample"] * 3 + ["RegionSample"] * 3


def test_url_forms(shards):
    d = shards[0].parent
    expected = [str(p) for p in shards]
    assert expand_urls(d) == expected
    assert expand_urls(str(d / "*.tar")) == expected
    assert expand_urls(str(d / "shard-{000000..000007}.tar")) == expected
    assert expand_urls([str(p) for p in reversed(shards)]) == expected
    with pytest.raises(FileNotFoundError, match="shard-000008.tar"):
        expand_urls(str(d / "shard-{000007..000008}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(str(d / "nothing-*.tar"))


def test_rank_and_worker_split_cover_everything_once(shards):
    seen = []
    for rank in range(2):
        for worker in range(2):
            ds = read_shards(shards, rank=rank, world_size=2, shuffle_buffer=4, seed=3)
            seen += [s.key for s in ds._iterate(worker, 2, tagged=False)]
    assert sorted(seen) == ALL_KEYS
    # The same through real DataLoader workers, per rank.
    loaded = []
    for rank in range(2):
        ds = read_shards(shards, rank=rank, world_size=2)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        loaded += [s.key for s in dl]
    assert sorted(loaded) == ALL_KEYS


def test_deterministic_shuffle_per_epoch(shards):
    a = read_shards(shards, shuffle_buffer=10, seed=1)
    b = read_shards(shards, shuffle_buffer=10, seed=1)
    e0 = _labels(a)
    assert e0 == _labels(b) and e0 != ALL_KEYS and sorted(e0) == ALL_KEYS
    a.set_epoch(1)
    e1 = _labels(a)
    assert e1 != e0 and sorted(e1) == ALL_KEYS
    assert _labels(read_shards(shards, shuffle_buffer=10, seed=1, epoch=1)) == e1
    assert _labels(read_shards(shards, shuffle_buffer=10, seed=2)) != e0


@pytest.mark.parametrize("decode_threads", [0, 3])
@pytest.mark.parametrize("k", [0, 1, 13, 39, 40])
def test_resume_num_workers_0(shards, k, decode_threads):
    # decoded ahead on threads, the position still counts what was delivered, not what was read ahead
    full = _labels(read_shards(shards, shuffle_buffer=8, seed=5, epoch=2))
    ds = read_shards(shards, shuffle_buffer=8, seed=5, epoch=2, decode_threads=decode_threads)
    it = iter(ds)
    first = [next(it).key for _ in range(k)]
    state = json.loads(json.dumps(ds.state_dict()))  # must survive a JSON round trip (checkpoint metadata)
    resumed = read_shards(shards, shuffle_buffer=8, seed=5, resume_from=state, decode_threads=decode_threads)
    assert resumed.epoch == 2
    rest = _labels(resumed)
    assert first + rest == full
    # After the resumed epoch, the next epoch starts from its beginning.
    resumed.set_epoch(3)
    assert sorted(_labels(resumed)) == ALL_KEYS


def _keys_of(items):
    return [s.key for s in items]


def _key_of(sample):
    return [sample.key]


def _read_keys(paths, batch_size, num_workers, shuffle_buffer, seed, state=None, stop_after=None):
    """Keys read through ``ShardDataset.loader`` (from ``state``), up to ``stop_after``; -> (keys, state)."""
    ds = read_shards(paths, shuffle_buffer=shuffle_buffer, seed=seed, resume_from=state)
    loader = ds.loader(batch_size=batch_size, num_workers=num_workers, collate_fn=_keys_of if batch_size else _key_of)
    got = []
    for batch in loader:
        got += batch
        if stop_after is not None and len(got) >= stop_after:
            break
    return got, loader.state_dict()


@pytest.mark.parametrize("batch_size,num_workers", [(3, 2), (None, 2), (2, 0)])
def test_resume_with_loader(shards, batch_size, num_workers):
    def run(state=None, stop_after=None):
        return _read_keys(shards, batch_size, num_workers, 4, 7, state, stop_after)

    full, _ = run()
    assert sorted(full) == ALL_KEYS
    part, state = run(stop_after=10)  # prefetching workers are further ahead; the state is not
    rest, _ = run(state=state)
    assert len(part) + len(rest) == 40
    assert sorted(part + rest) == ALL_KEYS  # no repeats, no losses
    assert part == full[:len(part)]  # the loader order is deterministic (in-order round robin)
    assert rest == full[len(part):]  # and the resumed loader continues it: the streams interleave as before

    with pytest.raises(ValueError, match="num_workers"):
        ds = read_shards(shards, shuffle_buffer=4, seed=7, resume_from=state)
        ds.loader(batch_size=3, num_workers=0 if num_workers == 2 else 2)
    with pytest.raises(ValueError, match="seed"):
        read_shards(shards, shuffle_buffer=4, seed=8, resume_from=state)


@pytest.mark.parametrize("num_workers", [2, 3])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_resumed_loader_keeps_the_order_with_uneven_streams(tmp_path, batch_size, num_workers):
    # 7 shards over 2 or 3 workers: streams of unequal length, so some end (and leave the round-robin) before
    # others; a resume at every point, also after a stream ended, continues in exactly the uninterrupted order
    paths = write_shards(_samples(35), tmp_path / "uneven", samples_per_shard=5)

    def run(state=None, stop_after=None):
        return _read_keys(paths, batch_size, num_workers, 3, 2, state, stop_after)

    full, _ = run()
    assert sorted(full) == ALL_KEYS[:35]
    for stop in (1, 4, 11, 24, 29, 33):
        part, state = run(stop_after=stop)
        rest, _ = run(state=state)
        assert part + rest == full, (stop, state["positions"], state["next_stream"])


def test_loader_epochs_with_workers(shards):
    ds = read_shards(shards, shuffle_buffer=6, seed=4)
    loader = ds.loader(batch_size=4, num_workers=2, collate_fn=lambda items: [s.key for s in items])
    e0 = [k for b in loader for k in b]
    ds.set_epoch(1)
    e1 = [k for b in loader for k in b]
    assert sorted(e0) == sorted(e1) == ALL_KEYS and e0 != e1
    ds.set_epoch(0)
    assert [k for b in loader for k in b] == e0
    with pytest.raises(ValueError, match="persistent_workers"):
        ds.loader(batch_size=4, num_workers=2, persistent_workers=True)


# --------------------------------------------------------------------------------------------- bad data


def _rewrite(path: Path, edit) -> None:
    """Rewrite a shard, passing each (name, bytes) member through ``edit`` (None drops it)."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            data = edit(name, data)
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_corrupt_image_missing_key_bad_json_are_skipped_and_counted(shards, caplog, decode_threads):
    def edit(name, data):
        if name == "s00006.png":
            return data[:40] + b"\x00" * 20  # truncated PNG stream
        if name == "s00012.png":
            return None  # missing image
        if name == "s00013.json":
            return b"{not json"
        return data

    _rewrite(shards[1], lambda n, d: edit(n, d))
    _rewrite(shards[2], lambda n, d: edit(n, d))
    ds = read_shards(shards, decode_threads=decode_threads)
    with caplog.at_level(logging.WARNING, logger="mmfm.data.shards"):
        keys = _labels(ds)
        _labels(ds)  # a second epoch: counted again, but not logged again
    assert keys == [k for k in ALL_KEYS if k not in ("s00006", "s00012", "s00013")]
    assert ds.skipped == {"corrupt_image": 2, "missing_key": 2, "bad_metadata": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert any("s00006" in m and "shard-000001.tar" in m and "corrupt_image" in m for m in messages)
    assert any("s00012" in m and "shard-000002.tar" in m and "missing" in m for m in messages)


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_skips_aggregate_over_workers(shards, decode_threads):
    _rewrite(shards[0], lambda n, d: None if n == "s00004.png" else d)  # last sample of shard 0
    _rewrite(shards[5], lambda n, d: b"garbage" if n == "s00025.png" else d)
    ds = read_shards(shards, decode_threads=decode_threads)
    loader = ds.loader(batch_size=4, num_workers=2)
    keys = [s.key for batch in loader for s in batch]
    assert sorted(keys) == [k for k in ALL_KEYS if k not in ("s00004", "s00025")]
    assert loader.skipped == {"missing_key": 1, "corrupt_image": 1}
    assert ds.skipped == {"missing_key": 1, "corrupt_image": 1}  # folded back at the end of the epoch


@pytest.mark.parametrize("member", [3, -1])
def test_truncated_tar_is_skipped(shards, member, caplog):
    with tarfile.open(shards[3]) as tf:
        cut = tf.getmembers()[member].offset_data + 7  # cut bytes off the end, inside a member's data
    shards[3].write_bytes(shards[3].read_bytes()[:cut])
    ds = read_shards(shards)
    with caplog.at_level(logging.WARNING, logger="mmfm.data.shards"):
        keys = _labels(ds)
    lost = [k for k in ALL_KEYS if k not in keys]
    assert keys == [k for k in ALL_KEYS if k not in lost]  # order kept, nothing invented
    assert 1 <= len(lost) <= 5 and all(15 <= int(k[1:]) < 20 for k in lost)  # only shard 3 loses samples
    assert ds.skipped == {"truncated": 1}
    assert any("shard-000003.tar" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_tar_cut_inside_first_header_is_truncated_not_fatal(shards):
    shards[0].write_bytes(shards[0].read_bytes()[:300])
    ds = read_shards(shards)
    assert _labels(ds) == ALL_KEYS[5:]
    assert ds.skipped == {"truncated": 1}


def test_unreadable_shard_is_an_error_naming_the_file(shards, tmp_path):
    shards[2].write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match="shard-000002.tar"):
        _labels(read_shards(shards))
    shards[2].unlink()
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        read_shards(shards)


def test_bad_arguments(shards):
    with pytest.raises(ValueError, match="schema"):
        read_shards(shards, schema="video")
    with pytest.raises(ValueError, match="rank"):
        read_shards(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        read_shards(shards, shuffle_buffer=-1)
    with pytest.raises(ValueError, match="decode_threads"):
        read_shards(shards, decode_threads=-1)
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(_samples(1), shards[0].parent / "x", samples_per_shard=0)


def test_transform_applied(shards):
    ds = read_shards(shards[:1], transform=lambda s: (s.key, s.label))
    assert list(ds) == [(f"s{i:05d}", i % 7) for i in range(5)]
