"""``mmfm demo``: the whole pipeline on built-in synthetic data, on a CPU, with no downloads.

Each stage is a function ``stage(ctx) -> dict`` that writes under ``ctx.out`` and returns the figures
that go in the final report. Stages run in order; ``--fast`` shrinks every stage to a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmfm.radio.distill import RadioTrainConfig

log = logging.getLogger("mmfm.demo")
# Recipes ship inside the package folder tree (configs/ at the repository root).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Side of the synthetic "images" shards the RADIO stage distils on (the largest partition resolution).
RADIO_IMAGE_SIZE = 128


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
    recipes: dict[str, str] = field(default_factory=dict)  # stage -> recipe replacing the tiny one
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> extra key=value overrides

    def size(self, fast: int, full: int) -> int:
        """Pick a size for the fast smoke run or the full demo."""
        return fast if self.fast else full

    def config(self, cls: type, stage: str, tiny: str, overrides: list[str]) -> Any:
        """The stage's config: the user's recipe for it (``--recipe STAGE=PATH``: real sizes, local
        checkpoints) or the tiny built-in one, then the demo's overrides (data, steps), then the user's
        (``--set STAGE.key=value``), which win."""
        from mmfm.config import load_config

        path = self.recipes.get(stage) or recipe(tiny)
        return load_config(cls, path, overrides + self.overrides.get(stage, []))


DATA_KINDS = ("images", "regions", "vqa")  # what stage_data writes under OUT/data and the other stages read


def stage_data(ctx: DemoContext) -> dict[str, Any]:
    """Generate synthetic shards for every job and read them back through the data layer."""
    from mmfm.data.shards import read_shards
    from mmfm.data.synth import write_synthetic

    counts = dict(zip(DATA_KINDS, (ctx.size(64, 1024), ctx.size(16, 256), ctx.size(64, 4096))))
    # images: the RADIO recipe's resolution (configs/radio/tiny-cpu.yaml: partitions up to 128 px)
    sizes = {"images": RADIO_IMAGE_SIZE, "regions": 512, "vqa": None}
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


def stage_radio(ctx: DemoContext) -> dict[str, Any]:
    """Distil a tiny student from the three tiny random-init teachers of ``radio/tiny-cpu.yaml`` (PHI-S,
    multi-resolution partitions, mosaic) on the synthetic image shards; held-out cosine similarity to every
    teacher before and after training, a PCA picture of the dense features and the loss curves."""
    from mmfm.data.synth import write_synthetic
    from mmfm.radio.distill import RadioTrainConfig, train

    held_out = ctx.out / "data" / "images-test"
    n_eval = ctx.size(16, 48)
    write_synthetic("images", n_eval, held_out, seed=ctx.seed + 3000, image_size=RADIO_IMAGE_SIZE)
    steps = ctx.size(12, 300)
    sched = ctx.size(5, 25)  # normaliser refits: a few in the smoke run too
    cfg = ctx.config(RadioTrainConfig, "radio", "radio/tiny-cpu.yaml", [
        f"data.train_shards={ctx.out / 'data' / 'images'}", f"data.eval_shards={held_out}",
        f"data.eval_images={n_eval}", f"steps={steps}", f"ckpt_every={steps}", f"seed={ctx.seed}",
        f"normalizer_schedule.refit_every={sched}",
        f"normalizer_schedule.refit_until={min(8 * sched, steps)}",
        f"engine.optimizer.total_steps={steps}", f"engine.optimizer.warmup_steps={min(20, steps // 5)}"])
    run = ctx.out / "radio"
    result = train(cfg, run, resume=False, progress=True)
    student_dir = result["export"]["model"]
    pictures = ctx.out / "pictures"
    draw_feature_pca(cfg, student_dir, held_out, pictures / "radio_pca.png")
    terms = ["loss"] + sorted(k for k in result["final"] if k.startswith("loss/"))
    plot_stage_losses(run, pictures / "loss_radio.png", terms, title="RADIO distillation", logy=True)
    return {"steps": cfg.steps, "teachers": [t.name for t in cfg.teachers],
            "held_out_cos": held_out_cosines(cfg, result["eval_before"], result["eval_after"]),
            "student_dir": student_dir}


def teacher_resolutions(cfg: RadioTrainConfig) -> dict[str, list[int]]:
    """The student resolutions every teacher is distilled at (its partitions' resolutions; all if none)."""
    out = {}
    for t in cfg.teachers:
        parts = [q for q in cfg.partitions if not t.partitions or q.name in t.partitions]
        res = {int(r) for q in parts for r in q.resolutions}
        out[t.name] = sorted(res)
    return out


def held_out_cosines(cfg: RadioTrainConfig, before: dict[str, Any], after: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """``{teacher: {metric: {"before", "after"}}}`` from the trainer's fidelity tables, averaged over the
    evaluation resolutions the teacher was trained at (``"at"``): summary and feature cosine similarity, and
    both again after removing the teacher's mean over the held-out set (``*_centered``: a random-init
    teacher's outputs share a large mean, which alone makes the plain cosine look high)."""
    metrics = ("summary_cos", "summary_cos_centered", "feature_cos", "feature_cos_centered")
    out: dict[str, dict[str, Any]] = {}
    for name, resolutions in teacher_resolutions(cfg).items():
        keys = [str(r) for r in resolutions if str(r) in before and str(r) in after] or list(before)
        row: dict[str, Any] = {"at": [int(k) for k in keys]}
        for m in metrics:
            vals = [(before[k][name][m], after[k][name][m]) for k in keys if m in before[k].get(name, {})]
            if vals:
                row[m] = {"before": round(sum(v[0] for v in vals) / len(vals), 3),
                          "after": round(sum(v[1] for v in vals) / len(vals), 3)}
        out[name] = row
    return out


def draw_feature_pca(cfg: RadioTrainConfig, student_dir: str | Path, shards: Path, out: Path,
                     resolution: int | None = None) -> Path:
    """PCA-to-RGB pictures of one held-out image: the student's backbone features, and for every teacher its
    own feature map above the student's adaptor prediction of it (one PCA basis per teacher for both, so
    equal colours mean similar features)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    from mmfm.data.transforms import center_crop_to_multiple, to_tensor
    from mmfm.radio import load
    from mmfm.radio.distill import (
        build_teachers,
        eval_resolutions,
        probe_teacher,
        resize,
        run_teacher,
        teacher_input_size,
    )
    from mmfm.radio.evaluate import load_samples

    res = int(resolution or max(eval_resolutions(cfg)))
    patch = cfg.student.patch_size
    sample = load_samples(str(shards), 1)[0]
    image = center_crop_to_multiple(sample.image, patch, (res, res))
    x = to_tensor(image)[None]
    student = load(student_dir, adaptors="all")
    teachers = build_teachers(cfg)
    with torch.no_grad():
        pred = student(x, feature_fmt="NCHW")
        panels = [("student backbone", _pca_picture(pred["backbone"].features[0]), None)]
        for spec in cfg.teachers:
            teacher = teachers[spec.name]
            info = probe_teacher(teacher, spec)
            s_feat = pred[spec.name].features
            if s_feat is None or info.feature_dim is None:
                continue
            _, t_feat = run_teacher(teacher, resize(x, teacher_input_size(spec, info, (res, res), patch)))
            t_feat = F.interpolate(t_feat.float(), size=s_feat.shape[-2:], mode="bilinear",
                                   align_corners=False)
            panels.append((spec.name, *_pca_pictures_shared_basis(t_feat[0], s_feat[0])))
    fig, axes = plt.subplots(2, len(panels) + 1, figsize=(2.4 * (len(panels) + 1), 5.0), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(f"held-out image ({res} px)", fontsize=8)
    axes[1, 0].set_visible(False)
    for col, (name, top, bottom) in enumerate(panels, start=1):
        axes[0, col].imshow(top, interpolation="nearest")
        axes[0, col].set_title(name if bottom is None else f"teacher {name}", fontsize=8)
        if bottom is None:
            axes[1, col].set_visible(False)
        else:
            axes[1, col].imshow(bottom, interpolation="nearest")
            axes[1, col].set_title(f"student -> {name}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle("PCA of dense features (first 3 components as RGB)", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _pca_picture(features_chw: Any) -> Any:
    """(C, h, w) features -> (h, w, 3) uint8 PCA picture."""
    from mmfm.radio.pca import pca_rgb

    c, h, w = features_chw.shape
    return pca_rgb(features_chw.reshape(c, h * w).T, (h, w))


def _pca_pictures_shared_basis(reference_chw: Any, other_chw: Any, q: float = 0.01) -> tuple[Any, Any]:
    """Two (C, h, w) maps -> two (h, w, 3) uint8 pictures in the reference map's PCA basis (its mean, its
    first three components, its quantile stretch), so that equal colours mean equal features."""
    import numpy as np
    import torch

    from mmfm.radio.pca import pca_components

    c, h, w = reference_chw.shape
    ref, other = (x.reshape(c, h * w).T.double() for x in (reference_chw, other_chw))
    _, comps = pca_components(ref, 3)
    mean = ref.mean(dim=0, keepdim=True)
    proj_ref, proj_other = ((x - mean) @ comps.double().T for x in (ref, other))
    lo, hi = torch.quantile(proj_ref, q, dim=0), torch.quantile(proj_ref, 1 - q, dim=0)
    return tuple((((p - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).reshape(h, w, 3).numpy() * 255)
                 .round().astype(np.uint8) for p in (proj_ref, proj_other))


def plot_stage_losses(run: Path, out: Path, keys: list[str], title: str, logy: bool = False) -> Path:
    """The loss curves of one stage (its trainer's ``metrics.jsonl``) as ``out``."""
    from mmfm.logging_utils import plot_loss_curves

    return plot_loss_curves(run / "metrics.jsonl", out, keys=keys, logy=logy, title=title)


def stage_ps3(ctx: DemoContext) -> dict[str, Any]:
    """Pre-train a tiny PS3 on synthetic high-res region data; selection/retrieval table and a picture."""
    import torch

    from mmfm.data.shards import read_shards
    from mmfm.data.synth import write_synthetic
    from mmfm.ps3.train import PS3TrainConfig, train
    from mmfm.ps3.visualize import save_selection

    held_out = ctx.out / "data" / "regions-test"
    write_synthetic("regions", ctx.size(8, 48), held_out, seed=ctx.seed + 1000, image_size=512)
    steps = ctx.size(10, 250)
    cfg = ctx.config(PS3TrainConfig, "ps3", "ps3/tiny-cpu.yaml", [
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
    plot_stage_losses(run, ctx.out / "pictures" / "loss_ps3.png",
                      ["loss", "loss_local", "loss_global", "loss_select"], title="PS3 pre-training")
    ev = result["eval"]
    return {"steps": cfg.steps, "prompt_for_picture": region.caption,
            "top_down_hit_rate@8": round(ev["top_down_hit_rate"], 3), "random": round(ev["top_down_random"], 3),
            "bottom_up_hit_rate@8": round(ev["bottom_up_hit_rate"], 3), "bottom_up_random": round(ev["bottom_up_random"], 3),
            "local_retrieval_top1": round(ev["local_retrieval_top1"], 3),
            "global_only_retrieval_top1": round(ev["global_only_retrieval_top1"], 3)}


def stage_vlm(ctx: DemoContext) -> dict[str, Any]:
    """Train a tiny VLM (tiny RADIO encoder -> 2x2 pixel unshuffle -> projector -> tiny Nemotron-H) on
    synthetic VQA, evaluate it against the majority-answer baseline, and draw a few examples."""
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
    cfg = ctx.config(VLMTrainConfig, "vlm", "vlm/tiny-cpu.yaml", overrides)
    result = train(cfg, ctx.out / "vlm", progress=True)
    draw_vqa_examples(ctx.out / "vlm" / "eval.json", held_out, ctx.out / "pictures" / "vqa_examples.png")
    plot_stage_losses(ctx.out / "vlm", ctx.out / "pictures" / "loss_vlm.png", ["loss"], title="VLM fine-tuning")
    ev = result["eval"]
    return {"steps": cfg.steps, "encoder": student or "random tiny student",
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
    ("radio", stage_radio),
    ("ps3", stage_ps3),
    ("vlm", stage_vlm),
]


def parse_stage_options(recipes: list[str], sets: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``["radio=PATH"]`` and ``["vlm.steps=100"]`` -> ``({"radio": "PATH"}, {"vlm": ["steps=100"]})``."""
    names = [n for n, _ in STAGES]
    out_recipes: dict[str, str] = {}
    for item in recipes:
        stage, sep, path = item.partition("=")
        if not sep or stage not in names:
            raise ValueError(f"--recipe {item!r}: expected STAGE=PATH with STAGE one of {names}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--recipe {item!r}: no such file {path!r}")
        out_recipes[stage] = path
    out_sets: dict[str, list[str]] = {}
    for item in sets:
        stage, sep, kv = item.partition(".")
        if not sep or stage not in names or "=" not in kv:
            raise ValueError(f"--set {item!r}: expected STAGE.key=value with STAGE one of {names}")
        out_sets.setdefault(stage, []).append(kv)
    return out_recipes, out_sets


def check_device(device: str) -> None:
    """``cpu`` or ``cuda`` (which needs a visible GPU); anything else is an error."""
    import torch

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")


def run_demo(out: str | Path = "mmfm-demo", fast: bool = False, device: str = "cpu", seed: int = 0,
             stages: list[str] | None = None, recipes: dict[str, str] | None = None,
             overrides: dict[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """Run the demo stages and return ``{stage: figures}``; also written to ``out/report.json``.

    ``recipes`` replaces a stage's tiny recipe (real sizes and local checkpoints); ``overrides`` adds
    ``key=value`` settings per stage after the demo's own."""
    import os

    check_device(device)
    names = [n for n, _ in STAGES]
    unknown = [s for s in stages or [] if s not in names]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; expected a subset of {names}")
    # the trainers take their device from mmfm.distributed, which honours MMFM_DEVICE=cpu
    previous = os.environ.get("MMFM_DEVICE")
    os.environ["MMFM_DEVICE"] = device
    try:
        return _run_stages(out, fast, device, seed, stages, recipes, overrides)
    finally:
        if previous is None:
            os.environ.pop("MMFM_DEVICE", None)
        else:
            os.environ["MMFM_DEVICE"] = previous


def _run_stages(out, fast, device, seed, stages, recipes, overrides) -> dict[str, dict[str, Any]]:
    from tqdm.auto import tqdm

    ctx = DemoContext(out=Path(out), fast=fast, device=device, seed=seed, recipes=dict(recipes or {}),
                      overrides={k: list(v) for k, v in (overrides or {}).items()})
    ctx.out.mkdir(parents=True, exist_ok=True)
    selected = [(name, fn) for name, fn in STAGES if stages is None or name in stages]
    if selected and selected[0][0] != "data" and not all((ctx.out / "data" / k).is_dir() for k in DATA_KINDS):
        log.info("stages %s need the synthetic data: running the data stage first", [n for n, _ in selected])
        selected.insert(0, STAGES[0])
    for name, fn in tqdm(selected, desc="mmfm demo", unit="stage"):
        start = time.perf_counter()
        figures = fn(ctx)
        figures["seconds"] = round(time.perf_counter() - start, 1)
        ctx.results[name] = figures
        log.info("stage %s done in %.1f s", name, figures["seconds"])
    (ctx.out / "report.json").write_text(json.dumps(ctx.results, indent=2))
    print(format_report(ctx.results, ctx.out))
    return ctx.results


def _format_value(value: Any) -> str:
    """``{"before": b, "after": a}`` -> ``"b -> a"``; dicts of those inline; anything else as it is."""
    if isinstance(value, dict) and set(value) == {"before", "after"}:
        return f"{value['before']} -> {value['after']}"
    if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
        return ", ".join(f"{k} {_format_value(v)}" for k, v in value.items())
    return str(value)


def format_report(results: dict[str, dict[str, Any]], out: Path) -> str:
    """The human-readable report: one block per stage; nested tables (per-teacher cosines) one row a line."""
    lines = ["", "mmfm demo report", "================"]
    for name, figures in results.items():
        lines.append(f"[{name}] ({figures.get('seconds', '?')} s)")
        for key, value in figures.items():
            if key == "seconds":
                continue
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                lines.append(f"  {key}:")
                lines.extend(f"    {k}: {_format_value(v)}" for k, v in value.items())
            else:
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
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (every stage trains on the GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="*", default=None, help=f"subset of: {', '.join(n for n, _ in STAGES)}")
    p.add_argument("--recipe", action="append", default=[], metavar="STAGE=PATH",
                   help="run a stage from this recipe instead of its tiny one (real sizes, local checkpoints), "
                        "e.g. radio=configs/radio/vit-b16-clip-dino-sam.yaml; repeatable")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.key=value",
                   help="override a stage's setting after the demo's own, e.g. vlm.steps=2000; repeatable")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        recipes, overrides = parse_stage_options(args.recipe, args.set)
        run_demo(args.out, args.fast, args.device, args.seed, args.stages, recipes, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmfm demo: error: {err}", file=sys.stderr)
        return 2
    return 0
