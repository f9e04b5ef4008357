#!/usr/bin/env python
"""VLM decoder benchmarks (random init; timings do not depend on the weights).

1. decode: tokens/s and peak memory of one-token decode steps after a prefill of 4k/16k/64k tokens, for a
   Nemotron-H-shaped hybrid (Mamba-2 + a few attention + MLP layers, mmfm kernels) vs an attention-only
   Llama of the same width and depth, in the same run.
2. prefill: a VLM forward (RADIO student + projector + hybrid decoder) with and without 2x2 pixel-unshuffle
   token compression.
3. kernels: the hybrid decoder's forward with mmfm kernels vs transformers' own PyTorch path.

    python scripts/bench_vlm.py --device cuda --json out.json
    python scripts/bench_vlm.py --tiny            # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmfm.vlm.decoder import tiny_llama, tiny_nemotron_h


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.inference_mode()
def decode_bench(model, context: int, steps: int, device: str, vocab: int, batch: int = 1) -> dict:
    """Prefill ``batch`` rows of ``context`` tokens, then time ``steps`` single-token decode steps.

    Both models decode through :class:`mmfm.vlm.static_decode.StaticDecoder`: preallocated caches and one
    CUDA-graph replay per step (eager transformers decode is CPU-launch bound at ~30 ms/step for either
    model, which hides what the GPU reads). One row is prefilled and its state copied to every row (a step's
    cost does not depend on the content; this keeps B32 x 64k prefills out of the run). Reported: decode-state bytes (K/V buffers + Mamba states), the peak during
    decode, and the peak including prefill.
    """
    from mmfm.vlm.static_decode import StaticDecoder

    reset_peak(device)
    dec = StaticDecoder(model, batch, context + steps + 8)
    ids = torch.randint(3, vocab, (1, context), device=device)
    nxt = dec.prefill(input_ids=ids).argmax(-1)
    del ids
    sync(device)
    prefill_peak = peak_gib(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # warm-up steps
        nxt = dec.step(nxt).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = dec.step(nxt).argmax(-1)
    sync(device)
    dt = time.perf_counter() - t0
    return {"context": context, "batch": batch, "tokens_per_s": batch * steps / dt, "ms_per_step": 1e3 * dt / steps,
            "state_gib": dec.state_bytes() / 2**30, "decode_peak_gib": peak_gib(device),
            "peak_gib": max(prefill_peak, peak_gib(device)), "cuda_graph": dec._graph is not None}


@torch.inference_mode()
def timed_forward(fn, device: str, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=4, help="repeats of the 6-layer pattern 'M-M-*-'x... unit")
    p.add_argument("--contexts", default="4096,16384,65536")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--decode-batch", default="1,8,32", help="decode batch sizes (rows decoded together)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: decode,prefill,kernels")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = args.device
    if args.tiny:
        args.hidden, args.blocks, args.contexts, args.decode_steps, args.decode_batch = 64, 1, "64,256", 4, "1,2"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    vocab = 32000 if not args.tiny else 512
    # Nemotron-H-8B keeps ~8% attention layers: unit "M-M-M-M-M*-" (5 Mamba, 1 attention, 6 MLP).
    pattern = "M-M-M-M-M*-" * args.blocks + "M-"  # ends on Mamba + MLP like the released patterns
    heads = max(args.hidden // 128, 2)
    hybrid = tiny_nemotron_h(vocab, hidden_size=args.hidden, pattern=pattern, num_heads=heads,
                             num_kv_heads=max(heads // 4, 1), mamba_heads=args.hidden * 2 // 64, mamba_head_dim=64,
                             n_groups=8 if not args.tiny else 2, state_size=128 if not args.tiny else 16,
                             intermediate_size=4 * args.hidden, chunk_size=128 if not args.tiny else 16)
    n_layers = sum(c in "M*" for c in pattern)  # mixer layers; a Llama layer = attention + MLP
    # same GQA as the hybrid's attention layers, so KV-cache size per attention layer is equal
    dense = tiny_llama(vocab, hidden_size=args.hidden, num_layers=n_layers, num_heads=heads,
                       num_kv_heads=max(heads // 4, 1), intermediate_size=4 * args.hidden)
    hybrid, dense = hybrid.to(dev, dtype).eval(), dense.to(dev, dtype).eval()
    from mmfm.kernels.hf_integration import patch_transformers, unpatch_transformers

    results: dict = {"args": vars(args), "pattern": pattern,
                     "params": {"hybrid": sum(x.numel() for x in hybrid.parameters()),
                                "attention_only": sum(x.numel() for x in dense.parameters())}}
    print(f"hybrid pattern {pattern} ({results['params']['hybrid'] / 1e6:.0f}M) vs Llama {n_layers} layers "
          f"({results['params']['attention_only'] / 1e6:.0f}M), hidden {args.hidden}, {dev} {dtype}")
    skip = set(filter(None, args.skip.split(",")))
    if "decode" not in skip:
        patch_transformers()
        rows = []
        for batch, ctx in ((int(b), int(c)) for b in args.decode_batch.split(",") for c in args.contexts.split(",")):
            row = {"context": ctx, "batch": batch}
            for name, model in (("hybrid", hybrid), ("attention_only", dense)):
                try:
                    row[name] = decode_bench(model, ctx, args.decode_steps, dev, vocab, batch)
                except torch.OutOfMemoryError:
                    row[name] = {"oom": True}
                reset_peak(dev)
            h, a = row["hybrid"], row["attention_only"]
            ratio = h["tokens_per_s"] / a["tokens_per_s"] if "tokens_per_s" in h and "tokens_per_s" in a else None
            row["ratio"] = ratio
            rows.append(row)
            nan = float("nan")
            print(f"decode B{batch} @ {ctx:6d}: hybrid {h.get('tokens_per_s', nan):8.1f} tok/s "
                  f"(state {h.get('state_gib', nan):.2f} GiB, decode peak {h.get('decode_peak_gib', nan):.2f}) | "
                  f"attention-only {a.get('tokens_per_s', nan):8.1f} tok/s (state {a.get('state_gib', nan):.2f} GiB, "
                  f"decode peak {a.get('decode_peak_gib', nan):.2f}) | ratio {ratio if ratio is None else round(ratio, 2)}")
        results["decode"] = rows
        unpatch_transformers()
    if "kernels" not in skip:
        ctx = int(args.contexts.split(",")[0])
        ids = torch.randint(3, vocab, (1, ctx), device=dev)
        patch_transformers()
        t_mmfm = timed_forward(lambda: hybrid(input_ids=ids), dev, 5)
        unpatch_transformers()
        try:
            t_hf = timed_forward(lambda: hybrid(input_ids=ids), dev, 3)
        except torch.OutOfMemoryError:
            t_hf = float("nan")
        results["kernels"] = {"context": ctx, "mmfm_ms": 1e3 * t_mmfm, "transformers_ms": 1e3 * t_hf,
                              "ratio": t_hf / t_mmfm}
        print(f"hybrid forward @ {ctx}: mmfm kernels {1e3 * t_mmfm:.1f} ms, transformers PyTorch path "
              f"{1e3 * t_hf:.1f} ms -> {t_hf / t_mmfm:.1f}x")
    if "prefill" not in skip:
        from mmfm.radio import RadioEncoder, create_student
        from mmfm.radio.compression import build_compressor
        from mmfm.vlm.model import VLM
        from mmfm.vlm.projector import Projector

        patch_transformers()
        size, res = ("tiny", 64) if args.tiny else ("L", 768)
        encoder = RadioEncoder(create_student(size))
        rows = []
        for comp_name in ("none", "pixel_unshuffle"):
            comp = build_compressor(comp_name, **({"factor": 2} if comp_name != "none" else {}))
            proj = Projector(comp.output_dim(encoder.embed_dim), args.hidden, args.hidden)
            vlm = VLM(encoder, comp, proj, hybrid, image_token_id=5).to(dev, dtype).eval()
            k = vlm.tokens_per_image(res, res)
            ids = torch.cat([torch.randint(6, vocab, (1, 32)), torch.full((1, k), 5), torch.randint(6, vocab, (1, 64))],
                            1).to(dev)
            images = torch.rand(1, 3, res, res, device=dev, dtype=dtype)
            t = timed_forward(lambda vlm=vlm, ids=ids, images=images: vlm(ids, images), dev, 5)
            rows.append({"compressor": comp_name, "image_tokens": k, "prefill_ms": 1e3 * t})
            print(f"VLM prefill ({size} encoder @ {res}px, {comp_name}): {k} image tokens, {1e3 * t:.1f} ms")
            del vlm
        rows[1]["speedup"] = rows[0]["prefill_ms"] / rows[1]["prefill_ms"]
        results["prefill"] = rows
        print(f"compression prefill speed-up: {rows[1]['speedup']:.2f}x")
        unpatch_transformers()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
