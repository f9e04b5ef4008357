"""Per-teacher loss balancing: fixed weights, AdaLoss, uncertainty weighting.

Every balancer is called as ``total, weights = balancer(losses, present)`` where ``losses`` maps a term name
(e.g. ``"clip/summary"``) to a scalar tensor and ``present`` (optional) says which terms had a target this
step. Absent terms still enter ``total`` (multiplied by their weight, their value is usually ``0 * x``) so
every parameter stays in the graph, but they never update running statistics.

* ``fixed``: ``total = sum_t w_t L_t`` with constant ``w_t`` (default 1).
* ``adaloss``: ``w_t = 1 / (m_t + eps)`` where ``m_t`` is an exponential moving average (``momentum``) of
  the detached ``L_t`` (initialised with the first value seen). Each term then contributes ~1 to the total,
  so a teacher with a large raw loss scale does not dominate. ``m_t`` lives in buffers (checkpointed).
* ``uncertainty`` (Kendall, Gal & Cipolla 2018): learned ``s_t = log sigma_t^2``;
  ``total = sum_t 0.5 * exp(-s_t) L_t + 0.5 * s_t``; the optimum for fixed ``L_t`` is ``s_t = log L_t``.
  ``weights`` reports ``0.5 * exp(-s_t)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["AdaLossBalancer", "FixedBalancer", "UncertaintyBalancer", "build_balancer"]


class _Balancer(nn.Module):
    def __init__(self, terms: Sequence[str]) -> None:
        super().__init__()
        terms = list(terms)
        if len(set(terms)) != len(terms):
            raise ValueError(f"balancer: duplicate term names in {terms}")
        self.terms = terms
        self.index = {t: i for i, t in enumerate(terms)}

    def _check(self, losses: Mapping[str, torch.Tensor]) -> None:
        unknown = [k for k in losses if k not in self.index]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown loss terms {unknown}; known terms: {self.terms}")


class FixedBalancer(_Balancer):
    """``total = sum_t w_t L_t``; ``weights``: dict of constants (missing terms weigh 1)."""

    def __init__(self, terms: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(terms)
        weights = dict(weights or {})
        bad = [k for k in weights if k not in self.index]
        if bad:
            raise ValueError(f"FixedBalancer: weights for unknown terms {bad}; known terms: {self.terms}")
        self.register_buffer("weight", torch.tensor([float(weights.get(t, 1.0)) for t in self.terms]))

    def forward(self, losses: Mapping[str, torch.Tensor], present: Mapping[str, bool] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(losses)
        total = sum(self.weight[self.index[k]] * v for k, v in losses.items())
        return torch.as_tensor(total), {k: self.weight[self.index[k]] for k in losses}


class AdaLossBalancer(_Balancer):
    """``w_t = 1 / (EMA(L_t) + eps)``; buffers ``running`` (T,) and ``seen`` (T,) are checkpointed."""

    def __init__(self, terms: Sequence[str], momentum: float = 0.99, eps: float = 1e-6) -> None:
        super().__init__(terms)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"AdaLossBalancer: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.register_buffer("running", torch.ones(len(self.terms), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(len(self.terms), dtype=torch.bool))

    def forward(self, losses: Mapping[str, torch.Tensor], present: Mapping[str, bool] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(losses)
        if self.training:
            with torch.no_grad():
                for k, v in losses.items():
                    if present is not None and not present.get(k, True):
                        continue
                    i = self.index[k]
                    val = v.detach().double().to(self.running.device)
                    # a term's first value starts its average; torch.where, not `if seen`: no host read per step
                    ema = self.momentum * self.running[i] + (1 - self.momentum) * val
                    self.running[i] = torch.where(self.seen[i], ema, val)
                    self.seen[i] = True
        weights = {k: (1.0 / (self.running[self.index[k]] + self.eps)).to(v.dtype).to(v.device)
                   for k, v in losses.items()}
        total = sum(weights[k] * v for k, v in losses.items())
        return torch.as_tensor(total), weights


class UncertaintyBalancer(_Balancer):
    """Learned homoscedastic uncertainty: ``total = sum_t 0.5 exp(-s_t) L_t + 0.5 s_t`` (present terms).

    ``log_var`` (T,) is a Parameter (initialised at ``init``) trained with the model."""

    def __init__(self, terms: Sequence[str], init: float = 0.0) -> None:
        super().__init__(terms)
        self.log_var = nn.Parameter(torch.full((len(self.terms),), float(init)))

    def forward(self, losses: Mapping[str, torch.Tensor], present: Mapping[str, bool] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(losses)
        total = self.log_var.sum() * 0.0  # keeps every log_var in the graph (DDP needs all grads)
        weights = {}
        for k, v in losses.items():
            s = self.log_var[self.index[k]]
            w = 0.5 * torch.exp(-s)
            weights[k] = w.detach()
            total = total + w * v
            if present is None or present.get(k, True):
                total = total + 0.5 * s
        return total, weights


def build_balancer(kind: str, terms: Sequence[str], momentum: float = 0.99, eps: float = 1e-6,
                   weights: Mapping[str, float] | None = None) -> nn.Module:
    """``"fixed"`` | ``"adaloss"`` | ``"uncertainty"`` over the named loss terms."""
    if kind == "fixed":
        return FixedBalancer(terms, weights)
    if kind == "adaloss":
        return AdaLossBalancer(terms, momentum=momentum, eps=eps)
    if kind == "uncertainty":
        return UncertaintyBalancer(terms)
    raise ValueError(f"build_balancer: unknown kind {kind!r}; choose 'fixed', 'adaloss' or 'uncertainty'")
