"""Synthetic shapes data: generation throughput (one process, one core) and VQA answer priors.

Prints samples/s of ``mmfm.data.synth.iter_synthetic`` per kind and image size (scene sampling +
rendering; ``+png`` adds the PNG encoding that writing shards costs), then the majority-answer
baseline per VQA category (VQAv2 accuracy of always giving the category's most frequent answer).

Usage: python scripts/bench_synth.py [--n 300] [--baseline-n 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="samples per 224 px measurement (fewer for high-res)")
    parser.add_argument("--baseline-n", type=int, default=2000, help="VQA questions for the majority baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from mmfm.data.schemas import encode_image
    from mmfm.data.synth import iter_synthetic, iter_vqa_items
    from mmfm.vlm.metrics import format_table, majority_baseline

    print(f"# bench_synth  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {platform.processor() or platform.machine()}  "
          f"cpus={os.cpu_count()}  (single process)")
    print(f"{'kind':<8} {'size':>5} {'n':>5} {'gen samples/s':>14} {'gen+png samples/s':>18}")
    for kind, size, n in [("images", 224, args.n), ("vqa", 224, args.n), ("vqa", 448, args.n // 3),
                          ("regions", 1024, max(10, args.n // 10)), ("regions", 2048, max(5, args.n // 40))]:
        start = time.perf_counter()
        samples = list(iter_synthetic(kind, n, seed=args.seed, image_size=size))
        gen = time.perf_counter() - start
        start = time.perf_counter()
        for s in samples:
            for im in (s.images if kind == "vqa" else [s.image]):
                encode_image(im, "png")
        enc = time.perf_counter() - start
        print(f"{kind:<8} {size:>5} {n:>5} {n / gen:>14.1f} {n / (gen + enc):>18.1f}")

    items = list(iter_vqa_items(args.baseline_n, seed=args.seed))
    res = majority_baseline({"answers": it.answers, "category": it.category} for it in items)
    print()
    print(format_table(res, title=f"majority-answer baseline, VQAv2 accuracy x100 ({args.baseline_n} questions)"))
    print("majority answers:", res["answers"])


if __name__ == "__main__":
    main()
