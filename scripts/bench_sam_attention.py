#!/usr/bin/env python
"""SAM ViT attention with decomposed relative-position bias: timm's forward vs mmfm's teacher forward.

One attention layer of SAM-L (width 1024, 16 heads of 64) on the token grids a 1024-px image gives: a global
block (64 x 64 tokens, batch B) and a windowed block (14 x 14 windows, 25 per image, batch 25 * B). Variants:
  timm         timm's ``Attention.forward``: (B * heads, N, C) inputs and a dense (B * heads, N, N) bias (anchor)
  dense_4d     the same dense bias, SDPA on (B, heads, N, C) (what mmfm did before folding the bias)
  folded_pad_v the bias folded into q / k, v zero-padded to their width (one head size for every kernel)
  folded       ``mmfm.radio.teachers._sam_attention_forward``: the folded q / k, v at its own width
Forward only, under ``no_grad`` (teachers are frozen). Prints ms, the speed-up over timm (timm ms / ms), the
extra peak memory, and the error against the same layer in fp32 (timm's forward, first two images): the
largest difference relative to the largest value, timm's own bf16 forward included.

    python scripts/bench_sam_attention.py --device cuda --json out.json
    python scripts/bench_sam_attention.py --device cpu --batch 1 --min-run-time 0.1  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from mmfm.radio.teachers import _rel_pos_in_qk, _sam_attention_forward, _sam_qkv


def _dense_4d(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The previous mmfm forward: 4-D SDPA with timm's dense bias. x (B, H, W, C) -> (B, H, W, C)."""
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

    b, h, w, _ = x.shape
    n, heads = h * w, self.num_heads
    q, k, v = _sam_qkv(self, x)
    bias = get_decomposed_rel_pos_bias(q.reshape(b * heads, n, -1), self.rel_pos_h, self.rel_pos_w,
                                       (h, w), (h, w)).view(b, heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return self.proj(out.transpose(1, 2).reshape(b, n, -1)).view(b, h, w, -1)


def _folded_pad_v(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Folded bias, v zero-padded to q's width (one head size for every fused kernel). x (B, H, W, C) -> same."""
    b, h, w, _ = x.shape
    q, k, v = _sam_qkv(self, x)
    c = v.shape[-1]
    q, k = _rel_pos_in_qk(q, k, self.rel_pos_h, self.rel_pos_w, h, w)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - c)), scale=c**-0.5)[..., :c]
    return self.proj(out.transpose(1, 2).reshape(b, h * w, -1)).view(b, h, w, -1)


VARIANTS = {"timm": None, "dense_4d": _dense_4d, "folded_pad_v": _folded_pad_v, "folded": _sam_attention_forward}


def _time_ms(fn: Callable[[], object], warmup: int, min_run_time: float) -> float:
    """Median time of ``fn()`` in ms (``torch.utils.benchmark``: CUDA synchronised, blocks of runs)."""
    for _ in range(warmup):
        fn()
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def bench_block(name: str, batch: int, grid: int, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> list[dict]:
    from timm.models.vision_transformer_sam import Attention

    torch.manual_seed(0)
    attn = Attention(args.dim, num_heads=args.heads, use_rel_pos=True, input_size=(grid, grid)).eval()
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)  # timm initialises them to zeros: a zero bias hides errors
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    attn = attn.to(device)
    x = torch.randn(batch, grid, grid, args.dim, device=device)
    with torch.no_grad():
        ref = attn(x[:2]).float()  # fp32 truth on two images (fp32 scores of the whole batch would not fit)
    attn, x = attn.to(dtype), x.to(dtype)
    rows, anchor_ms = [], None
    for vname, fwd in VARIANTS.items():
        attn.__dict__.pop("forward", None)
        if fwd is not None:
            attn.forward = types.MethodType(fwd, attn)
        with torch.no_grad():
            out = attn(x[:2]).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            ms = _time_ms(lambda: attn(x), args.warmup, args.min_run_time)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
        anchor_ms = anchor_ms or ms
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        rows.append({"block": name, "batch": batch, "grid": grid, "variant": vname, "ms": ms,
                     "speedup_vs_timm": anchor_ms / ms, "extra_peak_gib": peak, "max_rel_err_vs_fp32": err})
        print(f"{name:7s} B{batch:<4d} {grid}x{grid}  {vname:12s} {ms:9.3f} ms  x timm {anchor_ms / ms:6.2f}  "
              f"extra peak {peak:6.2f} GiB  max rel err vs fp32 {err:.1e}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU unless given")
    p.add_argument("--batch", type=int, default=16, help="images; the windowed block runs 25 windows per image")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--global-grid", type=int, default=64)
    p.add_argument("--window", type=int, default=14)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed runs per variant")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    windows = math.ceil(args.global_grid / args.window) ** 2  # timm pads the grid to whole windows
    rows = bench_block("global", args.batch, args.global_grid, args, device, dtype)
    rows += bench_block("window", windows * args.batch, args.window, args, device, dtype)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "dtype": str(dtype), "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
