"""mmfm.checkpoint: atomic writes, crash safety, weights_only loading, tied weights, keep-last-k, RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import mmfm.checkpoint as ckpt_mod
from mmfm.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_safetensors,
    load_torch_state,
    restore_rng_state,
    save_checkpoint,
    save_safetensors,
)


def _draws() -> tuple:
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist())


def test_rng_round_trip_through_disk(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied, as in LMs


def test_tied_weights_saved_once_and_restored(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    save_safetensors(model.state_dict(), tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["emb.weight"]  # the alias is not duplicated on disk
    sd = load_safetensors(tmp_path / "m.safetensors")
    assert set(sd) == {"emb.weight", "head.weight"}
    fresh = Tied()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.head.weight, model.emb.weight)
    assert fresh.head.weight is fresh.emb.weight
    # overlapping (non-identical) views of one storage are copied rather than rejected
    base = torch.arange(12.0)
    save_safetensors({"a": base[:6], "b": base[3:9].view(2, 3)}, tmp_path / "v.safetensors")
    v = load_safetensors(tmp_path / "v.safetensors")
    assert v["a"].tolist() == base[:6].tolist() and v["b"].flatten().tolist() == base[3:9].tolist()


def _save(tmp_path, step, value, **kw):
    return save_checkpoint(
        tmp_path,
        step,
        tensors={"model": {"w": torch.full((4,), float(value))}},
        state={"step": step, "opt": {"m": torch.ones(2) * value}},
        **kw,
    )


def test_save_load_and_latest(tmp_path):
    p1 = _save(tmp_path, 1, 1.0)
    p2 = _save(tmp_path, 2, 2.0, metadata={"note": "hi"})
    assert p1.name == "step_00000001" and find_latest(tmp_path) == p2
    assert (tmp_path / "latest").read_text().strip() == p2.name
    ck = load_checkpoint(tmp_path)
    assert ck.step == 2 and ck.meta["metadata"] == {"note": "hi"}
    assert torch.equal(ck.tensors["model"]["w"], torch.full((4,), 2.0))
    assert torch.equal(ck.state["opt"]["m"], torch.full((2,), 2.0))
    assert load_checkpoint(p1).step == 1
    # a stale `latest` pointer (its target deleted) falls back to scanning
    (tmp_path / "latest").write_text("step_00000009\n")
    assert find_latest(tmp_path) == p2
    # re-saving an existing step replaces it atomically
    _save(tmp_path, 2, 5.0)
    assert torch.equal(load_checkpoint(tmp_path).tensors["model"]["w"], torch.full((4,), 5.0))


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after the rank file, while writing train_state.pt: half a file, then death
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt("simulated kill")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 2.0)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    assert (tmp_path / ".tmp-step_00000002").is_dir()  # the torn write stayed in its temp dir
    assert not (tmp_path / "step_00000002").exists()
    assert find_latest(tmp_path).name == "step_00000001"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and torch.equal(ck.tensors["model"]["w"], torch.ones(4))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / ".tmp-step_00000002")
    _save(tmp_path, 2, 2.0)  # the next save clears the debris
    assert not (tmp_path / ".tmp-step_00000002").exists()
    assert load_checkpoint(tmp_path).step == 2


class _Evil:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MMFM_PWNED'], 'w').write('x')",))


def test_weights_only_loading_never_runs_code(tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    monkeypatch.setenv("MMFM_PWNED", str(flag))
    torch.save({"obj": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_torch_state(tmp_path / "evil.pt")
    assert not flag.exists()

    # the same inside a checkpoint: planted train_state.pt with a consistent meta.json
    p = _save(tmp_path / "ck", 1, 1.0)
    torch.save({"obj": _Evil()}, p / "train_state.pt")
    meta = json.loads((p / "meta.json").read_text())
    meta["files"]["train_state.pt"] = (p / "train_state.pt").stat().st_size
    (p / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_checkpoint(p)
    assert not flag.exists()


def test_corrupt_and_missing_files_are_named(tmp_path):
    p = _save(tmp_path, 1, 1.0)
    model_file = p / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_checkpoint(p)
    # same size but garbage content -> the parser error is reported with the file name
    model_file.write_bytes(b"\xff" * len(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(p)
    model_file.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(p)
    (p / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "elsewhere")


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step * 10, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50]
    assert find_latest(tmp_path).name == "step_00000050"
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 60, 6.0, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        _save(tmp_path, -1, 6.0)
