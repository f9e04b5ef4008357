#!/usr/bin/env python
"""Tiny VLM on synthetic shapes VQA: 2x2 pixel-unshuffle vs no compression (tokens vs accuracy).

Generates the synthetic data (VQA train seed 0 or ``--train-seeds``, held-out seed 1, captioned images seed
2), trains the tiny VLM of ``configs/vlm/tiny-cpu-vqa.yaml`` (tiny RADIO student, trained -> compressor ->
projector -> tiny Nemotron-H with Mamba-2, attention and MLP layers) once per compressor, and prints one
table: tokens per image, held-out VQA accuracy (VQAv2 metric) overall and per question category, the same
model with the images shuffled across questions (an image-blind control: a model that reads its image loses
accuracy there), and the per-category majority-answer baseline.

Each setting first trains every part on captioned images for ``--caption-steps`` (``data_kind=captions``:
dense, per-word supervision that ties colour / shape / count words to the visual tokens) and then on VQA
for ``--steps``, starting from that model (``--caption-steps 0``: VQA only).

    python scripts/vlm_experiment.py --out runs/vlm_experiment            # ~25 min on 2 CPU cores
    python scripts/vlm_experiment.py --out runs/x --steps 50 --caption-steps 20 --n-train 512  # smoke run
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path
from typing import Any

import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vlm" / "tiny-cpu-vqa.yaml"
CATEGORIES = ("color", "shape", "count", "position", "relation", "existence", "text")


def make_data(out: Path, n_train: int, n_test: int, n_captions: int, caption_style: str = "global",
              train_seeds: tuple[int, ...] = (0,), workers: int = 1) -> dict[str, Path]:
    """The experiment's shard directories under ``out/data``, generated where missing. Training VQA: ``n_train``
    samples of each seed in ``train_seeds``; one seed (0) writes ``data/vqa`` itself, several write
    ``data/vqa-s<seed>`` each (``workers`` at a time) and link them all into ``data/vqa``."""
    from mmfm.data.synth import write_synthetic

    if 1 in train_seeds:
        raise ValueError("--train-seeds must not contain 1: seed 1 is the held-out VQA set")
    captions = "captions" if caption_style == "global" else f"captions-{caption_style}"
    paths = {"train": out / "data" / "vqa", "test": out / "data" / "vqa-test", "captions": out / "data" / captions}
    if not paths["train"].is_dir():
        if tuple(train_seeds) == (0,):
            write_synthetic("vqa", n_train, paths["train"], seed=0)
        else:
            _write_seed_sets(paths["train"], n_train, train_seeds, workers)
    if not paths["test"].is_dir():
        write_synthetic("vqa", n_test, paths["test"], seed=1)
    if n_captions and not paths["captions"].is_dir():
        write_synthetic("images", n_captions, paths["captions"], seed=2, caption_style=caption_style)
    return paths


def _write_seed_sets(train: Path, n: int, seeds: tuple[int, ...], workers: int) -> None:
    """``n`` VQA samples per seed in ``<train>-s<seed>`` (kept if present: a set of another run can be linked
    there), then ``train`` as a directory of links to all of them, renamed into place when whole."""
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from mmfm.data.synth import write_synthetic

    def seed_dir(s: int, partial: bool = False) -> Path:
        # each set goes to a temporary name first, so an interrupted run regenerates it instead of using half
        return train.with_name(f".{train.name}-s{s}.partial" if partial else f"{train.name}-s{s}")

    missing = [s for s in seeds if not seed_dir(s).is_dir()]
    for s in missing:  # what an interrupted run left
        shutil.rmtree(seed_dir(s, partial=True), ignore_errors=True)
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(missing)))) as pool:
        for job in [pool.submit(write_synthetic, "vqa", n, seed_dir(s, partial=True), seed=s) for s in missing]:
            job.result()
    for s in missing:
        seed_dir(s, partial=True).rename(seed_dir(s))
    tmp = train.with_name(f".{train.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        link_shards(seed_dir(s), tmp, prefix=f"s{s}-")
    tmp.rename(train)


def link_shards(src: Path, dst: Path, prefix: str) -> None:
    """Link every ``src/*.tar`` into ``dst`` as ``<prefix><name>`` (links already there are kept)."""
    for shard in sorted(src.glob("*.tar")):
        link = dst / f"{prefix}{shard.name}"
        if not link.is_symlink():
            link.symlink_to(shard.resolve())


def caption_conversations(captions: Path, out: Path) -> Path:
    """The captioned images as one-turn conversation shards ("Describe the image." -> caption), so that the VQA
    stage can keep training on captions too (``--mix-captions``)."""
    from mmfm.data.shards import read_shards, write_shards
    from mmfm.vlm.conversation import caption_conversation

    out.mkdir(parents=True, exist_ok=True)
    # settings run side by side (--only) share this directory: one writes, the others wait for its marker
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".captions-complete").exists():
            write_shards((caption_conversation(s) for s in read_shards(captions, schema="image")), out,
                         samples_per_shard=256, prefix="caption")
            (out / ".captions-complete").touch()
    return out


@torch.no_grad()
def shuffled_image_eval(model, tokenizer, data: Path, image_size: int, limit: int, seed: int = 0) -> dict[str, Any]:
    """VQA accuracy when each question gets another question's image (a fixed random permutation)."""
    from mmfm.vlm.evaluate import iter_vqa
    from mmfm.vlm.metrics import evaluate_predictions

    items = list(iter_vqa(data, limit))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    records = []
    for i in range(0, len(items), 32):
        batch = items[i:i + 32]
        images = [torch.nn.functional.interpolate(items[perm[i + j]].image[None], size=(image_size, image_size),
                                                  mode="bilinear", antialias=True, align_corners=False)[0]
                  for j in range(len(batch))]
        preds = model.answer(tokenizer, images, [it.question for it in batch])
        records += [{"prediction": p, "answers": it.answers, "category": it.category} for p, it in zip(preds, batch)]
    return evaluate_predictions(records, "vqa_accuracy")


def _caption_word_kind(caption: str, start: int, word: str, caption_style: str) -> str | None:
    """'cell' / 'color' / 'shape' / 'text' for the word at ``caption[start:]``, or None for any other word."""
    from mmfm.data.synth import CELL_NAMES, COLOR_NAMES, SHAPES, _plural

    if caption_style == "grounded" and word in {w for name in CELL_NAMES.values() for w in name.split()}:
        return "cell"
    if word in COLOR_NAMES:
        return "color"
    if word in SHAPES or word in {_plural(k) for k in SHAPES}:  # global captions say "two squares"
        return "shape"
    if caption[max(0, start - 5):start] == "text " or caption[max(0, start - 1):start] == "'":
        return "text"  # grounded "text cat", global "the text 'cat'"
    return None


@torch.no_grad()
def caption_word_accuracy(model, tokenizer, caption_style: str, image_size: int, n: int = 200, seed: int = 3) -> dict:
    """Teacher-forced accuracy of a caption-stage model on ``n`` held-out captioned images, per kind of word
    (a word counts as right when every one of its tokens is the argmax): where an object is (``cell``: top /
    middle / bottom / left / center / right), its ``color``, its ``shape``, the drawn ``text``. Tells which
    part of the scene the model reads from the image."""
    import re

    from mmfm.data.synth import make_sample
    from mmfm.vlm.conversation import caption_conversation, collate_train, encode_sample

    right: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = [make_sample("images", i, seed=seed, caption_style=caption_style) for i in range(n)]
    for b0 in range(0, n, 50):
        chunk = samples[b0:b0 + 50]
        enc = [encode_sample(caption_conversation(s), tokenizer, model.image_token_id, model.tokens_per_image,
                             image_size) for s in chunk]
        batch = collate_train(enc, tokenizer.pad_token_id)
        logits = model(batch["input_ids"], batch["images"], attention_mask=batch["attention_mask"]).logits
        hit = logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]
        for row, sample in enumerate(chunk):
            labelled = hit[row][batch["labels"][row, 1:] >= 0].tolist()  # the caption's tokens, then </s>
            tok = tokenizer(sample.caption, return_offsets_mapping=True, add_special_tokens=False)
            if len(labelled) != len(tok["input_ids"]) + 1:  # truncated: skip rather than misalign
                continue
            for m in re.finditer(r"\w+", sample.caption):
                w0, w1 = m.span()
                kind = _caption_word_kind(sample.caption, w0, m.group(), caption_style)
                if kind is None:
                    continue
                ok = all(labelled[t] for t, (t0, t1) in enumerate(tok["offset_mapping"]) if t0 < w1 and t1 > w0)
                right[kind] = right.get(kind, 0) + int(ok)
                total[kind] = total.get(kind, 0) + 1
    return {k: right[k] / total[k] for k in sorted(total)} | {"words": total}


def pretrain_encoder(cfg, out: Path, steps: int, n_images: int = 8192, seed: int = 2, batch: int = 64,
                     lr: float = 3e-3) -> tuple[Path, dict[str, float]]:
    """Supervised pre-training of the VLM's vision encoder on the captioned images' scene ground truth (not the
    VQA data): the tokens of each 3x3 grid cell -> a linear head for the cell's shape (or empty) and colour
    (or empty). A stand-in for the pre-trained encoder a real VLM starts from (no pre-trained teacher exists
    for the synthetic world). Returns a VLM directory (random projector and LM, the pre-trained encoder) for
    ``init_from``, and the encoder's per-cell shape / colour accuracy on the last 512 images, held out."""
    import torch.nn.functional as F

    from mmfm.data.synth import COLOR_NAMES, SHAPES, cell_labels, render_scene, sample_scene, tokens_by_cell
    from mmfm.vlm.build import build_vlm, save_vlm
    from mmfm.vlm.conversation import image_to_tensor

    size = cfg.model.image_size
    torch.manual_seed(cfg.seed)  # the random init, so that settings and reruns start from the same encoder
    vlm, tokenizer = build_vlm(cfg.model)
    encoder = vlm.vision_encoder
    grid = size // encoder.patch_size
    if grid % 3:
        raise ValueError(f"encoder pre-training needs whole grid cells: {size} px / {encoder.patch_size} px patches "
                         f"= {grid} tokens per side, not a multiple of 3")
    f = grid // 3
    scenes = [sample_scene("images", i, seed=seed) for i in range(n_images)]  # the images of make_sample
    images = torch.stack([image_to_tensor(render_scene(scene), size) for scene in scenes])
    shape_y, color_y = cell_labels(scenes)
    # seeded again: the LM, compressor and projector built above draw from the generator by amounts that
    # depend on the setting (compressor width, vocabulary), and the head's init and the encoder's dropout must
    # not, so that every setting of one seed starts from the same pre-trained encoder
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(f * f * encoder.embed_dim, len(SHAPES) + 1 + len(COLOR_NAMES) + 1)

    def cell_logits(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 9, classes)
        return head(tokens_by_cell(encoder(x).features))  # features (B, grid * grid, D)

    encoder.requires_grad_(True)
    vlm.freeze_vision = False
    vlm.train()  # a trainable encoder, its position embeddings deterministic, as in VLM training
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n_train = n_images - 512
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        logits = cell_logits(images[idx])
        loss = (F.cross_entropy(logits[..., :len(SHAPES) + 1].flatten(0, 1), shape_y[idx].flatten())
                + F.cross_entropy(logits[..., len(SHAPES) + 1:].flatten(0, 1), color_y[idx].flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    encoder.eval()
    with torch.no_grad():
        logits = torch.cat([cell_logits(images[i:i + 256]) for i in range(n_train, n_images, 256)])
    occupied = shape_y[n_train:] < len(SHAPES)
    acc = {"shape": float((logits[..., :len(SHAPES) + 1].argmax(-1) == shape_y[n_train:])[occupied].float().mean()),
           "color": float((logits[..., len(SHAPES) + 1:].argmax(-1) == color_y[n_train:])[occupied].float().mean())}
    save_vlm(vlm, tokenizer, out)
    return out, acc


def run_one(name: str, overrides: list[str], paths: dict[str, Path], out: Path, args) -> dict[str, Any]:
    from mmfm.config import load_config
    from mmfm.vlm.build import load
    from mmfm.vlm.evaluate import evaluate_vqa
    from mmfm.vlm.train import VLMTrainConfig, train

    run_dir = out / name
    common = [f"steps={args.steps}", f"ckpt_every={args.steps}", f"engine.optimizer.total_steps={args.steps}",
              f"eval_samples={args.n_test}", f"seed={args.seed}"] + overrides + list(args.set)
    init_from, caption_words, encoder_acc = None, None, None
    t0 = time.perf_counter()
    if args.pretrain_encoder_steps:
        base = load_config(VLMTrainConfig, args.config, common)
        init_from, encoder_acc = pretrain_encoder(base, run_dir / "encoder-pretrained", args.pretrain_encoder_steps)
        print(f"{name}: encoder pre-training, held-out per-cell accuracy {encoder_acc}", flush=True)
    if args.caption_steps:
        cap = load_config(VLMTrainConfig, args.config, common + [
            f"train_shards={paths['captions']}", "data_kind=captions", "eval_shards=null",
            f"steps={args.caption_steps}", f"ckpt_every={args.caption_steps}",
            f"engine.optimizer.total_steps={args.caption_steps}"])
        if init_from is not None:
            cap.init_from = str(init_from)
        train(cap, run_dir / "captions", progress=not args.no_progress)
        init_from = run_dir / "captions" / "model"
        cap_model, cap_tok = load(init_from)
        cap_model.eval()
        caption_words = caption_word_accuracy(cap_model, cap_tok, args.caption_style, cap.model.image_size)
        print(f"{name}: caption stage, held-out word accuracy {caption_words}", flush=True)
    train_shards = str(paths["train"])
    if args.mix_captions:  # one directory holding both shard sets (links to the VQA shards), shuffled together
        mix = paths["train"].parent / f"vqa-with-{paths['captions'].name}"
        caption_conversations(paths["captions"], mix)
        link_shards(paths["train"], mix, prefix="vqa-")
        train_shards = str(mix)
    cfg = load_config(VLMTrainConfig, args.config, common + [f"train_shards={train_shards}", "eval_shards=null"])
    if init_from is not None:
        cfg.init_from = str(init_from)
    result = train(cfg, run_dir / "vqa", progress=not args.no_progress)
    seconds = time.perf_counter() - t0  # training only (caption + VQA stages); evaluation is timed apart
    model, tokenizer = load(run_dir / "vqa" / "model")
    model.eval()
    size = cfg.model.image_size
    t1 = time.perf_counter()
    ev = evaluate_vqa(model, tokenizer, paths["test"], image_size=size, limit=args.n_test,
                      progress=not args.no_progress)
    (run_dir / "vqa" / "eval.json").write_text(json.dumps(ev, indent=2))
    blind = shuffled_image_eval(model, tokenizer, paths["test"], size, args.n_test)
    return {"name": name, "tokens": model.tokens_per_image(size, size), "train_s": seconds,
            "eval_s": time.perf_counter() - t1, "final_loss": result["final_loss"], "overall": ev["overall"],
            "per_category": {k: v["score"] for k, v in ev["per_category"].items()},
            "shuffled_overall": blind["overall"],
            "shuffled_per_category": {k: v["score"] for k, v in blind["per_category"].items()},
            "caption_word_accuracy": caption_words, "encoder_pretrain_accuracy": encoder_acc,
            "majority": ev["majority_baseline"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    cats = [c for c in CATEGORIES if any(c in r["per_category"] for r in rows)]
    head = ["setting", "tokens/img", "train s", "loss", "VQA acc", "shuffled-img acc"] + cats
    lines = [head]
    for r in rows:
        lines.append([r["name"], str(r["tokens"]), f"{r['train_s']:.0f}", f"{r['final_loss']:.3f}",
                      f"{r['overall']:.3f}", f"{r['shuffled_overall']:.3f}"]
                     + [f"{r['per_category'].get(c, float('nan')):.3f}" for c in cats])
    maj = rows[0]["majority"]
    lines.append(["majority baseline", "-", "-", "-", f"{maj['overall']:.3f}", "-"]
                 + [f"{maj['per_category'][c]['score']:.3f}" if c in maj["per_category"] else "nan" for c in cats])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/vlm_experiment"), help="run directory")
    p.add_argument("--config", type=Path, default=CONFIG, help="VLM training recipe")
    p.add_argument("--n-train", type=int, default=16384, help="training VQA samples (per seed of --train-seeds)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the training VQA sets, --n-train samples each (1 is the held-out set's)")
    p.add_argument("--n-test", type=int, default=350, help="held-out VQA samples (evaluated)")
    p.add_argument("--steps", type=int, default=None, help="VQA training steps per setting (default: the recipe's)")
    p.add_argument("--caption-steps", type=int, default=800, help="caption pre-training steps (0: none)")
    p.add_argument("--mix-captions", action="store_true",
                   help="the VQA stage trains on the VQA samples and the caption conversations mixed")
    p.add_argument("--n-captions", type=int, default=8192, help="captioned images when --caption-steps > 0")
    p.add_argument("--caption-style", choices=("global", "grounded"), default="global",
                   help="captions of the caption stage: 'global' (what is in the image) or 'grounded' (each item "
                        "with its grid cell: 'top left: red circle; ...', one phrase per visual token at 2x2)")
    p.add_argument("--pretrain-encoder-steps", type=int, default=0,
                   help="first pre-train the vision encoder for this many steps on the captioned images' scene "
                        "ground truth (per-cell shape and colour; 0: start from a random encoder)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra VLMTrainConfig overrides for every setting, e.g. model.image_size=96")
    p.add_argument("--only", choices=["unshuffle2x2", "none"], default=None,
                   help="run one setting (e.g. two processes in parallel); the table then has one row")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from mmfm.config import load_config
    from mmfm.vlm.train import VLMTrainConfig

    if args.steps is None:
        args.steps = load_config(VLMTrainConfig, args.config, []).steps
    for name in ("n_train", "n_test", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = make_data(args.out, args.n_train, args.n_test,
                      args.n_captions if args.caption_steps or args.mix_captions else 0, args.caption_style,
                      tuple(args.train_seeds), workers=args.threads)
    settings = [("2x2 pixel-unshuffle", "unshuffle2x2", ["model.compressor=pixel_unshuffle", "model.compress_factor=2"]),
                ("no compression", "none", ["model.compressor=none"])]
    rows = [run_one(run_dir, ov, paths, args.out, args) | {"name": name} for name, run_dir, ov in settings
            if args.only in (None, run_dir)]
    table = format_table(rows)
    print(table)
    suffix = f"-{args.only}" if args.only else ""
    (args.out / f"table{suffix}.txt").write_text(table + "\n")
    (args.out / f"results{suffix}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
