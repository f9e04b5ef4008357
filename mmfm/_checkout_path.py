"""Keep a source checkout's root folders from shadowing installed packages of the same name.

The repository root holds the folders ``kernels/``, ``data/``, ``radio/``, ... that the install maps to
``mmfm.kernels``, ``mmfm.data``, ... (DESIGN.md). When the root itself is on ``sys.path`` (``python -m pytest``
or ``python -m mmfm`` run from it puts it first), ``import kernels`` finds our folder instead of the PyPI
``kernels`` package that transformers (>= 5.25) imports at start-up, and importing transformers fails.
"""

from __future__ import annotations

import os
import sys


def move_checkout_root_behind_site_packages() -> None:
    """If this is a source checkout whose root is on ``sys.path``, move that entry to the end: installed packages
    then win, and modules of the root that are not installed under the same name still import."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return  # an installed copy, not a checkout
    at_root = [p for p in sys.path if os.path.abspath(p or os.curdir) == root]
    if at_root:
        sys.path[:] = [p for p in sys.path if p not in at_root] + at_root
