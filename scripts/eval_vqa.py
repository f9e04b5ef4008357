#!/usr/bin/env python
"""VQA evaluation: generate answers with a saved VLM and score them with the official metric definitions.

    python scripts/eval_vqa.py --model runs/vlm/model --data data/vqa-test --metric vqa_accuracy --out eval/

Writes ``OUT/predictions.json`` (every prediction with its references) and ``OUT/metrics.json``, and prints a
per-category table next to the majority-answer baseline.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from mmfm.vlm.metrics import METRICS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="mmfm VLM dir or HF nemotron_h_omni dir (local)")
    p.add_argument("--data", required=True, help="conversation shards (dir/glob) or a .jsonl file")
    p.add_argument("--metric", default="vqa_accuracy", choices=sorted(METRICS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="resize images (default: the model's)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output directory for predictions.json and metrics.json")
    args = p.parse_args(argv)
    from mmfm.vlm.evaluate import run_eval

    return run_eval(args)


if __name__ == "__main__":
    raise SystemExit(main())
