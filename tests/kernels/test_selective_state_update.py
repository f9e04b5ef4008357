"""selective_state_update: Triton kernel (CPU interpreter / GPU) vs reference, and against the full scan.

Tolerances: fp32 atol=rtol=1e-5 for one step (same fp32 math, different summation order); bf16
state/inputs: the kernel and the reference see the same bf16 values and round the new state and the
output to bf16 once each, so atol=rtol=1e-2. Step by step vs the full scan: fp32, atol=rtol=1e-4.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmfm.kernels._dispatch import triton_mode

ss = importlib.import_module("mmfm.kernels.selective_scan")
ssu = importlib.import_module("mmfm.kernels.selective_state_update")

STEP_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=1e-2, rtol=1e-2)
SCAN_TOL = dict(atol=1e-4, rtol=1e-4)


KERNELS = ((ssu, "_state_update_kernel"), (ss, "_selective_scan_fwd_kernel"))


@pytest.fixture(scope="class")
def interpreter():
    with triton_mode(True, *KERNELS):
        yield


@pytest.fixture(scope="class")
def native_triton():
    with triton_mode(False, *KERNELS):
        yield


def heads_inputs(
    batch=2, heads=4, dim=3, dstate=5, groups=2, dtype=torch.float32, device="cpu", extras=True, seed=0
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    # Mamba-2 style: one A per head, broadcast over (P, N) with zero strides
    A = (-torch.rand(heads, generator=g) - 0.1).to(device)[:, None, None].expand(heads, dim, dstate)
    return dict(
        state=rnd(batch, heads, dim, dstate),
        x=rnd(batch, heads, dim),
        dt=rnd(batch, heads, dim),
        A=A,
        B=rnd(batch, groups, dstate),
        C=rnd(batch, groups, dstate),
        D=rnd(heads, dim) if extras else None,
        z=rnd(batch, heads, dim) if extras else None,
        dt_bias=rnd(heads, dim) if extras else None,
    )


def flat_inputs(batch=2, chan=8, dstate=4, groups=None, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    bc_shape = (batch, dstate) if groups is None else (batch, groups, dstate)
    return dict(
        state=rnd(batch, chan, dstate),
        x=rnd(batch, chan),
        dt=rnd(batch, chan),
        A=(-torch.rand(chan, dstate, generator=g) - 0.1).to(device),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(chan),
        z=rnd(batch, chan),
        dt_bias=rnd(chan),
    )


def check_against_ref(inputs, tol, softplus=True):
    a = {k: (v.clone() if k == "state" else v) for k, v in inputs.items()}
    b = {k: (v.clone() if k == "state" else v) for k, v in inputs.items()}
    out = ssu.selective_state_update(**a, dt_softplus=softplus, backend="triton")
    ref = ssu.selective_state_update_ref(**b, dt_softplus=softplus)
    assert out.shape == inputs["x"].shape and out.dtype == inputs["x"].dtype
    assert a["state"].dtype == inputs["state"].dtype
    assert not torch.equal(a["state"], inputs["state"])  # updated in place
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(a["state"].float(), b["state"].float(), **tol)


@pytest.mark.usefixtures("interpreter")
class TestTritonInterpreter:
    @pytest.mark.parametrize("extras", [True, False])
    @pytest.mark.parametrize("groups", [1, 2, 4])
    def test_heads_layout(self, groups, extras):
        check_against_ref(heads_inputs(groups=groups, extras=extras), STEP_TOL, softplus=extras)

    @pytest.mark.parametrize("groups", [None, 2])
    def test_flat_layout(self, groups):
        check_against_ref(flat_inputs(groups=groups), STEP_TOL)

    def test_bf16(self):
        check_against_ref(heads_inputs(dtype=torch.bfloat16), BF16_TOL)

    def test_non_contiguous_state_updated_in_place(self):
        x = flat_inputs()
        buf = torch.randn(2, 4, 8 * 2)  # (batch, N, 2D): the state is every other channel, transposed
        state = buf.transpose(1, 2)[:, ::2]
        state.copy_(x["state"])
        x["state"] = state
        ref_state = state.clone()
        out = ssu.selective_state_update(**x, backend="triton")
        ref = ssu.selective_state_update_ref(**{**x, "state": ref_state})
        torch.testing.assert_close(out, ref, **STEP_TOL)
        torch.testing.assert_close(buf.transpose(1, 2)[:, ::2], ref_state, **STEP_TOL)

    @pytest.mark.parametrize("groups", [None, 2])
    def test_steps_equal_full_scan(self, groups):
        check_steps_equal_scan(groups, device="cpu")


def check_steps_equal_scan(groups, device, dim=8, dstate=4, seqlen=9):
    """Decoding token by token from a zero state reproduces the scan's outputs and last state."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    u, delta, z = rnd(2, dim, seqlen), rnd(2, dim, seqlen), rnd(2, dim, seqlen)
    A = (-torch.rand(dim, dstate, generator=g) - 0.1).to(device)
    bc = (2, dstate, seqlen) if groups is None else (2, groups, dstate, seqlen)
    B, C, D, bias = rnd(*bc), rnd(*bc), rnd(dim), rnd(dim)
    full, last = ss.selective_scan(
        u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True, backend="triton"
    )
    state = torch.zeros(2, dim, dstate, device=device)
    for t in range(seqlen):
        y = ssu.selective_state_update(
            state,
            u[..., t],
            delta[..., t],
            A,
            B[..., t],
            C[..., t],
            D,
            z[..., t],
            bias,
            True,
            backend="triton",
        )
        torch.testing.assert_close(y, full[..., t], **SCAN_TOL)
    torch.testing.assert_close(state, last, **SCAN_TOL)


def test_heads_layout_equals_grouped_flat_layout():
    """Mamba-2 heads (H, P) and Mamba-1 channels D = H * P with G groups are the same op."""
    x = heads_inputs(extras=True)
    batch, heads, dim, dstate = x["state"].shape
    flat = dict(
        state=x["state"].reshape(batch, heads * dim, dstate).clone(),
        x=x["x"].reshape(batch, -1),
        dt=x["dt"].reshape(batch, -1),
        A=x["A"].reshape(heads * dim, dstate),
        B=x["B"],
        C=x["C"],
        D=x["D"].reshape(-1),
        z=x["z"].reshape(batch, -1),
        dt_bias=x["dt_bias"].reshape(-1),
    )
    out_h = ssu.selective_state_update(**x, dt_softplus=True, backend="reference")
    out_f = ssu.selective_state_update(**flat, dt_softplus=True, backend="reference")
    torch.testing.assert_close(out_f.reshape(batch, heads, dim), out_h, **STEP_TOL)
    torch.testing.assert_close(flat["state"].reshape(x["state"].shape), x["state"], **STEP_TOL)


def test_reference_one_step_by_hand():
    x = flat_inputs(batch=1, chan=2, dstate=3)
    s0 = x["state"].clone()
    out = ssu.selective_state_update(**x, backend="reference")
    dt = x["dt"][0] + x["dt_bias"]
    s1 = torch.exp(dt[:, None] * x["A"]) * s0[0] + (dt * x["x"][0])[:, None] * x["B"][0][None]
    y = (s1 * x["C"][0][None]).sum(-1) + x["D"] * x["x"][0]
    y = y * torch.nn.functional.silu(x["z"][0])
    torch.testing.assert_close(x["state"][0], s1)
    torch.testing.assert_close(out[0], y)


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("state", torch.zeros(2, 8), r"state must have 3 or 4 dimensions, got shape \(2, 8\)"),
        ("x", torch.zeros(2, 7), r"x has shape \(2, 7\), expected \(2, 8\)"),
        ("dt", torch.zeros(3, 8), r"dt has shape \(3, 8\), expected \(2, 8\)"),
        ("A", torch.zeros(8, 5), r"A has shape \(8, 5\), expected \(8, 4\)"),
        ("B", torch.zeros(2, 3, 4), r"groups"),
        ("C", torch.zeros(2, 5), r"C has shape \(2, 5\), expected \(2, 4\)"),
        ("D", torch.zeros(8, 1), r"D has shape \(8, 1\), expected \(8,\)"),
        ("z", torch.zeros(2, 8, 1), r"z has shape \(2, 8, 1\), expected \(2, 8\)"),
        ("dt_bias", torch.zeros(7), r"dt_bias has shape \(7,\), expected \(8,\)"),
        ("x", torch.zeros(2, 8, dtype=torch.int64), r"x has dtype int64"),
        ("A", None, r"A must be a torch.Tensor, got NoneType"),
    ],
)
def test_bad_input_names_the_argument(name, bad, match):
    x = flat_inputs()
    x[name] = bad
    with pytest.raises(ValueError, match=match):
        ssu.selective_state_update(**x)


def test_bad_heads_input():
    x = heads_inputs()
    x["B"] = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"G=3 groups must divide H=4"):
        ssu.selective_state_update(**x)
    x = heads_inputs()
    x["D"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"D has shape \(4,\), expected \(4, 3\)"):
        ssu.selective_state_update(**x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("native_triton")
class TestGPU:
    @pytest.mark.parametrize("dstate", [16, 64, 128])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_nemotron_like_heads(self, dstate, dtype):
        tol = BF16_TOL if dtype == torch.bfloat16 else STEP_TOL
        check_against_ref(heads_inputs(4, 32, 64, dstate, 8, dtype=dtype, device="cuda"), tol)

    @pytest.mark.parametrize("dstate", [16, 64])
    def test_flat(self, dstate):
        check_against_ref(flat_inputs(4, 512, dstate, device="cuda"), STEP_TOL)

    @pytest.mark.parametrize("groups", [None, 2])
    def test_steps_equal_full_scan(self, groups):
        check_steps_equal_scan(groups, device="cuda", dim=64, dstate=16, seqlen=40)
