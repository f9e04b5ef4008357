"""PS3 pre-training: region shards -> PS3Objective -> Engine (DeepSpeed or plain PyTorch).

Launch::

    python scripts/train_ps3.py --config configs/ps3/tiny-cpu.yaml --out runs/ps3 train_shards=DIR
    deepspeed --num_gpus 2 scripts/train_ps3.py --config ... --deepspeed configs/deepspeed/zero2.json

Checkpoints (atomic, ``OUT/checkpoints``) hold weights, optimizer, RNG and the data position, so
``--resume`` continues exactly. The final model is written to ``OUT/model`` (``mmfm.ps3.load``) with the
text tower and tokenizer under ``OUT/model/text``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmfm.ps3.evaluate import evaluate_ps3, format_table
from mmfm.ps3.model import PS3Config, PS3Encoder
from mmfm.ps3.objective import ObjectiveConfig, PS3Objective, batch_from_samples
from mmfm.ps3.text import TextTower, load_text_tower, tiny_text_tower
from mmfm.training import EngineConfig, OptimizerConfig


@dataclass
class PS3TrainConfig:
    seed: int = 0
    model: PS3Config = field(default_factory=lambda: PS3Config(base_resolution=128, scales=(2, 4)))
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(num_look_close=32))
    text_tower: str | None = None  # local HF CLIP/SigLIP text model dir; None = tiny random tower
    text_layers: int = 2
    train_shards: str = ""
    eval_shards: str | None = None
    eval_samples: int = 32
    eval_k: int = 8
    image_size: int = 512
    batch_size: int = 8
    shuffle_buffer: int = 64
    steps: int = 300
    ckpt_every: int = 100
    keep_last: int = 2
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=20, total_steps=300)))


def build_objective(cfg: PS3TrainConfig) -> PS3Objective:
    if cfg.text_tower:
        text = load_text_tower(cfg.text_tower)
    else:
        from mmfm.data.tokenizer import synthetic_tokenizer

        text = tiny_text_tower(synthetic_tokenizer(), width=cfg.model.embed_dim, layers=cfg.text_layers,
                               embed_dim=cfg.model.embed_dim)
    return PS3Objective(PS3Encoder(cfg.model), text, cfg.objective)


def eval_batches(cfg: PS3TrainConfig, shards: str) -> list:
    from mmfm.data.shards import read_shards

    samples = []
    for sample in read_shards(shards, schema="regions"):
        samples.append(sample)
        if len(samples) >= cfg.eval_samples:
            break
    return [batch_from_samples(samples[i:i + cfg.batch_size], cfg.image_size)
            for i in range(0, len(samples), cfg.batch_size)]


def save_model(objective: PS3Objective, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    objective.encoder.save(out)
    objective.text.save(out / "text")
    return out


def load_model(path: str | Path) -> tuple[PS3Encoder, TextTower]:
    """Encoder and text tower written by :func:`save_model`."""
    from mmfm.ps3.model import load

    path = Path(path)
    return load(path), load_text_tower(path / "text")


def train(cfg: PS3TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pre-train PS3; returns final figures (losses and the evaluation table's numbers)."""
    from mmfm.checkpoint import find_latest
    from mmfm.config import save_config
    from mmfm.data.batching import EpochBatcher
    from mmfm.data.shards import read_shards
    from mmfm.distributed import (
        all_reduce_mean,
        get_rank,
        get_world_size,
        init_distributed,
        is_main_process,
        seed_everything,
    )
    from mmfm.logging_utils import MetricLogger, plot_loss_curves
    from mmfm.training import Engine

    if not cfg.train_shards:
        raise ValueError("train_shards is empty: point it at region shards (e.g. `mmfm data synth --kind regions`)")
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    init_distributed(force=cfg.engine.deepspeed_config is not None)
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg)
    seed_everything(cfg.seed, get_rank())
    engine = Engine.from_config(objective, cfg.engine, micro_batch_size=cfg.batch_size)
    data = read_shards(cfg.train_shards, schema="regions", shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                       rank=get_rank(), world_size=get_world_size())
    batches = EpochBatcher(data, cfg.batch_size)
    start = 0
    if resume and find_latest(ckpt_dir) is not None:
        ckpt = engine.load_checkpoint(ckpt_dir)
        start = int(ckpt.extra["step"])
        batches.load_state_dict(ckpt.extra["data"])
    elif is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    evals = eval_batches(cfg, cfg.eval_shards) if cfg.eval_shards else []
    before = evaluate_ps3(engine.module, evals, cfg.eval_k) if evals and start == 0 else None
    logger = MetricLogger(out, total_steps=cfg.steps, start_step=start, progress=progress, desc="ps3")
    engine.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = engine.lr
        for _ in range(cfg.engine.grad_accum):
            batch = batch_from_samples(next(batches), cfg.image_size)
            batch.images = batch.images.to(engine.device)
            losses = engine.forward(batch)
            engine.backward(losses["loss"])
            engine.step()
        scalars = {k: all_reduce_mean(v.detach().float()) for k, v in losses.items()}
        logger.log(step, lr=lr, img_per_s=cfg.batch_size * cfg.engine.grad_accum / (time.perf_counter() - t0),
                   skipped_samples=sum(getattr(data, "skipped", {}).values()) if hasattr(data, "skipped") else 0,
                   **scalars)
        logger.advance()
        done = step + 1
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            engine.save_checkpoint(ckpt_dir, done, extra={"step": done, "data": batches.state_dict()},
                                   keep_last=cfg.keep_last)
    logger.close()
    result: dict[str, Any] = {"final": {k: float(v) for k, v in logger.latest.items()}}
    if is_main_process():
        save_model(engine.module, out / "model")
        plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png",
                         keys=("loss", "loss_local", "loss_global", "loss_select"), title="PS3 pre-training")
        if evals:
            after = evaluate_ps3(engine.module, evals, cfg.eval_k)
            result["eval_before"], result["eval"] = before, after
            print(format_table(after))
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
