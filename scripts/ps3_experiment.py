#!/usr/bin/env python
"""PS3 "must be shown" run on CPU: synthetic high-resolution region data (small readable details planted in
big images), a short tiny pre-training, then selection hit rates vs random and local retrieval vs the
global-only baseline, before and after training.

    python scripts/ps3_experiment.py --out runs/ps3-experiment [--train 512 --test 64 --steps 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfm.config import load_config
from mmfm.data.synth import write_synthetic
from mmfm.ps3.evaluate import format_table
from mmfm.ps3.train import PS3TrainConfig, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ps3-experiment")
    p.add_argument("--train", type=int, default=512, help="training images")
    p.add_argument("--test", type=int, default=64, help="held-out images")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--image-size", type=int, default=512)
    args = p.parse_args()
    out = Path(args.out)
    write_synthetic("regions", args.train, out / "data/train", seed=0, image_size=args.image_size)
    write_synthetic("regions", args.test, out / "data/test", seed=12345, image_size=args.image_size)
    cfg = load_config(PS3TrainConfig, Path(__file__).parents[1] / "configs/ps3/tiny-cpu.yaml", [
        f"train_shards={out / 'data/train'}", f"eval_shards={out / 'data/test'}", f"eval_samples={args.test}",
        f"steps={args.steps}", f"engine.optimizer.total_steps={args.steps}", f"image_size={args.image_size}"])
    result = train(cfg, out / "run")
    print("\nbefore training:\n" + format_table(result["eval_before"]))
    print("\nafter training:\n" + format_table(result["eval"]))
    (out / "experiment.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
