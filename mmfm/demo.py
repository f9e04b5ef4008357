"""``mmfm demo``: the whole pipeline on built-in synthetic data, on a CPU, with no downloads.

Each stage is a function ``stage(ctx) -> dict`` that writes under ``ctx.out`` and returns the figures
that go in the final report. Stages run in order; ``--fast`` shrinks every stage to a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("mmfm.demo")


@dataclass
class DemoContext:
    out: Path
    fast: bool
    device: str
    seed: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def size(self, fast: int, full: int) -> int:
        """Pick a size for the fast smoke run or the full demo."""
        return fast if self.fast else full


def stage_data(ctx: DemoContext) -> dict[str, Any]:
    """Generate synthetic shards for every job and read them back through the data layer."""
    from mmfm.data.shards import read_shards
    from mmfm.data.synth import write_synthetic

    counts = {"images": ctx.size(64, 1024), "regions": ctx.size(16, 192), "vqa": ctx.size(64, 2048)}
    figures: dict[str, Any] = {}
    for kind, n in counts.items():
        start = time.perf_counter()
        shards = write_synthetic(kind, n, ctx.out / "data" / kind, seed=ctx.seed, samples_per_shard=256)
        seconds = time.perf_counter() - start
        schema = {"images": "image", "regions": "regions", "vqa": "conversation"}[kind]
        read_back = sum(1 for _ in read_shards([str(s) for s in shards], schema=schema))
        if read_back != n:
            raise RuntimeError(f"wrote {n} {kind} samples but read back {read_back}")
        figures[kind] = {"samples": n, "shards": len(shards), "write_samples_per_s": round(n / seconds, 1)}
    return figures


STAGES: list[tuple[str, Callable[[DemoContext], dict[str, Any]]]] = [
    ("data", stage_data),
]


def run_demo(out: str | Path = "mmfm-demo", fast: bool = False, device: str = "cpu", seed: int = 0,
             stages: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the demo stages and return ``{stage: figures}``; also written to ``out/report.json``."""
    from tqdm.auto import tqdm

    ctx = DemoContext(out=Path(out), fast=fast, device=device, seed=seed)
    ctx.out.mkdir(parents=True, exist_ok=True)
    selected = [(name, fn) for name, fn in STAGES if stages is None or name in stages]
    for name, fn in tqdm(selected, desc="mmfm demo", unit="stage"):
        start = time.perf_counter()
        figures = fn(ctx)
        figures["seconds"] = round(time.perf_counter() - start, 1)
        ctx.results[name] = figures
        log.info("stage %s done in %.1f s", name, figures["seconds"])
    (ctx.out / "report.json").write_text(json.dumps(ctx.results, indent=2))
    print(format_report(ctx.results, ctx.out))
    return ctx.results


def format_report(results: dict[str, dict[str, Any]], out: Path) -> str:
    lines = ["", "mmfm demo report", "================"]
    for name, figures in results.items():
        lines.append(f"[{name}] ({figures.get('seconds', '?')} s)")
        for key, value in figures.items():
            if key != "seconds":
                lines.append(f"  {key}: {value}")
    lines.append(f"Everything is under {out}/ (report.json, pictures, checkpoints, logs).")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on built-in synthetic data",
        description="Generate synthetic data and run every available stage on it, then print a report.",
    )
    p.add_argument("--out", default="mmfm-demo", help="output directory (default: ./mmfm-demo)")
    p.add_argument("--fast", action="store_true", help="1-2 minute smoke version")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="*", default=None, help=f"subset of: {', '.join(n for n, _ in STAGES)}")
    p.set_defaults(func=lambda args: run_demo(args.out, args.fast, args.device, args.seed, args.stages) and 0)
