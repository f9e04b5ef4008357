#!/usr/bin/env python
"""Teacher-feature normaliser study: PHI-S vs per-channel standardisation vs raw MSE, same run budget.

Every variant trains the same student (same seed, data order, teachers, steps, LR) with the MSE feature loss;
only ``normalizer`` changes. Fidelity is then measured on held-out images in each **teacher's own feature
space** (the normaliser's inverse folded into the exported adaptors), so the numbers are comparable:
``fidelity = Var(teacher) / MSE`` (higher is better) and per-token cosine similarity.

    python scripts/radio_normalizer_study.py --config configs/radio/tiny-cpu.yaml --out runs/radio-study \
        steps=150 engine.optimizer.total_steps=150

Writes ``OUT/<normaliser>/`` runs, ``OUT/study.json`` and ``OUT/study.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

from mmfm.config import add_config_args, config_from_args
from mmfm.radio.distill import RadioTrainConfig, train

LABELS = {"phi_s": "PHI-S", "identity": "raw (no normaliser)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--normalizers", default="phi_s,channel,identity",
                   help="comma-separated normaliser kinds (mmfm.radio.normalizers names; default "
                        "phi_s,channel,identity)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    base = config_from_args(RadioTrainConfig, args)
    if not base.data.eval_shards:
        raise SystemExit("the study needs held-out shards: set data.eval_shards")
    out = Path(args.out)
    rows: dict[str, dict] = {}
    for kind in [k.strip() for k in args.normalizers.split(",") if k.strip()]:
        cfg = config_from_args(RadioTrainConfig, args)
        cfg.normalizer = kind
        cfg.loss.feature = "mse"
        for t in cfg.teachers:  # the study overrides per-teacher choices too
            if hasattr(t, "normalizer"):
                t.normalizer = None
        t0 = time.perf_counter()
        res = train(cfg, out / kind, progress=not args.no_progress)
        rows[kind] = {"eval_before": res.get("eval_before"), "eval_after": res["eval_after"],
                      "final_loss": res["final"].get("loss"), "seconds": time.perf_counter() - t0}
    (out / "study.json").write_text(json.dumps(rows, indent=2))
    table = format_study(rows, base)
    (out / "study.md").write_text(table + "\n")
    print(table)
    return 0


def _avg(table: dict, teacher: str, key: str) -> float | None:
    vals = [row[teacher][key] for row in table.values() if teacher in row and key in row[teacher]]
    return mean(vals) if vals else None


def format_study(rows: dict[str, dict], cfg: RadioTrainConfig) -> str:
    teachers = [t.name for t in cfg.teachers]
    res = ", ".join(next(iter(rows.values()))["eval_after"].keys())
    lines = [f"Teacher-matching after {cfg.steps} steps (held-out images, mean over resolutions {res}; "
             "teacher feature space)", "",
             "| normaliser | " + " | ".join(f"{t} fidelity | {t} feat cos" for t in teachers)
             + " | mean fidelity | mean summary cos |",
             "|---|" + "---|---|" * len(teachers) + "---|---|"]
    for kind, r in rows.items():
        ev = r["eval_after"]
        cells, fids, scos = [], [], []
        for t in teachers:
            f, c = _avg(ev, t, "fidelity"), _avg(ev, t, "feature_cos")
            s = _avg(ev, t, "summary_cos")
            cells.append(f"{f:.3f} | {c:.3f}" if f is not None else "- | -")
            if f is not None:
                fids.append(f)
            if s is not None:
                scos.append(s)
        lines.append(f"| {LABELS.get(kind, kind)} | " + " | ".join(cells)
                     + f" | {mean(fids):.3f} | {mean(scos):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
