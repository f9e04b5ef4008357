"""Build the optional CUDA C++ extensions: ``python -m mmfm.kernels.build [--verbose] [NAME ...]``.

Needs a CUDA torch, nvcc and ninja; builds for the visible GPU unless ``TORCH_CUDA_ARCH_LIST`` is set
(e.g. ``TORCH_CUDA_ARCH_LIST=9.0`` for H100/H200). Afterwards ``backend="auto"`` picks the extension up.
"""

from __future__ import annotations

import argparse
import time

from mmfm.kernels._cuda_ext import EXTENSIONS, build, build_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=sorted(EXTENSIONS), help=f"extensions ({', '.join(EXTENSIONS)})")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    for name in args.names:
        t0 = time.perf_counter()
        build(name, verbose=args.verbose)
        print(f"built {name} in {time.perf_counter() - t0:.0f} s -> {build_dir(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
