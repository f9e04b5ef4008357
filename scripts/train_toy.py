#!/usr/bin/env python
"""Minimal trainer proving mmfm's training machinery end to end (config, Engine, checkpoints, resume).

A small MLP learns a fixed random function (regression) or a random linear labelling (classification)
from synthetic tensors that are a pure function of the data position ``(step, micro-batch, rank)``, so a
resumed run sees exactly the batches the uninterrupted run would have seen.

Launch (CPU or GPU)::

    python scripts/train_toy.py --out runs/toy steps=50
    torchrun --nproc_per_node 2 scripts/train_toy.py --out runs/toy
    torchrun --nproc_per_node 2 scripts/train_toy.py --out runs/toy --deepspeed configs/deepspeed/zero2.json
    deepspeed --num_gpus 2 scripts/train_toy.py --out runs/toy --deepspeed configs/deepspeed/zero2.json

(``deepspeed --num_gpus N`` also works on a CPU-only host: DeepSpeed's CPU accelerator starts N
processes that talk over gloo.) Add ``--resume`` to continue from ``OUT/checkpoints``; ``--crash-after K``
SIGKILLs every rank right after step K (a simulated failure, for tests).
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.checkpoint import find_latest
from mmfm.config import add_config_args, config_from_args, save_config
from mmfm.distributed import (
    all_reduce_mean,
    barrier,
    get_rank,
    init_distributed,
    is_main_process,
    seed_everything,
)
from mmfm.logging_utils import MetricLogger
from mmfm.training import Engine, EngineConfig, OptimizerConfig


@dataclass
class ToyConfig:
    seed: int = 0
    task: Literal["regression", "classification"] = "regression"
    in_dim: int = 16
    hidden: int = 32
    out_dim: int = 4
    dropout: float = 0.1  # exercises the RNG state across a resume
    batch_size: int = 16  # per rank and micro-batch
    steps: int = 30
    ckpt_every: int = 10
    keep_last: int = 2
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.01, warmup_steps=3, total_steps=30),
            grad_clip=1.0,
        )
    )


class ToyMLP(nn.Module):
    """``(B, in_dim) -> (B, out_dim)``."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.in_dim, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def target_params(cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed function to learn (same on every rank)."""
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    w1 = torch.randn(cfg.in_dim, cfg.hidden, generator=g) / cfg.in_dim**0.5
    w2 = torch.randn(cfg.hidden, cfg.out_dim, generator=g) / cfg.hidden**0.5
    return w1, w2


def make_batch(
    cfg: ToyConfig, step: int, micro: int, rank: int, target: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch at data position (step, micro, rank): ``x (B, in_dim)``, ``y (B, out_dim)`` or ``(B,)`` labels."""
    g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 64 + micro) * 1024 + rank)
    x = torch.randn(cfg.batch_size, cfg.in_dim, generator=g)
    w1, w2 = target
    if cfg.task == "regression":
        y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(cfg.batch_size, cfg.out_dim, generator=g)
    else:
        y = (x @ w1 @ w2).argmax(dim=-1)
    return x, y


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (config, metrics.jsonl, tb/, checkpoints/)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--crash-after", type=int, default=None, help="SIGKILL all ranks after this step (testing)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(ToyConfig, args)
    if args.deepspeed:
        cfg.engine.deepspeed_config = args.deepspeed
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"

    init_distributed(force=cfg.engine.deepspeed_config is not None)
    rank = get_rank()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ToyMLP(cfg)
    seed_everything(cfg.seed, rank)  # per-rank dropout masks
    engine = Engine.from_config(model, cfg.engine, micro_batch_size=cfg.batch_size)
    target = target_params(cfg)

    start = 0
    if args.resume and find_latest(ckpt_dir) is not None:
        ckpt = engine.load_checkpoint(ckpt_dir)
        start = int(ckpt.extra["data_step"])
        if is_main_process():
            print(f"resumed from {ckpt.path} at step {start}", flush=True)
    elif is_main_process():
        save_config(cfg, out / "config.yaml")

    logger = MetricLogger(out, total_steps=cfg.steps, start_step=start, progress=not args.no_progress)
    engine.train()
    for step in range(start, cfg.steps):
        lr = engine.lr
        losses = []
        for micro in range(cfg.engine.grad_accum):
            x, y = make_batch(cfg, step, micro, rank, target)
            x, y = x.to(engine.device), y.to(engine.device)
            pred = engine.forward(x).float()
            loss = F.mse_loss(pred, y) if cfg.task == "regression" else F.cross_entropy(pred, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        mean_loss = all_reduce_mean(torch.stack(losses).mean())
        logger.log(step, loss=mean_loss, lr=lr, grad_norm=engine.last_grad_norm or 0.0)
        logger.advance()
        done = step + 1
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            engine.save_checkpoint(ckpt_dir, done, extra={"data_step": done}, keep_last=cfg.keep_last)
        if args.crash_after is not None and done == args.crash_after:
            logger.close()
            barrier()
            os.kill(os.getpid(), signal.SIGKILL)  # a real, unclean failure
    logger.close()
    if is_main_process():
        print(f"final step {cfg.steps} loss {logger.latest.get('loss', float('nan')):.6f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
