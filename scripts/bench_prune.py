#!/usr/bin/env python
"""Minitron pruning: prefill and decode throughput and memory of a pruned vs the unpruned hybrid decoder.

A Nemotron-H-shaped hybrid (random init: timings do not depend on the weights; hidden 2048, pattern
``M-M-M-M-M*-`` x 4 + ``M-``, Mamba-2 layers on mmfm's kernels) is pruned with ``mmfm.vlm.compress``
(activation importance on a few random calibration batches, group-aware Mamba head pruning) to about half
its parameters: hidden 2048 -> 1536, FFN 8192 -> 4096, Mamba heads 64 -> 32 per layer (groups kept),
attention heads 16 -> 8. Both models are then timed in the same run with the same helpers as
``scripts/bench_vlm.py``: prefill = one forward over ``--prefill`` tokens (median of 5), decode = one-token
steps after a prefill of ``--contexts`` tokens; peak memory of each.

    python scripts/bench_prune.py --device cuda --json out.json
    python scripts/bench_prune.py --tiny            # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import decode_bench, peak_gib, reset_peak, timed_forward  # noqa: E402

from mmfm.kernels.hf_integration import patch_transformers  # noqa: E402
from mmfm.vlm.compress import PruneTarget, estimate_importance, num_parameters, prune  # noqa: E402
from mmfm.vlm.decoder import tiny_nemotron_h  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", default="4096,16384")
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--decode-batch", default="1,8")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = args.device
    if args.tiny:
        hidden, blocks, vocab, groups, state, chunk = 64, 1, 512, 2, 16, 16
        args.prefill, args.contexts, args.decode_steps, args.decode_batch = "64", "64", 4, "1,2"
        target = PruneTarget(hidden_size=48, ffn_intermediate=128, attention_heads=2, mamba_heads=2)
    else:
        hidden, blocks, vocab, groups, state, chunk = 2048, 4, 32000, 8, 128, 128
        target = PruneTarget(hidden_size=1536, ffn_intermediate=4096, attention_heads=8, mamba_heads=32)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    pattern = "M-M-M-M-M*-" * blocks + "M-"
    heads = max(hidden // 128, 4)
    torch.manual_seed(0)
    full = tiny_nemotron_h(vocab, hidden_size=hidden, pattern=pattern, num_heads=heads,
                           num_kv_heads=max(heads // 4, 1), mamba_heads=hidden * 2 // 64 if not args.tiny else 4,
                           mamba_head_dim=64 if not args.tiny else 32, n_groups=groups, state_size=state,
                           intermediate_size=4 * hidden, chunk_size=chunk).to(dev).eval()
    patch_transformers()
    calibration = [torch.randint(3, vocab, (2, 256 if not args.tiny else 32), device=dev) for _ in range(2)]
    imp = estimate_importance(full, calibration, layers=False)
    pruned = prune(full.cpu(), imp, target).to(dev).eval()  # slicing runs on the CPU copy
    full.to(dev)
    models = {"unpruned": full.to(dtype), "pruned": pruned.to(dtype)}
    results: dict = {"args": vars(args), "pattern": pattern, "target": vars(target),
                     "params": {k: num_parameters(m) for k, m in models.items()}, "prefill": [], "decode": []}
    print(f"{dev} {dtype}; pattern {pattern}; params unpruned {results['params']['unpruned'] / 1e6:.0f}M, "
          f"pruned {results['params']['pruned'] / 1e6:.0f}M "
          f"({results['params']['pruned'] / results['params']['unpruned']:.2f}x)", flush=True)
    for n in (int(c) for c in args.prefill.split(",")):
        ids = torch.randint(3, vocab, (1, n), device=dev)
        row: dict = {"tokens": n}
        for name, model in models.items():
            reset_peak(dev)
            row[name] = {"ms": 1e3 * timed_forward(lambda m=model, ids=ids: m(input_ids=ids, logits_to_keep=1), dev, 5),
                         "peak_gib": peak_gib(dev)}
        row["speedup"] = row["unpruned"]["ms"] / row["pruned"]["ms"]
        results["prefill"].append(row)
        print(f"prefill {n:6d}: unpruned {row['unpruned']['ms']:8.1f} ms ({row['unpruned']['peak_gib']:.2f} GiB) | "
              f"pruned {row['pruned']['ms']:8.1f} ms ({row['pruned']['peak_gib']:.2f} GiB) | "
              f"speed-up {row['speedup']:.2f}x", flush=True)
    for batch, ctx in ((int(b), int(c)) for b in args.decode_batch.split(",") for c in args.contexts.split(",")):
        row = {"context": ctx, "batch": batch}
        for name, model in models.items():
            row[name] = decode_bench(model, ctx, args.decode_steps, dev, vocab, batch)
            reset_peak(dev)
        row["speedup"] = row["pruned"]["tokens_per_s"] / row["unpruned"]["tokens_per_s"]
        results["decode"].append(row)
        print(f"decode B{batch} @ {ctx:6d}: unpruned {row['unpruned']['tokens_per_s']:8.1f} tok/s "
              f"({row['unpruned']['peak_gib']:.2f} GiB) | pruned {row['pruned']['tokens_per_s']:8.1f} tok/s "
              f"({row['pruned']['peak_gib']:.2f} GiB) | speed-up {row['speedup']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
