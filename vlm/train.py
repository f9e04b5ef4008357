"""VLM training stages on the shared Engine (DeepSpeed ZeRO-2/3 or plain PyTorch).

- stage ``align``: projector alignment on captioned images (encoder and language model frozen);
- stage ``finetune``: projector + language model (+ the encoder with ``train_encoder``) on
  conversation / VQA shards, usually starting from an ``align`` run (``init_from``).

Launch::

    deepspeed scripts/train_vlm.py --config configs/vlm/tiny-cpu.yaml --deepspeed configs/deepspeed/zero2.json \
        --out runs/vlm

Checkpoints (atomic, ``OUT/checkpoints``) carry weights, optimizer, RNG and the data position: ``--resume``
continues exactly. The final model is saved to ``OUT/model`` (``mmfm.vlm.load``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmfm.training import EngineConfig, OptimizerConfig
from mmfm.vlm.build import VLMConfig, build_vlm, load, save_vlm
from mmfm.vlm.conversation import caption_conversation, collate_train, encode_sample
from mmfm.vlm.decoder import route_mamba_to_mmfm_kernels


@dataclass
class VLMTrainConfig:
    seed: int = 0
    model: VLMConfig = field(default_factory=VLMConfig)
    stage: str = "finetune"  # "align" | "finetune"
    init_from: str | None = None  # a saved VLM dir (e.g. the align run's OUT/model)
    train_shards: str = ""
    data_kind: str = "conversation"  # "conversation" | "captions" (ImageSample shards, stage align)
    eval_shards: str | None = None
    eval_samples: int = 200
    eval_metric: str = "vqa_accuracy"
    train_encoder: bool = False
    gradient_checkpointing: bool = False
    batch_size: int = 16
    max_length: int = 256
    shuffle_buffer: int = 256
    steps: int = 300
    ckpt_every: int = 100
    keep_last: int = 2
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(
        optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.0, warmup_steps=20, total_steps=300)))


def set_trainable(vlm, stage: str, train_encoder: bool) -> None:
    """align: projector only; finetune: projector + language model (+ encoder)."""
    if stage not in ("align", "finetune"):
        raise ValueError(f"stage must be 'align' or 'finetune', got {stage!r}")
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    if stage == "finetune":
        vlm.language_model.requires_grad_(True)
        if train_encoder:
            vlm.vision_encoder.requires_grad_(True)
    vlm.freeze_vision = not (stage == "finetune" and train_encoder)


def prepare_model(cfg: VLMTrainConfig):
    if cfg.init_from:
        vlm, tokenizer = load(cfg.init_from)
        vlm.config = cfg.model if cfg.model != VLMConfig() else vlm.config
    else:
        vlm, tokenizer = build_vlm(cfg.model)
    set_trainable(vlm, cfg.stage, cfg.train_encoder)
    if cfg.gradient_checkpointing:
        vlm.language_model.gradient_checkpointing_enable()
    return vlm, tokenizer


def train(cfg: VLMTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run one training stage; returns the final figures (and the VQA evaluation when ``eval_shards``)."""
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
        raise ValueError("train_shards is empty: point it at conversation (or caption) shards")
    if cfg.data_kind not in ("conversation", "captions"):
        raise ValueError(f"data_kind must be 'conversation' or 'captions', got {cfg.data_kind!r}")
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    init_distributed(force=cfg.engine.deepspeed_config is not None)
    torch.manual_seed(cfg.seed)
    vlm, tokenizer = prepare_model(cfg)
    seed_everything(cfg.seed, get_rank())
    engine = Engine.from_config(vlm, cfg.engine, micro_batch_size=cfg.batch_size)
    route_mamba_to_mmfm_kernels(vlm.language_model, engine.device)
    schema = "image" if cfg.data_kind == "captions" else "conversation"
    data = read_shards(cfg.train_shards, schema=schema, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
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

    image_size = vlm.config.image_size

    def encode(sample):
        conv = caption_conversation(sample) if cfg.data_kind == "captions" else sample
        return encode_sample(conv, tokenizer, vlm.image_token_id, vlm.tokens_per_image, image_size, cfg.max_length,
                             image_position=vlm.config.image_position)

    logger = MetricLogger(out, total_steps=cfg.steps, start_step=start, progress=progress, desc=f"vlm {cfg.stage}")
    engine.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = engine.lr
        tokens = 0
        for _ in range(cfg.engine.grad_accum):
            batch = collate_train([encode(s) for s in next(batches)], tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            dev = engine.device
            output = engine.forward(batch["input_ids"].to(dev), [im.to(dev) for im in batch["images"]],
                                    attention_mask=batch["attention_mask"].to(dev), labels=batch["labels"].to(dev))
            engine.backward(output.loss)
            engine.step()
        logger.log(step, loss=all_reduce_mean(output.loss.detach().float()), lr=lr,
                   tokens_per_s=tokens / (time.perf_counter() - t0),
                   skipped_samples=sum(data.skipped.values()))
        logger.advance()
        done = step + 1
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            engine.save_checkpoint(ckpt_dir, done, extra={"step": done, "data": batches.state_dict()},
                                   keep_last=cfg.keep_last)
    logger.close()
    result: dict[str, Any] = {"stage": cfg.stage, "final_loss": float(logger.latest.get("loss", float("nan")))}
    if is_main_process():
        model = engine.module
        model.config = vlm.config
        save_vlm(model, tokenizer, out / "model")
        plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png", title=f"VLM {cfg.stage}")
        if cfg.eval_shards:
            from mmfm.vlm.evaluate import evaluate_vqa

            model.eval()
            ev = evaluate_vqa(model, tokenizer, cfg.eval_shards, metric=cfg.eval_metric, image_size=image_size,
                              limit=cfg.eval_samples, progress=progress)
            (out / "eval.json").write_text(json.dumps(ev, indent=2))
            result["eval"] = {k: v for k, v in ev.items() if k != "predictions"}
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
