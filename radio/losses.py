"""Distillation losses, resolution matching and the fidelity metric.

* ``summary_loss``: cosine distance ``1 - cos(a, b)`` averaged over the batch (AM-RADIO summary loss).
* ``feature_loss(kind="mse")``: MSE in the normaliser's (e.g. PHI-S) space, mean over all elements.
* ``feature_loss(kind="cos_smoothl1")``: AM-RADIO's ``0.9 * (1 - cos) + 0.1 * smooth_l1`` per token, where
  the cosine runs over channels and smooth-L1 (beta=1) is averaged over elements.
* Resolution matching: ``match_resolution`` resizes the teacher map to the student grid
  (``teacher_to_student``) or the student map to the teacher grid (``student_to_teacher``), bilinearly;
  ``pixel_shuffle_target`` / ``pixel_unshuffle_prediction`` convert between a ``u``-times finer teacher map
  and a pixel-shuffle head's ``u*u*C`` channels with the channel order ``(u1, u2, c)`` of
  :func:`mmfm.radio.adaptors.pixel_shuffle_tokens`.
* ``fidelity``: ``Var(teacher) / MSE(student, teacher)``, the per-channel variance over batch and space
  averaged over channels (as in RADIO's mode-switching evaluation).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "cos_smoothl1_loss",
    "cosine_distance",
    "feature_loss",
    "fidelity",
    "match_resolution",
    "mse_loss",
    "pixel_shuffle_target",
    "pixel_unshuffle_prediction",
    "resize_features",
    "summary_loss",
]

FEATURE_LOSSES = ("mse", "cos_smoothl1", "cosine", "smooth_l1")


def _same_shape(pred: torch.Tensor, target: torch.Tensor, fn: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{fn}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; "
                         "match the resolution first (match_resolution / pixel_shuffle_target)")


def cosine_distance(pred: torch.Tensor, target: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Element-wise ``1 - cos(pred, target)`` along ``dim`` (that axis removed), computed in float32+."""
    _same_shape(pred, target, "cosine_distance")
    wd = torch.promote_types(pred.dtype, torch.float32)
    return 1.0 - F.cosine_similarity(pred.to(wd), target.to(wd), dim=dim, eps=eps)


def summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target (B, C) -> scalar mean cosine distance."""
    if pred.ndim != 2:
        raise ValueError(f"summary_loss: expected (B, C) summaries, got pred {tuple(pred.shape)}")
    return cosine_distance(pred, target, dim=-1).mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (float32+)."""
    _same_shape(pred, target, "mse_loss")
    wd = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(wd) - target.to(wd)).pow(2).mean()


def cos_smoothl1_loss(pred: torch.Tensor, target: torch.Tensor, dim: int = 1, cos_weight: float = 0.9,
                      smoothl1_weight: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """AM-RADIO feature loss: ``cos_weight * mean(1 - cos over dim) + smoothl1_weight * mean(smooth_l1)``."""
    _same_shape(pred, target, "cos_smoothl1_loss")
    wd = torch.promote_types(pred.dtype, torch.float32)
    p, t = pred.to(wd), target.to(wd)
    cos = cosine_distance(p, t, dim=dim).mean()
    sl1 = F.smooth_l1_loss(p, t, beta=beta)
    return cos_weight * cos + smoothl1_weight * sl1


def feature_loss(pred: torch.Tensor, target: torch.Tensor,
                 kind: Literal["mse", "cos_smoothl1", "cosine", "smooth_l1"] = "mse", dim: int = 1) -> torch.Tensor:
    """Dense feature loss on matching maps, e.g. (B, C, h, w) with channels at ``dim=1`` (or (B, N, C), dim=-1).

    ``mse``: mean squared error; ``cos_smoothl1``: 0.9 cos + 0.1 smooth-L1; ``cosine``: mean cosine distance;
    ``smooth_l1``: smooth-L1 (beta=1). -> scalar.
    """
    if kind == "mse":
        return mse_loss(pred, target)
    if kind == "cos_smoothl1":
        return cos_smoothl1_loss(pred, target, dim=dim)
    if kind == "cosine":
        return cosine_distance(pred, target, dim=dim).mean()
    if kind == "smooth_l1":
        _same_shape(pred, target, "feature_loss")
        wd = torch.promote_types(pred.dtype, torch.float32)
        return F.smooth_l1_loss(pred.to(wd), target.to(wd))
    raise ValueError(f"feature_loss: unknown kind {kind!r}; choose one of {FEATURE_LOSSES}")


def resize_features(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
                    align_corners: bool = False) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size). No-op when the size already matches. Area mode when shrinking by an
    integer factor would also work; bilinear keeps it differentiable and matches RADIO's evaluation."""
    if x.ndim != 4:
        raise ValueError(f"resize_features: expected (B, C, h, w), got {tuple(x.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    kw = {"align_corners": align_corners} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **kw)


def match_resolution(student: torch.Tensor, teacher: torch.Tensor,
                     mode: Literal["teacher_to_student", "student_to_teacher"] = "teacher_to_student"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring (B, C, hs, ws) student and (B, C, ht, wt) teacher maps to one grid. -> (student, teacher)."""
    if mode == "teacher_to_student":
        return student, resize_features(teacher, student.shape[-2:])
    if mode == "student_to_teacher":
        return resize_features(student, teacher.shape[-2:]), teacher
    raise ValueError(f"match_resolution: mode must be 'teacher_to_student' or 'student_to_teacher', got {mode!r}")


def pixel_shuffle_target(target: torch.Tensor, u: int) -> torch.Tensor:
    """Fine teacher map (B, C, h*u, w*u) -> (B, u*u*C, h, w) with channel order (u1, u2, c).

    This is the target layout of a pixel-shuffle head whose token (i, j) predicts the u x u fine positions
    ``(i*u + u1, j*u + u2)``."""
    if u < 1:
        raise ValueError(f"pixel_shuffle_target: u must be >= 1, got {u}")
    b, c, hu, wu = target.shape
    if hu % u or wu % u:
        raise ValueError(f"pixel_shuffle_target: grid {hu}x{wu} is not divisible by u={u}")
    h, w = hu // u, wu // u
    x = target.reshape(b, c, h, u, w, u).permute(0, 3, 5, 1, 2, 4)  # b u1 u2 c h w
    return x.reshape(b, u * u * c, h, w)


def pixel_unshuffle_prediction(pred: torch.Tensor, u: int) -> torch.Tensor:
    """Inverse of :func:`pixel_shuffle_target`: (B, u*u*C, h, w) -> (B, C, h*u, w*u)."""
    b, cu, h, w = pred.shape
    if cu % (u * u):
        raise ValueError(f"pixel_unshuffle_prediction: {cu} channels are not a multiple of u*u={u * u}")
    c = cu // (u * u)
    x = pred.reshape(b, u, u, c, h, w).permute(0, 3, 4, 1, 5, 2)  # b c h u1 w u2
    return x.reshape(b, c, h * u, w * u)


@torch.no_grad()
def fidelity(pred: torch.Tensor, target: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``Var(target) / MSE(pred, target)``: per-channel variance (over every non-channel axis, biased)
    averaged over channels, divided by the element-wise MSE. Higher is better; 1 = predicting the mean."""
    _same_shape(pred, target, "fidelity")
    t = target.float().movedim(dim, -1).reshape(-1, target.shape[dim])
    p = pred.float().movedim(dim, -1).reshape(-1, pred.shape[dim])
    var = t.var(dim=0, unbiased=False).mean()
    mse = (p - t).pow(2).mean()
    return var / mse.clamp_min(eps)
