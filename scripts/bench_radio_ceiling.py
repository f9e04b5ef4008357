#!/usr/bin/env python
"""Kernel-throughput ceiling on the MFU of one RADIO distillation training step.

Question: how fast could the step of ``scripts/bench_radio_train.py`` be if only its GEMMs, convolutions and
attention kernels ran, each at the speed it gets alone on this GPU? If that ceiling is below a target MFU, no
amount of fusing, overlapping or launch tuning reaches the target at these shapes: only different kernels
(or shapes) would.

How: one point is built exactly as ``bench_radio_train.bench_point`` builds it (eager models, never compiled:
a dispatch mode after ``torch.compile`` breaks compiled blocks on torch 2.11, pytorch/pytorch#190286). One
step runs under a ``TorchDispatchMode`` that records every op which ``torch.utils.flop_counter`` has a FLOP
formula for (mm, addmm, bmm, baddbmm, convolution and its backward, the fused SDPA kernels and their
backwards, ...), with its FLOPs from that same formula, so the count is torch's own. Groups:

  teacher  the frozen teachers' forward (``TargetMaker.teacher_output`` per teacher, i.e. ``teacher_outputs``)
  targets  PHI-S normalisation + resize of the teacher features (``TargetMaker.targets``): not model FLOPs
           (``mmfm.radio.flops`` leaves them out), but its GEMM is step time, so it is in the kernel sum
  student  ``Engine.forward`` (student, adaptor heads, losses) + ``Engine.backward`` (autograd's backward
           runs on autograd's threads; the dispatch mode travels with autograd's thread-local state, and the
           report splits the student's FLOPs into forward and backward, so a missed backward would show)

Ops are deduplicated by signature (op overload; each tensor argument's shape, stride and dtype; the other
arguments by value); only the first instance's arguments are kept (copied, strides kept), with a call count.
Each signature is then replayed alone: warm-up calls, then ``--iters`` timed calls (CUDA events on a GPU).

    ceiling MFU = model FLOPs of the step (``count_step_flops``, the numerator of the trainer's MFU)
                  / sum over signatures of (isolated ms per call x calls) / peak

The capture switches off PyTorch's fused ``nn.MultiheadAttention`` inference path (open_clip's teacher),
as ``count_step_flops`` does: the FLOP registry sees none of the GEMMs inside that fused op. Without the fast
path the same in-projection GEMM, attention kernel and out-projection GEMM run as separate ops. Teachers'
other mmfm fast paths (SAM's relative-position bias folded into q / k, ``mmfm.radio.teachers``) are kept,
since the step runs them; their extra FLOPs make the captured teacher FLOPs exceed the model FLOPs, and the
report says so. ``--model-flops-paths`` captures the model's own path instead (then the counts match).

What the ceiling leaves out: all elementwise work (bias, GELU, residual adds, casts, copies), LayerNorm,
softmax outside fused attention, resizes, the losses' reductions, the optimizer step and gradient clipping,
the CPU's launch gaps and any stream bubbles. Kernels timed alone also get a warm L2 cache and a whole GPU
to themselves. So it is an upper bound on MFU, not a prediction. On a CPU (``--tiny``) the attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula in torch, so neither the count nor
the ceiling has attention; the report lists such unregistered heavy ops.

    python scripts/bench_radio_ceiling.py --device cuda --json ceiling.json
    python scripts/bench_radio_ceiling.py --points low --iters 50
    python scripts/bench_radio_ceiling.py --tiny                 # CPU smoke run with tiny models, fp32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import bench_radio_train as bench  # scripts/ is on sys.path when a script runs
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from mmfm.radio.distill import RadioTrainConfig, StepPlan, TargetMaker, setup, teachers_for
from mmfm.radio.flops import StepFlops, count_step_flops, model_flops_paths, no_mha_fastpath
from mmfm.training import Engine

GROUPS = ("teacher", "targets", "student")
KINDS = ("gemm", "conv", "attn_fwd", "attn_bwd", "other")
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "linear_gelu"}  # linear_gelu: mmfm.kernels
# names of ops outside the FLOP registry that probably hide matmul work: listed in the report
_HEAVY = re.compile(r"attention|matmul|(?<!bi)linear|conv|einsum|mm_?$")


def op_kind(func: torch._ops.OpOverload) -> str:
    """gemm | conv | attn_fwd | attn_bwd | other, from the op's name."""
    name = func._overloadpacket.__name__
    if name in _GEMMS:
        return "gemm"
    if "conv" in name:
        return "conv"
    if "attention" in name:
        return "attn_bwd" if "backward" in name else "attn_fwd"
    return "other"


class Stashed:
    """A tensor argument kept for replay: the storage span it covers (1-D ``buf``) and its view on it.

    Copying the span, not the values, keeps strides and any overlap (an expanded, stride-0 argument), which
    ``empty_strided(...).copy_(t)`` cannot: copy_ refuses overlapping destinations. Same memory as
    ``empty_strided``, which allocates the span as well. (Plain classes, not dataclasses, here: the test
    loads this script without registering it in ``sys.modules``, which dataclasses need.)"""

    __slots__ = ("buf", "device", "shape", "stride")

    def __init__(self, buf: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...],
                 device: torch.device) -> None:
        self.buf, self.shape, self.stride, self.device = buf, shape, stride, device

    @classmethod
    def of(cls, t: torch.Tensor, where: torch.device | None) -> Stashed:
        """Keep a copy of ``t`` on ``where`` (None: its own device)."""
        t = t.detach()
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        flat = t.as_strided((span,), (1,), t.storage_offset())
        buf = flat.to(where or t.device, copy=True)
        return cls(buf, tuple(t.shape), tuple(t.stride()), t.device)

    def materialise(self) -> torch.Tensor:
        return self.buf.to(self.device).as_strided(self.shape, self.stride, 0)

    def describe(self) -> str:
        dt = str(self.buf.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "f")
        s = f"{dt}[{','.join(map(str, self.shape))}]"
        contiguous = torch.empty(self.shape, device="meta").stride() if self.shape else ()
        return s if self.stride == contiguous else s + "{" + ",".join(map(str, self.stride)) + "}"


class Signature:
    """One distinct op call of a group: its first instance's arguments, calls by (label, phase), FLOPs."""

    def __init__(self, group: str, func: torch._ops.OpOverload, spec: Any, leaves: list[Any], flops: int) -> None:
        self.group, self.func = group, func
        self.spec = spec  # pytree spec of (args, kwargs)
        self.leaves = leaves  # Stashed for tensors, the value otherwise
        self.flops = flops  # per call, torch.utils.flop_counter's formula
        self.calls: Counter = Counter()  # (label, phase) -> calls
        self.ms = math.nan  # isolated time per call
        self.error: str | None = None

    @property
    def kind(self) -> str:
        return op_kind(self.func)

    @property
    def n(self) -> int:
        return sum(self.calls.values())

    def arguments(self) -> tuple[tuple, dict]:
        leaves = [v.materialise() if isinstance(v, Stashed) else v for v in self.leaves]
        return tree_unflatten(leaves, self.spec)

    def describe(self, width: int = 120) -> str:
        """``op(arg, ...)``: tensors as ``dtype[shape]`` (``{strides}`` when not contiguous), the rest by value."""
        args, kwargs = tree_unflatten([_Repr(v.describe()) if isinstance(v, Stashed) else v for v in self.leaves],
                                      self.spec)
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        s = f"{self.func._overloadpacket.__name__}({', '.join(parts)})"
        return s if len(s) <= width else s[: width - 3] + "..."


class _Repr(str):
    def __repr__(self) -> str:
        return str(self)


class OpCapture(TorchDispatchMode):
    """Records the FLOP-registry ops that run under it, deduplicated by signature (module docstring).

    Mirrors ``torch.utils.flop_counter``'s dispatch mode: an op without a formula is first decomposed (if it
    is a CompositeImplicit op that reached this mode), so exactly the ops FlopCounterMode counts are kept."""

    def __init__(self, group: str, stash_on: torch.device | None = None) -> None:
        super().__init__()
        self.group = group
        self.stash_on = stash_on
        self.registry = FlopCounterMode(display=False).flop_registry
        self.signatures: dict[tuple, Signature] = {}
        self.unregistered: Counter = Counter()  # heavy-looking ops without a FLOP formula: name -> calls
        self.label, self.phase = group, "forward"

    @contextlib.contextmanager
    def scope(self, label: str, phase: str = "forward") -> Iterator[None]:
        """Attribute the ops run inside to ``label`` / ``phase`` (read from autograd's threads too)."""
        old = self.label, self.phase
        self.label, self.phase = label, phase
        try:
            yield
        finally:
            self.label, self.phase = old

    def flops(self, label: str | None = None, phase: str | None = None) -> int:
        return sum(s.flops * n for s in self.signatures.values() for (lb, ph), n in s.calls.items()
                   if label in (None, lb) and phase in (None, ph))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):  # none in these eager models (flex attention is)
            return NotImplemented
        packet = func._overloadpacket
        if packet not in self.registry:
            if func is not torch.ops.prim.device.default:
                with self:
                    r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
            if _HEAVY.search(packet.__name__):
                self.unregistered[str(packet)] += 1
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        flops = int(self.registry[packet](*args, **kwargs, out_val=out))
        leaves, spec = tree_flatten((args, kwargs))
        key = (func, str(spec), *(("T", tuple(v.shape), tuple(v.stride()), v.dtype, v.device.type)
                                  if isinstance(v, torch.Tensor) else _hashable(v) for v in leaves))
        sig = self.signatures.get(key)
        if sig is None:  # first instance: keep its arguments (only one instance per signature: memory)
            kept = [Stashed.of(v, self.stash_on) if isinstance(v, torch.Tensor) else v for v in leaves]
            sig = self.signatures[key] = Signature(self.group, func, spec, kept, flops)
        sig.calls[(self.label, self.phase)] += 1
        return out


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def replay(sig: Signature, iters: int, warmup: int) -> float:
    """Mean ms per call of ``sig``'s op alone on its kept arguments (CUDA events on a GPU)."""
    args, kwargs = sig.arguments()
    cuda = any(isinstance(v, Stashed) and v.device.type == "cuda" for v in sig.leaves)
    with torch.no_grad():
        for _ in range(warmup):
            sig.func(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                sig.func(*args, **kwargs)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            sig.func(*args, **kwargs)
        return (time.perf_counter() - t0) / iters * 1e3


def capture_step(cfg: RadioTrainConfig, partition: int, device: torch.device, stash_on: torch.device | None,
                 model_paths: bool = False, student_sdpa: list[str] | None = None
                 ) -> tuple[dict[str, OpCapture], StepFlops, list[str], dict[str, bool]]:
    """Build the point as ``bench_radio_train.bench_point`` does and capture one step's registry ops.

    -> (captures by group, count_step_flops's counts, the step's teachers, teacher -> has an mmfm-patched
    forward). Images are (batch, 3, res, res) uniform noise, as in the benchmark."""
    teachers, infos, model, normalizers = setup(cfg, device)
    model.encoder.student.set_sdpa_backends(student_sdpa)
    part = cfg.partitions[partition]
    maker = TargetMaker(cfg, teachers, infos, normalizers, device)
    plan = StepPlan(partition, (part.resolutions[0],) * 2, 1)
    counted = count_step_flops(maker, model.to(device).encoder, plan)  # as bench_point: before the Engine
    engine = Engine.from_config(model, cfg.engine, micro_batch_size=part.batch_size)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(part.batch_size, 3, *plan.resolution, device=device, generator=gen)
    names = teachers_for(cfg, plan)
    bench.prime_normalizers(maker, plan, x)
    engine.train()
    caps = {g: OpCapture(g, stash_on) for g in GROUPS}
    paths = model_flops_paths(teachers.values()) if model_paths else no_mha_fastpath()
    with paths, caps["teacher"]:
        raw = {}
        for name in names:  # = maker.teacher_outputs(plan, x), one teacher at a time to attribute FLOPs
            with caps["teacher"].scope(name):
                raw[name] = maker.teacher_output(name, x)
    with caps["targets"], caps["targets"].scope("targets"):
        targets = maker.targets(plan, raw)
    cap = caps["student"]
    with cap:
        with cap.scope("student", "forward"):
            loss = engine.forward(x, targets)["loss"]
        with cap.scope("student", "backward"):
            engine.backward(loss)
    patched = {n: any("forward" in m.__dict__ for m in teachers[n].modules()) for n in names}
    del raw, targets, loss, engine, model, teachers, maker
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the step's activations are gone; the replay gets the memory
    return caps, counted, names, patched


def ceiling_point(cfg: RadioTrainConfig, partition: int, device: torch.device, peak_tflops: float,
                  iters: int = 20, warmup: int = 3, stash_on: torch.device | None = None,
                  model_paths: bool = False, student_sdpa: list[str] | None = None, top: int = 12,
                  target_mfu: float = 0.45) -> dict:
    """Capture one step of the point, replay its signatures and summarise (module docstring). -> report row."""
    caps, counted, names, patched = capture_step(cfg, partition, device, stash_on, model_paths, student_sdpa)
    sigs = [s for g in GROUPS for s in caps[g].signatures.values()]
    for s in sigs:
        try:
            s.ms = replay(s, iters, warmup)
        except Exception as e:  # e.g. out of memory: reported, its time is then missing from the sum
            s.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    peak = peak_tflops * 1e12

    def agg(rows: list[Signature], phase: str | None = None) -> dict:
        rows = [s for s in rows if any(phase in (None, ph) for _, ph in s.calls)]
        calls = sum(n for s in rows for (_, ph), n in s.calls.items() if phase in (None, ph))
        flops = sum(s.flops * n for s in rows for (_, ph), n in s.calls.items() if phase in (None, ph))
        ms = sum(s.ms * n for s in rows if s.error is None for (_, ph), n in s.calls.items() if phase in (None, ph))
        rate = flops / (ms / 1e3) if ms > 0 else math.nan
        return {"signatures": len(rows), "calls": calls, "tflop": flops / 1e12, "kernel_ms": ms,
                "tflops": rate / 1e12, "pct_peak": 100 * rate / peak}

    table = []
    for g in GROUPS:
        rows = [s for s in sigs if s.group == g]
        if not rows:
            continue
        table += [{"group": g, "kind": k, **agg([s for s in rows if s.kind == k])}
                  for k in KINDS if any(s.kind == k for s in rows)]
        if g == "student":
            table += [{"group": g, "kind": f"{ph} total", **agg(rows, ph)} for ph in ("forward", "backward")]
        table.append({"group": g, "kind": "total", **agg(rows)})
    table.append({"group": "step", "kind": "total", **agg(sigs)})
    group_ms = {r["group"]: r["kernel_ms"] for r in table if r["kind"] == "total"}
    total_ms = group_ms["step"]

    captured = {n: caps["teacher"].flops(n) for n in names} | {"student": caps["student"].flops()}
    expected = dict(counted.teachers) | {"student": counted.student}
    notes = []
    for n, c in captured.items():
        if c != expected[n]:
            why = (f"{n} runs an mmfm-patched attention forward (mmfm.radio.teachers, e.g. SAM's relative-position "
                   "bias folded into q / k: wider q.k and two einsums), whose FLOPs are not the model's; "
                   "count_step_flops counts the model's own path (--model-flops-paths captures that)"
                   if patched.get(n) and not model_paths else "unexplained: check the ops of this part")
            notes.append(f"{n}: captured {c / 1e12:.6g} TFLOP vs counted {expected[n] / 1e12:.6g} "
                         f"(x{c / expected[n] if expected[n] else math.inf:.4f}): {why}")
    cap_total = sum(captured.values())
    step_s = total_ms / 1e3
    failed = [s for s in sigs if s.error is not None]
    if failed:
        notes.append(f"{len(failed)} signature(s) failed to replay ({sum(s.flops * s.n for s in failed) / 1e12:.4g} "
                     "TFLOP): their time is missing, so the ceiling is too high")
    if caps["student"].flops(phase="backward") == 0:
        notes.append("no backward op was captured in the student group: the dispatch mode missed autograd's threads")
    unregistered = sum((caps[g].unregistered for g in GROUPS), Counter())
    part = cfg.partitions[partition]
    ranked = sorted(sigs, key=lambda s: -(s.ms * s.n if s.error is None else math.inf))
    return {
        "resolution": part.resolutions[0], "batch": part.batch_size, "teachers": names,
        "flops": {"captured": captured, "counted": expected, "captured_total": cap_total,
                  "counted_total": counted.total, "ratio": cap_total / counted.total,
                  "targets_captured": caps["targets"].flops()},
        "table": table,
        "kernel_ms": total_ms,
        "ceiling_mfu": counted.total / step_s / peak if step_s > 0 else math.nan,
        "teacher_ceiling_mfu": counted.teacher / (group_ms["teacher"] / 1e3) / peak,
        "student_ceiling_mfu": counted.student / (group_ms["student"] / 1e3) / peak,
        "kernel_flop_rate_pct_peak": 100 * (cap_total + caps["targets"].flops()) / step_s / peak,
        "target_mfu": target_mfu, "step_ms_at_target": counted.total / (target_mfu * peak) * 1e3,
        "unregistered_heavy_ops": dict(unregistered),
        "notes": notes,
        "top": [_sig_row(s, peak) for s in ranked[:top]],
        "signatures": [_sig_row(s, peak) for s in ranked],
    }


def _sig_row(s: Signature, peak: float) -> dict:
    rate = s.flops / (s.ms / 1e3) if s.error is None and s.ms > 0 else math.nan
    return {"group": s.group, "kind": s.kind, "op": str(s.func), "args": s.describe(10_000),
            "calls": {f"{lb}/{ph}": n for (lb, ph), n in s.calls.items()}, "count": s.n,
            "gflop_per_call": s.flops / 1e9, "ms_per_call": s.ms, "ms_total": s.ms * s.n,
            "tflops": rate / 1e12, "pct_peak": 100 * rate / peak, "error": s.error, "describe": s.describe()}


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def print_row(row: dict, peak_tflops: float) -> None:
    f = row["flops"]
    print(f"res {row['resolution']} batch {row['batch']} teachers {','.join(row['teachers'])}", flush=True)
    print("  FLOPs captured / count_step_flops (TFLOP): " + "  ".join(
        f"{n} {c / 1e12:.6g} / {f['counted'][n] / 1e12:.6g}" for n, c in f["captured"].items())
        + f"  | step {f['captured_total'] / 1e12:.6g} / {f['counted_total'] / 1e12:.6g}"
        f"  ratio {f['ratio']:.9f}  (+ targets, not model FLOPs: {f['targets_captured'] / 1e12:.4g})")
    print(f"  {'group':8s} {'kind':15s} {'sigs':>5s} {'calls':>6s} {'TFLOP':>10s} {'kernel ms':>10s} "
          f"{'TFLOP/s':>9s} {'% peak':>7s}")
    for r in row["table"]:
        print(f"  {r['group']:8s} {r['kind']:15s} {r['signatures']:5d} {r['calls']:6d} {r['tflop']:10.4g} "
              f"{r['kernel_ms']:10.4g} {r['tflops']:9.4g} {r['pct_peak']:7.2f}")
    ms = row["kernel_ms"]
    print(f"  ceiling MFU = {f['counted_total'] / 1e12:.4g} TFLOP (count_step_flops) / {ms:.4g} ms of isolated "
          f"kernels / {peak_tflops:g} TFLOP/s = {_pct(row['ceiling_mfu'])}   (teachers "
          f"{_pct(row['teacher_ceiling_mfu'])}, student {_pct(row['student_ceiling_mfu'])}; kernel FLOP rate on "
          f"the captured FLOPs {_pct(row['kernel_flop_rate_pct_peak'] / 100)} of peak)")
    at = row["step_ms_at_target"]
    print(f"  {_pct(row['target_mfu'])} MFU = a {at:.4g} ms step; the isolated kernels alone take {ms:.4g} ms "
          f"({_pct(ms / at)} of it), leaving {at - ms:.4g} ms for everything else", flush=True)
    for n in row["notes"]:
        print(f"  note: {n}")
    if row["unregistered_heavy_ops"]:
        print("  ops without a FLOP formula (neither counted nor in the ceiling): " + ", ".join(
            f"{k} x{v}" for k, v in row["unregistered_heavy_ops"].items()))
    print(f"  top {len(row['top'])} signatures by total isolated time:")
    print(f"    {'ms total':>9s} {'calls':>5s} {'ms/call':>9s} {'TFLOP/s':>8s} {'%peak':>6s}  group/kind    op and args")
    for s in row["top"]:
        print(f"    {s['ms_total']:9.4g} {s['count']:5d} {s['ms_per_call']:9.4g} {s['tflops']:8.4g} "
              f"{s['pct_peak']:6.1f}  {s['group'][:7] + '/' + s['kind']:13s} {s['describe']}"
              + (f"  [{s['error']}]" if s["error"] else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_point_args(p)
    p.add_argument("--points", nargs="+", choices=("low", "high"), default=["low", "high"])
    p.add_argument("--iters", type=int, default=20, help="timed calls per signature")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per signature first")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--target-mfu", type=float, default=0.45, help="the MFU to compare the kernel time against")
    p.add_argument("--stash", choices=("cpu", "device"), default="cpu",
                   help="where the captured arguments wait for the replay (cpu: the step's peak memory is unchanged)")
    p.add_argument("--model-flops-paths", action="store_true",
                   help="capture the teachers' model paths (as count_step_flops), not the patched ones the step runs")
    p.add_argument("--student-sdpa", nargs="+", default=None, metavar="BACKEND",
                   help="the student's SDPA kernel preference, best first (as bench_radio_train)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny models")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.low, args.high, args.batch_low, args.batch_high, args.iters, args.warmup = 64, 128, 4, 2, 3, 1
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = bench.make_config(args.tiny, args.low, args.high, args.batch_low, args.batch_high, precision)
    stash_on = torch.device("cpu") if args.stash == "cpu" else None
    rows = []
    for partition, pname in enumerate(("low", "high")):
        if pname not in args.points:
            continue
        row = ceiling_point(cfg, partition, device, args.peak_tflops, args.iters, args.warmup, stash_on,
                            args.model_flops_paths, args.student_sdpa, args.top, args.target_mfu)
        rows.append(row)
        print_row(row, args.peak_tflops)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {**bench.run_meta(device), "precision": precision, "peak_tflops": args.peak_tflops,
            "iters": args.iters, "warmup": args.warmup, "stash": args.stash,
            "model_flops_paths": args.model_flops_paths, "student_sdpa": args.student_sdpa}
    bench.write_json(args.json, meta, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
