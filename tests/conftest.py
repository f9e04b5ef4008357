"""Suite-wide setup. Triton decides at import time whether kernels are interpreted, so without a GPU
the interpreter must be switched on before anything imports triton: then the Triton kernels' CPU tests
(small shapes) run in CI. Ops called with ``backend="auto"`` take the Triton path under the interpreter
too, which is what the kernel and transformers-integration tests check."""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

import mmfm  # noqa: F401  (first: from a checkout's root, `kernels/` must not shadow the PyPI `kernels`)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def load_script(monkeypatch):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package): ``load_script("vlm_experiment")``.
    ``scripts/`` goes on ``sys.path`` for the test, as when a script is run, so scripts can import each other."""
    root = Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(root))

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def no_host_reads(monkeypatch):
    """A context manager inside which reading a tensor's value on the host (``item``, ``tolist``, ``bool``,
    ``float``, ``int``) raises: each such read waits for the GPU, so code meant to queue work without waiting
    is checked on CPU with ``with no_host_reads(): ...``."""
    import contextlib

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    @contextlib.contextmanager
    def forbid():
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, host_read)
            yield

    return forbid


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear`` for the rest of the process ("This will persist
    unless manually reset"); put it back after each test so that later tests in the worker see PyTorch's."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear
