"""Model FLOPs of one distillation step, for the trainer's MFU log and ``scripts/bench_radio_train.py``.

A step's FLOPs depend only on its plan (partition, resolution, mosaic k) and batch size, so the trainer counts
every plan its config can draw once, at set-up, with ``torch.utils.flop_counter`` on one image and scales by
the batch (the models are per-sample). The count runs on the eager models, before any block is compiled:
with torch 2.11 (the GPU image), compiled blocks that once ran under the counter's dispatch mode ran eager ever
after (dynamo recorded its skip on the code object: pytorch/pytorch#190286; BENCHMARKS.md), which a count
inside the training loop would cause.

MFU = (teacher forward + student forward and backward FLOPs) / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from mmfm.radio.distill import RadioTrainConfig, StepPlan, TargetMaker

__all__ = ["StepFlops", "count_step_flops", "dense_bf16_peak_tflops", "model_flops_paths", "no_mha_fastpath",
           "possible_plans"]

# dense (not 2:4 sparse) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name; the
# first match wins (a PCIe H100 is slower than the SXM part); other GPUs: set RadioTrainConfig.peak_tflops
_PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch of a plan: each teacher's forward and the student's forward + backward."""

    teachers: dict[str, float]
    student: float

    @property
    def teacher(self) -> float:
        return sum(self.teachers.values())

    @property
    def total(self) -> float:
        return self.teacher + self.student


def dense_bf16_peak_tflops(device: torch.device | str) -> float | None:
    """The dense bf16 peak of a known data-centre GPU (TFLOP/s), else None (then no MFU is logged)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16_TFLOPS if key in name), None)


@contextlib.contextmanager
def model_flops_paths(teachers: Iterable[nn.Module]) -> Iterator[None]:
    """Count the models' own FLOPs, not those of the fast paths they take: PyTorch's fused
    ``nn.MultiheadAttention`` inference path is switched off (``no_mha_fastpath``), and SAM's attention runs
    timm's forward instead of ``mmfm.radio.teachers``' folded bias (whose wider q / k add FLOPs that are not
    the model's). open_clip's packed attention (``mmfm.radio.teachers``) stays: it runs the model's own GEMMs
    and attention. MFU is then model FLOPs / time, as usual."""
    restored = []
    for t in teachers:
        for m in t.modules():
            if "forward" in m.__dict__:  # an instance-level forward patched in by mmfm
                restored.append((m, m.__dict__.pop("forward")))
    try:
        with no_mha_fastpath():
            yield
    finally:
        for m, fwd in restored:
            m.forward = fwd


@contextlib.contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """Switch off PyTorch's fused ``nn.MultiheadAttention`` inference path, one op whose GEMMs the FLOP counter
    cannot see (a teacher still on ``nn.MultiheadAttention`` would otherwise count no attention FLOPs)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def possible_plans(cfg: RadioTrainConfig) -> list[StepPlan]:
    """Every distinct ``StepPlan`` that ``plan_step`` can draw under ``cfg``."""
    from mmfm.radio.distill import StepPlan

    plans = []
    for pi, part in enumerate(cfg.partitions):
        if part.probability <= 0:
            continue
        mosaic = part.mosaic_k > 1 and part.mosaic_prob > 0
        ks = ([1] if not (mosaic and part.mosaic_prob >= 1) else []) + ([part.mosaic_k] if mosaic else [])
        plans += [StepPlan(pi, (int(r), int(r)), k) for r in dict.fromkeys(part.resolutions) for k in ks]
    return plans


def count_step_flops(maker: TargetMaker, encoder: nn.Module, plan: StepPlan) -> StepFlops:
    """FLOPs of one micro-batch of ``plan``: the teachers' forward on the plan's pictures (through ``maker``)
    and the student ``encoder``'s forward + backward with the plan's heads, counted on one image and scaled by
    the partition's batch size. RNG state and gradients are left as they were; eager models only (module
    docstring)."""
    from mmfm.radio.distill import teachers_for

    cfg = maker.cfg
    k, (h, w) = plan.mosaic_k, plan.resolution
    device = next(encoder.parameters()).device
    params = [p for p in encoder.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    names = teachers_for(cfg, plan)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        units = torch.rand(k * k, 3, h // k, w // k, device=device)
        teachers = {}
        with model_flops_paths(maker.teachers.values()):
            for name in names:
                with FlopCounterMode(display=False) as fc:
                    maker.teacher_output(name, units)
                teachers[name] = fc.get_total_flops()
        image = torch.rand(1, 3, h, w, device=device)
        run = [n for n in encoder.adaptors if n in names] or None
        with FlopCounterMode(display=False) as fc:
            out = encoder(image, feature_fmt="NCHW", adaptors=run)
            heads = [o for n, o in out.items() if n != "backbone"] if isinstance(out, dict) else [out]
            preds = [t for o in heads for t in (o.summary, o.features) if t is not None]
            sum(t.float().sum() for t in preds).backward()
        student = fc.get_total_flops()
    for p, g in zip(params, saved_grads):
        p.grad = g
    batch = cfg.partitions[plan.partition].batch_size
    return StepFlops({n: f * batch for n, f in teachers.items()}, student * batch)
