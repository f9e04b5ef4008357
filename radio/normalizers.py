"""Teacher-feature normalisers: PHI-S and the baselines of the PHI-S paper.

Every normaliser is an affine map on the channel axis, fitted from streaming float64 moments
(mean ``mu`` (C,), covariance ``Sigma = U diag(lambda) U^T`` (C, C))::

    forward:  y = (x - mu) @ T^T          inverse:  x = y @ T_inv^T + mu

==================  ==========================================  =========================================
name                T                                           property of y
==================  ==========================================  =========================================
``identity``        I  (mu = 0)                                 raw features
``global``          I / sigma_g,  sigma_g^2 = tr(Sigma) / C     zero mean, mean channel variance 1
``channel``         diag(1 / sigma_c)                           zero mean, every channel variance 1
``pca``             diag(lambda^-1/2) U^T                       identity covariance (PCA basis)
``zca``             U diag(lambda^-1/2) U^T                     identity covariance (original basis)
``hadamard``        H diag(lambda^-1/2) U^T                     identity covariance (Hadamard basis)
``phi_s``           alpha H U^T,  alpha = (tr(Sigma) / C)^-1/2  every channel variance exactly 1
==================  ==========================================  =========================================

``H`` is the normalised Hadamard matrix of :mod:`mmfm.radio.hadamard`. Why PHI-S gives every channel unit
variance: ``Cov(y) = alpha^2 H Lambda H^T`` so ``Cov(y)_ii = alpha^2 sum_k H_ik^2 lambda_k =
alpha^2 (1/C) sum_k lambda_k = 1`` because ``H_ik^2 = 1/C``. Off-diagonal covariances are *not* zero (PHI-S
is a scaled rotation, not a whitening): it preserves the geometry (``|y1 - y2| = alpha |x1 - x2|``).

Whitening variants divide by ``sqrt(lambda + eps * mean(lambda))`` so near-zero (noise) directions of
low-rank teachers stay finite; ``eps`` is configurable (default 1e-6).

Moments: ``update(x (N, C))`` merges a batch into running float64 ``(count, mean, M2)`` with Chan's
parallel formula. Under ``torch.distributed`` the batch statistics are all-reduced first (counts and sums,
then the scatter about the global batch mean), so every rank holds identical moments. ``fit()`` turns the
moments into ``T``; the schedule (refit every 100 steps for the first 3000, then frozen) is
:class:`RefitSchedule`. All state is in buffers, so ``state_dict()`` stores it in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from mmfm.radio.hadamard import hadamard

__all__ = [
    "NORMALIZERS",
    "FeatureNormalizer",
    "GlobalStandardize",
    "HadamardWhiten",
    "Identity",
    "PCAWhiten",
    "PerChannelStandardize",
    "PHIS",
    "RefitSchedule",
    "ZCAWhiten",
    "build_normalizer",
    "tf32_matmuls",
]


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """Inside, float32 CUDA matmuls may run on TF32 tensor cores (inputs rounded to a 10-bit mantissa, float32
    accumulation): a normaliser's (tokens, C) x (C, C) transform of bf16 teacher features then costs ~1 ms
    instead of ~5 ms at 432 px (H100, BENCHMARKS.md), and its ~5e-4 relative rounding stays below that of the
    bf16 features it transforms (2^-9). The previous setting is restored on exit; CPU matmuls are unaffected."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision; allow_tf32 is deprecated there
    attr, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    old = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, old)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (gloo cannot reduce on a CUDA tensor of float64 everywhere, so reduce where it lives)."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


class FeatureNormalizer(nn.Module):
    """Base class: streaming moments + an affine transform on the last axis (channels).

    Args:
        dim: number of channels C.
        eps: relative eigenvalue floor for whitening (``lambda + eps * mean(lambda)``) and variance floor.

    Buffers (all in ``state_dict``): ``count`` (), ``running_mean`` (C,), ``running_m2`` (C, C) float64;
    ``mean`` (C,), ``transform`` (C, C), ``inverse_transform`` (C, C) float64; ``fitted`` () bool.
    Before the first ``fit()`` the transform is the identity with zero mean.
    """

    name = "base"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.eps = float(eps)
        f64 = torch.float64
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.register_buffer("running_mean", torch.zeros(dim, dtype=f64))
        self.register_buffer("running_m2", torch.zeros(dim, dim, dtype=f64))
        self.register_buffer("mean", torch.zeros(dim, dtype=f64))
        self.register_buffer("transform", torch.eye(dim, dtype=f64))
        self.register_buffer("inverse_transform", torch.eye(dim, dtype=f64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ moments
    def _check(self, x: torch.Tensor, arg: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: {arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: {arg} has {x.shape[-1]} channels on its last axis "
                             f"(shape {tuple(x.shape)}), expected {self.dim}; pass (..., C) tokens "
                             "(permute (B, C, h, w) maps to (B, h, w, C))")

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x (N, C)`` (any leading shape is flattened) into the running float64 moments.

        Under ``torch.distributed`` this is a collective: every rank must call it at the same step (a rank
        with nothing to add passes an empty ``(0, C)`` tensor)."""
        self._check(x, "x")
        xb = x.detach().reshape(-1, self.dim).to(device=self.running_mean.device, dtype=torch.float64)
        n_b = torch.tensor(float(xb.shape[0]), dtype=torch.float64, device=xb.device)
        s_b = xb.sum(0)
        _all_reduce(n_b)
        _all_reduce(s_b)
        # No host read of n_b (it would wait for the GPU every training step): with no rows on any rank,
        # n_b = 0 makes every increment below exactly zero, and the clamps keep 0 / 0 out.
        mean_b = s_b / n_b.clamp_min(1.0)
        xc = xb - mean_b
        m2_b = _all_reduce(xc.T @ xc)
        n_a = self.count.clone()
        n = n_a + n_b
        delta = mean_b - self.running_mean
        self.running_mean += delta * (n_b / n.clamp_min(1.0))
        self.running_m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n.clamp_min(1.0))
        self.count.copy_(n)

    def reset_moments(self) -> None:
        """Forget the accumulated moments (the fitted transform is kept)."""
        self.count.zero_()
        self.running_mean.zero_()
        self.running_m2.zero_()

    def covariance(self) -> torch.Tensor:
        """(C, C) float64 unbiased covariance of everything seen by ``update``."""
        if self.count.item() < 2:
            raise ValueError(f"{type(self).__name__}: need at least 2 samples to fit, got "
                             f"{int(self.count.item())}; call update(x) with teacher features first")
        return self.running_m2 / (self.count - 1)

    def _eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        cov = self.covariance()
        cov = 0.5 * (cov + cov.T)
        lam, u = torch.linalg.eigh(cov)
        return lam.clamp_min(0.0), u

    # ------------------------------------------------------------------ fitting
    def _compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (mean (C,), T (C, C), T_inv (C, C)), float64. The base class is the identity map."""
        c = self.dim
        eye = torch.eye(c, dtype=torch.float64, device=self.mean.device)
        return torch.zeros(c, dtype=torch.float64, device=eye.device), eye, eye.clone()

    @torch.no_grad()
    def fit(self) -> None:
        """Recompute the transform from the moments accumulated so far."""
        mean, t, t_inv = self._compute()
        self.mean.copy_(mean)
        self.transform.copy_(t)
        self.inverse_transform.copy_(t_inv)
        self.fitted.fill_(True)

    # ------------------------------------------------------------------ apply
    def _work_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> normalised (..., C), same dtype as x (computed in >= float32)."""
        self._check(x, "x")
        wd = self._work_dtype(x)
        y = (x.to(wd) - self.mean.to(wd)) @ self.transform.to(wd).T
        return y.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y (..., C) normalised -> teacher space (..., C)."""
        self._check(y, "y")
        wd = self._work_dtype(y)
        x = y.to(wd) @ self.inverse_transform.to(wd).T + self.mean.to(wd)
        return x.to(y.dtype)

    @torch.no_grad()
    def fold_inverse_into_linear(self, linear: nn.Linear, blocks: int = 1) -> nn.Linear:
        """Make ``linear`` (which predicts normalised features) output teacher-space features, in place.

        ``W' = T_inv W``, ``b' = T_inv b + mu``. ``blocks``: the outputs are ``blocks`` consecutive groups of C
        channels (a pixel-shuffle head predicting ``u*u`` positions per token), each folded the same way.
        A Linear without bias gets one (the shift ``mu`` needs it). Returns ``linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"fold_inverse_into_linear: expected nn.Linear, got {type(linear).__name__}")
        if linear.out_features != self.dim * blocks:
            raise ValueError(f"fold_inverse_into_linear: linear.out_features={linear.out_features}, expected "
                             f"dim*blocks={self.dim}*{blocks}")
        w = linear.weight.detach().double().reshape(blocks, self.dim, -1)
        b = (linear.bias.detach().double() if linear.bias is not None
             else torch.zeros(linear.out_features, dtype=torch.float64, device=w.device)).reshape(blocks, self.dim)
        tinv = self.inverse_transform.double().to(w.device)
        w_new = torch.einsum("oc,gci->goi", tinv, w).reshape(linear.out_features, -1)
        b_new = (b @ tinv.T + self.mean.double().to(w.device)).reshape(-1)
        linear.weight.copy_(w_new.to(linear.weight.dtype))
        if linear.bias is None:
            linear.bias = nn.Parameter(b_new.to(linear.weight.dtype))
        else:
            linear.bias.copy_(b_new.to(linear.bias.dtype))
        return linear

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fitted={bool(self.fitted.item())}"


class Identity(FeatureNormalizer):
    """y = x. Moments are still tracked (for logging), the transform stays the identity."""

    name = "identity"


class GlobalStandardize(FeatureNormalizer):
    """y = (x - mu) / sigma_g with sigma_g^2 = tr(Sigma) / C (one scalar for all channels).

    ``alpha`` () = 1 / sigma_g is exposed as a buffer (same scalar as PHI-S's alpha)."""

    name = "global"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64))

    def _compute(self):
        cov = self.covariance()
        var = torch.diagonal(cov).mean().clamp_min(1e-30)
        alpha = var.rsqrt()
        self.alpha.copy_(alpha)
        eye = torch.eye(self.dim, dtype=torch.float64, device=cov.device)
        return self.running_mean.clone(), eye * alpha, eye / alpha


class PerChannelStandardize(FeatureNormalizer):
    """y_c = (x_c - mu_c) / sigma_c; channels with sigma_c^2 < eps * mean variance are floored there."""

    name = "channel"

    def _compute(self):
        var = torch.diagonal(self.covariance()).clone()
        var = var.clamp_min(self.eps * var.mean().clamp_min(1e-30))
        std = var.sqrt()
        return self.running_mean.clone(), torch.diag(1.0 / std), torch.diag(std)


class _Whiten(FeatureNormalizer):
    """Shared eigen-decomposition for the whitening variants; subclasses choose the output basis R."""

    def _basis(self, u: torch.Tensor) -> torch.Tensor:
        """Output basis R (C, C); the PCA basis (identity) unless a subclass rotates it."""
        return torch.eye(self.dim, dtype=torch.float64, device=u.device)

    def _compute(self):
        lam, u = self._eig()
        lam = lam + self.eps * lam.mean().clamp_min(1e-30)
        r = self._basis(u)  # (C, C) orthogonal
        t = r @ torch.diag(lam.rsqrt()) @ u.T
        t_inv = u @ torch.diag(lam.sqrt()) @ r.T
        return self.running_mean.clone(), t, t_inv


class PCAWhiten(_Whiten):
    """y = diag(lambda^-1/2) U^T (x - mu)."""

    name = "pca"


class ZCAWhiten(_Whiten):
    """y = U diag(lambda^-1/2) U^T (x - mu)."""

    name = "zca"

    def _basis(self, u):
        return u


class HadamardWhiten(_Whiten):
    """y = H diag(lambda^-1/2) U^T (x - mu)."""

    name = "hadamard"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        self.register_buffer("hadamard", hadamard(dim), persistent=False)

    def _basis(self, u):
        return self.hadamard.to(u)


class PHIS(FeatureNormalizer):
    """PHI-S: y = alpha H U^T (x - mu), alpha = (tr(Sigma) / C)^-1/2; inverse x = U H^T y / alpha + mu.

    Raises ``ValueError`` at construction if no exact Hadamard matrix of order ``dim`` is known.
    ``alpha`` () is a buffer (log it: 1/alpha^2 is the teacher's mean channel variance)."""

    name = "phi_s"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        self.register_buffer("hadamard", hadamard(dim), persistent=False)
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64))

    def _compute(self):
        lam, u = self._eig()
        alpha = lam.mean().clamp_min(1e-30).rsqrt()
        self.alpha.copy_(alpha)
        h = self.hadamard.to(u)
        return self.running_mean.clone(), alpha * (h @ u.T), (u @ h.T) / alpha


NORMALIZERS: dict[str, type[FeatureNormalizer]] = {
    "identity": Identity,
    "none": Identity,
    "global": GlobalStandardize,
    "global_std": GlobalStandardize,
    "channel": PerChannelStandardize,
    "per_channel": PerChannelStandardize,
    "pca": PCAWhiten,
    "pca_whiten": PCAWhiten,
    "zca": ZCAWhiten,
    "zca_whiten": ZCAWhiten,
    "hadamard": HadamardWhiten,
    "hadamard_whiten": HadamardWhiten,
    "phi_s": PHIS,
    "phis": PHIS,
    "phi-s": PHIS,
}


def build_normalizer(kind: str, dim: int, eps: float = 1e-6) -> FeatureNormalizer:
    """Normaliser by name (see ``NORMALIZERS``; e.g. ``"phi_s"``, ``"channel"``, ``"identity"``)."""
    key = str(kind).lower()
    if key not in NORMALIZERS:
        raise ValueError(f"build_normalizer: unknown kind {kind!r}; choose one of {sorted(set(NORMALIZERS))}")
    return NORMALIZERS[key](dim, eps=eps)


@dataclass
class RefitSchedule:
    """When to accumulate moments and refit during training (RADIO practice: every 100 steps up to 3000).

    ``update_at(step)``: feed this step's teacher features into ``update``; ``refit_at(step)``: call ``fit()``
    after this step. With ``refit_until <= 0`` the normaliser is fitted once (before step 0) and frozen.
    """

    refit_every: int = 100
    refit_until: int = 3000

    def __post_init__(self) -> None:
        if self.refit_every < 1:
            raise ValueError(f"RefitSchedule: refit_every must be >= 1, got {self.refit_every}")

    def update_at(self, step: int) -> bool:
        return step < self.refit_until

    def refit_at(self, step: int) -> bool:
        return step < self.refit_until and (step + 1) % self.refit_every == 0

    def frozen_at(self, step: int) -> bool:
        return step >= self.refit_until
