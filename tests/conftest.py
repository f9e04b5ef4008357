"""Suite-wide setup. Triton decides at import time whether kernels are interpreted, so without a GPU
the interpreter must be switched on before anything imports triton: then the Triton kernels' CPU tests
(small shapes) run in CI. Ops called with ``backend="auto"`` take the Triton path under the interpreter
too, which is what the kernel and transformers-integration tests check."""

import os

import torch

import mmfm  # noqa: F401  (first: from a checkout's root, `kernels/` must not shadow the PyPI `kernels`)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
