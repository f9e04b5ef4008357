"""Input validation shared by the ops in ``mmfm.kernels``.

Every helper raises ``ValueError`` naming the argument, what it got and what was expected, so a
wrong call fails at the op's boundary with a readable message instead of deep inside a kernel.
Expected shapes are tuples whose entries are ints (must match) or ``None`` (any size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt_expected(expected: Sequence[int | None]) -> str:
    return (
        "("
        + ", ".join("*" if e is None else str(e) for e in expected)
        + ("," if len(expected) == 1 else "")
        + ")"
    )


def check_tensor(name: str, t: object) -> torch.Tensor:
    """Raise unless ``t`` is a tensor; returns it for chaining."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_rank(name: str, t: torch.Tensor, ranks: int | Iterable[int]) -> torch.Tensor:
    """Raise unless ``t.dim()`` is one of ``ranks``."""
    check_tensor(name, t)
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in allowed:
        want = " or ".join(str(r) for r in allowed)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)} ({t.dim()} dims)")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], hint: str = "") -> torch.Tensor:
    """Raise unless ``t.shape`` matches ``expected`` (``None`` entries are wildcards).

    Args:
        name: argument name used in the message.
        t: the tensor to check.
        expected: the wanted shape, e.g. ``(batch, None, seqlen)``.
        hint: optional layout description appended to the message, e.g. ``"(B, D, L)"``.
    """
    check_tensor(name, t)
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        extra = f" {hint}" if hint else ""
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {_fmt_expected(expected)}{extra}")
    return t


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Raise unless ``t.dtype`` is in ``allowed``."""
    check_tensor(name, t)
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of: {names}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise unless all given (non-None) tensors live on one device; returns that device.

    Call as ``check_same_device(u=u, delta=delta, A=A)``; the first tensor's device is the reference.
    """
    ref_name, ref_dev = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t)
        if ref_dev is None:
            ref_name, ref_dev = name, t.device
        elif t.device != ref_dev:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref_dev}; move all inputs to one device"
            )
    if ref_dev is None:
        raise ValueError("no tensors given")
    return ref_dev


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """Raise unless ``divisor`` divides ``value`` (e.g. heads divisible by groups)."""
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def check_number(name: str, value: object) -> float:
    """Raise unless ``value`` is a real number (int/float, not bool or tensor); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)
