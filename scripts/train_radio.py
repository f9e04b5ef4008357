#!/usr/bin/env python
"""RADIO multi-teacher distillation launcher (python, torchrun or deepspeed); rules in mmfm.radio.distill.

    python scripts/train_radio.py --config configs/radio/tiny-cpu.yaml --out runs/radio-tiny
    torchrun --nproc_per_node 2 scripts/train_radio.py --config configs/radio/tiny-cpu.yaml --out runs/r
    deepspeed --num_gpus 2 scripts/train_radio.py --config configs/radio/tiny-cpu.yaml --out runs/r \
        --deepspeed configs/deepspeed/zero2.json

Trailing ``key=value`` arguments override the recipe (``steps=50 loss.feature=cos_smoothl1``). ``--resume``
continues from ``OUT/checkpoints`` exactly; ``--crash-after K`` SIGKILLs every rank after step K (tests).
"""

from __future__ import annotations

import argparse

from mmfm.config import add_config_args, config_from_args
from mmfm.radio.distill import RadioTrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints, model)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    parser.add_argument("--crash-after", type=int, default=None, help="SIGKILL all ranks after this step (testing)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    cfg = config_from_args(RadioTrainConfig, args)
    if args.deepspeed:
        cfg.engine.deepspeed_config = args.deepspeed
    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, crash_after=args.crash_after)
    from mmfm.distributed import is_main_process

    if is_main_process():
        final = result.get("final", {})
        print(f"final step {cfg.steps} loss {final.get('loss', float('nan')):.6f}", flush=True)
        from mmfm.radio.evaluate import format_fidelity

        for key in ("eval_before", "eval_after"):
            if key in result:
                print(format_fidelity(result[key], title=f"{key} (held-out, teacher space)"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
