#!/usr/bin/env python
"""RADIO distillation step: scaling from one GPU to N GPUs of one host.

Runs ``scripts/bench_radio_train.py`` under ``torchrun`` with 1 process, then with N (one GPU each, DDP, or
DeepSpeed with ``--deepspeed``), with the same arguments, one after the other in this run. Each rank keeps the
per-GPU batch of the point (weak scaling, as a data-parallel job does), so for every point it prints:

- img/s on 1 GPU and on N GPUs (all ranks together);
- **scaling efficiency** = img/s(N) / (N * img/s(1)), the anchor being the 1-GPU run made here;
- step time, MFU per GPU and peak memory per GPU of both runs (ZeRO-2's per-GPU saving shows in the last).

Arguments after ``--`` go to ``bench_radio_train.py`` unchanged::

    python scripts/bench_radio_scaling.py --gpus 2 -- --compile --points low
    python scripts/bench_radio_scaling.py --gpus 2 -- --compile --deepspeed configs/deepspeed/zero2.json
    python scripts/bench_radio_scaling.py --gpus 2 --tiny        # CPU smoke run: tiny models, gloo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().with_name("bench_radio_train.py")


def run_bench(nproc: int, bench_args: list[str], json_path: Path) -> dict:
    """``bench_radio_train.py`` under torchrun with ``nproc`` processes; its JSON (written by rank 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(BENCH),
           *bench_args, "--json", str(json_path)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(json_path.read_text())


def scaling_rows(one: dict, many: dict) -> list[dict]:
    """Per point (resolution): img/s of both runs and the efficiency img/s(N) / (N * img/s(1))."""
    n = many["meta"]["world_size"]
    if one["meta"]["world_size"] != 1:
        raise ValueError(f"the anchor run has world_size {one['meta']['world_size']}, expected 1")
    base = {r["resolution"]: r for r in one["rows"]}
    out = []
    for r in many["rows"]:
        b = base.get(r["resolution"])
        if b is None:
            raise ValueError(f"point {r['resolution']} px is missing from the 1-GPU run")
        out.append({"resolution": r["resolution"], "batch_per_gpu": r["batch"], "gpus": n,
                    "img_per_s_1": b["img_per_s"], "img_per_s_n": r["img_per_s"],
                    "efficiency": r["img_per_s"] / (n * b["img_per_s"]),
                    "step_ms_1": b["step_ms"], "step_ms_n": r["step_ms"], "mfu_1": b["mfu"], "mfu_n": r["mfu"],
                    "peak_gib_1": b["peak_gib"], "peak_gib_n": r["peak_gib"]})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the scaled run")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (bench_radio_train.py --tiny on gloo)")
    p.add_argument("--json", default=None)
    args = p.parse_args(own)
    if args.gpus < 2:
        raise SystemExit(f"--gpus {args.gpus}: the scaled run needs at least 2 processes")
    if args.tiny:
        bench_args = ["--tiny", "--device", "cpu", *bench_args]
    with tempfile.TemporaryDirectory() as tmp:
        one = run_bench(1, bench_args, Path(tmp) / "one.json")
        many = run_bench(args.gpus, bench_args, Path(tmp) / "many.json")
    rows = scaling_rows(one, many)
    print(f"\n{one['meta']['device']}, torch {one['meta']['torch']}, bench arguments: {' '.join(bench_args) or '-'}")
    for r in rows:
        print(f"res {r['resolution']:5d} batch {r['batch_per_gpu']:3d}/GPU  1 GPU {r['img_per_s_1']:8.1f} img/s  "
              f"{r['gpus']} GPUs {r['img_per_s_n']:8.1f} img/s  scaling efficiency {100 * r['efficiency']:.1f}%  "
              f"step {r['step_ms_1']:.1f} -> {r['step_ms_n']:.1f} ms  MFU/GPU {100 * r['mfu_1']:.1f}% -> "
              f"{100 * r['mfu_n']:.1f}%  peak/GPU {r['peak_gib_1']:.1f} -> {r['peak_gib_n']:.1f} GiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"one": one, "many": many, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
