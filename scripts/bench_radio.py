"""Benchmark: mmfm's student ViT vs ``transformers.RadioModel`` with the same config and the same weights.

For each size (B/L/H at patch 16) and resolution (512, 1024 px) it builds a randomly initialised mmfm encoder,
exports it with ``mmfm.radio.export_hf`` and loads the export with ``transformers.RadioModel.from_pretrained``
(so both run identical weights; their outputs are compared as a sanity check), then times inference
(``torch.inference_mode``, one forward = conditioning + backbone + summary/features) and records peak memory.
Prints img/s, peak memory and the mmfm / transformers ratios, one row per point, in one run.

transformers is timed eager (its default) with SDPA attention. mmfm is timed eager with PyTorch's default SDPA
kernel choice, eager preferring cuDNN attention (``ViT.set_sdpa_backends(["cudnn", "flash"])``, CUDA only),
and with ``--compile`` the faster of those with ``ViT.compile_blocks()`` (the compile time is not timed).

    python scripts/bench_radio.py --device cuda                 # B/L/H x 512/1024, bf16
    python scripts/bench_radio.py --device cuda --compile
    python scripts/bench_radio.py --tiny                        # CPU smoke test (tiny model, fp32)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time

import torch

from mmfm.radio import RadioEncoder, create_student, export_hf

# images per forward; chosen to saturate an H100 at each point without running out of memory
BATCH = {("B", 512): 64, ("L", 512): 32, ("H", 512): 32, ("B", 1024): 16, ("L", 1024): 8, ("H", 1024): 8}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_model(fn, x: torch.Tensor, warmup: int, iters: int, dev: torch.device) -> tuple[float, float]:
    """Returns (images per second, peak memory in GiB during the timed forwards; NaN on CPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        _sync(dev)
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return x.shape[0] * iters / dt, peak


GEMM_KEYS = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma")
ATTN_KEYS = ("flash", "fmha", "attention", "attn", "cudnn", "sdpa")


def kernel_breakdown(fn, x: torch.Tensor, iters: int = 3) -> dict:
    """GPU kernel time per forward split into GEMM, attention and everything else (torch.profiler), and the
    speed-up ceiling if everything but GEMM and attention took no time: total / (gemm + attention)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn(x)
            torch.cuda.synchronize()
    out = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        name, us = evt.name.lower(), evt.time_range.elapsed_us()
        kind = "attention" if any(k in name for k in ATTN_KEYS) else "gemm" if any(k in name for k in GEMM_KEYS) \
            else "other"
        out[kind] += us / 1e3 / iters
    total = sum(out.values())
    return {f"{k}_ms": v for k, v in out.items()} | {"total_ms": total,
                                                     "ceiling": total / max(out["gemm"] + out["attention"], 1e-9)}


def bench_point(size: str, res: int, batch: int, dev: torch.device, dtype: torch.dtype, args) -> dict:
    """One (size, resolution) point: HF eager, then mmfm variants; returns a row dict."""
    from transformers import RadioModel

    torch.manual_seed(0)
    over = dict(num_cls_tokens=3, num_registers=5)
    if size == "tiny":
        over.update(max_resolution=max(512, res))
    with torch.device(dev):
        student = create_student(size, **over)
    enc = RadioEncoder(student, summary_idxs=[0, 1]).to(device=dev, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(enc, tmp)
        hf = RadioModel.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    x = torch.rand(batch, 3, res, res, device=dev, dtype=dtype)
    with torch.inference_mode():
        ref = hf(x[:2]).features.float()

    def check() -> float:
        with torch.inference_mode():
            return (enc(x[:2]).features.float() - ref).abs().max().item()

    row = {"size": size, "res": res, "batch": batch, "feature_scale": ref.abs().max().item(), "variants": {}}
    ips, peak = time_model(hf, x, args.warmup, args.iters, dev)
    row["variants"]["transformers"] = {"img_s": ips, "peak_gib": peak, "diff": 0.0}
    if args.profile and dev.type == "cuda":
        row["profile"] = {"transformers": kernel_breakdown(hf, x), "mmfm": kernel_breakdown(enc, x)}
        for name, b in row["profile"].items():
            print(f"  kernels {size}@{res} {name}: GEMM {b['gemm_ms']:.2f} ms, attention {b['attention_ms']:.2f} ms, "
                  f"other {b['other_ms']:.2f} ms; GEMM+attention-only ceiling {b['ceiling']:.2f}x", flush=True)
    backends = {"mmfm": None}
    if dev.type == "cuda":
        backends["mmfm+cudnn-attn"] = ["cudnn", "flash"]
    for name, order in backends.items():
        student.set_sdpa_backends(order)
        try:
            diff = check()
            ips, peak = time_model(enc, x, args.warmup, args.iters, dev)
            row["variants"][name] = {"img_s": ips, "peak_gib": peak, "diff": diff}
        except RuntimeError as err:  # e.g. no cuDNN attention kernel for this shape / build
            print(f"  {name}: failed ({str(err).splitlines()[0][:120]})", flush=True)
    if args.compile:
        eager = {k: v for k, v in row["variants"].items() if k != "transformers"}
        best = max(eager, key=lambda k: eager[k]["img_s"]) if eager else "mmfm"
        student.set_sdpa_backends(backends[best])
        # one dynamo cache per process: start each point clean so earlier points' graphs do not hit the
        # recompile limit (a hit silently falls back to eager)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            student.compile_blocks(dynamic=False)
            with torch.inference_mode():
                enc(x)  # compile for the timed shape
            diff = check()
            row["compile_s"] = time.perf_counter() - t0
            ips, peak = time_model(enc, x, args.warmup, args.iters, dev)
            row["variants"][best + "+compile"] = {"img_s": ips, "peak_gib": peak, "diff": diff}
        except Exception as err:  # report and keep the eager numbers
            print(f"  compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                    help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--sizes", nargs="+", default=["B", "L", "H"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--batch", type=int, default=None, help="override the per-point batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time mmfm with ViT.compile_blocks()")
    ap.add_argument("--profile", action="store_true",
                    help="also split each model's GPU kernel time into GEMM / attention / other (CUDA only)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model at 64/128 px, 2 iterations")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.resolutions = ["tiny"], [64, 128]
        args.warmup, args.iters = 1, 2
        args.batch = args.batch or 2
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --tiny on CPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_radio {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | device {name} | "
          f"torch {torch.__version__} | transformers {transformers.__version__} | {dtype}")
    print("| model | res | batch | variant | img/s | x transformers | peak GiB | max abs diff vs HF (feature scale) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for res in args.resolutions:
        for size in args.sizes:
            batch = args.batch or BATCH.get((size, res), 8)
            r = bench_point(size, res, batch, dev, dtype, args)
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the point's models are gone; release their memory before the next
            rows.append(r)
            base = r["variants"]["transformers"]["img_s"]
            for name, v in r["variants"].items():
                print(f"| {size} | {res} | {batch} | {name} | {v['img_s']:.1f} | {v['img_s'] / base:.2f}x | "
                      f"{v['peak_gib']:.2f} | {v['diff']:.3g} ({r['feature_scale']:.3g}) |", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
