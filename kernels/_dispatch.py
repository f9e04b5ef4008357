"""Backend selection shared by every op in ``mmfm.kernels``.

Each op takes ``backend="auto"|"reference"|"triton"|"cuda"``. ``MMFM_KERNEL_BACKEND`` forces one
for every op (useful to A/B a whole model). ``auto`` picks the fastest available path for the
device of the inputs: the CUDA extension if built, else Triton on CUDA tensors, else the
PyTorch reference (CPU always works).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
ENV_VAR = "MMFM_KERNEL_BACKEND"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, available: tuple[str, ...]) -> str:
    """Return the concrete backend for an op.

    Args:
        backend: the caller's request; the environment variable overrides ``"auto"`` only.
        device: device of the op's inputs.
        available: the fast backends the op implements and that are usable now, fastest first
            (e.g. ``("cuda", "triton")``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        on_gpu = device.type == "cuda"
        for candidate in available:
            if candidate == "cuda" and on_gpu:
                return "cuda"
            if candidate == "triton" and triton_available() and (on_gpu or triton_interpret()):
                return "triton"
        return "reference"
    if backend == "reference":
        return backend
    if backend not in available:
        raise RuntimeError(
            f"backend {backend!r} is not available here (available: {('reference',) + available}); "
            f"use backend='auto' or unset {ENV_VAR}"
        )
    if backend == "triton" and device.type != "cuda" and not triton_interpret():
        raise RuntimeError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError("backend 'cuda' needs CUDA tensors")
    return backend


@contextlib.contextmanager
def triton_mode(interpret: bool, *kernels: tuple[ModuleType, str]) -> Iterator[None]:
    """Run the given modules' Triton kernels interpreted on the CPU (``interpret=True``) or compiled, then restore.

    Triton decides when a ``@triton.jit`` function is defined whether it is interpreted, so each module whose
    kernel ``(module, "kernel_name")`` is in the wrong mode is reloaded (in place: references to the module stay
    valid) after ``TRITON_INTERPRET`` is set; on exit the variable and the modules go back. For tests that run
    one file's kernels both ways in one process.
    """
    old = os.environ.get("TRITON_INTERPRET")

    def switch(on: bool) -> None:
        os.environ["TRITON_INTERPRET"] = "1" if on else "0"
        for module, name in kernels:
            if (type(getattr(module, name)).__name__ == "InterpretedFunction") != on:
                importlib.reload(module)

    switch(interpret)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        switch(old == "1")
