#!/usr/bin/env python
"""VLM training launcher (python, torchrun or deepspeed); see mmfm.vlm.train for the stages.

    deepspeed --num_gpus 2 scripts/train_vlm.py --config configs/vlm/tiny-cpu.yaml --out runs/vlm \
        --deepspeed configs/deepspeed/zero2.json
"""

from __future__ import annotations

import argparse

from mmfm.config import add_config_args, config_from_args
from mmfm.vlm.train import VLMTrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (zero2.json / zero3.json)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_args(VLMTrainConfig, args)
    if args.deepspeed:
        cfg.engine.deepspeed_config = args.deepspeed
    train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
