"""Eager vs block-compiled forward of a frozen timm ViT (a RADIO teacher), and whether the blocks ran compiled.

``compile_repeated_blocks`` (what ``compile: true`` and ``bench_radio_train.py --compile`` do) compiles each
transformer block in place. This bench times one model's forward both ways on the same inputs and reads the
profile of the compiled run: the number of compiled-region calls and the GPU time in Triton (inductor's fused)
kernels. A block class whose frames did not compile shows 0 of both. The ratio printed is eager / compiled.

    python scripts/bench_compiled_blocks.py                                  # DINOv2-L/14, 448 px, batch 32, GPU
    python scripts/bench_compiled_blocks.py --tiny                           # CPU smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Callable

import timm
import torch
from bench_radio_train import sync, time_ms  # scripts/ is on sys.path when a script is run
from torch.profiler import ProfilerActivity, profile

from mmfm.radio.distill import compile_repeated_blocks


def _profile(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Compiled-region calls and Triton-kernel GPU ms in one call of ``fn``."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    regions = collections.Counter(e.name for e in prof.events() if e.name.startswith("Torch-Compiled Region"))
    triton_ms = sum(e.device_time_total for e in prof.key_averages() if e.key.startswith("triton_")) / 1e3
    return {"compiled_region_calls": sum(regions.values()), "triton_ms": triton_ms}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_large_patch14_reg4_dinov2")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-block, 64-wide model at 56 px")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"img_size": args.size, "dynamic_img_size": True}
    if args.tiny:
        args.size, args.batch, args.iters = 56, 2, 2
        kwargs.update(img_size=56, embed_dim=64, depth=2, num_heads=2)
    model = timm.create_model(args.model, pretrained=False, **kwargs).to(device, dtype).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    eager_ms = time_ms(forward, device, args.iters)
    n_blocks = compile_repeated_blocks(model)
    compiled_ms = time_ms(forward, device, args.iters)
    prof = _profile(forward, device)
    row = {"model": args.model, "size": args.size, "batch": args.batch, "dtype": str(dtype),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "timm": timm.__version__, "compiled_blocks": n_blocks,
           "eager_ms": eager_ms, "compiled_ms": compiled_ms, "speedup": eager_ms / compiled_ms, **prof}
    print(f"{args.model} {args.size} px, batch {args.batch}, {dtype}: eager {eager_ms:.1f} ms, "
          f"{n_blocks} blocks compiled {compiled_ms:.1f} ms ({row['speedup']:.2f}x); compiled-region calls "
          f"{prof['compiled_region_calls']}, Triton kernels {prof['triton_ms']:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
