"""``mmfm radio train | eval | export``: the distillation commands (wired into ``mmfm.radio.cli.register`` by
``register_subcommands(sub)``).

- ``train --config RECIPE --out RUN [key=value ...]``: one-process training (``scripts/train_radio.py`` is the
  launcher for torchrun / deepspeed);
- ``eval --run RUN``: fidelity / kNN / mode-switching tables (``mmfm.radio.evaluate``);
- ``export --run RUN --out DIR [--checkpoint STEP_DIR]``: mmfm + Hugging Face export of a checkpoint with the
  normalisers folded into the adaptors.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["export_checkpoint", "register_eval", "register_export", "register_subcommands", "register_train"]


def register_subcommands(sub) -> None:
    register_train(sub)
    register_eval(sub)
    register_export(sub)


def _friendly(name: str, fn, args: argparse.Namespace) -> int:
    from mmfm.radio.cli import _friendly_errors  # one error policy for every radio command

    return _friendly_errors(name)(fn)(args)


def register_train(sub) -> None:
    from mmfm.config import add_config_args

    s = sub.add_parser("train", help="distil a student from frozen teachers (one process)",
                       description="Multi-teacher distillation (mmfm.radio.distill). For several processes use "
                                   "scripts/train_radio.py under torchrun or deepspeed.")
    add_config_args(s)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    s.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    s.set_defaults(func=lambda a: _friendly("train", _cmd_train, a))


def _cmd_train(args: argparse.Namespace) -> int:
    from mmfm.config import config_from_args
    from mmfm.radio.distill import RadioTrainConfig, train
    from mmfm.radio.evaluate import format_fidelity

    cfg = config_from_args(RadioTrainConfig, args)
    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    for key in ("eval_before", "eval_after"):
        if key in result:
            print(format_fidelity(result[key], title=key))
    print(f"final loss {result['final'].get('loss', float('nan')):.6f}; model in {Path(args.out) / 'model'}")
    return 0


def register_export(sub) -> None:
    s = sub.add_parser("export", help="export a training checkpoint (normalisers folded into the adaptors)",
                       description="Write OUT/model (mmfm checkpoint) and OUT/hf (Hugging Face radio + adaptor "
                                   "files) from a checkpoint of a distillation run.")
    s.add_argument("--run", required=True, help="run directory (config.yaml + checkpoints/)")
    s.add_argument("--checkpoint", default=None, help="a checkpoint step_* dir (default: the latest)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--ema", action="store_true", help="export the EMA weights (needs engine.ema_decay)")
    s.set_defaults(func=lambda a: _friendly("export", _cmd_export, a))


def export_checkpoint(run: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                      ema: bool = False) -> dict[str, Path]:
    """Rebuild the run's model from ``config.yaml``, load a checkpoint's weights and normalisers (rank 0's),
    and export it (``mmfm.radio.distill.export``)."""
    from mmfm.checkpoint import load_checkpoint
    from mmfm.config import load_config
    from mmfm.radio.distill import RadioTrainConfig, export, setup

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {run} has no config.yaml (is it a `mmfm radio train` output directory?)")
    cfg = load_config(RadioTrainConfig, run / "config.yaml")
    _, _, model, normalizers = setup(cfg)
    ckpt = load_checkpoint(checkpoint or run / "checkpoints", restore_rng=False)
    group = "ema" if ema else "model"
    if group not in ckpt.tensors:
        raise ValueError(f"checkpoint {ckpt.path} has no {group}.safetensors"
                         + (" (was engine.ema_decay set?)" if ema else ""))
    state = model.state_dict()
    state.update(ckpt.tensors[group])
    model.load_state_dict(state)
    for name, norm in normalizers.items():
        norm.load_state_dict(ckpt.rank_state["normalizers"][name])
    return export(model.encoder, normalizers, out)


def _cmd_export(args: argparse.Namespace) -> int:
    paths = export_checkpoint(args.run, args.out, args.checkpoint, args.ema)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


# ----------------------------------------------------------------------------------------------- eval
def register_eval(sub) -> None:
    """``mmfm radio eval``."""
    s = sub.add_parser("eval", help="fidelity to the teachers, kNN accuracy and mode switching of a trained run",
                       description="Evaluate a distillation run: per-teacher fidelity (cosine, Var/MSE) per "
                                   "resolution on held-out shards, kNN classification (cosine, T=0.07) on "
                                   "labelled shards, and summary agreement across resolutions.")
    s.add_argument("--run", required=True, help="run directory of `mmfm radio train` (config.yaml + model/)")
    s.add_argument("--model", default=None, help="student checkpoint dir (default RUN/model)")
    s.add_argument("--shards", default=None, help="held-out image shards (default: the run's data.eval_shards)")
    s.add_argument("--knn-shards", default=None,
                   help="labelled shards for the kNN bank (default: the run's data.knn_shards or train shards)")
    s.add_argument("--images", type=int, default=64, help="held-out images (default 64)")
    s.add_argument("--bank", type=int, default=128, help="kNN bank images (default 128)")
    s.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    s.add_argument("--resolutions", default=None, help="comma-separated sizes (default: the run's)")
    s.add_argument("--json", default=None, help="write all tables to this JSON file")
    s.set_defaults(func=lambda a: _friendly("eval", _run_eval, a))


def _run_eval(args: argparse.Namespace) -> int:
    import json
    import math

    import torch

    from mmfm.config import load_config
    from mmfm.radio.distill import RadioTrainConfig, build_teachers, eval_resolutions, probe_teacher
    from mmfm.radio.encoder import load
    from mmfm.radio.evaluate import (
        evaluate_fidelity,
        format_fidelity,
        format_mode_switching,
        knn_accuracy,
        load_samples,
        mode_switching,
    )

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {run} has no config.yaml (is it a `mmfm radio train` output directory?)")
    cfg = load_config(RadioTrainConfig, run / "config.yaml")
    enc = load(args.model or run / "model", adaptors="all")
    shards = args.shards or cfg.data.eval_shards
    if not shards:
        raise ValueError("no held-out shards: pass --shards (the run's data.eval_shards is empty)")
    res = ([int(v) for v in args.resolutions.split(",")] if args.resolutions else eval_resolutions(cfg))
    teachers = build_teachers(cfg)
    infos = {t.name: probe_teacher(teachers[t.name], t) for t in cfg.teachers}
    samples = load_samples(shards, args.images)

    def predict(x: torch.Tensor):
        o = enc(x, feature_fmt="NCHW")
        return {n: (o[n].summary, o[n].features) for n in enc.adaptors}

    out: dict[str, Any] = {"fidelity": evaluate_fidelity(predict, teachers, cfg.teachers, infos, samples, res,
                                                          enc.patch_size)}
    print(format_fidelity(out["fidelity"]))
    labelled = load_samples(shards, args.images, labelled=True)
    bank = load_samples(args.knn_shards or cfg.data.knn_shards or cfg.data.train_shards, args.bank, labelled=True)
    out["knn"] = {str(r): knn_accuracy(enc, bank, labelled, r, k=args.k) for r in res}
    print("\n### kNN top-1 accuracy (backbone summary, cosine, T=0.07)\n")
    print("\n".join(f"- {r}px: {a:.4f}" for r, a in out["knn"].items()))
    out["mode_switching"] = mode_switching(enc, samples, res)
    print("\n" + format_mode_switching(out["mode_switching"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    if any(math.isnan(v.get("fidelity", 0.0)) for row in out["fidelity"].values() for v in row.values()):
        return 1
    return 0
