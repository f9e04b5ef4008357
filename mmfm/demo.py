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
# Recipes ship inside the package folder tree (configs/ at the repository root).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def recipe(name: str) -> Path | None:
    """A recipe from configs/ when running from a checkout; None (the dataclass defaults, which are the
    same tiny recipes) for a plain wheel install without configs/."""
    path = CONFIGS / name
    return path if path.is_file() else None


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

    counts = {"images": ctx.size(64, 1024), "regions": ctx.size(16, 256), "vqa": ctx.size(64, 4096)}
    sizes = {"images": None, "regions": 512, "vqa": None}
    figures: dict[str, Any] = {}
    for kind, n in counts.items():
        start = time.perf_counter()
        shards = write_synthetic(kind, n, ctx.out / "data" / kind, seed=ctx.seed, samples_per_shard=256,
                                 image_size=sizes[kind])
        seconds = time.perf_counter() - start
        schema = {"images": "image", "regions": "regions", "vqa": "conversation"}[kind]
        read_back = sum(1 for _ in read_shards([str(s) for s in shards], schema=schema))
        if read_back != n:
            raise RuntimeError(f"wrote {n} {kind} samples but read back {read_back}")
        figures[kind] = {"samples": n, "shards": len(shards), "write_samples_per_s": round(n / seconds, 1)}
    return figures


def stage_ps3(ctx: DemoContext) -> dict[str, Any]:
    """Pre-train a tiny PS3 on synthetic high-res region data; selection/retrieval table and a picture."""
    import torch

    from mmfm.config import load_config
    from mmfm.data.shards import read_shards
    from mmfm.data.synth import write_synthetic
    from mmfm.ps3.train import PS3TrainConfig, train
    from mmfm.ps3.visualize import save_selection

    held_out = ctx.out / "data" / "regions-test"
    write_synthetic("regions", ctx.size(8, 48), held_out, seed=ctx.seed + 1000, image_size=512)
    steps = ctx.size(10, 250)
    cfg = load_config(PS3TrainConfig, recipe("ps3/tiny-cpu.yaml"), [
        f"train_shards={ctx.out / 'data' / 'regions'}", f"eval_shards={held_out}", f"eval_samples={ctx.size(8, 48)}",
        f"steps={steps}", f"ckpt_every={steps}", f"engine.optimizer.total_steps={steps}",
        f"engine.optimizer.warmup_steps={min(20, steps // 5)}", f"seed={ctx.seed}"])
    run = ctx.out / "ps3"
    result = train(cfg, run, progress=True)
    objective_model = run / "model"
    from mmfm.ps3.train import load_model

    encoder, text = load_model(objective_model)
    sample = next(iter(read_shards(str(held_out), schema="regions")))
    region = sample.regions[-1]
    image = torch.from_numpy(__import__("numpy").asarray(sample.image, dtype="float32") / 255.0).permute(2, 0, 1)
    with torch.no_grad():
        out = encoder(image[None], num_look_close=24, prompt=text([region.caption]))
    save_selection(sample.image, out.positions[0], encoder.grid_sizes(), ctx.out / "pictures" / "ps3_selection.png",
                   boxes=[region.box])
    ev = result["eval"]
    return {"steps": steps, "prompt_for_picture": region.caption,
            "top_down_hit_rate@8": round(ev["top_down_hit_rate"], 3), "random": round(ev["top_down_random"], 3),
            "bottom_up_hit_rate@8": round(ev["bottom_up_hit_rate"], 3), "bottom_up_random": round(ev["bottom_up_random"], 3),
            "local_retrieval_top1": round(ev["local_retrieval_top1"], 3),
            "global_only_retrieval_top1": round(ev["global_only_retrieval_top1"], 3)}


def stage_vlm(ctx: DemoContext) -> dict[str, Any]:
    """Train a tiny VLM (tiny RADIO encoder -> 2x2 pixel unshuffle -> projector -> tiny Nemotron-H) on
    synthetic VQA, evaluate it against the majority-answer baseline, and draw a few examples."""
    from mmfm.config import load_config
    from mmfm.data.synth import write_synthetic
    from mmfm.vlm.train import VLMTrainConfig, train

    held_out = ctx.out / "data" / "vqa-test"
    write_synthetic("vqa", ctx.size(32, 300), held_out, seed=ctx.seed + 2000)
    steps = ctx.size(10, 600)
    overrides = [f"train_shards={ctx.out / 'data' / 'vqa'}", f"eval_shards={held_out}",
                 f"eval_samples={ctx.size(32, 300)}", f"steps={steps}", f"ckpt_every={steps}",
                 f"engine.optimizer.total_steps={steps}", f"engine.optimizer.warmup_steps={min(20, steps // 5)}",
                 f"seed={ctx.seed}"]
    student = ctx.results.get("radio", {}).get("student_dir")
    if student:
        overrides.append(f"model.encoder.path={student}")
    cfg = load_config(VLMTrainConfig, recipe("vlm/tiny-cpu.yaml"), overrides)
    result = train(cfg, ctx.out / "vlm", progress=True)
    draw_vqa_examples(ctx.out / "vlm" / "eval.json", held_out, ctx.out / "pictures" / "vqa_examples.png")
    ev = result["eval"]
    return {"steps": steps, "encoder": student or "random tiny student",
            "vqa_accuracy": round(ev["overall"], 3), "majority_baseline": round(ev["majority_baseline"]["overall"], 3),
            "per_category": {k: round(v["score"], 3) for k, v in ev["per_category"].items()}}


def draw_vqa_examples(eval_json: Path, shards: Path, out: Path, n: int = 6) -> Path:
    """A grid of held-out images with question, model answer and ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmfm.data.shards import read_shards

    preds = {r["id"]: r for r in json.loads(eval_json.read_text())["predictions"]}
    shown = []
    for sample in read_shards(str(shards), schema="conversation"):
        if sample.key in preds:
            shown.append((sample.images[0], preds[sample.key]))
        if len(shown) == n:
            break
    fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3.6))
    for ax, (image, rec) in zip(list(__import__("numpy").atleast_1d(axes)), shown):
        ax.imshow(image)
        ax.set_axis_off()
        ok = rec["prediction"].strip().lower() in [a.strip().lower() for a in rec["answers"]]
        ax.set_title(f"{rec['question']}\nmodel: {rec['prediction']}\ntruth: {rec['answers'][0]}", fontsize=7,
                     color="green" if ok else "red")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


STAGES: list[tuple[str, Callable[[DemoContext], dict[str, Any]]]] = [
    ("data", stage_data),
    ("ps3", stage_ps3),
    ("vlm", stage_vlm),
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
