#!/usr/bin/env python
"""PS3 encode cost vs input resolution at a fixed high-res token budget, against encoding all patches.

Anchor (same run, same ViT weights): the plain ViT over the whole image at that resolution (every patch
encoded, what a non-selective high-res encoder pays). PS3's claim: cost stays near-constant as the
resolution grows because only ``num_look_close`` high-res patches are encoded.

    python scripts/bench_ps3.py --device cuda --vit B --budget 1024      # GPU
    python scripts/bench_ps3.py --tiny                                    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from mmfm.ps3.model import PS3Config, PS3Encoder


def timed(fn, device: str, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call and peak GiB allocated (CUDA) for ``fn()``."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vit", default="B")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--base", type=int, default=384)
    p.add_argument("--scales", default="2,4,10")
    p.add_argument("--resolutions", default="768,1536,2304,3840")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny ViT")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.tiny:
        args.vit, args.base, args.scales, args.resolutions, args.budget, args.repeats = \
            "tiny", 64, "2,4", "128,256", 32, 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    scales = tuple(int(s) for s in args.scales.split(","))
    model = PS3Encoder(PS3Config(vit_size=args.vit, patch_size=args.patch, base_resolution=args.base, scales=scales,
                                 num_look_close=args.budget)).to(args.device, dtype).eval()
    vit = model.vit
    rows = []
    print(f"PS3 ViT-{args.vit}/{args.patch}, base {args.base}, scales {scales}, budget {args.budget}, "
          f"{args.device} {dtype}")
    print(f"{'res':>6} {'all-patch tokens':>16} {'all ms':>9} {'all GiB':>8} {'PS3 ms':>9} {'PS3 GiB':>8} "
          f"{'speed-up':>9} {'local tok/s':>12}")
    for res in (int(r) for r in args.resolutions.split(",")):
        images = torch.rand(1, 3, res, res, device=args.device, dtype=dtype)
        norm = (images - 0.5) / 0.5
        with torch.inference_mode():
            all_s, all_gib = timed(partial(vit.forward_tokens, norm), args.device, args.repeats)
            ps3_s, ps3_gib = timed(partial(model, images, num_look_close=args.budget), args.device, args.repeats)
            _, kv = model.encode_global(images)
            positions = model.select(model.upsample_maps(model.saliency_maps(
                model.encode_global(images)[0][:, vit.num_prefix_tokens:], None)[0]), args.budget)
            local_s, _ = timed(partial(model.encode_local, images, positions, kv), args.device, args.repeats)
        n_all = (res // args.patch) ** 2
        row = {"resolution": res, "all_tokens": n_all, "all_ms": all_s * 1e3, "all_gib": all_gib,
               "ps3_ms": ps3_s * 1e3, "ps3_gib": ps3_gib, "speedup": all_s / ps3_s,
               "local_tokens_per_s": args.budget / local_s}
        rows.append(row)
        print(f"{res:6d} {n_all:16d} {row['all_ms']:9.2f} {all_gib:8.2f} {row['ps3_ms']:9.2f} {ps3_gib:8.2f} "
              f"{row['speedup']:8.2f}x {row['local_tokens_per_s']:12.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
