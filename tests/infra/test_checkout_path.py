"""From a checkout's root (``python -m pytest``, ``python -m mmfm``), the root folder ``kernels/`` must not
shadow the PyPI ``kernels`` package that transformers imports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_root_kernels_folder_does_not_shadow_installed_packages() -> None:
    # the precondition: run from the root, a bare `import kernels` finds our folder
    assert _run("import kernels; print(kernels.__file__)") == str(ROOT / "kernels" / "__init__.py")
    # importing mmfm first puts the root (sys.path[0] == '' under -c) behind site-packages
    assert _run("import sys, mmfm; print(sys.path.count(''), sys.path[-1] == '')") == "1 True"
    # so `kernels` is the installed package where there is one, and never our folder
    found = _run("import mmfm, importlib.util; print(getattr(importlib.util.find_spec('kernels'), 'origin', None))")
    assert found != str(ROOT / "kernels" / "__init__.py")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_transformers_imports_after_mmfm_from_the_root() -> None:
    # transformers >= 5.25 imports the PyPI `kernels` at start-up (transformers.activations)
    assert _run("import mmfm.vlm.model, transformers.activations; print('ok')") == "ok"
