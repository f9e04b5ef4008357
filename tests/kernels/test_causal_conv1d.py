"""Causal depthwise conv1d: Triton kernels (CPU interpreter in CI) vs the fp32 reference and vs F.conv1d.

Tolerances: fp32 1e-5 relative to the max magnitude; bf16 2e-2.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Before mmfm's kernels are imported (triton.jit reads it): run the Triton kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmfm.kernels.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_reference,
    causal_conv1d_update,
    causal_conv1d_update_reference,
)

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(ref, got, rel):
    scale = max(ref.abs().max().item(), 1e-6)
    err = (ref.float() - got.float()).abs().max().item()
    assert err <= rel * scale + 1e-6, f"max err {err:.3e} > {rel:.1e} * {scale:.3e}"


def _inputs(b=2, d=20, L=37, w=4, dtype=torch.float32, init=False, seq=False, device=None, seed=0):
    device = device or DEVICE
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, L, generator=gen).to(device, dtype)
    weight = torch.randn(d, w, generator=gen).to(device, dtype)
    bias = torch.randn(d, generator=gen).to(device, dtype)
    i0 = torch.randn(b, d, w - 1, generator=gen).to(device, dtype) if init else None
    sid = None
    if seq:
        sid = torch.zeros(b, L, dtype=torch.int64)
        sid[:, L // 3 :] = 1
        sid[-1, L // 5 :] = 2
        sid = sid.to(device)
    return x, weight, bias, i0, sid


def test_reference_matches_torch_conv1d():
    x, w, bias, _, _ = _inputs()
    ref = causal_conv1d_reference(x, w, bias, "silu")
    expect = F.silu(F.conv1d(x, w[:, None, :], bias, padding=w.shape[1] - 1, groups=x.shape[1])[..., : x.shape[-1]])
    _close(expect, ref, 1e-6)


@pytest.mark.parametrize("L", [1, 7, 37, 130])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("mode", ["plain", "init", "seq"])
def test_triton_matches_reference_fwd_bwd(L, activation, mode):
    x, w, bias, i0, sid = _inputs(L=L, init=mode == "init", seq=mode == "seq")
    leaves0 = [t.clone().requires_grad_(True) for t in (x, w, bias) + ((i0,) if i0 is not None else ())]
    leaves1 = [t.clone().requires_grad_(True) for t in (x, w, bias) + ((i0,) if i0 is not None else ())]
    init0 = leaves0[3] if i0 is not None else None
    init1 = leaves1[3] if i0 is not None else None
    o0, f0 = causal_conv1d_reference(*leaves0[:3], activation, init0, True, sid)
    o1, f1 = causal_conv1d(*leaves1[:3], activation, init1, True, sid, backend="triton")
    _close(o0, o1, 1e-5)
    _close(f0, f1, 0.0)
    g = torch.randn_like(o0)
    for a, b in zip(torch.autograd.grad((o0 * g).sum(), leaves0), torch.autograd.grad((o1 * g).sum(), leaves1)):
        _close(a, b, 1e-5)


def test_bf16_and_non_contiguous():
    x, w, bias, _, _ = _inputs(L=50, dtype=torch.bfloat16)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, D, L) view of a (B, L, D) buffer
    assert not x_nc.is_contiguous()
    ref = causal_conv1d_reference(x.float(), w.float(), bias.float(), "silu")
    got = causal_conv1d(x_nc, w, bias, "silu", backend="triton")
    assert got.dtype == torch.bfloat16
    _close(ref, got, 2e-2)


@pytest.mark.parametrize("state_len", [3, 4, 6])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_update_step_by_step_equals_full_conv(state_len, backend):
    x, w, bias, _, _ = _inputs(L=11)
    full = causal_conv1d_reference(x, w, bias, "silu")
    state = torch.zeros(x.shape[0], x.shape[1], state_len, device=x.device)
    outs = [causal_conv1d_update(x[:, :, t], state, w, bias, "silu", backend=backend) for t in range(11)]
    _close(full, torch.stack(outs, dim=-1), 1e-5)
    _close(x[:, :, -state_len:], state, 0.0)  # newest inputs at the end of the rolling state
    # several tokens at once (B, D, T), continuing from a prefill's final states
    state = torch.zeros(x.shape[0], x.shape[1], state_len, device=x.device)
    head = causal_conv1d_update(x[:, :, :6], state, w, bias, "silu", backend=backend)
    tail = causal_conv1d_update(x[:, :, 6:], state, w, bias, "silu", backend=backend)
    _close(full, torch.cat([head, tail], dim=-1), 1e-5)


def test_prefill_final_states_continue_decoding():
    x, w, bias, _, _ = _inputs(L=12)
    full = causal_conv1d(x, w, bias, "silu", backend="triton")
    _, final = causal_conv1d(x[:, :, :8], w, bias, "silu", return_final_states=True, backend="triton")
    state = final.clone()
    steps = [causal_conv1d_update(x[:, :, t], state, w, bias, "silu", backend="triton") for t in range(8, 12)]
    _close(full[:, :, 8:], torch.stack(steps, dim=-1), 1e-5)
    ref_state = torch.zeros_like(state)
    ref_steps = [causal_conv1d_update_reference(x[:, :, t], ref_state, w, bias, "silu") for t in range(12)]
    _close(full, torch.stack(ref_steps, -1), 1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"x": torch.zeros(2, 3)}, "x must have 3 dimensions"),
        ({"weight": torch.zeros(5, 4)}, "weight has shape"),
        ({"bias": torch.zeros(2)}, "bias has shape"),
        ({"initial_states": torch.zeros(2, 3, 2)}, "initial_states has shape"),
        ({"activation": "relu"}, "activation"),
        ({"seq_idx": torch.zeros(2, 9)}, "seq_idx must be an integer"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = {"x": torch.zeros(2, 3, 9), "weight": torch.zeros(3, 4)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**args)


def test_update_bad_state_raises():
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(torch.zeros(2, 3), torch.zeros(2, 3, 2), torch.zeros(3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("L,d,w", [(1, 64, 4), (513, 300, 4), (4096, 1024, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["plain", "init", "seq"])
def test_gpu_grid(L, d, w, dtype, mode):
    x, wt, bias, i0, sid = _inputs(b=2, d=d, L=L, w=w, dtype=dtype, init=mode == "init", seq=mode == "seq",
                                   device="cuda")  # fmt: skip
    leaves0 = [t.float().clone().requires_grad_(True) for t in (x, wt, bias)]
    leaves1 = [t.clone().requires_grad_(True) for t in (x, wt, bias)]
    o0 = causal_conv1d_reference(*leaves0, "silu", i0.float() if i0 is not None else None, seq_idx=sid)
    o1 = causal_conv1d(*leaves1, "silu", i0, seq_idx=sid, backend="triton")
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    _close(o0, o1, rel)
    g = torch.randn_like(o0)
    for a, b in zip(torch.autograd.grad((o0 * g).sum(), leaves0), torch.autograd.grad((o1.float() * g).sum(), leaves1)):
        _close(a, b, rel * 5)
