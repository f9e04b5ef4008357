"""Benchmark mmfm's selective scan (Mamba-1) against mamba-ssm's CUDA kernel and the PyTorch reference.

Everything is measured in one process on one GPU: forward and forward+backward median times
(``triton.testing.do_bench``, CUDA events), peak extra memory of one forward+backward, and ratios
against the anchors. The anchor is mamba-ssm's ``selective_scan_fn`` with its CUDA extension built
from the mamba-ssm sdist for this GPU's architecture only (``--mamba-src``); when that build is not
possible the anchor is mamba-ssm's own PyTorch ``selective_scan_ref`` and the output says so.

    python scripts/bench_selective_scan.py --mamba-src PATH/mamba_ssm-2.2.6.post3 --out results/
    python scripts/bench_selective_scan.py --build-only --mamba-src ...   # compile the anchor, then exit
    python scripts/bench_selective_scan.py --grids   # the backward's launch grid by batch size, both grids

Shapes (batch, D, L, N), bf16 activations, fp32 A/D/delta_bias, input-dependent B/C (batch, N, L),
delta_softplus=True as in Mamba's mixer: B4 D4096 L2048 N16 (with z), B64 D512 L196 N8 (MambaVision
stage, z=None), B1 D4096 L16384 N16 (with z).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

SHAPES = [
    # name, batch, dim, seqlen, dstate, gated
    ("B4 D4096 L2048 N16", 4, 4096, 2048, 16, True),
    ("B64 D512 L196 N8 (MambaVision)", 64, 512, 196, 8, False),
    ("B1 D4096 L16384 N16", 1, 4096, 16384, 16, True),
]

NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
]


def build_mamba_cuda(src: Path, build_dir: Path):
    """Compile mamba-ssm's selective_scan_cuda extension for the local GPU's architecture only."""
    from torch.utils.cpp_extension import load

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")  # e.g. "9.0" to build on a machine without the GPU
    major, minor = arch.split(".") if arch else torch.cuda.get_device_capability()
    csrc = src / "csrc" / "selective_scan"
    names = ["selective_scan.cpp"] + [
        f"selective_scan_{k}.cu"
        for k in (
            "fwd_fp32", "fwd_fp16", "fwd_bf16", "bwd_fp32_real", "bwd_fp32_complex", "bwd_fp16_real",
            "bwd_fp16_complex", "bwd_bf16_real", "bwd_bf16_complex",
        )
    ]  # fmt: skip
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="selective_scan_cuda",
        sources=[str(csrc / n) for n in names],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=NVCC_FLAGS + ["-gencode", f"arch=compute_{major}{minor},code=sm_{major}{minor}"],
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        verbose=False,
    )


def import_mamba(src: Path, build_dir: Path, build: bool):
    """Import mamba-ssm's selective_scan_interface without running its package __init__ (which pulls in
    models and optional dependencies). Returns (selective_scan_fn or None, selective_scan_ref, note)."""
    note = ""
    cuda_mod = None
    prebuilt = build_dir / "selective_scan_cuda.so"
    if prebuilt.exists():  # built earlier (possibly on another machine with the same torch): just import it
        from mmfm.kernels._cuda_ext import import_library

        cuda_mod = import_library("selective_scan_cuda", prebuilt)
        note = f"mamba-ssm CUDA extension imported from {prebuilt}"
    elif build:
        t0 = time.time()
        try:
            cuda_mod = build_mamba_cuda(src, build_dir)
            note = f"mamba-ssm CUDA extension built in {time.time() - t0:.0f} s"
        except Exception as exc:  # the anchor is optional; say why it is missing
            note = f"mamba-ssm CUDA build failed ({type(exc).__name__}: {str(exc)[-300:]}); anchor = selective_scan_ref"
    if cuda_mod is None:
        cuda_mod = types.ModuleType("selective_scan_cuda")  # stub: lets the interface import
    sys.modules["selective_scan_cuda"] = cuda_mod
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(src / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

    has_cuda = hasattr(cuda_mod, "fwd")
    return (selective_scan_fn if has_cuda else None), selective_scan_ref, note


def make_inputs(batch, dim, seqlen, dstate, gated, device="cuda", dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, device=device, dtype=dtype, generator=g)
    delta = (0.5 * torch.randn(batch, dim, seqlen, device=device, generator=g)).to(dtype)
    # Mamba's initialisation: A = -(1..N) per channel, dt in [1e-3, 1e-1] through softplus^-1 as bias
    A = -torch.arange(1, dstate + 1, device=device, dtype=torch.float32).repeat(dim, 1)
    dt = torch.exp(torch.rand(dim, device=device, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))  # fmt: skip
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    B = torch.randn(batch, dstate, seqlen, device=device, dtype=dtype, generator=g)
    C = torch.randn(batch, dstate, seqlen, device=device, dtype=dtype, generator=g)
    D = torch.ones(dim, device=device)
    z = torch.randn(batch, dim, seqlen, device=device, dtype=dtype, generator=g) if gated else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def floor_ms(batch, dim, seqlen, dstate, gated, bw_tbs):
    """Bytes every forward must move (bf16 u, delta, z, out; B, C) over the copy bandwidth."""
    act = (3 + int(gated)) * batch * dim * seqlen * 2 + 2 * batch * dstate * seqlen * 2
    return act / (bw_tbs * 1e12) * 1e3


def grad_leaves(inputs) -> tuple[dict, list]:
    """Fresh leaf copies of ``inputs`` that require grad (None stays None), and the list of them for
    do_bench's ``grad_to_none``."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    return leaves, [v for v in leaves.values() if v is not None]


def measure(fn, inputs, dout, quick=False, fwd_only=False):
    """-> dict(fwd_ms, fwdbwd_ms, peak_mib) for fn(**inputs) -> out (fwd_ms only when fwd_only)."""
    import triton

    args = {k: v for k, v in inputs.items()}

    def fwd():
        with torch.no_grad():
            fn(**args)

    leaves, grads = grad_leaves(args)

    def fwdbwd():
        out = fn(**leaves)
        out.backward(dout)

    def timed(f):
        if quick:  # slow reference: one warm-up, one timed run
            f()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return triton.testing.do_bench(f, warmup=25, rep=200, grad_to_none=grads, return_mode="median")

    res = {"fwd_ms": timed(fwd)}
    if fwd_only:
        return res
    for g in grads:
        g.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for g in grads:
        g.grad = None
    res["fwdbwd_ms"] = timed(fwdbwd)
    return res


def host_and_graph_ms(fn, inputs, dout) -> dict:
    """Where eager fwd+bwd time goes: the host's time to enqueue one fwd+bwd while the GPU is held busy (so the
    host never waits on it), and the GPU time of the same fwd+bwd replayed from a CUDA graph (no host work).
    When host_fwdbwd_ms exceeds graph_fwdbwd_ms, eager timings measure the host, not the kernels."""
    import triton

    leaves, grads = grad_leaves(inputs)

    def fwdbwd():
        for g in grads:
            g.grad = None
        fn(**leaves).backward(dout)

    fwdbwd()
    torch.cuda.synchronize()
    reps = 30
    torch.cuda._sleep(300_000_000)  # ~0.2 s of GPU work queued ahead of the enqueues below
    t0 = time.perf_counter()
    for _ in range(reps):
        fwdbwd()
    host_ms = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # graph capture wants warm-up on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fwdbwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwdbwd()
    graph_ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return {"host_fwdbwd_ms": host_ms, "graph_fwdbwd_ms": graph_ms}


GRID_SHAPES = [  # D, L, N, gated: the backward-grid sweep (--grids), each at batch 2..64
    (4096, 2048, 16, True), (1536, 1024, 16, True), (1024, 784, 8, False), (512, 196, 8, False),
]


def backward_grid_sweep(out: Path) -> int:
    """fwd+bwd ms of the CUDA path with its backward on the (batch, D) grid (the default) vs (D, batch)
    (variant 100) by batch size; prints one line per shape and writes bench_selective_scan_grids.json."""
    from mmfm.kernels.selective_scan import selective_scan

    rows = []
    for dim, seqlen, dstate, gated in GRID_SHAPES:
        for batch in (2, 4, 8, 16, 32, 64):
            if batch * dim * seqlen > 2**30:
                continue
            x = make_inputs(batch, dim, seqlen, dstate, gated)
            dout = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16)
            ms = {}
            for variant in (0, 100):
                fn = functools.partial(selective_scan, delta_softplus=True, backend="cuda", _config=dict(variant=variant))
                ms[variant] = measure(fn, x, dout)["fwdbwd_ms"]
            rows.append(dict(batch=batch, dim=dim, seqlen=seqlen, dstate=dstate, batch_d_ms=ms[0], d_batch_ms=ms[100]))
            print(f"B{batch} D{dim} L{seqlen} N{dstate}: fwd+bwd with the backward on (batch, D) {ms[0]:.3f} ms, "
                  f"on (D, batch) {ms[100]:.3f} ms: x {ms[100] / ms[0]:.3f}", flush=True)
            del x, dout
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_selective_scan_grids.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


def max_rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mamba-src", type=Path, default=None, help="extracted mamba-ssm sdist (has csrc/)")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/mamba_ssm_build"))
    p.add_argument("--build-only", action="store_true", help="compile the mamba-ssm extension and exit")
    p.add_argument("--no-build", action="store_true", help="do not compile; anchor = selective_scan_ref")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    p.add_argument("--skip-ref", action="store_true", help="skip the (slow) PyTorch references")
    p.add_argument("--sweep", nargs="?", const="all", choices=["all", "triton", "cuda"], default=None,
                   help="also time other block configurations (of the Triton kernels, the CUDA ones or both)")
    p.add_argument("--variants", type=lambda v: [int(k) for k in v.split(",")], default=None,
                   help="CUDA sweep: only these variants, e.g. 0,100,14 (VARIANT_CHUNKS; k + 100: the backward on "
                        "a (D, batch) grid)")
    p.add_argument("--grids", action="store_true",
                   help="only the backward-grid sweep: (batch, D) vs (D, batch) by batch size (GRID_SHAPES)")
    p.add_argument("--no-mmfm-cuda", action="store_true", help="skip mmfm's CUDA C++ path (else built here)")
    p.add_argument("--host", action="store_true",
                   help="also time the host's enqueue of one fwd+bwd and its CUDA-graph replay (CUDA paths)")
    p.add_argument("--bw-tbs", type=float, default=3.0, help="copy bandwidth for the floor (H100: ~3.0 TB/s)")
    args = p.parse_args()
    if args.build_only:  # may run without a GPU when TORCH_CUDA_ARCH_LIST is set
        if args.mamba_src is None:
            print("--build-only needs --mamba-src", file=sys.stderr)
            return 2
        t0 = time.time()
        build_mamba_cuda(args.mamba_src, args.build_dir)
        print(f"built selective_scan_cuda in {time.time() - t0:.0f} s")
        return 0

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    if args.grids:
        from mmfm.kernels import _cuda_ext

        _cuda_ext.build("selective_scan")
        return backward_grid_sweep(args.out)
    from mmfm.kernels.selective_scan import selective_scan, selective_scan_ref

    mamba_fn, mamba_ref, note = (None, None, "no --mamba-src: no mamba-ssm anchor")
    if args.mamba_src is not None:
        mamba_fn, mamba_ref, note = import_mamba(args.mamba_src, args.build_dir, build=not args.no_build)
    print(note)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}")
    has_cuda = not args.no_mmfm_cuda
    if has_cuda:
        from mmfm.kernels import _cuda_ext

        t0 = time.time()
        _cuda_ext.build("selective_scan")
        print(f"mmfm CUDA extension ready in {time.time() - t0:.0f} s")

    def mmfm_fn(cfg=None, backend="triton"):
        def f(**kw):
            return selective_scan(**kw, delta_softplus=True, backend=backend, _config=cfg)

        return f

    def anchor_fn(**kw):
        return mamba_fn(**kw, delta_softplus=True)

    def mamba_ref_fn(**kw):
        return mamba_ref(**kw, delta_softplus=True)

    def ref_fn(**kw):
        return selective_scan_ref(**kw, delta_softplus=True)

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, batch, dim, seqlen, dstate, gated in SHAPES:
        x = make_inputs(batch, dim, seqlen, dstate, gated)
        dout = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name, "floor_fwd_ms": floor_ms(batch, dim, seqlen, dstate, gated, args.bw_tbs)}
        out = mmfm_fn()(**x)
        if mamba_fn is not None:
            row["err_vs_mamba"] = max_rel_err(out, anchor_fn(**x))
            row["mamba_cuda"] = measure(anchor_fn, x, dout)
        row["mmfm_triton"] = measure(mmfm_fn(), x, dout)
        if has_cuda:
            out_cuda = mmfm_fn(backend="cuda")(**x)
            row["err_cuda_vs_triton"] = max_rel_err(out_cuda, out)
            if mamba_fn is not None:
                row["err_cuda_vs_mamba"] = max_rel_err(out_cuda, anchor_fn(**x))
            row["mmfm_cuda"] = measure(mmfm_fn(backend="cuda"), x, dout)
        if args.host:
            for key, fn in (("mamba_cuda", anchor_fn if mamba_fn else None),
                            ("mmfm_cuda", mmfm_fn(backend="cuda") if has_cuda else None)):
                if fn is not None:
                    row[key].update(host_and_graph_ms(fn, x, dout))
        if not args.skip_ref:
            row["err_vs_ref"] = max_rel_err(out, ref_fn(**x))
            # the reference's autograd graph of 16k steps is slow and large: forward only there
            long = seqlen > 4096
            row["mmfm_reference"] = measure(ref_fn, x, dout, quick=True, fwd_only=long)
            if mamba_fn is None and mamba_ref is not None:
                row["mamba_ref"] = measure(mamba_ref_fn, x, dout, quick=True, fwd_only=long)
        if args.sweep:
            row["sweep"] = []
            sweep = [("seq", bd, 64, nw) for bd, nw in ((8, 1), (16, 2), (32, 4))] + [("scan", 8, 32, 4)]
            for algo, bd, bl, nw in sweep if args.sweep in ("all", "triton") else ():
                cfg = dict(algo=algo, block_d=bd, block_l=bl, num_warps=nw)
                try:
                    r = measure(mmfm_fn(cfg), x, dout)
                    r["err_vs_default"] = max_rel_err(mmfm_fn(cfg)(**x), out)
                except Exception as exc:  # e.g. out of registers/shared memory for a config
                    r = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                row["sweep"].append({"cfg": cfg, **r})
            from mmfm.kernels.selective_scan import VARIANT_CHUNKS

            if args.variants is not None:
                cuda_cfgs = [dict(variant=k) for k in args.variants]
            else:
                cuda_cfgs = [dict(chunk=c) for c in (256, 512, 1024, 2048)]
                cuda_cfgs += [dict(variant=k) for k, cs in VARIANT_CHUNKS.items()
                              if max(cs) < 2 * seqlen or seqlen > 1024]
                # the defaults and the best variants again with the backward on a (D, batch) grid
                cuda_cfgs += [dict(variant=100 + k) for k in (0, 7) if dict(variant=k) in cuda_cfgs or k == 0]
            for cfg in cuda_cfgs if has_cuda and args.sweep in ("all", "cuda") else ():
                r = measure(mmfm_fn(cfg, "cuda"), x, dout)
                r["err_vs_default"] = max_rel_err(mmfm_fn(cfg, "cuda")(**x), out)
                row["sweep"].append({"cfg": {"cuda": cfg}, **r})
        rows.append(row)
        print(json.dumps(row))
        del x, dout
        torch.cuda.empty_cache()

    result = {
        "device": dev,
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(sys.argv),
        "anchor_note": note,
        "rows": rows,
    }
    (args.out / "bench_selective_scan.json").write_text(json.dumps(result, indent=1))

    # summary table (printed last so it lands in the tail of the log)
    anchor_key = "mamba_cuda" if mamba_fn is not None else None
    lines = [
        "| shape | impl | fwd ms | fwd+bwd ms | peak MiB | fwd x anchor | fwd+bwd x anchor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        anc = row.get(anchor_key) if anchor_key else None
        impls = [(key, row[key]) for key in ("mamba_cuda", "mmfm_cuda", "mmfm_triton", "mmfm_reference", "mamba_ref")
                 if key in row]
        impls += [(f"cuda variant {r['cfg']['cuda']['variant']}", r) for r in row.get("sweep", [])
                  if "variant" in r["cfg"].get("cuda", {})]  # the Triton configs stay in the JSON
        for label, r in impls:
            rf = f"{anc['fwd_ms'] / r['fwd_ms']:.3f}" if anc else "-"
            has_bwd = "fwdbwd_ms" in r
            rb = f"{anc['fwdbwd_ms'] / r['fwdbwd_ms']:.3f}" if anc and has_bwd else "-"
            fb = f"{r['fwdbwd_ms']:.3f}" if has_bwd else "-"
            pk = f"{r['peak_mib']:.0f}" if has_bwd else "-"
            lines.append(f"| {row['shape']} | {label} | {r['fwd_ms']:.3f} | {fb} | {pk} | {rf} | {rb} |")
    table = "\n".join(lines)
    (args.out / "bench_selective_scan.md").write_text(
        f"device: {dev}, torch {torch.__version__}, {result['date_utc']} UTC\n{note}\n\n{table}\n"
    )
    print(table)
    print("(x anchor = anchor time / impl time: above 1 is faster than mamba-ssm CUDA)")
    for row in rows:
        for key in ("mamba_cuda", "mmfm_cuda"):
            if "host_fwdbwd_ms" in row.get(key, {}):
                r = row[key]
                print(f"{row['shape']} {key}: host enqueue {r['host_fwdbwd_ms']:.3f} ms, CUDA-graph replay "
                      f"{r['graph_fwdbwd_ms']:.3f} ms, eager {r['fwdbwd_ms']:.3f} ms (fwd+bwd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
