"""``mmfm bench``: run the repository's benchmark scripts (``scripts/bench_*.py``) from the command line.

``mmfm bench kernels --op ssd`` runs ``scripts/bench_kernels.py`` with ``--op ssd``; every
other ``scripts/bench_<name>.py`` of a source checkout becomes ``mmfm bench <name> -- [ARGS...]`` (the
arguments after ``--`` go to that script's own parser). Benchmarks live in
``scripts/`` (DESIGN.md: performance claims come from them), so this needs a source checkout.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

KNOWN = {
    "kernels": "SSD chunk scan / causal conv1d (and other kernels) vs mamba-ssm and transformers",
}


def scripts_dir() -> Path:
    """``scripts/`` of the source checkout this package is installed from (editable install)."""
    import mmfm

    return Path(mmfm.__file__).resolve().parent.parent / "scripts"


def _available() -> dict[str, Path]:
    d = scripts_dir()
    found = {p.stem[len("bench_") :]: p for p in sorted(d.glob("bench_*.py"))} if d.is_dir() else {}
    return found


def _load(name: str):
    path = _available().get(name)
    if path is None:
        raise FileNotFoundError(
            f"scripts/bench_{name}.py not found under {scripts_dir()}; benchmarks need a source "
            "checkout installed with `pip install -e .`"
        )
    spec = importlib.util.spec_from_file_location(f"mmfm_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    spec.loader.exec_module(module)
    return module


def _cmd_kernels(args) -> int:
    module = _load("kernels")
    module.run(args.op, tuple(args.batch), tuple(args.seqlen), args.mamba_ssm_src, not args.no_transformers,
               args.json, args.md, args.hf_max_seqlen)  # fmt: skip
    return 0


def _run_script(args) -> int:
    module = _load(args.bench_name)
    path = _available()[args.bench_name]
    argv = [a for a in args.bench_args if a != "--"]
    old_argv = sys.argv
    sys.argv = [str(path), *argv]  # scripts whose main() takes no argv parse sys.argv
    try:
        try:
            rc = module.main(argv)
        except TypeError:
            rc = module.main()
    finally:
        sys.argv = old_argv
    return int(rc or 0)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark script (scripts/bench_*.py)",
        description="Run one of the repository's benchmarks; arguments after the name go to the script.",
    )
    p.set_defaults(area_parser=p)
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    k = sub.add_parser("kernels", help=KNOWN["kernels"], description=KNOWN["kernels"])
    # Mirrors scripts/bench_kernels.py's parser (kept here so `mmfm --help` does not import torch).
    k.add_argument("--op", choices=["ssd", "conv1d", "all"], default="all", help="which op to benchmark")
    k.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    k.add_argument("--seqlen", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths")
    k.add_argument("--mamba-ssm-src", default=None, help="unpacked mamba-ssm sdist (anchor), else installed")
    k.add_argument("--no-transformers", action="store_true", help="skip transformers' PyTorch anchor")
    k.add_argument("--json", default=None, help="write rows as JSON here")
    k.add_argument("--md", default=None, help="write the markdown table here")
    k.add_argument("--hf-max-seqlen", type=int, default=16384, help="longest L for transformers' SSD anchor")
    k.set_defaults(func=_cmd_kernels)
    for name in _available():
        if name in KNOWN:
            continue
        s = sub.add_parser(name, help=f"scripts/bench_{name}.py (pass its arguments after --)")
        s.add_argument("bench_args", nargs="...", help="arguments for the script, after --")
        s.set_defaults(func=_run_script, bench_name=name)
