"""The ``mmfm`` command line: one sub-command per area (``mmfm data ...``, ``mmfm radio ...``, ...).

Each area owns a ``cli`` module with ``register(subparsers)``; heavy imports happen inside the
handlers so that ``mmfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mmfm.version import __version__

# (sub-command, module that registers it). Order is the order in --help.
AREAS: tuple[tuple[str, str], ...] = (
    ("data", "mmfm.data.cli"),
    ("radio", "mmfm.radio.cli"),
    ("ps3", "mmfm.ps3.cli"),
    ("vlm", "mmfm.vlm.cli"),
    ("bench", "mmfm.kernels.cli"),
    ("demo", "mmfm.demo"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfm",
        description="mmfm: agglomerative vision encoders, PS3, hybrid VLMs and their kernels.",
    )
    parser.add_argument("--version", action="version", version=f"mmfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module_name in AREAS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # An area that has not landed yet simply has no sub-command; any other missing
            # module (a real dependency problem) must surface.
            if err.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        # `mmfm` or `mmfm <area>` alone: show the help of that level.
        (getattr(args, "area_parser", None) or parser).print_help()
        return 0
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
