#!/usr/bin/env python
"""RADIO distillation training throughput: img/s, MFU and peak memory of one training step.

One step is exactly what ``mmfm.radio.distill.train`` does per micro-batch: the frozen teachers run on the
batch (on a GPU their weights are bf16 and they run natively in bf16; ``--teacher-autocast`` runs them under
autocast instead, for A/B), their features are PHI-S normalised and resized to the student grid, the student
(ViT-B/16 with one adaptor per teacher) runs forward + backward, and the Engine steps (AdamW, clipping, EMA off).
Images are random tensors already on the device, so the data pipeline is not timed
(``scripts/bench_radio_data.py`` times it).

Teachers (random init: timings do not depend on the weights), ViT-L sized as in RADIO's recipes:
  clip  open_clip ViT-L-14-336 at 336 px (summary + features)
  dino  timm vit_large_patch14_reg4_dinov2 at the student's token grid (summary + features)
  sam   timm samvit_large_patch16 at 1024 px (features only; in the high partition only, as in
        configs/radio/vit-b16-clip-dino-sam.yaml)
Points: student resolution 432 (clip + dino) and 1024 (clip + dino + sam).

MFU = FLOPs of one step (``mmfm.radio.flops``, as the trainer logs it: torch.utils.flop_counter over the
teachers' forward + the student's forward and backward, matmuls, convolutions and attention) / step time /
the GPU's dense bf16 peak (``--peak-tflops``, 989 for
H100/H200 SXM). A second, synchronised pass over the same number of steps splits the step into phases
(teachers, targets = PHI-S + resize, student forward + backward, optimizer step); "teacher MFU" and "student
MFU" are each part's FLOPs over its own phase time. Peak memory = ``torch.cuda.max_memory_allocated`` over
the timed steps. ``--compile`` compiles the student's and teachers' blocks, the adaptor MLPs and the loss
terms as ``compile: true`` does in a recipe (``--compile-blocks-only`` leaves the heads and losses eager);
``--deepspeed configs/deepspeed/zero2.json`` runs the Engine under DeepSpeed (one process here: ZeRO
partitions over ranks, so one GPU shows its bf16-weights + fp32-master memory layout, not the savings).
Under ``torchrun --nproc_per_node N`` every rank runs the step on its own GPU with its own images, the Engine
wraps the student in DDP (or DeepSpeed), rank 0 reports, and img/s counts all ranks;
``scripts/bench_radio_scaling.py`` runs 1 and N processes and prints the scaling efficiency.

    python scripts/bench_radio_train.py --device cuda --json out.json
    python scripts/bench_radio_train.py --compile --points low          # one point, compiled blocks
    python scripts/bench_radio_train.py --tiny                 # CPU smoke run with tiny models
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import torch

from mmfm.distributed import cleanup_distributed, get_rank, get_world_size, init_distributed, is_main_process
from mmfm.radio import teachers as teachers_module
from mmfm.radio.distill import (
    COMPILE_MODES,
    PartitionConfig,
    RadioTrainConfig,
    StepPlan,
    StudentConfig,
    TargetMaker,
    compile_models,
    setup,
    teachers_for,
)
from mmfm.radio.flops import count_step_flops
from mmfm.radio.teacher_lookahead import TeacherLookahead
from mmfm.radio.teachers import Teacher, TeacherSpec
from mmfm.training import EngineConfig, OptimizerConfig

LARGE_TEACHERS = [
    TeacherSpec(name="clip", family="open_clip", model_name="ViT-L-14-336", input_size=336, gelu_epilogue=True),
    TeacherSpec(name="dino", family="timm", model_name="vit_large_patch14_reg4_dinov2", input_size=448,
                match_student_resolution=True, model_kwargs={"dynamic_img_size": True}, gelu_epilogue=True),
    TeacherSpec(name="sam", family="timm", model_name="samvit_large_patch16", input_size=1024, use_summary=False,
                partitions=["high"], gelu_epilogue=True),
]
TINY_TEACHERS = [
    TeacherSpec(name="clip", family="open_clip", input_size=64,
                model_kwargs={"embed_dim": 48, "vision_cfg": {"width": 64, "layers": 2, "patch_size": 16,
                                                              "head_width": 32}}, gelu_epilogue=True),
    TeacherSpec(name="dino", family="timm", model_name="vit_small_patch14_dinov2", input_size=64,
                match_student_resolution=True,
                model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 3, "patch_size": 8, "dynamic_img_size": True},
                gelu_epilogue=True),
    TeacherSpec(name="sam", family="timm", model_name="samvit_base_patch16", input_size=128, use_summary=False,
                partitions=["high"],
                model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1],
                              "window_size": 4, "neck_chans": 32}, gelu_epilogue=True),
]


def make_config(tiny: bool, low: int, high: int, batch_low: int, batch_high: int, precision: str) -> RadioTrainConfig:
    student = (StudentConfig(size="tiny", overrides={"embed_dim": 64, "depth": 2, "num_heads": 4,
                                                     "max_resolution": 256}, adaptor_hidden=64)
               if tiny else StudentConfig(size="B", patch_size=16, num_registers=4, adaptor_hidden=1536,
                                          overrides={"preferred_resolution": 432, "max_resolution": 2048}))
    return RadioTrainConfig(
        teachers=[TeacherSpec(**vars(t)) for t in (TINY_TEACHERS if tiny else LARGE_TEACHERS)],
        student=student,
        partitions=[PartitionConfig(name="low", resolutions=[low], batch_size=batch_low),
                    PartitionConfig(name="high", resolutions=[high], batch_size=batch_high)],
        engine=EngineConfig(precision=precision, grad_clip=1.0,
                            optimizer=OptimizerConfig(lr=1e-4, warmup_steps=1, total_steps=1000)),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prime_normalizers(maker: TargetMaker, plan: StepPlan, images: torch.Tensor) -> None:
    """Feed one batch of the plan's teacher features to the normalisers and fit those of the plan's teachers,
    so that ``maker.targets`` has a fitted normaliser for every teacher the step runs."""
    maker.observe(maker.teacher_outputs(plan, images))
    for name in teachers_for(maker.cfg, plan):
        if name in maker.normalizers:
            maker.normalizers[name].fit()


def run_meta(device: torch.device) -> dict:
    """What every bench JSON records about the run: UTC date, device name, torch version."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__}


def write_json(path: str | None, meta: dict, **results: object) -> None:
    """``{"meta": meta, **results}`` to ``path`` (nothing without a path)."""
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, **results}, f, indent=2)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Mean synchronised wall time of ``fn()`` over ``iters`` calls after ``warmup`` calls, in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters * 1e3


def bench_point(cfg: RadioTrainConfig, partition: int, device: torch.device, warmup: int, iters: int,
                gradient_checkpointing: bool, profile: bool = False, student_sdpa: list[str] | None = None,
                compile_heads_and_losses: bool = True, overlap_teachers: bool = False) -> dict:
    from mmfm.training import Engine

    teachers, infos, model, normalizers = setup(cfg, device)
    if gradient_checkpointing:
        model.encoder.student.set_grad_checkpointing(True)
    model.encoder.student.set_sdpa_backends(student_sdpa)
    part = cfg.partitions[partition]
    maker = TargetMaker(cfg, teachers, infos, normalizers, device)
    plan = StepPlan(partition, (part.resolutions[0],) * 2, 1)
    # FLOPs of one step, counted as the trainer does: on the eager models, before the Engine (DeepSpeed's
    # gradient hooks) and before any compile (mmfm.radio.flops)
    flops = count_step_flops(maker, model.to(device).encoder, plan)
    engine = Engine.from_config(model, cfg.engine, micro_batch_size=part.batch_size)
    gen = torch.Generator(device=device).manual_seed(get_rank())  # each rank its own images, as with real data

    def images() -> torch.Tensor:
        return torch.rand(part.batch_size, 3, *plan.resolution, device=device, generator=gen)

    prime_normalizers(maker, plan, images())
    engine.train()

    def endless_batches() -> Iterable[SimpleNamespace]:
        while True:
            x = images()
            yield SimpleNamespace(plan=plan, units=x, student=x)

    # the trainer's step; with overlap_teachers the teachers of step t + 1 are queued on a side stream before
    # the student of step t (the phases below stay synchronous)
    with_teachers = TeacherLookahead(endless_batches(), maker, device, enabled=overlap_teachers)

    def step() -> None:
        batch, raw = next(with_teachers)
        res = engine.forward(batch.student, maker.targets(plan, raw))
        engine.backward(res["loss"])
        engine.step()

    if cfg.compile:
        compile_models(model, teachers, cfg.compile_mode, heads_and_losses=compile_heads_and_losses)
    for _ in range(warmup):  # compiles, and pays the compiled blocks' one-time costs
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step_ends = []
    for _ in range(iters):
        step()
        step_ends.append(time.perf_counter())  # CPU-side: shows a step that stalls (recompiles, allocator)
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    phases = dict.fromkeys(("teachers", "targets", "student_fwd_bwd", "optimizer"), 0.0)
    for _ in range(iters):  # the same steps again, synchronised between phases
        x = images()
        sync(device)
        t = time.perf_counter()
        raw = maker.teacher_outputs(plan, x)
        t = _lap(device, phases, "teachers", t)
        targets = maker.targets(plan, raw)
        t = _lap(device, phases, "targets", t)
        res = engine.forward(x, targets)
        engine.backward(res["loss"])
        t = _lap(device, phases, "student_fwd_bwd", t)
        engine.step()
        _lap(device, phases, "optimizer", t)
    engine.settle()  # nonfinite_check='device': a non-finite step of the bench raises here, not silently
    per_teacher = _per_teacher(maker, plan, images(), iters, device, flops.teachers) if profile else {}
    student_kernels = []
    if profile and device.type == "cuda":
        x = images()
        targets = maker.targets(plan, maker.teacher_outputs(plan, x))
        student_kernels = _top_kernels(lambda: engine.backward(engine.forward(x, targets)["loss"]), device, 12)
        engine.step()
    compiled = _compiled_forwards([model, *teachers.values()]) if cfg.compile else {}
    regions = _compiled_region_calls(step) if cfg.compile else None
    return {"phase_ms": {k: 1e3 * v / iters for k, v in phases.items()}, "per_teacher": per_teacher,
            "compiled_forwards": compiled, "compiled_region_calls_per_step": regions,
            "student_top_kernels": student_kernels,
            "resolution": plan.resolution[0], "batch": part.batch_size,
            "teachers": teachers_for(cfg, plan),
            "step_ms": 1e3 * dt, "img_per_s": get_world_size() * part.batch_size / dt,
            "img_per_s_per_gpu": part.batch_size / dt, "world_size": get_world_size(),
            "step_enqueue_ms": [round(1e3 * (b - a), 1) for a, b in zip([t0, *step_ends], step_ends)],
            "teacher_tflop_per_step": flops.teacher / 1e12, "student_tflop_per_step": flops.student / 1e12,
            "achieved_tflops": flops.total / dt / 1e12, "peak_gib": peak,
            "student_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6}


def _per_teacher(maker: TargetMaker, plan: StepPlan, x: torch.Tensor, iters: int, device: torch.device,
                 flops: dict[str, float]) -> dict[str, dict]:
    """Each teacher alone on the step's images: ms and TFLOP (from ``flops``: FLOPs counted before any
    compile), and on a GPU its top kernels (torch.profiler), to see where a slow teacher's time goes."""
    out = {}
    for name, f in flops.items():
        maker.teacher_output(name, x)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            maker.teacher_output(name, x)
        sync(device)
        row = {"ms": 1e3 * (time.perf_counter() - t0) / iters, "tflop": f / 1e12}
        if device.type == "cuda":
            row["top_kernels"] = _top_kernels(functools.partial(maker.teacher_output, name, x), device, 8)
        out[name] = row
    return out


def _compiled_region_calls(step: Callable[[], None]) -> int:
    """Compiled-region entries (torch.profiler's "Torch-Compiled Region" events) in one training step: one per
    compiled block that actually ran compiled, 0 when they all ran eager."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.name.startswith("Torch-Compiled Region") for e in prof.events())


def _compiled_forwards(models: Iterable[torch.nn.Module]) -> dict[str, int]:
    """Dynamo cache entries of the ``forward`` of each class whose modules were compiled in place: 0 means
    those blocks ran eager although ``.compile()`` was called on them."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    classes = {type(m) for model in models for m in model.modules() if getattr(m, "_compiled_call_impl", None)}
    return {f"{c.__module__}.{c.__qualname__}": len(_debug_get_cache_entry_list(c.forward.__code__))
            for c in sorted(classes, key=lambda c: c.__qualname__)}


def _top_kernels(fn, device: torch.device, n: int) -> list[tuple[str, float]]:
    """The ``n`` GPU kernels (or ops) with the most CUDA time in one call of ``fn``: (name, ms)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return [(e.key[:90], round(e.device_time_total / 1e3, 2)) for e in sorted(
        prof.key_averages(), key=lambda e: -e.device_time_total)[:n]]


def _lap(device: torch.device, phases: dict[str, float], name: str, t0: float) -> float:
    sync(device)
    t = time.perf_counter()
    phases[name] += t - t0
    return t


# on / off switches; most give the behaviour before an optimisation, for A/B in one session
SWITCHES = {
    "--teacher-autocast": "run the bf16-weight teachers under autocast (the behaviour before native bf16)",
    "--timm-sam-attention": "keep timm's 3-D SAM attention (the behaviour before the 4-D SDPA change)",
    "--open-clip-mha": "keep open_clip's nn.MultiheadAttention in the CLIP teacher (before the packed SDPA change)",
    "--no-gelu-epilogue": "teachers' MLPs as Linear + separate exact GELU (before TeacherSpec.gelu_epilogue)",
    "--normalizer-fp32": "PHI-S target transform in plain fp32 (before normalizer_tf32)",
    "--overlap-teachers": "run the next step's teachers on a side CUDA stream during the student's step "
                          "(RadioTrainConfig.overlap_teachers)",
    "--device-nonfinite-check": "the Engine tests the gradient norm on the device and reads nothing on the host "
                                "during a step (EngineConfig.nonfinite_check='device', the ViT-B recipe's setting)",
    "--ema": "keep an EMA of the student's weights (ema_decay 0.9999, as the ViT-B recipe does)",
}


def add_point_args(p: argparse.ArgumentParser) -> None:
    """The device and the two points (student resolution and batch of the low and high partitions)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--low", type=int, default=432)
    p.add_argument("--high", type=int, default=1024)
    p.add_argument("--batch-low", type=int, default=64)
    p.add_argument("--batch-high", type=int, default=16)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_point_args(p)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny models")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student's and teachers' blocks, the adaptor MLPs and the loss terms")
    p.add_argument("--compile-mode", default=None, choices=[m for m in COMPILE_MODES if m],
                   help="torch.compile mode (RadioTrainConfig.compile_mode)")
    p.add_argument("--compile-blocks-only", action="store_true",
                   help="with --compile, leave the adaptor MLPs and loss terms eager (the behaviour before), for A/B")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config (e.g. configs/deepspeed/zero2.json)")
    p.add_argument("--profile", action="store_true",
                   help="time each teacher alone; top GPU kernels of each teacher and of the student")
    p.add_argument("--points", nargs="+", choices=("low", "high"), default=["low", "high"],
                   help="which partitions to measure")
    for flag, text in SWITCHES.items():
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--student-sdpa", nargs="+", default=None, metavar="BACKEND",
                   help="the student's SDPA kernel preference, best first (flash, cudnn, efficient, math); "
                        "default: PyTorch's choice")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.teacher_autocast:
        Teacher.low_precision_weights = lambda self: None  # Teacher.forward then takes its autocast branch
    if args.timm_sam_attention:
        teachers_module._sam_attention_in_4d = lambda model: 0  # _build_timm then leaves timm's forward
    if args.open_clip_mha:
        teachers_module._open_clip_packed_attention = lambda model: 0  # _build_open_clip then leaves open_clip's
    if args.tiny:
        args.low, args.high, args.batch_low, args.batch_high, args.warmup, args.iters = 64, 128, 4, 2, 1, 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank, DDP (or DeepSpeed) over them
        if args.device == "cpu":
            os.environ["MMFM_DEVICE"] = "cpu"  # gloo on CPU, for a smoke run
        device = init_distributed(force=args.deepspeed is not None).device
    else:
        device = torch.device(args.device)
    say = print if is_main_process() else lambda *a, **k: None  # rank 0 reports; every rank runs the steps
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = make_config(args.tiny, args.low, args.high, args.batch_low, args.batch_high, precision)
    cfg.compile = args.compile
    cfg.compile_mode = args.compile_mode
    cfg.normalizer_tf32 = not args.normalizer_fp32
    for t in cfg.teachers:
        t.gelu_epilogue = t.gelu_epilogue and not args.no_gelu_epilogue
    cfg.engine.deepspeed_config = args.deepspeed
    cfg.engine.nonfinite_check = "device" if args.device_nonfinite_check else "host"
    cfg.engine.ema_decay = 0.9999 if args.ema else None
    rows = []
    for partition, pname in enumerate(("low", "high")):
        if pname not in args.points:
            continue
        row = bench_point(cfg, partition, device, args.warmup, args.iters, args.grad_checkpointing, args.profile,
                          args.student_sdpa, not args.compile_blocks_only, args.overlap_teachers)
        row["mfu"] = row["achieved_tflops"] / args.peak_tflops
        ph = row["phase_ms"]
        row["teacher_mfu"] = row["teacher_tflop_per_step"] / (ph["teachers"] / 1e3) / args.peak_tflops
        row["student_mfu"] = row["student_tflop_per_step"] / (ph["student_fwd_bwd"] / 1e3) / args.peak_tflops
        rows.append(row)
        gpus = f" ({row['world_size']} ranks)" if row["world_size"] > 1 else ""
        say(f"res {row['resolution']:5d} batch {row['batch']:3d} teachers {','.join(row['teachers']):14s} "
              f"{row['img_per_s']:8.1f} img/s{gpus}  step {row['step_ms']:8.1f} ms  "
              f"TFLOP/step teacher {row['teacher_tflop_per_step']:.2f} student {row['student_tflop_per_step']:.2f}  "
              f"MFU {100 * row['mfu']:.1f}%  peak {row['peak_gib']:.1f} GiB", flush=True)
        say("    phases (ms, synchronised): " + "  ".join(f"{k} {v:.1f}" for k, v in ph.items())
              + f"  | teacher MFU {100 * row['teacher_mfu']:.1f}%  student MFU {100 * row['student_mfu']:.1f}%",
              flush=True)
        if row["compiled_forwards"]:
            say("    compiled blocks, dynamo cache entries of their forward: " + ", ".join(
                f"{'.'.join(k.split('.')[-2:])} {n}" for k, n in row["compiled_forwards"].items())
                + f"; compiled-region calls in one step: {row['compiled_region_calls_per_step']}", flush=True)
        say("    timed steps, CPU time to enqueue each (ms): " + " ".join(f"{v:.0f}" for v in row["step_enqueue_ms"]),
              flush=True)
        for tname, t in row["per_teacher"].items():
            say(f"    teacher {tname}: {t['ms']:.1f} ms, {t['tflop']:.2f} TFLOP, "
                  f"MFU {100 * t['tflop'] / (t['ms'] / 1e3) / args.peak_tflops:.1f}%", flush=True)
            for k, ms in t.get("top_kernels", []):
                say(f"        {ms:8.2f} ms  {k}", flush=True)
        if row["student_top_kernels"]:
            say("    student forward + backward, top GPU kernels:", flush=True)
            for k, ms in row["student_top_kernels"]:
                say(f"        {ms:8.2f} ms  {k}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.compile:  # a block that recompiles past dynamo's limit runs eager: say so, or timings mislead
        from torch._dynamo.utils import counters

        say("    torch.compile: " + "  ".join(f"{k} {dict(counters[k])}" for k in ("frames", "stats", "recompiles")
                                               if counters.get(k)) + f"  graph breaks {sum(counters['graph_break'].values())}",
              flush=True)
    meta = {**run_meta(device), "precision": precision, "peak_tflops": args.peak_tflops,
            "grad_checkpointing": args.grad_checkpointing, "compile": args.compile, "deepspeed": args.deepspeed,
            "teacher_autocast": args.teacher_autocast, "student_sdpa": args.student_sdpa,
            "timm_sam_attention": args.timm_sam_attention, "compile_mode": args.compile_mode,
            "compile_blocks_only": args.compile_blocks_only, "open_clip_mha": args.open_clip_mha,
            "gelu_epilogue": not args.no_gelu_epilogue, "normalizer_tf32": not args.normalizer_fp32,
            "overlap_teachers": args.overlap_teachers, "nonfinite_check": cfg.engine.nonfinite_check,
            "ema_decay": cfg.engine.ema_decay, "world_size": get_world_size()}
    if is_main_process():
        write_json(args.json, meta, rows=rows)
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
