"""bf16 model weights with fp32 master copies in the optimizer (DeepSpeed's bf16 mode, without DeepSpeed).

Under plain autocast the weights stay fp32, so everything that is not a matmul runs in fp32: a ViT's residual
stream (patch embedding + an fp32 position embedding), its adds and LayerNorm inputs, and every matmul input is
re-cast to bf16 on each call. Storing the trainable weights in bf16 makes that stream bf16 and drops the casts;
the optimizer then steps fp32 copies, so that updates smaller than a bf16 ulp of the weight still accumulate,
and the bf16 weights are re-rounded from them after every step.

Gradients: autograd writes bf16 ``.grad`` on the model's weights (a window of ``grad_accum`` micro-batches
accumulates there, as under DDP with any bf16 model); ``fold_grads`` moves them into the fp32 masters' ``.grad``
before clipping and the optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["MasterWeights"]


class MasterWeights:
    """The fp32 masters of every parameter ``optimizer`` steps; those parameters of ``module`` become ``dtype``.

    Call it right after building the optimizer, before its first step (the optimizer has no state yet): the
    masters take the parameters' places in its param groups.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16
                 ) -> None:
        if optimizer.state:
            raise ValueError("MasterWeights: the optimizer has already stepped; wrap it before the first step")
        names = {id(p): n for n, p in module.named_parameters()}
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self.names: list[str] = []
        for group in optimizer.param_groups:
            masters = []
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError("MasterWeights: the optimizer steps a tensor that is not a parameter of the model")
                m = p.detach().float().clone()
                self.params.append(p)
                self.masters.append(m)
                self.names.append(names[id(p)])
                masters.append(m)
            group["params"] = masters
        self.dtype = dtype
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(dtype)

    def named_masters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name in the module, fp32 master) pairs."""
        return zip(self.names, self.masters)

    @torch.no_grad()
    def fold_grads(self) -> None:
        """Move the model's bf16 ``.grad`` into the masters' fp32 ``.grad`` (summed into any already there)."""
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def round_to_model(self) -> None:
        """The model's weights := the masters rounded to ``dtype`` (after an optimizer step)."""
        torch._foreach_copy_(self.params, self.masters)

    def state_dict_over(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (a module state dict) with the fp32 masters in place of the rounded weights."""
        out = dict(state)
        out.update((n, m.detach().clone()) for n, m in self.named_masters() if n in out)
        return out

    @torch.no_grad()
    def load_from(self, state: Mapping[str, torch.Tensor]) -> None:
        """Masters := ``state``'s (fp32) tensors of the same names, and the model's weights rounded from them."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"MasterWeights: the state has no tensor for {missing[:5]}")
        for n, m in self.named_masters():
            m.copy_(state[n])
        self.round_to_model()

    @contextlib.contextmanager
    def in_model(self) -> Iterator[None]:
        """Within: the module's parameters *are* the fp32 masters (same storage), so evaluation and export see
        full-precision weights and in-place edits (e.g. re-expressing a head after a normaliser refit) reach
        the masters. On exit the module gets ``dtype`` weights rounded from them again."""
        for p, m in zip(self.params, self.masters):
            p.data = m
        try:
            yield
        finally:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.data = m.to(self.dtype)
