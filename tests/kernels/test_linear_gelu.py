"""linear_gelu: one GEMM with a bias + tanh-GELU epilogue, against F.linear + F.gelu(approximate="tanh")."""

import pytest
import torch
import torch.nn.functional as F

from mmfm.kernels.linear_gelu import LinearGELU, linear_gelu, linear_gelu_reference


def _inputs(dtype, device="cpu", m=37, k=48, n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) * 0.5
    return [t.to(device, dtype) for t in (x, w, b)]


def test_tanh_gelu_is_within_documented_bound_of_exact_gelu():
    # the module docstring's claim: |gelu_tanh - gelu_erf| < 4.8e-4 everywhere, largest near x = 2.7
    x = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)
    diff = (F.gelu(x) - F.gelu(x, approximate="tanh")).abs()
    assert diff.max() < 4.8e-4 and abs(x[diff.argmax()].item() - 2.7) < 0.05


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.bfloat16, 0.0)])
def test_cpu_equals_reference(dtype, tol):
    x, w, b = _inputs(dtype)
    out = linear_gelu(x, w, b)
    assert out.shape == (3, 37, 80) and out.dtype == dtype
    torch.testing.assert_close(out, linear_gelu_reference(x, w, b), atol=tol, rtol=tol)
    torch.testing.assert_close(linear_gelu(x, w), F.gelu(F.linear(x, w), approximate="tanh"), atol=tol, rtol=tol)


def test_backward_matches_reference_gradcheck():
    x, w, b = (t.requires_grad_(True) for t in _inputs(torch.float64, m=4, k=6, n=5))
    assert torch.autograd.gradcheck(linear_gelu, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear_gelu(x, w, None), (x, w))


def test_compile_keeps_one_op():
    # torch.compile must see the op as one call (not decompose it into a GEMM and a GELU kernel)
    x, w, b = _inputs(torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: linear_gelu(x, w, b), backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(x), linear_gelu_reference(x, w, b))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.mmfm.linear_gelu.default in targets
    assert not any("gelu" in str(t) and "mmfm" not in str(t) for t in targets)


def test_module_shares_linear_parameters_and_errors():
    lin = torch.nn.Linear(8, 16)
    fused = LinearGELU.from_linear(lin)
    assert fused.weight is lin.weight and fused.bias is lin.bias
    assert list(fused.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(fused(x), F.gelu(lin(x), approximate="tanh"))
    with pytest.raises(ValueError, match="in_features"):
        linear_gelu(torch.randn(2, 7), lin.weight, lin.bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m", [1, 37, 4096])
def test_cuda_epilogue_matches_fp64_reference(dtype, tol, m):
    # CUDA fp16 / bf16 run cuBLASLt's GELU_BIAS epilogue (fp32 accumulate, one rounding of the output);
    # fp32 takes the reference path. Reference: the same math in float64. Tolerances: a few output roundings
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, w, b = _inputs(dtype, "cuda", m=m, k=1024, n=4096)
    want = linear_gelu_reference(x.double(), w.double(), b.double())
    got = linear_gelu(x, w, b)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    err = (got.double() - want).abs().max()
    unfused = (linear_gelu_reference(x, w, b).double() - want).abs().max()
    assert err <= 2 * unfused + 1e-6, (err, unfused)  # no worse than the unfused GEMM + GELU in the same dtype


def test_flop_counter_counts_the_gemm():
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = _inputs(torch.float32)
    with FlopCounterMode(display=False) as fused:
        linear_gelu(x, w, b)
    with FlopCounterMode(display=False) as ref:
        linear_gelu_reference(x, w, b)
    assert fused.get_total_flops() == ref.get_total_flops() == 2 * 3 * 37 * 48 * 80
