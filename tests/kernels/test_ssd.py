"""SSD chunk scan (Mamba-2): Triton kernels (CPU interpreter in CI) vs the sequential fp32 reference.

Tolerances: fp32 outputs/grads atol 1e-4 + rtol 1e-4 (relative to the largest reference magnitude);
bf16 inputs 3e-2 of the max magnitude (the kernels round the intra-chunk operands to bf16 like mamba-ssm).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before mmfm's kernels are imported (triton.jit reads it): run the Triton kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmfm.kernels.ssd import ssd_chunk_scan, ssd_chunked_reference, ssd_reference

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(b=2, L=33, h=2, p=4, g=1, n=8, dtype=torch.float32, seq=False, init=False, D_hp=False,
                z=True, device=None, seed=0):  # fmt: skip
    device = device or DEVICE
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    inp = {
        "x": r(b, L, h, p).to(dtype),
        "dt": r(b, L, h, scale=0.5).to(dtype),
        "A": -(torch.rand(h, generator=gen) + 0.5).to(device),
        "B": r(b, L, g, n, scale=0.5).to(dtype),
        "C": r(b, L, g, n, scale=0.5).to(dtype),
        "D": r(h, p) if D_hp else r(h),
        "z": r(b, L, h, p).to(dtype) if z else None,
        "dt_bias": r(h, scale=0.5),
        "initial_states": r(b, h, p, n) if init else None,
        "seq_idx": None,
    }
    if seq:
        sid = torch.zeros(b, L, dtype=torch.int64)
        sid[:, L // 3 :] = 1
        sid[:, (2 * L) // 3 :] = 2
        if b > 1:
            sid[1, L // 5 :] = 3  # a different packing in the second row
        inp["seq_idx"] = sid.to(device)
    return inp


def _close(ref, got, rel):
    scale = max(ref.abs().max().item(), 1e-6)
    err = (ref.float() - got.float()).abs().max().item()
    assert err <= rel * scale + 1e-5, f"max err {err:.3e} > {rel:.1e} * {scale:.3e}"


def _run_and_grads(fn, inp, gy, gs, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()
              if v is not None and v.dtype.is_floating_point}  # fmt: skip
    y, s = fn(**{**inp, **leaves}, dt_softplus=True, return_final_states=True, **kw)
    loss = (y.float() * gy).sum() + (s.float() * gs).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, s, dict(zip(leaves, grads))


CASES = [
    # (L, chunk, g, seq, init)
    (1, 8, 1, False, False),
    (7, 8, 1, False, True),
    (33, 8, 2, False, True),  # L not a multiple of chunk, G > 1
    (64, 16, 1, True, False),  # packed sequences
    (33, 16, 2, True, True),
]


@pytest.mark.parametrize("L,chunk,g,seq,init", CASES)
def test_triton_matches_reference_fp32(L, chunk, g, seq, init):
    inp = make_inputs(L=L, g=g, h=2 * g, seq=seq, init=init, D_hp=(L == 33))
    gen = torch.Generator().manual_seed(1)
    b, _, h, p = inp["x"].shape
    gy = torch.randn(inp["x"].shape, generator=gen).to(DEVICE)
    gs = torch.randn(b, h, p, inp["B"].shape[-1], generator=gen).to(DEVICE)
    y0, s0, g0 = _run_and_grads(ssd_reference, inp, gy, gs)
    y1, s1, g1 = _run_and_grads(ssd_chunk_scan, inp, gy, gs, chunk_size=chunk, backend="triton")
    _close(y0, y1, 1e-4)
    _close(s0, s1, 1e-4)
    for k in g0:
        _close(g0[k], g1[k], 1e-4)


@pytest.mark.parametrize("seq", [False, True])
def test_blocks_smaller_than_the_tiles(monkeypatch, seq):
    """The blocked kernels (several position / channel / state blocks per chunk, C B^T and its gradient
    written in blocks of other sizes than the kernels reading them use, a chunk that is not a power of two,
    a head dimension of two blocks) equal the reference: outputs, final state and every gradient."""
    import mmfm.kernels.ssd as ssd

    fwd = {"state": {"BP": 16, "BN": 16, "num_warps": 4, "num_stages": 1},
           "cb": {"BM": 16, "BS": 32, "BKN": 16, "num_warps": 4, "num_stages": 1},
           "scan": {"BM": 32, "BP": 16, "BK": 16, "BKN": 16, "num_warps": 4, "num_stages": 1}}
    bwd = {"dstate": {"BP": 16, "BN": 16, "num_warps": 4, "num_stages": 1},
           "dx": {"BS": 16, "BP": 16, "BL": 32, "BN": 16, "num_warps": 4, "num_stages": 1},
           "dcb": {"BM": 32, "BS": 16, "BP": 16, "num_warps": 4, "num_stages": 1},
           "dbc": {"BM": 16, "BN": 16, "BP": 16, "BK": 32, "num_warps": 4, "num_stages": 1}}
    monkeypatch.setattr(ssd, "FWD_BLOCKS", fwd)
    monkeypatch.setattr(ssd, "BWD_BLOCKS", bwd)
    inp = make_inputs(b=2, L=100, h=4, p=32, g=2, n=32, seq=seq, init=True)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(inp["x"].shape, generator=gen).to(DEVICE)
    gs = torch.randn(2, 4, 32, 32, generator=gen).to(DEVICE)
    y0, s0, g0 = _run_and_grads(ssd_reference, inp, gy, gs)
    y1, s1, g1 = _run_and_grads(ssd_chunk_scan, inp, gy, gs, chunk_size=48, backend="triton")
    _close(y0, y1, 1e-4)
    _close(s0, s1, 1e-4)
    for k in g0:
        _close(g0[k], g1[k], 1e-4)


def test_triton_bf16_close_to_fp32_reference():
    inp = make_inputs(L=33, g=2, h=4, p=8, n=16, dtype=torch.bfloat16, init=True)
    gen = torch.Generator().manual_seed(2)
    b, _, h, p = inp["x"].shape
    gy = torch.randn(inp["x"].shape, generator=gen).to(DEVICE)
    gs = torch.randn(b, h, p, 16, generator=gen).to(DEVICE)
    y0, s0, g0 = _run_and_grads(ssd_reference, inp, gy, gs)
    y1, s1, g1 = _run_and_grads(ssd_chunk_scan, inp, gy, gs, chunk_size=16, backend="triton")
    assert y1.dtype == torch.bfloat16
    _close(y0, y1, 3e-2)
    _close(s0, s1, 3e-2)
    for k in g0:
        _close(g0[k], g1[k], 3e-2)


def test_chunked_reference_matches_sequential():
    inp = make_inputs(L=45, g=2, h=4, seq=True, init=True, D_hp=True)
    y0, s0 = ssd_reference(**inp, dt_softplus=True, dt_limit=(0.05, 2.0), return_final_states=True)
    y1, s1 = ssd_chunked_reference(**inp, chunk_size=16, dt_softplus=True, dt_limit=(0.05, 2.0),
                                   return_final_states=True)  # fmt: skip
    _close(y0, y1, 1e-5)
    _close(s0, s1, 1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_halves_with_state_handover_equal_one_pass(backend):
    inp = make_inputs(L=40, g=1, h=2, z=False)
    full, s_full = ssd_chunk_scan(**inp, chunk_size=8, dt_softplus=True, return_final_states=True,
                                  backend=backend)  # fmt: skip
    first = {k: (v[:, :17] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    second = {k: (v[:, 17:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, s1 = ssd_chunk_scan(**first, chunk_size=8, dt_softplus=True, return_final_states=True, backend=backend)
    second["initial_states"] = s1
    y2, s2 = ssd_chunk_scan(**second, chunk_size=8, dt_softplus=True, return_final_states=True, backend=backend)
    _close(full, torch.cat([y1, y2], dim=1), 1e-5)
    _close(s_full, s2, 1e-5)


def test_packed_equals_separate_sequences():
    inp = make_inputs(b=1, L=30, g=1, h=2, z=False)
    sid = torch.zeros(1, 30, dtype=torch.int64)
    sid[:, 11:] = 1
    sid = sid.to(DEVICE)
    packed = ssd_chunk_scan(**{**inp, "seq_idx": sid}, chunk_size=8, dt_softplus=True, backend="triton")
    parts = []
    for lo, hi in ((0, 11), (11, 30)):
        part = {k: (v[:, lo:hi] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        parts.append(ssd_chunk_scan(**part, chunk_size=8, dt_softplus=True, backend="triton"))
    _close(torch.cat(parts, dim=1), packed, 1e-5)


def test_non_contiguous_inputs():
    inp = make_inputs(L=20, g=2, h=4, z=False)
    x_nc = inp["x"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, permuted strides
    assert not x_nc.is_contiguous()
    ref = ssd_reference(**inp, dt_softplus=True)
    got = ssd_chunk_scan(**{**inp, "x": x_nc}, chunk_size=8, dt_softplus=True, backend="triton")
    _close(ref, got, 1e-4)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"x": torch.zeros(2, 5, 2)}, "x must have 4 dimensions"),
        ({"dt": torch.zeros(2, 5, 3)}, "dt has shape"),
        ({"A": torch.zeros(3)}, "A has shape"),
        ({"B": torch.zeros(2, 5, 3, 4), "C": torch.zeros(2, 5, 3, 4)}, "divisible"),
        ({"C": torch.zeros(2, 5, 1, 5)}, "C has shape"),
        ({"D": torch.zeros(3)}, "D has shape"),
        ({"initial_states": torch.zeros(2, 2, 4, 5)}, "initial_states has shape"),
        ({"seq_idx": torch.zeros(2, 5)}, "seq_idx must be an integer"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"x": torch.zeros(2, 5, 2, 4, dtype=torch.int32)}, "x has dtype"),
    ],
)
def test_bad_input_raises_value_error(override, match):
    args = {"x": torch.zeros(2, 5, 2, 4), "dt": torch.zeros(2, 5, 2), "A": torch.zeros(2),
            "B": torch.zeros(2, 5, 1, 4), "C": torch.zeros(2, 5, 1, 4), "chunk_size": 4}  # fmt: skip
    args.update(override)
    with pytest.raises(ValueError, match=match):
        ssd_chunk_scan(**args)


# ------------------------------------------------------------------------------------------------
# Full grid on a GPU: `pytest -m gpu tests/kernels/test_ssd.py`
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "n,L,chunk,g,seq,dtype",
    [
        (16, 300, 64, 2, True, torch.float32),
        (16, 300, 64, 2, True, torch.bfloat16),
        (64, 300, 64, 2, True, torch.bfloat16),
        (128, 300, 64, 2, True, torch.bfloat16),
        (128, 77, 128, 1, False, torch.bfloat16),  # the Nemotron-H chunk, L < chunk
    ],
)
def test_gpu_grid(n, L, chunk, g, seq, dtype):
    inp = make_inputs(b=2, L=L, h=2 * g, p=64, g=g, n=n, dtype=dtype, seq=seq, init=True, device="cuda")
    gy = torch.randn(inp["x"].shape, device="cuda")
    gs = torch.randn(2, 2 * g, 64, n, device="cuda")
    y0, s0, g0 = _run_and_grads(ssd_chunked_reference, inp, gy, gs, chunk_size=chunk)
    y1, s1, g1 = _run_and_grads(ssd_chunk_scan, inp, gy, gs, chunk_size=chunk, backend="triton")
    rel = 1e-3 if dtype == torch.float32 else 4e-2
    _close(y0, y1, rel)
    _close(s0, s1, rel)
    for k in g0:
        _close(g0[k], g1[k], rel)
