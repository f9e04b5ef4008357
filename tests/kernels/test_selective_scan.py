"""Selective scan (Mamba-1): Triton kernels (CPU interpreter here, native on a GPU) against the reference.

Tolerances: fp32 inputs, outputs and every gradient within atol=rtol=1e-4 of the fp32 reference
(both accumulate in fp32, only the order of operations differs). bf16 inputs: compared with the
reference run on the same bf16 values upcast to fp32; the kernel's outputs/gradients are rounded to
bf16 (relative step 2**-8), so atol=rtol=2e-2. The reference itself is checked against an
independent closed form (the materialized (L, L) convolution kernel of the SSM) in float64.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmfm.kernels._dispatch import triton_mode

ss = importlib.import_module("mmfm.kernels.selective_scan")

FP32_TOL = dict(atol=1e-4, rtol=1e-4)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="class")
def interpreter():
    with triton_mode(True, (ss, "_selective_scan_fwd_kernel")):
        yield


def make_inputs(
    batch=2, dim=8, seqlen=7, dstate=4, *, b_layout="var", c_layout="var", groups=1, has_d=True, has_z=True,
    has_bias=True, dtype=torch.float32, device="cpu", seed=0,
):  # fmt: skip
    """Random inputs in mamba-ssm's layouts. b_layout/c_layout: "var" (batch, N, L), "group" (batch, G, N, L),
    "const" (D, N)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def bc(layout):
        if layout == "var":
            return rnd(batch, dstate, seqlen)
        if layout == "group":
            return rnd(batch, groups, dstate, seqlen)
        return rnd(dim, dstate)

    return dict(
        u=rnd(batch, dim, seqlen),
        # positive even without softplus: exp(delta * A) <= 1 keeps long sequences from blowing up
        delta=(torch.rand(batch, dim, seqlen, generator=g) * 0.5 + 0.01).to(device=device, dtype=dtype),
        A=(-torch.rand(dim, dstate, generator=g) * 2 - 0.2).to(device=device, dtype=torch.float32),
        B=bc(b_layout),
        C=bc(c_layout),
        D=rnd(dim) if has_d else None,
        z=rnd(batch, dim, seqlen) if has_z else None,
        delta_bias=rnd(dim, scale=0.3) if has_bias else None,
    )


def run_with_grads(inputs, backend, softplus=True, initial_state=None, config=None, cot_dtype=None, feed="both"):
    """Forward (with last state) and backward with fixed random cotangents -> (out, last, grads by name).

    The cotangent of ``out`` is rounded to ``cot_dtype`` (default: out's dtype) so that a bf16 run and
    its fp32 reference see the same values. ``feed``: "both", or only "out" / "last" in the loss (the other
    output then gets no gradient at all); inputs the loss does not reach get zero gradients."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    h0 = initial_state.detach().clone().requires_grad_(True) if initial_state is not None else None
    kwargs = dict(backend=backend, initial_state=h0)
    if config is not None and backend in ("triton", "cuda"):
        kwargs["_config"] = config
    out, last = ss.selective_scan(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves.get("D"), leaves.get("z"),
        leaves.get("delta_bias"), delta_softplus=softplus, return_last_state=True, **kwargs,
    )  # fmt: skip
    g = torch.Generator().manual_seed(123)
    dout = torch.randn(out.shape, generator=g).to(cot_dtype or out.dtype).to(out.device, out.dtype)
    dlast = torch.randn(last.shape, generator=g).to(last.device, last.dtype)
    terms = {"out": (out.float() * dout.float()).sum(), "last": (last * dlast).sum()}
    sum(t for name, t in terms.items() if feed in ("both", name)).backward()
    # the reference leaves inputs the loss does not reach (C, D, z for the last state) at None, kernels at 0
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    if h0 is not None:
        grads["initial_state"] = h0.grad
    return out, last, grads


def assert_matches(inputs, tol, softplus=True, initial_state=None, config=None, backend="triton"):
    out, last, grads = run_with_grads(inputs, backend, softplus, initial_state, config)
    ref_inputs = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    ref_h0 = initial_state.float() if initial_state is not None else None
    r_out, r_last, r_grads = run_with_grads(
        ref_inputs, "reference", softplus, ref_h0, cot_dtype=inputs["u"].dtype
    )
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["u"].shape
    assert last.dtype == torch.float32
    torch.testing.assert_close(out.float(), r_out.float(), **tol)
    torch.testing.assert_close(last, r_last, **tol)
    assert set(grads) == set(r_grads)
    for name in grads:
        assert grads[name].shape == r_grads[name].shape, name
        assert grads[name].dtype == (inputs[name].dtype if name in inputs else torch.float32), name
        torch.testing.assert_close(
            grads[name].float(), r_grads[name].float(), **tol, msg=lambda m, name=name: f"{name}: {m}"
        )


# --------------------------------------------------------------------------------------------------
# The reference against an independent formulation
# --------------------------------------------------------------------------------------------------
def closed_form(u, delta, A, B, C, D, z):
    """y[t] = sum_{s<=t} C[t] . (prod_{r=s+1..t} exp(dt[r] A)) (dt[s] B[s] u[s]) in float64; B, C (batch, N, L)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    seqlen = u.shape[-1]
    cum = torch.cumsum(delta, dim=-1)  # log-decay: sum_{r<=t} dt[r] * A
    # decay[b, d, n, t, s] = exp((cum[t] - cum[s]) * A) for s <= t
    diff = cum[:, :, :, None] - cum[:, :, None, :]
    decay = torch.exp(diff[:, :, None] * A[None, :, :, None, None])
    causal = torch.tril(torch.ones(seqlen, seqlen, dtype=torch.bool))
    decay = decay.masked_fill(~causal, 0.0)
    b = delta[:, :, None, :] * B[:, None] * u[:, :, None, :]  # (batch, D, N, L)
    y = torch.einsum("bdnts,bdns,bnt->bdt", decay, b, C)
    y = y + u * D.double()[:, None]
    return y * torch.nn.functional.silu(z.double())


def test_reference_matches_closed_form():
    x = make_inputs(batch=2, dim=3, seqlen=9, dstate=5, has_bias=False)
    x = {k: v.double() if v is not None else None for k, v in x.items()}
    ref = ss.selective_scan_ref(**x)
    expected = closed_form(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    # the reference computes in fp32 whatever the input dtype
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Triton through the interpreter (CPU, tiny sizes)
# --------------------------------------------------------------------------------------------------
CASES = {
    # name: (make_inputs kwargs, softplus)
    "L1_var_plain": (dict(seqlen=1, dstate=4, has_d=False, has_z=False, has_bias=False), False),
    "L7_grouped_all": (dict(seqlen=7, dstate=16, dim=4, batch=1, b_layout="group", groups=2), True),
    "L33_const_B": (dict(seqlen=33, dstate=4, dim=4, b_layout="const", has_bias=False), False),
    "L33_const_BC_groupC": (
        dict(seqlen=33, dstate=4, dim=8, batch=1, b_layout="const", c_layout="group", groups=4, has_z=False),
        True,
    ),
    "L7_odd_dim_nopow2_N": (dict(seqlen=7, dstate=3, dim=5, batch=2, b_layout="group", groups=5), True),
}


@pytest.mark.usefixtures("interpreter")
class TestTritonInterpreter:
    @pytest.mark.parametrize("algo", ["default", "seq", "scan"])
    @pytest.mark.parametrize("case", list(CASES))
    def test_fwd_bwd_fp32(self, case, algo):
        kwargs, softplus = CASES[case]
        config = {
            "default": None,  # forward "seq", backward "scan"
            "seq": dict(algo="seq"),
            "scan": dict(algo="scan"),
        }[algo]
        assert_matches(make_inputs(**kwargs), FP32_TOL, softplus=softplus, config=config)

    @pytest.mark.parametrize("algo", ["seq", "scan"])
    def test_initial_state_and_last_state_grads(self, algo):
        x = make_inputs(batch=1, dim=4, seqlen=20, dstate=4)
        h0 = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(5))
        assert_matches(x, FP32_TOL, initial_state=h0, config=dict(algo=algo))

    @pytest.mark.parametrize("algo", ["seq", "scan"])
    def test_several_chunks_per_program(self, algo):
        # BLOCK_L=4 walks 9 chunks; BLOCK_D=2 (forward) / 1 (backward) splits the channels over programs
        x = make_inputs(batch=1, dim=4, seqlen=33, dstate=4, b_layout="group", groups=2)
        # prefetch off here: the plain step-by-step loads are covered too
        config = dict(algo=algo, block_l=4, block_d=2, bwd_block_d=1, prefetch=False)
        assert_matches(x, FP32_TOL, config=config)

    @pytest.mark.parametrize("algo", ["default", "seq", "scan"])
    def test_bf16(self, algo):
        x = make_inputs(batch=1, dim=4, seqlen=33, dstate=4, dtype=torch.bfloat16)
        assert_matches(x, BF16_TOL, config=None if algo == "default" else dict(algo=algo))

    def test_non_contiguous_inputs(self):
        base = make_inputs(batch=2, dim=4, seqlen=7, dstate=4, b_layout="group", groups=2)
        # same values, strided storage: (L, D) transposed, every other element, channel-last B/C
        nc = {}
        for k, v in base.items():
            if v is None:
                continue
            if v.dim() == 3:
                nc[k] = v.transpose(1, 2).contiguous().transpose(1, 2)
            elif v.dim() == 4:
                nc[k] = v.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
            elif v.dim() == 1:
                nc[k] = torch.stack([v, v], dim=-1)[:, 0]
            else:
                nc[k] = v.t().contiguous().t()
            assert torch.equal(nc[k], v)
        assert not nc["u"].is_contiguous() and not nc["B"].is_contiguous() and not nc["D"].is_contiguous()
        out_nc, last_nc, grads_nc = run_with_grads(nc, "triton")
        out, last, grads = run_with_grads(base, "triton")
        torch.testing.assert_close(out_nc, out, **FP32_TOL)
        for k in grads:
            torch.testing.assert_close(grads_nc[k], grads[k], **FP32_TOL)
        assert_matches(nc, FP32_TOL)

    def test_two_halves_equal_one_pass(self):
        x = make_inputs(batch=2, dim=4, seqlen=19, dstate=4)
        cut = 8

        def part(sl):
            return {
                k: (v[..., sl] if (v is not None and v.dim() >= 3 and v.shape[-1] == 19) else v)
                for k, v in x.items()
            }

        full, last = ss.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="triton")
        y1, h1 = ss.selective_scan(
            **part(slice(0, cut)), delta_softplus=True, return_last_state=True, backend="triton"
        )
        y2, h2 = ss.selective_scan(
            **part(slice(cut, None)),
            delta_softplus=True,
            return_last_state=True,
            backend="triton",
            initial_state=h1,
        )
        torch.testing.assert_close(torch.cat([y1, y2], dim=-1), full, **FP32_TOL)
        torch.testing.assert_close(h2, last, **FP32_TOL)

    def test_states_saved_only_when_recording_a_graph(self, monkeypatch):
        saved = []
        orig = ss._scan_fwd_triton

        def spy(*args, **kwargs):
            saved.append(args[10])  # save_states
            return orig(*args, **kwargs)

        monkeypatch.setattr(ss, "_scan_fwd_triton", spy)
        x = make_inputs(seqlen=5)
        x["u"].requires_grad_(True)
        with torch.no_grad():
            ss.selective_scan(**x, backend="triton")
        ss.selective_scan(**x, backend="triton")
        assert saved == [False, True]

    def test_auto_backend_picks_triton_under_interpreter(self, monkeypatch):
        monkeypatch.delenv("MMFM_KERNEL_BACKEND", raising=False)
        calls = []
        orig = ss._scan_fwd_triton
        monkeypatch.setattr(ss, "_scan_fwd_triton", lambda *a, **k: calls.append(1) or orig(*a, **k))
        ss.selective_scan(**make_inputs(seqlen=3))
        assert calls == [1]


# --------------------------------------------------------------------------------------------------
# Reference backend, dispatch, validation (no Triton needed)
# --------------------------------------------------------------------------------------------------
def test_reference_backend_is_differentiable_and_keeps_dtype():
    x = make_inputs(dtype=torch.bfloat16)
    out, last = ss.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="reference")
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 7) and last.shape == (2, 8, 4)


def test_empty_sequence():
    x = make_inputs(seqlen=0)
    out, last = ss.selective_scan(**x, return_last_state=True)
    assert out.shape == (2, 8, 0) and torch.equal(last, torch.zeros(2, 8, 4))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ss.selective_scan(**make_inputs(), backend="fast")


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("u", torch.zeros(2, 8), r"u must have 3 dimensions, got shape \(2, 8\)"),
        ("delta", torch.zeros(2, 8, 6), r"delta has shape \(2, 8, 6\), expected \(2, 8, 7\)"),
        ("A", torch.zeros(7, 4), r"A has shape \(7, 4\), expected \(8, \*\)"),
        ("B", torch.zeros(2, 5, 7), r"B has shape \(2, 5, 7\), expected \(2, 4, 7\)"),
        ("C", torch.zeros(2, 3, 4, 7), r"C has shape \(2, 3, 4, 7\): its G=3 groups must divide D=8"),
        ("C", torch.zeros(8, 4, 1, 1, 1), r"C must have 2 or 3 or 4 dimensions"),
        ("D", torch.zeros(4), r"D has shape \(4,\), expected \(8,\)"),
        ("z", torch.zeros(2, 8, 8), r"z has shape \(2, 8, 8\), expected \(2, 8, 7\)"),
        ("delta_bias", torch.zeros(8, 1), r"delta_bias has shape \(8, 1\), expected \(8,\)"),
        ("u", torch.zeros(2, 8, 7, dtype=torch.int32), r"u has dtype int32"),
        ("B", [[1.0]], r"B must be a torch.Tensor, got list"),
        ("D", torch.zeros(8, device="meta"), r"D is on meta but u is on cpu"),
    ],
)
def test_bad_input_names_the_argument(name, bad, match):
    x = make_inputs()
    x[name] = bad
    with pytest.raises(ValueError, match=match):
        ss.selective_scan(**x)


def test_bad_initial_state():
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 8\), expected \(2, 8, 4\)"):
        ss.selective_scan(**make_inputs(), initial_state=torch.zeros(2, 8))


# --------------------------------------------------------------------------------------------------
# Full grid on a GPU (native Triton)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def native_triton():
    with triton_mode(False, (ss, "_selective_scan_fwd_kernel")):
        yield


GPU_GRID = [
    # (batch, dim, seqlen, dstate, b_layout, c_layout, groups, extras)
    (2, 64, seqlen, dstate, bl, cl, g, extras)
    for dstate in (16, 64, 128)
    for (bl, cl, g, extras), lengths in (
        (("var", "var", 1, True), (1, 7, 33, 300, 2048)),
        (("group", "group", 4, False), (33, 2048)),
        (("const", "group", 2, True), (33, 2048)),
    )
    for seqlen in lengths
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("native_triton")
class TestGPU:
    @pytest.mark.parametrize("batch, dim, seqlen, dstate, bl, cl, groups, extras", GPU_GRID)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_grid(self, batch, dim, seqlen, dstate, bl, cl, groups, extras, dtype):
        self._check(batch, dim, seqlen, dstate, bl, cl, groups, extras, dtype, None)

    @pytest.mark.parametrize("seqlen, dstate", [(33, 16), (2048, 16), (300, 128)])
    @pytest.mark.parametrize(
        "config",
        [dict(algo="scan"), dict(algo="seq"), dict(algo="seq", prefetch=False)],
        ids=["scan", "seq", "seq0"],
    )
    def test_other_algorithms(self, seqlen, dstate, config):
        self._check(2, 64, seqlen, dstate, "var", "var", 1, True, torch.float32, config)

    def _check(self, batch, dim, seqlen, dstate, bl, cl, groups, extras, dtype, config):
        x = make_inputs(
            batch, dim, seqlen, dstate, b_layout=bl, c_layout=cl, groups=groups, has_d=extras, has_z=extras,
            has_bias=extras, dtype=dtype, device="cuda",
        )  # fmt: skip
        h0 = torch.randn(batch, dim, dstate, device="cuda") if extras else None
        # long fp32 sums over L=2048 steps: allow 1e-3 absolute on O(10-100) gradients of B/C/A
        tol = BF16_TOL if dtype == torch.bfloat16 else dict(atol=1e-3, rtol=1e-3)
        assert_matches(x, tol, softplus=extras, initial_state=h0, config=config)

    def test_two_halves_equal_one_pass(self):
        x = make_inputs(2, 256, 1000, 16, device="cuda")
        full, last = ss.selective_scan(**x, delta_softplus=True, return_last_state=True)
        first = {k: (v[..., :600] if v is not None and v.dim() >= 3 else v) for k, v in x.items()}
        second = {k: (v[..., 600:] if v is not None and v.dim() >= 3 else v) for k, v in x.items()}
        y1, h1 = ss.selective_scan(**first, delta_softplus=True, return_last_state=True)
        y2, h2 = ss.selective_scan(**second, delta_softplus=True, return_last_state=True, initial_state=h1)
        torch.testing.assert_close(torch.cat([y1, y2], -1), full, **FP32_TOL)
        torch.testing.assert_close(h2, last, **FP32_TOL)


# --------------------------------------------------------------------------------------------------
# CUDA C++ extension on a GPU (built here if it is not yet: needs nvcc, ~1 min)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def cuda_ext():
    from mmfm.kernels import _cuda_ext

    return _cuda_ext.build("selective_scan")


CUDA_GRID = [
    # (batch, dim, seqlen, dstate, b_layout, groups, extras): L across the chunk lengths 256-2048 and past
    # one chunk (several chunks), odd L, grouped B/C, N up to 256
    (2, 64, seqlen, dstate, bl, g, extras)
    for dstate in (16, 64, 128)
    for (bl, g, extras), lengths in (
        (("var", 1, True), (1, 7, 33, 300, 700, 2048, 5000)),
        (("group", 4, False), (33, 2049)),
    )
    for seqlen in lengths
] + [(1, 32, 300, 256, "var", 1, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("cuda_ext")
class TestCUDA:
    @pytest.mark.parametrize("batch, dim, seqlen, dstate, bl, groups, extras", CUDA_GRID)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_grid(self, batch, dim, seqlen, dstate, bl, groups, extras, dtype):
        if dtype == torch.float16 and dstate != 16:
            pytest.skip("fp16: one N is enough (same code as bf16 but the conversion)")
        x = make_inputs(
            batch, dim, seqlen, dstate, b_layout=bl, c_layout=bl, groups=groups, has_d=extras, has_z=extras,
            has_bias=extras, dtype=dtype, device="cuda",
        )  # fmt: skip
        h0 = torch.randn(batch, dim, dstate, device="cuda") if extras else None
        tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else BF16_TOL
        if dtype == torch.float16:
            tol = dict(atol=5e-3, rtol=5e-3)  # fp16 rounds to 2**-11
        assert_matches(x, tol, softplus=extras, initial_state=h0, backend="cuda")

    @pytest.mark.parametrize("chunk", [256, 512, 1024, 2048])
    def test_every_chunk_length(self, chunk):
        x = make_inputs(2, 64, 3000, 16, dtype=torch.float32, device="cuda")
        assert_matches(x, dict(atol=1e-3, rtol=1e-3), config=dict(chunk=chunk), backend="cuda")

    @pytest.mark.parametrize("chunks", [(2048, 256), (256, 2048), (512, 1024), (1024, 512)])
    def test_forward_and_backward_chunks_differ(self, chunks):
        # the forward saves states at the backward's chunk boundaries, finer or coarser than its own
        x = make_inputs(2, 64, 5000, 16, has_z=True, dtype=torch.float32, device="cuda")
        assert_matches(x, dict(atol=1e-3, rtol=1e-3), softplus=True, config=dict(chunks=chunks), backend="cuda")

    @pytest.mark.parametrize("variant", [12, 13, 14, 15])
    @pytest.mark.parametrize("seqlen, extras", [(700, False), (5000, True)])
    def test_forward_rows_variants(self, variant, seqlen, extras):
        # bf16 sweep variants whose rows share B / C staged in shared memory (12-14; 14 is the default
        # 512-step forward) and 15 (its single-row form, the default when 4 does not divide the group size):
        # outputs, last state and every gradient against the reference, odd lengths, grouped B / C
        x = make_inputs(
            2, 64, seqlen, 16, b_layout="group", c_layout="group", groups=4, has_d=extras, has_z=extras,
            has_bias=extras, dtype=torch.bfloat16, device="cuda",
        )  # fmt: skip
        h0 = torch.randn(2, 64, 16, device="cuda") if extras else None
        assert_matches(x, BF16_TOL, softplus=extras, initial_state=h0, config=dict(variant=variant), backend="cuda")

    @pytest.mark.parametrize("variant, dtype", [(100, torch.float32), (100, torch.bfloat16), (114, torch.bfloat16)])
    def test_backward_on_channel_fastest_grid(self, variant, dtype):
        # variant + 100 swaps the backward's grid from (batch, D / rows) to (D / rows, batch): every block
        # must still find its own row
        x = make_inputs(
            3, 64, 1500, 16, b_layout="group", c_layout="group", groups=4, has_d=True, has_z=True, has_bias=True,
            dtype=dtype, device="cuda",
        )  # fmt: skip
        tol = BF16_TOL if dtype == torch.bfloat16 else dict(atol=1e-3, rtol=1e-3)
        h0 = torch.randn(3, 64, 16, device="cuda")
        assert_matches(x, tol, softplus=True, initial_state=h0, config=dict(variant=variant), backend="cuda")

    @pytest.mark.parametrize("dim, groups", [(24, 4), (24, 8), (24, 24)])
    def test_group_sizes_not_divisible_by_four(self, dim, groups):
        # group sizes 6, 3 and 1: the backward sums B/C gradients of 2 or 1 channels per block, not 4
        x = make_inputs(
            2, dim, 700, 16, b_layout="group", c_layout="group", groups=groups, dtype=torch.float32, device="cuda"
        )
        assert_matches(x, dict(atol=1e-3, rtol=1e-3), backend="cuda")

    def test_non_contiguous_and_auto_picks_cuda(self, monkeypatch):
        x = make_inputs(2, 64, 100, 16, device="cuda")
        x["u"] = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # stride 1 along D, not L
        x["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)
        monkeypatch.delenv("MMFM_KERNEL_BACKEND", raising=False)
        chunk_for, called = ss._cuda_chunks, []
        monkeypatch.setattr(ss, "_cuda_chunks", lambda n: called.append(n) or chunk_for(n))  # on the CUDA path only
        assert_matches(x, dict(atol=1e-3, rtol=1e-3), backend="auto")
        assert called == [100]

    def test_constant_B_is_refused_with_a_reason(self):
        x = make_inputs(2, 64, 33, 16, b_layout="const", device="cuda")
        with pytest.raises(ValueError, match=r"backend='cuda' cannot run these inputs: constant"):
            ss.selective_scan(**x, backend="cuda")
        ss.selective_scan(**x)  # auto: Triton


@pytest.mark.parametrize("which", ["out", "last"])
@pytest.mark.parametrize(
    "backend", ["triton", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])],
)
def test_gradient_through_one_output_only(backend, which):
    # the unused output's gradient is None (the CUDA path does not materialise zeros): both must still work
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "cuda":
        from mmfm.kernels import _cuda_ext

        _cuda_ext.build("selective_scan")
    x = make_inputs(2, 8, 40, 4, has_d=True, has_z=True, has_bias=True, device=device)
    got = run_with_grads(x, backend, feed=which)[2]
    ref = run_with_grads(x, "reference", feed=which)[2]
    assert set(got) == set(ref)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_cuda_backend_without_the_extension_says_how_to_get_it():
    x = make_inputs()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available here"):
        ss.selective_scan(**x, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs: constant"):
        ss.selective_scan(**make_inputs(b_layout="const"), backend="cuda")


def test_cuda_build_dir_tracks_sources_and_versions(tmp_path, monkeypatch):
    from mmfm.kernels import _cuda_ext

    src = tmp_path / "csrc"
    src.mkdir()
    for name in _cuda_ext.EXTENSIONS["selective_scan"] + ("selective_scan.h", "selective_scan.cuh"):
        (src / name).write_text("// " + name)
    monkeypatch.setattr(_cuda_ext, "CSRC", src)
    monkeypatch.setenv(_cuda_ext.BUILD_DIR_VAR, str(tmp_path / "builds"))
    first = _cuda_ext.build_dir("selective_scan")
    assert first.parent.parent == tmp_path / "builds" and f"torch{torch.__version__.split('+')[0]}" in first.parent.name
    (src / "selective_scan.cuh").write_text("// changed header")  # a header edit must not reuse the old build
    assert _cuda_ext.build_dir("selective_scan") != first
    assert _cuda_ext._built_library("selective_scan") is None
    with pytest.raises(ValueError, match="unknown CUDA extension 'nope'"):
        _cuda_ext.build_dir("nope")
