#!/usr/bin/env python
"""Linear + GELU of a ViT-L MLP: ``mmfm.kernels.linear_gelu`` (one cuBLASLt GEMM, bias + tanh-GELU epilogue)
against what a compiled teacher block ran before: ``torch.compile`` of ``F.gelu(F.linear(x, w, b))`` (cuBLAS GEMM
+ one fused Triton bias/GELU kernel), in the same run.

Shapes: the RADIO bench's teachers (``scripts/bench_radio_train.py``), bf16, K = 1024 -> N = 4096:
CLIP ViT-L/14-336 (batch 64, 577 tokens), DINOv2-L/14 at the 432 px student grid (batch 64, 734 tokens), SAM-L
at 1024 px (batch 16, 64 x 64 tokens). Times: median of ``--iters`` CUDA-event timings after warm-up. Also
prints each output's max error against a float64 reference of its own GELU (tanh for the fused op, exact for the
anchors) and the fused op's largest difference from exact GELU.

    python scripts/bench_linear_gelu.py --json out.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from bench_radio_train import run_meta, write_json  # scripts/ is on sys.path when a script is run

from mmfm.kernels.linear_gelu import linear_gelu, linear_gelu_reference

SHAPES = {"clip-L/14-336 B64": 64 * 577, "dinov2-L/14 @432 B64": 64 * 734, "sam-L @1024 B16": 16 * 64 * 64}


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the fused path is cuBLASLt's epilogue)")
        return 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    compiled_exact = torch.compile(lambda x, w, b: F.gelu(F.linear(x, w, b)))
    compiled_tanh = torch.compile(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"))
    variants = {
        "compiled linear + exact GELU (anchor)": (compiled_exact, "none"),
        "compiled linear + tanh GELU": (compiled_tanh, "tanh"),
        "eager linear + exact GELU": (lambda x, w, b: F.gelu(F.linear(x, w, b)), "none"),
        "mmfm linear_gelu (epilogue)": (linear_gelu, "tanh"),
    }
    rows = []
    for shape, m in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, 1024, device=dev, generator=g).to(dt)
        w = (torch.randn(4096, 1024, device=dev, generator=g) * 1024**-0.5).to(dt)
        b = (torch.randn(4096, device=dev, generator=g) * 0.5).to(dt)
        flop = 2 * m * 1024 * 4096
        ref = {a: F.gelu(F.linear(x[:4096].double(), w.double(), b.double()), approximate=a) for a in ("none", "tanh")}
        anchor = None
        for name, (fn, approx) in variants.items():
            ms = median_ms(lambda: fn(x, w, b), args.iters)  # noqa: B023
            err = (fn(x[:4096], w, b).double() - ref[approx]).abs().max().item()
            anchor = anchor or ms
            rows.append({"shape": shape, "m": m, "variant": name, "ms": ms, "tflops": flop / ms / 1e9,
                         "speedup_vs_anchor": anchor / ms, "max_err_vs_fp64": err})
            print(f"{shape:22s} {name:40s} {ms:7.3f} ms  {flop / ms / 1e9:6.0f} TFLOP/s "
                  f"({100 * flop / ms / 1e9 / args.peak_tflops:4.1f}% of peak)  {anchor / ms:5.2f}x anchor  "
                  f"max err {err:.2e}", flush=True)
    tanh_vs_exact = (linear_gelu_reference(x[:4096].double(), w.double(), b.double())
                     - ref["none"]).abs().max().item()
    print(f"tanh vs exact GELU on the last shape (float64): max |diff| {tanh_vs_exact:.2e}")
    write_json(args.json, {**run_meta(dev), "dtype": "bf16"}, rows=rows, tanh_vs_exact=tanh_vs_exact)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
