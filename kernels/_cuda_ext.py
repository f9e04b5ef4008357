"""Optional CUDA C++ extensions of ``mmfm.kernels`` (sources in ``kernels/csrc``).

Nothing is compiled at install time or behind the user's back: ``python -m mmfm.kernels.build`` (or
:func:`build`) compiles the sources with ``torch.utils.cpp_extension`` for the visible GPU (or
``TORCH_CUDA_ARCH_LIST``) into a per-torch-version cache directory. ``backend="auto"`` then uses an
extension if, and only if, an up-to-date build is in that directory; otherwise the Triton path runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# extension name -> its sources under csrc/
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "selective_scan": ("selective_scan.cpp", "selective_scan_f32.cu", "selective_scan_f16.cu", "selective_scan_bf16.cu"),
}
BUILD_DIR_VAR = "MMFM_CUDA_EXT_DIR"
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def _source_hash(name: str) -> str:
    h = hashlib.sha256()
    for src in sorted({*EXTENSIONS[name], *(p.name for p in CSRC.glob(f"{name}*"))}):  # sources and headers
        h.update((CSRC / src).read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:12]


def build_dir(name: str) -> Path:
    """Where extension ``name`` is built: keyed by torch/CUDA versions and the sources' hash, so a stale
    build is never picked up (nor one for another Python)."""
    if name not in EXTENSIONS:
        raise ValueError(f"unknown CUDA extension {name!r}; known: {sorted(EXTENSIONS)}")
    root = Path(os.environ.get(BUILD_DIR_VAR, Path.home() / ".cache" / "mmfm" / "cuda_ext"))
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}"
    return root / tag / f"{name}-{_source_hash(name)}"


def _module_name(name: str) -> str:
    return f"mmfm_{name}_ext"


def _built_library(name: str) -> Path | None:
    libs = sorted(build_dir(name).glob(f"{_module_name(name)}*.so"))
    return libs[0] if libs else None


def build(name: str = "selective_scan", verbose: bool = False, force: bool = False) -> ModuleType:
    """Compile extension ``name`` (needs nvcc and ninja) and return it; just loads it if already built
    (``force``: rebuild)."""
    from torch.utils.cpp_extension import load

    if not force and _built_library(name) is not None:
        get.cache_clear()
        return _import(name)
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA; the CUDA extensions cannot be built")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    out = build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    module = load(
        name=_module_name(name),
        sources=[str(CSRC / s) for s in EXTENSIONS[name]],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(out),
        verbose=verbose,
    )
    get.cache_clear()
    return module


@functools.cache
def get(name: str) -> ModuleType | None:
    """The built extension ``name``, or None when it has not been built for this torch (or no GPU)."""
    if not torch.cuda.is_available() or _built_library(name) is None:
        return None
    return _import(name)


def import_library(module_name: str, lib: Path) -> ModuleType:
    """Import a compiled extension module from a .so path (once per process)."""
    if module_name in sys.modules:  # an extension module is loaded once per process
        return sys.modules[module_name]
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(lib))
    spec = importlib.util.spec_from_file_location(module_name, str(lib), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def _import(name: str) -> ModuleType:
    return import_library(_module_name(name), _built_library(name))
