"""Linear + GELU as one GEMM: ``gelu_tanh(x @ W^T + b)``, the bias and the GELU in cuBLASLt's epilogue.

A transformer MLP's first Linear writes a (tokens, 4 * D) activation, and a separate elementwise kernel reads
it back to apply GELU and writes it again; torch.compile fuses the bias into that kernel but cannot move it
into cuBLAS's GEMM. cuBLASLt's ``GELU_BIAS`` epilogue (PyTorch: ``torch._addmm_activation(.., use_gelu=True)``)
applies both while the GEMM's tile is still in registers, saving two passes over the block's widest
activation: ~12 ms of the frozen ViT-L teachers' time in a 225 ms RADIO step (H100, 432 px, BENCHMARKS.md).

The epilogue computes the **tanh approximation** of GELU (``F.gelu(.., approximate="tanh")``), so the op is
defined as that on every device (CPU and other inputs run the reference). It differs from exact (erf) GELU
by less than 4.8e-4 everywhere (largest near x = 2.7; checked in the tests), under half of bf16's rounding
step for |values| >= 0.125: a bf16 teacher's outputs move at the level of its own rounding noise.

The op is a ``torch.library`` custom op, so torch.compile keeps it as one call instead of decomposing it
back into a GEMM and a Triton GELU kernel. Backward (for completeness; teachers need none) recomputes the
pre-activation with the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

__all__ = ["LinearGELU", "linear_gelu", "linear_gelu_reference"]


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate="tanh")``. x (..., K), weight (N, K), bias (N,) ->
    (..., N)."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _epilogue_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # cuBLASLt's bias epilogue wants a 1-D bias of the GEMM's dtype; fp16 / bf16 are where it pays off
    return (x.is_cuda and bias is not None and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and bias.dtype == x.dtype)


@torch.library.custom_op("mmfm::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not _epilogue_ok(x, weight, bias):
        return linear_gelu_reference(x, weight, bias)
    lead = x.shape[:-1]
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*lead, weight.shape[0])


@_linear_gelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # bias may be None


def _backward(ctx, grad: torch.Tensor):
    x, weight, bias = ctx.saved_tensors
    with torch.enable_grad():
        x, weight, bias = (t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, bias))
        out = linear_gelu_reference(x, weight, bias)
        grads = torch.autograd.grad(out, [t for t in (x, weight, bias) if t is not None], grad)
    return grads[0], grads[1], grads[2] if bias is not None else None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mmfm.linear_gelu)
def _linear_gelu_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # the GEMM's 2 * M * K * N, as torch.utils.flop_counter counts addmm (bias and activation not counted), so
    # MFU figures do not drop when a model switches to the fused op
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu_tanh(x @ weight^T + bias)`` in one cuBLASLt GEMM on CUDA fp16 / bf16 (module docstring), the
    reference elsewhere. x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_gelu: x has {x.shape[-1]} features but weight is {tuple(weight.shape)} "
                         "(out_features, in_features)")
    return _linear_gelu_op(x, weight, bias)


class LinearGELU(torch.nn.Linear):
    """``nn.Linear`` followed by tanh-approximated GELU, run by :func:`linear_gelu`. Same parameters (and
    state-dict keys) as the ``nn.Linear`` it replaces: :meth:`from_linear` shares them."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> LinearGELU:
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight, self.bias)
