#!/usr/bin/env python
"""PS3 pre-training launcher (python, torchrun or deepspeed); see mmfm.ps3.train for the options.

    deepspeed --num_gpus 2 scripts/train_ps3.py --config configs/ps3/tiny-cpu.yaml --out runs/ps3 \
        --deepspeed configs/deepspeed/zero2.json train_shards=data/regions
"""

from __future__ import annotations

import argparse

from mmfm.config import add_config_args, config_from_args
from mmfm.ps3.train import PS3TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_args(PS3TrainConfig, args)
    if args.deepspeed:
        cfg.engine.deepspeed_config = args.deepspeed
    train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
