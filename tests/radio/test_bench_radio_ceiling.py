"""scripts/bench_radio_ceiling.py: the captured ops of one RADIO step and their kernel-time ceiling (CPU, tiny)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def test_tiny_point_matches_count_step_flops(load_script, tmp_path):
    ceiling = load_script("bench_radio_ceiling")
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--tiny", "--points", "low", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    flops = row["flops"]
    # same registry, same shapes: the per-op counts are integers and must agree exactly (teachers per teacher,
    # student forward + backward), batch-scaled one-image count vs the whole batch
    assert flops["captured_total"] == flops["counted_total"] > 0
    assert flops["captured"] == flops["counted"]
    assert row["notes"] == []
    sigs = row["signatures"]
    assert {s["group"] for s in sigs} >= {"teacher", "student"}
    # autograd's backward ops reach the dispatch mode (weight / input gradient GEMMs)
    assert any(s["group"] == "student" and s["kind"] in ("gemm", "attn_bwd")
               and any(k.endswith("/backward") for k in s["calls"]) for s in sigs)
    for s in sigs:
        assert s["count"] >= 1 and s["count"] == sum(s["calls"].values())
        assert s["error"] is None
        assert math.isfinite(s["ms_per_call"]) and s["ms_per_call"] > 0
    total = next(r for r in row["table"] if r["group"] == "step")
    assert total["kernel_ms"] == pytest.approx(sum(s["ms_total"] for s in sigs), rel=1e-12)  # summation order
    assert math.isfinite(row["ceiling_mfu"]) and row["ceiling_mfu"] > 0


def test_capture_dedups_and_counts_like_flop_counter(load_script):
    ceiling = load_script("bench_radio_ceiling")
    lin, conv = torch.nn.Linear(16, 32), torch.nn.Conv2d(3, 8, 3)
    x, img = torch.randn(4, 5, 16), torch.randn(2, 3, 9, 9)

    def step():
        y = lin(x) + lin(x)  # the same addmm twice: one signature, two calls
        z = conv(img)
        w = torch.bmm(y, y.transpose(1, 2))  # a transposed (strided) argument
        (y.sum() + z.sum() + w.sum()).backward()

    with FlopCounterMode(display=False) as fc:
        step()
    cap = ceiling.OpCapture("student")
    with cap, cap.scope("student", "forward"):
        step()
    assert cap.flops() == fc.get_total_flops()
    addmm = [s for s in cap.signatures.values() if s.func is torch.ops.aten.addmm.default]
    assert len(addmm) == 1 and addmm[0].n == 2
    assert {s.kind for s in cap.signatures.values()} == {"gemm", "conv"}
    for s in cap.signatures.values():  # the kept arguments replay the op
        assert ceiling.replay(s, iters=1, warmup=0) > 0


def test_stashed_keeps_strides_and_overlap(load_script):
    ceiling = load_script("bench_radio_ceiling")
    base = torch.randn(4, 6)
    for t in (base.t(), base[:, 1:5:2], torch.randn(3, 1).expand(3, 5), F.pad(base, (1, 1))[1:3]):
        kept = ceiling.Stashed.of(t, torch.device("cpu"))
        r = kept.materialise()
        assert r.shape == t.shape and r.stride() == t.stride()
        assert torch.equal(r, t)
        assert r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
