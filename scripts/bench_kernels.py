"""Benchmark mmfm's Mamba-2 kernels (SSD chunk scan, causal conv1d) against the anchors, in one run.

Anchors: mamba-ssm's Triton ``mamba_chunk_scan_combined`` (imported from its source tree without the
CUDA build: ``--mamba-ssm-src`` points at an unpacked sdist, ``selective_scan_cuda`` is stubbed) and
transformers' pure-PyTorch path (``mamba2_chunk_scan`` / ``causal_conv1d_fn`` of modeling_nemotron_h,
unwrapped from its hub decorator). Default shapes: the Nemotron-H-8B Mamba layer (H=128, P=64, G=8,
N=128, chunk 128; conv dim 10240, width 4) at B in {1, 4} and L in {4k, 16k, 64k}, bf16.

Reports per point: forward ms, forward+backward ms (``triton.testing.do_bench``, median), peak memory
of a forward+backward (GiB, ``torch.cuda.max_memory_allocated`` above the inputs), ratio vs each
anchor (anchor time / mmfm time: > 1 means mmfm is faster) and the fraction of the HBM bandwidth floor
(minimum bytes moved / peak bandwidth, divided by the measured time). Out-of-memory points are
reported as "OOM". Run: ``python scripts/bench_kernels.py --op ssd`` or ``mmfm bench kernels``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
from dataclasses import asdict, dataclass, field

import torch

# H100 SXM HBM3 peak (NVIDIA spec); the measured device-to-device copy on the lent machine is ~3.0 TB/s.
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12}


@dataclass
class SSDShape:
    batch: int
    seqlen: int
    nheads: int = 128
    headdim: int = 64
    ngroups: int = 8
    dstate: int = 128
    chunk: int = 128


@dataclass
class Row:
    op: str
    impl: str
    shape: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_gib: float | None = None
    bw_frac_fwd: float | None = None
    bw_frac_fwd_bwd: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _peak_bw() -> float:
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return 3.35e12


def load_mamba_ssm(src: str | None):
    """Import mamba-ssm's Triton SSD from a source tree without its CUDA extension; None if absent."""
    if src is None:
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            return mamba_chunk_scan_combined
        except Exception:
            return None
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    pkg = types.ModuleType("mamba_ssm")  # skip its __init__ (imports the CUDA build and model code)
    pkg.__path__ = [f"{src}/mamba_ssm"]
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def load_transformers_paths():
    """transformers' pure-PyTorch SSD and conv (the torch functions under the hub decorators)."""
    try:
        from transformers.models.nemotron_h import modeling_nemotron_h as m
    except Exception:
        return None, None
    scan = getattr(m, "mamba2_chunk_scan", None)
    conv = getattr(m, "causal_conv1d_fn", None)
    return (getattr(scan, "__wrapped__", scan), getattr(conv, "__wrapped__", conv))


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _measure(make_fwd, leaves, bytes_fwd: float, bytes_bwd: float, bw: float, row: Row) -> Row:
    """make_fwd() -> output tensor; times fwd and fwd+bwd, peak memory of fwd+bwd."""
    try:
        with torch.no_grad():
            row.fwd_ms = _bench(make_fwd)
        out = make_fwd()
        grad = torch.randn_like(out)
        del out

        def fwd_bwd():
            o = make_fwd()
            torch.autograd.grad(o, leaves, grad, allow_unused=True)

        row.fwd_bwd_ms = _bench(fwd_bwd)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        row.peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        row.bw_frac_fwd = bytes_fwd / bw / (row.fwd_ms * 1e-3)
        row.bw_frac_fwd_bwd = (bytes_fwd + bytes_bwd) / bw / (row.fwd_bwd_ms * 1e-3)
    except torch.cuda.OutOfMemoryError as err:
        row.note = "OOM: " + str(err).split("\n")[0][:120]
    finally:
        torch.cuda.empty_cache()
    return row


def bench_ssd(shapes: list[SSDShape], dtype=torch.bfloat16, mamba_src: str | None = None,
              with_transformers: bool = True, check: bool = True, hf_max_seqlen: int = 16384,
              rows: list[Row] | None = None) -> list[Row]:  # fmt: skip
    """Time mmfm's ``ssd_chunk_scan`` vs mamba-ssm's Triton and transformers' PyTorch path."""
    mamba = load_mamba_ssm(mamba_src)
    hf_scan, _ = load_transformers_paths() if with_transformers else (None, None)
    bw = _peak_bw()
    rows = [] if rows is None else rows  # appended in place: a crash keeps the finished points
    for s in shapes:
        # transformers' path takes seconds per call beyond 16k: cap it to keep the run short.
        hf = hf_scan if s.seqlen <= hf_max_seqlen else None
        rows += _bench_ssd_point(s, dtype, mamba, hf, bw, check)
        torch.cuda.empty_cache()
    return rows


def _ssd_inputs(s: SSDShape, dtype) -> list[torch.Tensor]:
    """Random leaves x, dt, A, B, C, D, dt_bias of one SSD point on the GPU (fixed seed)."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    b, L, h, p, g, n = s.batch, s.seqlen, s.nheads, s.headdim, s.ngroups, s.dstate
    x = torch.randn(b, L, h, p, device=dev, dtype=dtype, generator=gen)
    dt = (torch.randn(b, L, h, device=dev, generator=gen) * 0.5).to(dtype)
    A = -torch.rand(h, device=dev, generator=gen) - 0.5
    B = (torch.randn(b, L, g, n, device=dev, generator=gen) * 0.3).to(dtype)
    C = (torch.randn(b, L, g, n, device=dev, generator=gen) * 0.3).to(dtype)
    D = torch.randn(h, device=dev, generator=gen)
    dt_bias = torch.randn(h, device=dev, generator=gen) * 0.5
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


def _bench_ssd_point(s: SSDShape, dtype, mamba, hf_scan, bw: float, check: bool) -> list[Row]:
    from mmfm.kernels.ssd import ssd_chunk_scan

    b, L, h, p, g, n = s.batch, s.seqlen, s.nheads, s.headdim, s.ngroups, s.dstate
    shape = _shape_str(s)
    try:
        leaves = _ssd_inputs(s, dtype)
    except torch.cuda.OutOfMemoryError:
        return [Row("ssd", "inputs", shape, note="OOM allocating inputs")]
    x, dt, A, B, C, D, dt_bias = leaves
    es = x.element_size()
    # Minimum HBM traffic: read x, dt, B, C; write y. Backward: read those + dy, write their grads.
    bytes_fwd = (2 * b * L * h * p + b * L * h + 2 * b * L * g * n) * es
    bytes_bwd = 2 * bytes_fwd
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True)
    impls = [("mmfm-triton", lambda: ssd_chunk_scan(x, dt, A, B, C, s.chunk, backend="triton", **kw))]
    if mamba is not None:
        impls.append(("mamba-ssm-triton", lambda: mamba(x, dt, A, B, C, s.chunk, **kw)))
    if hf_scan is not None:
        impls.append(("transformers-torch", lambda: hf_scan(x, dt, A, B, C, s.chunk, **kw)))
    if check and mamba is not None:
        with torch.no_grad():
            try:
                ours, ref = impls[0][1](), impls[1][1]()
                diff = (ours.float() - ref.float()).abs().max().item()
                scale = ref.float().abs().max().item()
                print(f"# {shape}: max |mmfm - mamba-ssm| = {diff:.3e} (max |y| = {scale:.3e})", flush=True)
                del ours, ref
            except torch.cuda.OutOfMemoryError:
                pass
            torch.cuda.empty_cache()
    rows = []
    for name, fn in impls:
        row = _measure(fn, leaves, bytes_fwd, bytes_bwd, bw, Row("ssd", name, shape))
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


# Variants tried by --sweep: patches of mmfm.kernels.ssd's FWD_BLOCKS / BWD_BLOCKS
# (the rows equal to an earlier default keep that default in the comparison).
SWEEP_VARIANTS: list[dict[str, dict]] = [
    {},
    {"fwd": {"scan": {"BM": 128, "BP": 64, "BK": 32, "BKN": 64, "num_warps": 4, "num_stages": 3}}},
    {"fwd": {"scan": {"BM": 64, "BP": 64, "BK": 64, "BKN": 64, "num_warps": 4, "num_stages": 2}}},
    {"fwd": {"scan": {"BM": 128, "BP": 64, "BK": 32, "BKN": 128, "num_warps": 4, "num_stages": 4}}},
    {"fwd": {"scan": {"BM": 64, "BP": 64, "BK": 32, "BKN": 128, "num_warps": 4, "num_stages": 3}}},
    {"fwd": {"state": {"BP": 64, "BN": 64, "num_warps": 4, "num_stages": 2}}},
    {"fwd": {"state": {"BP": 64, "BN": 32, "num_warps": 4, "num_stages": 3}}},
    {"fwd": {"state": {"BP": 32, "BN": 128, "num_warps": 4, "num_stages": 3}}},
    {"fwd": {"state": {"BP": 64, "BN": 128, "num_warps": 8, "num_stages": 2}}},
    {"fwd": {"state": {"BP": 64, "BN": 64, "num_warps": 8, "num_stages": 4}}},
    {"fwd": {"scan": {"BM": 64, "BP": 64, "BK": 32, "BKN": 32, "num_warps": 2, "num_stages": 4}}},
    {"fwd": {"scan": {"BM": 64, "BP": 64, "BK": 32, "BKN": 32, "num_warps": 4, "num_stages": 4}}},
    {"fwd": {"scan": {"BM": 128, "BP": 64, "BK": 32, "BKN": 32, "num_warps": 8, "num_stages": 3}}},
    {"bwd": {"dstate": {"BP": 64, "BN": 32, "num_warps": 4, "num_stages": 3}}},
    {"bwd": {"dstate": {"BP": 32, "BN": 128, "num_warps": 4, "num_stages": 3}}},
    {"bwd": {"dstate": {"BP": 64, "BN": 64, "num_warps": 4, "num_stages": 2}}},
    {"bwd": {"dstate": {"BP": 64, "BN": 128, "num_warps": 8, "num_stages": 2}}},
    {"bwd": {"dx": {"BS": 64, "BP": 64, "BL": 32, "BN": 32, "num_warps": 4, "num_stages": 3}}},
    {"bwd": {"dx": {"BS": 64, "BP": 64, "BL": 32, "BN": 128, "num_warps": 4, "num_stages": 4}}},
    {"bwd": {"dx": {"BS": 64, "BP": 64, "BL": 64, "BN": 64, "num_warps": 4, "num_stages": 2}}},
    {"bwd": {"dx": {"BS": 128, "BP": 64, "BL": 64, "BN": 64, "num_warps": 8, "num_stages": 2}}},
    {"bwd": {"dx": {"BS": 64, "BP": 32, "BL": 64, "BN": 64, "num_warps": 4, "num_stages": 2}}},
    {"bwd": {"dcb": {"BM": 64, "BS": 64, "BP": 32, "num_warps": 4, "num_stages": 3}}},
    {"bwd": {"dcb": {"BM": 128, "BS": 64, "BP": 64, "num_warps": 8, "num_stages": 2}}},
    {"bwd": {"dbc": {"BM": 64, "BN": 64, "BP": 32, "BK": 32, "num_warps": 4, "num_stages": 3}}},
    {"bwd": {"dbc": {"BM": 128, "BN": 64, "BP": 64, "BK": 64, "num_warps": 8, "num_stages": 2}}},
    {"bwd": {"dbc": {"BM": 64, "BN": 64, "BP": 64, "BK": 64, "num_warps": 4, "num_stages": 2}}},
]


def sweep_blocks(s: SSDShape, dtype=torch.bfloat16) -> list[dict]:
    """Forward and forward+backward time of mmfm's SSD under each variant of :data:`SWEEP_VARIANTS`."""
    import mmfm.kernels.ssd as ssd

    leaves = _ssd_inputs(s, dtype)
    x, dt, A, B, C, D, dt_bias = leaves
    tables = {"fwd": "FWD_BLOCKS", "bwd": "BWD_BLOCKS"}
    saved = {name: getattr(ssd, name) for name in tables.values()}

    def fwd():
        return ssd.ssd_chunk_scan(x, dt, A, B, C, s.chunk, D=D, dt_bias=dt_bias, dt_softplus=True, backend="triton")

    def fwd_bwd():
        y = fwd()
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    out, ref = [], None
    try:
        for variant in SWEEP_VARIANTS:
            for key, name in tables.items():
                setattr(ssd, name, {**saved[name], **variant.get(key, {})})
            grads = fwd_bwd()
            ref = grads if ref is None else ref
            diff = max((a.float() - r.float()).abs().max().item() for a, r in zip(grads, ref))
            with torch.no_grad():
                f_ms = _bench(fwd)
            fb_ms = _bench(fwd_bwd)
            out.append({"variant": variant, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "max_grad_diff": diff})
            print(f"# sweep {_shape_str(s)} fwd {f_ms:.3f} ms fwd+bwd {fb_ms:.3f} ms grad diff {diff:.2e} "
                  f"{variant or 'default'}", flush=True)
    finally:
        for name, value in saved.items():
            setattr(ssd, name, value)
    return out


def kernel_resources(module) -> list[str]:
    """Registers per thread, spilled registers and shared memory of every compiled Triton kernel of
    ``module`` (read from the JIT caches; Triton >= 3.0 layout, lines are skipped where it differs)."""
    import triton

    lines = []
    for name in sorted(vars(module)):
        fn = getattr(module, name)
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            continue
        for caches in getattr(fn, "device_caches", {}).values():
            if not (isinstance(caches, tuple) and caches and isinstance(caches[0], dict)):
                continue
            for k in caches[0].values():
                if hasattr(k, "_init_handles"):  # n_regs / n_spills are filled when the binary loads
                    k._init_handles()
                meta = getattr(k, "metadata", None)
                lines.append(f"{name}: regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                             f"shared {getattr(meta, 'shared', '?')} B warps {getattr(meta, 'num_warps', '?')}")
    return lines


def profile_ssd(s: SSDShape, dtype=torch.bfloat16, backward: bool = True, fn=None) -> str:
    """CUDA time per kernel of an SSD forward (and backward) at one shape (torch.profiler table): mmfm's,
    or ``fn`` with ``ssd_chunk_scan``'s positional signature (e.g. mamba-ssm's)."""
    from torch.profiler import ProfilerActivity, profile

    from mmfm.kernels.ssd import ssd_chunk_scan

    leaves = _ssd_inputs(s, dtype)
    x, dt, A, B, C, D, dt_bias = leaves

    fn = fn or functools.partial(ssd_chunk_scan, backend="triton")

    def step():
        y = fn(x, dt, A, B, C, s.chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
        if backward:
            torch.autograd.grad(y, leaves, torch.ones_like(y))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def bench_conv(points: list[tuple[int, int]], dim: int = 10240, width: int = 4, dtype=torch.bfloat16,
               with_transformers: bool = True, rows: list[Row] | None = None) -> list[Row]:  # fmt: skip
    """Time mmfm's ``causal_conv1d`` (SiLU) vs transformers' PyTorch ``causal_conv1d_fn`` (F.conv1d)."""
    from mmfm.kernels.causal_conv1d import causal_conv1d

    _, hf_conv = load_transformers_paths() if with_transformers else (None, None)
    if hf_conv is None:

        def hf_conv(x, w, bias, activation=None):
            out = torch.nn.functional.conv1d(x, w[:, None], bias, padding=w.shape[1] - 1, groups=x.shape[1])
            return torch.nn.functional.silu(out[..., : x.shape[-1]])

    bw = _peak_bw()
    rows = [] if rows is None else rows
    for b, L in points:
        rows += _bench_conv_point(b, L, dim, width, dtype, causal_conv1d, hf_conv, bw)
        torch.cuda.empty_cache()
    return rows


def _bench_conv_point(b, L, dim, width, dtype, causal_conv1d, hf_conv, bw) -> list[Row]:
    # (B, D, L) as a transposed view of (B, L, D), the layout the mixers hand over.
    x = torch.randn(b, L, dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    w = torch.randn(dim, width, device="cuda", dtype=dtype).requires_grad_()
    bias = torch.randn(dim, device="cuda", dtype=dtype).requires_grad_()
    bytes_fwd = 2 * b * L * dim * x.element_size()
    shape = f"B{b} L{L} D{dim} W{width}"
    rows = []
    for name, fn in (("mmfm-triton", lambda: causal_conv1d(x, w, bias, "silu", backend="triton")),
                     ("transformers-torch", lambda: hf_conv(x, w, bias, activation="silu"))):  # fmt: skip
        row = _measure(fn, [x, w, bias], bytes_fwd, 1.5 * bytes_fwd, bw, Row("conv1d", name, shape))
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _shape_str(s: SSDShape) -> str:
    return f"B{s.batch} L{s.seqlen} H{s.nheads} P{s.headdim} G{s.ngroups} N{s.dstate} Q{s.chunk}"


def _fmt(r: Row) -> str:
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    return (f"{r.op:7s} {r.impl:20s} {r.shape:42s} fwd {f(r.fwd_ms)} ms  fwd+bwd {f(r.fwd_bwd_ms)} ms  "
            f"peak {f(r.peak_gib, '.2f')} GiB  bw% {f(r.bw_frac_fwd and 100 * r.bw_frac_fwd, '.1f')}/"
            f"{f(r.bw_frac_fwd_bwd and 100 * r.bw_frac_fwd_bwd, '.1f')} {r.note}")  # fmt: skip


def markdown_table(rows: list[Row]) -> str:
    """Rows grouped by shape: each impl's times and the anchors' time / mmfm's time."""
    out = ["| op | shape | impl | fwd ms | fwd+bwd ms | peak GiB | mmfm speedup fwd (anchor ms / mmfm ms) | mmfm speedup fwd+bwd | % BW floor fwd / fwd+bwd |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ours = {(r.op, r.shape): r for r in rows if r.impl == "mmfm-triton"}
    for r in rows:
        m = ours.get((r.op, r.shape))

        def ratio(a, b):
            return f"{a / b:.2f}x" if (a and b) else "-"

        def num(v, spec=".3f", note=r.note):
            return format(v, spec) if v is not None else (note.split(":")[0] or "-")

        fr = "1.00x" if r is m else ratio(r.fwd_ms, m.fwd_ms if m else None)
        fbr = "1.00x" if r is m else ratio(r.fwd_bwd_ms, m.fwd_bwd_ms if m else None)
        bwf = (f"{100 * r.bw_frac_fwd:.1f} / {100 * r.bw_frac_fwd_bwd:.1f}"
               if r.bw_frac_fwd is not None and r.bw_frac_fwd_bwd is not None else "-")  # fmt: skip
        out.append(f"| {r.op} | {r.shape} | {r.impl} | {num(r.fwd_ms)} | {num(r.fwd_bwd_ms)} | "
                   f"{num(r.peak_gib, '.2f')} | {fr} | {fbr} | {bwf} |")  # fmt: skip
    return "\n".join(out)


def run(op: str = "all", batches=(1, 4), seqlens=(4096, 16384, 65536), mamba_src: str | None = None,
        with_transformers: bool = True, json_out: str | None = None, md_out: str | None = None,
        hf_max_seqlen: int = 16384) -> list[Row]:  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    print(f"# device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows: list[Row] = []
    points = [(b, L) for b in batches for L in seqlens]
    try:
        if op in ("ssd", "all"):
            bench_ssd([SSDShape(b, L) for b, L in points], mamba_src=mamba_src, with_transformers=with_transformers,
                      hf_max_seqlen=hf_max_seqlen, rows=rows)  # fmt: skip
        if op in ("conv1d", "all"):
            bench_conv(points, with_transformers=with_transformers, rows=rows)
    finally:
        _write(rows, json_out, md_out)
    return rows


def _write(rows: list[Row], json_out: str | None, md_out: str | None) -> None:
    table = markdown_table(rows)
    print(table)
    if json_out:
        with open(json_out, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if md_out:
        with open(md_out, "w") as f:
            f.write(table + "\n")


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=["ssd", "conv1d", "all"], default="all", help="which op to benchmark")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--seqlen", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths")
    p.add_argument("--mamba-ssm-src", default=None, help="unpacked mamba-ssm sdist (anchor), else installed")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' PyTorch anchor")
    p.add_argument("--json", default=None, help="write rows as JSON here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--hf-max-seqlen", type=int, default=16384, help="longest L for transformers' SSD anchor")
    p.add_argument("--profile", action="store_true",
                   help="only print the per-kernel CUDA time of mmfm's SSD fwd+bwd (first --batch / --seqlen)")
    p.add_argument("--sweep", action="store_true",
                   help="only time the SSD fwd and fwd+bwd under each tile variant (first --batch / --seqlen)")
    return p


def main(argv=None) -> int:
    a = build_arg_parser().parse_args(argv)
    if a.profile:
        import mmfm.kernels.ssd as ssd

        print(profile_ssd(SSDShape(a.batch[0], a.seqlen[0])))
        print("\n".join(kernel_resources(ssd)))
        if a.mamba_ssm_src:
            print("# mamba-ssm")
            print(profile_ssd(SSDShape(a.batch[0], a.seqlen[0]), fn=load_mamba_ssm(a.mamba_ssm_src)))
        return 0
    if a.sweep:
        res = sweep_blocks(SSDShape(a.batch[0], a.seqlen[0]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    run(a.op, tuple(a.batch), tuple(a.seqlen), a.mamba_ssm_src, not a.no_transformers, a.json, a.md,
        a.hf_max_seqlen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
