"""Benchmark visual-token compressors and the MambaVision-T student against a ViT of equal parameter count.

Part 1: forward time of each compressor in ``mmfm.radio.compression`` on (B, N, D) tokens of a square grid.
Part 2: forward time of MambaVision-T vs a ViT student (``mmfm.radio.vit``) with ViT-S width (384, 6 heads)
and the depth that makes its parameter count closest to MambaVision-T's, at the same image size.

Usage:
    python scripts/bench_compression.py                                # defaults of the issue: B=8, N=1024/4096, D=1024, CPU
    python scripts/bench_compression.py --batch 2 --tokens 256 1024 --dim 256 --image-size 224 --model-batch 2
    python scripts/bench_compression.py --device cuda --dtype bfloat16 --model-batch 64

Times are the median of ``--repeats`` runs after ``--warmup`` runs (CUDA synchronised).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_compressors(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    from mmfm.radio.compression import build_compressor

    print(f"\n== token compressors: B={args.batch}, D={args.dim}, dtype={dtype}, device={device}")
    print(f"{'N':>6} {'grid':>7} {'compressor':<22} {'K':>6} {'D_out':>6} {'ms':>10}")
    for n in args.tokens:
        side = math.isqrt(n)
        if side * side != n:
            raise SystemExit(f"--tokens {n} is not a square number of tokens (need a square grid)")
        x = torch.randn(args.batch, n, args.dim, device=device, dtype=dtype)
        specs = [("none", {}), ("pixel_unshuffle", {"factor": 2}), ("pixel_unshuffle", {"factor": 3}),
                 ("avgpool", {"factor": 2}), ("tome", {"num_tokens": n // 4}), ("tome", {"num_tokens": n // 16})]
        for name, kw in specs:
            comp = build_compressor(name, **kw).to(device)
            with torch.no_grad():
                ms = _time(lambda c=comp, t=x, g=(side, side): c(t, g), device, args.warmup, args.repeats)
            label = name + "".join(f" {k}={v}" for k, v in kw.items() if k != "num_tokens")
            print(f"{n:>6} {f'{side}x{side}':>7} {label:<22} {comp.num_output_tokens(side, side):>6} "
                  f"{comp.output_dim(args.dim):>6} {ms:>10.3f}")


def _count(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in skip))


def bench_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    from mmfm.radio.mambavision import create_mambavision

    print(f"\n== MambaVision-T vs equal-parameter ViT: B={args.model_batch}, {args.image_size}px, "
          f"dtype={dtype}, device={device}")
    try:
        from mmfm.radio.vit import create_student
    except ImportError as e:
        print(f"mmfm.radio.vit is not available ({e}); skipping the ViT comparison")
        create_student = None

    torch.manual_seed(0)
    mv = create_mambavision("T").to(device).eval()
    n_mv = _count(mv)
    models = [(f"MambaVision-T (stride 32, {(args.image_size // 32) ** 2} final tokens)", mv, n_mv)]
    if create_student is not None:
        # ViT-S width; pick the depth whose parameter count (without the CPE grid) is closest to MambaVision-T
        best = None
        for depth in range(8, 25):
            with torch.device("meta"):
                vit = create_student("B", embed_dim=384, num_heads=6, depth=depth, max_resolution=512,
                                     preferred_resolution=args.image_size)
            n = _count(vit, skip=("pos_embed", "cpe"))
            if best is None or abs(n - n_mv) < abs(best[1] - n_mv):
                best = (depth, n)
        depth, _ = best
        vit = create_student("B", embed_dim=384, num_heads=6, depth=depth, max_resolution=512,
                             preferred_resolution=args.image_size).to(device).eval()
        n_vit = _count(vit, skip=("pos_embed", "cpe"))
        models.append((f"ViT-S width, depth {depth}, patch 16 ({(args.image_size // 16) ** 2} tokens)", vit, n_vit))

    x = torch.rand(args.model_batch, 3, args.image_size, args.image_size, device=device)
    print(f"{'model':<58} {'params (M)':>10} {'ms/batch':>10} {'img/s':>9}")
    for label, model, n in models:
        def run(model=model) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(x)

        ms = _time(run, device, args.warmup, args.repeats)
        print(f"{label:<58} {n / 1e6:>10.2f} {ms:>10.2f} {args.model_batch / ms * 1e3:>9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=8, help="batch size for the compressors")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="token counts N (squares)")
    p.add_argument("--dim", type=int, default=1024, help="token width D")
    p.add_argument("--image-size", type=int, default=224, help="image side for the model comparison (multiple of 32)")
    p.add_argument("--model-batch", type=int, default=8, help="batch size for the model comparison")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-models", action="store_true", help="only benchmark the compressors")
    args = p.parse_args()
    if args.image_size % 32:
        raise SystemExit(f"--image-size must be a multiple of 32, got {args.image_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    bench_compressors(args, device, dtype)
    if not args.skip_models:
        bench_models(args, device, dtype)


if __name__ == "__main__":
    main()
