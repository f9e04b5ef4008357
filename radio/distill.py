"""Multi-teacher distillation trainer for RADIO-style students (``RadioTrainConfig`` -> ``train``).

One training step (optimizer step ``s``; everything below is a pure function of the config, ``s``, the
data stream position and the RNG state, which is what makes resume exact):

1. **Partition and resolution.** ``plan_step(cfg, s)`` draws one partition from ``cfg.partitions`` with the
   partitions' ``probability`` weights, then one resolution ``R`` uniformly from that partition's
   ``resolutions`` (one resolution per batch), then whether the batch is a mosaic (probability
   ``mosaic_prob`` with ``mosaic_k = k > 1``). The draw uses ``random.Random`` seeded by ``(seed, s)``, so all
   ranks agree without communication and a resumed run draws the same plan.
2. **Images.** A plain batch takes ``batch_size`` samples from the stream, each center-cropped (after an
   aspect-preserving resize) to ``R x R``. A mosaic batch takes ``batch_size * k * k`` samples, each
   cropped to the tile size ``T = R / k`` (a multiple of the student patch), and tiles ``k x k`` of them
   row-major into one ``R x R`` student image (``mmfm.data.transforms.mosaic``): image ``b`` of the batch
   holds samples ``b*k*k .. b*k*k + k*k - 1``.
3. **Teachers.** Every teacher assigned to the step's partition (``TeacherSpec.partitions``, empty = all)
   runs on every image of the batch; teachers not assigned to it contribute no loss this step. The teacher
   sees an image at its native size: ``TeacherSpec.input_size``, or with ``match_student_resolution`` the
   size that gives the student's token grid at the teacher's patch size (``R / p_student * p_teacher``); the
   student image is resized to it (bilinear, antialiased). Under mosaic each **tile** is resized to the
   teacher size and encoded on its own (so a teacher never sees a mosaic); the tile feature maps are then
   stitched back in the same row-major order (``stitch_tiles``). Summary targets do not exist for a mosaic
   (the student's class tokens see ``k*k`` images), so **mosaic batches train only the feature heads**.
   A teacher with a ``featsharp_checkpoint`` gets its feature map from the FeatSharp upsampler
   (``u = upsample_factor`` times finer, mapped back to the teacher's space) instead of its plain output.
   With ``overlap_teachers`` the teachers of the next micro-batch are queued on a side CUDA stream before
   this one's student step (``mmfm.radio.teacher_lookahead``); nothing below changes order, so neither do
   the losses.
4. **Targets.** Teacher features pass through the teacher's normaliser (``cfg.normalizer``, default PHI-S;
   ``TeacherSpec.normalizer`` when the teacher names its own): before step 0 it is fitted from streaming
   float64 moments of ``normalizer_schedule.init_batches`` batches read from a second, independent stream of
   the training shards; during training each step's raw teacher features keep feeding the moments (all-reduced
   across ranks), and the normaliser is refitted after every ``refit_every``-th step up to ``refit_until``,
   then frozen. On GPUs the transform's matmul runs in TF32 (``normalizer_tf32``). Summary targets are the
   raw teacher summaries (the cosine loss is scale invariant).
5. **Resolution matching** per teacher (``loss.match``): ``"teacher_to_student"`` interpolates the
   (normalised) teacher map to the student adaptor grid ``(R/p * u)`` (under mosaic: per tile, before
   stitching, so no interpolation crosses a tile border); ``"student_to_teacher"`` interpolates the student
   adaptor map to the teacher grid (stitched grid under mosaic). Bilinear, ``align_corners=False``.
6. **Student.** ``RadioEncoder`` -> per-teacher ``TeacherAdaptor``: class token ``head_idx`` -> summary head,
   patch tokens -> feature head (pixel shuffle ``u = TeacherSpec.upsample_factor``).
7. **Losses.** Summary: cosine distance ``1 - cos``. Features (``loss.feature``): ``"mse"`` in normalised
   space or ``"cos_smoothl1"`` = ``0.9 (1 - cos) + 0.1 smooth-L1`` per token. Each term is multiplied by the
   teacher's own weight (``summary_weight`` / ``feature_weight``).
8. **Balancing** (``balancing.kind``) over all present terms ``<teacher>/summary``, ``<teacher>/feature``:
   ``fixed`` (sum), ``adaloss`` (each term divided by its running magnitude), ``uncertainty`` (Kendall et al.:
   ``exp(-s) L + s``, learned ``s``). Absent terms enter with weight 0 so every parameter gets a gradient on
   every rank (DDP / ZeRO stay in step).
9. **Engine step** (``mmfm.training.Engine``: AdamW, cosine LR with warm-up, clipping, bf16, EMA, DeepSpeed).

Logged every step (TensorBoard + ``metrics.jsonl`` + tqdm; step t is read after step t + 1 is queued, so the
host does not wait for the GPU with nothing queued; ``engine.nonfinite_check: device`` keeps the step itself
free of host reads too): total loss, per-term losses and balancing
weights, per-teacher summary / feature cosine similarity, feature fidelity ``Var(target) / MSE``, PHI-S
``alpha`` (where the normaliser has one), resolution, mosaic flag, img/s, model TFLOP/s and MFU per GPU
(``mmfm.radio.flops``; MFU where the GPU's peak is known), LR, gradient norm, skipped samples. Checkpoints
(atomic, ``OUT/checkpoints/step_*``) hold weights, optimizer, RNG, the data position of every rank, and
normaliser + balancer state, so ``--resume`` reproduces the uninterrupted loss sequence.
At the end the model is exported (``export``): ``OUT/model`` (mmfm checkpoint, ``mmfm.radio.load``) and
``OUT/hf`` (Hugging Face ``radio`` + adaptor files), with each normaliser's inverse folded into its
adaptor's last Linear so that adaptor outputs are in the teacher's own feature space.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfm.radio.adaptors import AdaptorSpec, MLPSpec, ResidualMLP, TeacherAdaptor
from mmfm.radio.balancing import build_balancer
from mmfm.radio.encoder import RadioEncoder
from mmfm.radio.flops import StepFlops, count_step_flops, dense_bf16_peak_tflops, possible_plans
from mmfm.radio.losses import feature_loss, fidelity, match_resolution, summary_loss
from mmfm.radio.normalizers import RefitSchedule, build_normalizer, tf32_matmuls
from mmfm.radio.step_batches import StepBatches
from mmfm.radio.teacher_lookahead import TeacherLookahead
from mmfm.radio.teachers import TeacherSpec
from mmfm.radio.vit import create_student
from mmfm.training import EngineConfig, OptimizerConfig

if TYPE_CHECKING:
    from mmfm.logging_utils import MetricLogger
    from mmfm.training import Engine

__all__ = [
    "COMPILE_MODES",
    "BalancingConfig",
    "DataConfig",
    "DistillModel",
    "LossConfig",
    "NormalizerSchedule",
    "PartitionConfig",
    "RadioTrainConfig",
    "StepPlan",
    "StudentConfig",
    "build_batch",
    "build_student",
    "build_teachers",
    "build_upsamplers",
    "compile_models",
    "compile_repeated_blocks",
    "export",
    "feature_terms",
    "plan_step",
    "stitch_tiles",
    "train",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class StudentConfig:
    """The student ViT and its adaptor heads.

    Attributes:
        size: ``mmfm.radio.vit.VIT_SIZES`` key (``tiny``, ``B``, ``L``, ...), optionally ``"B/16"``.
        patch_size: student patch size.
        num_registers: register tokens (no target).
        overrides: any other ``ViTConfig`` field (``embed_dim``, ``depth``, ``max_resolution``, ...).
        adaptor_hidden: hidden width of every adaptor MLP.
        adaptor_inner: residual blocks inside each adaptor MLP.
        feature_head: ``"mlp"`` or ``"attn"`` feature heads.
    """

    size: str = "tiny"
    patch_size: int = 16
    num_registers: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    adaptor_hidden: int = 128
    adaptor_inner: int = 1
    feature_head: Literal["mlp", "attn"] = "mlp"


@dataclass
class PartitionConfig:
    """One resolution partition (e.g. low = {256, 432}, high = {1024} with mosaic).

    Attributes:
        name: referenced by ``TeacherSpec.partitions``.
        resolutions: square student resolutions (multiples of the student patch); one is drawn per step.
        probability: relative chance that a step uses this partition.
        batch_size: images per rank and micro-batch (student images; a mosaic image counts once).
        mosaic_k: tiles per side of a mosaic (1 = no mosaic).
        mosaic_prob: chance that a step of this partition is a mosaic batch (needs ``mosaic_k > 1``).
    """

    name: str = "low"
    resolutions: list[int] = field(default_factory=lambda: [64])
    probability: float = 1.0
    batch_size: int = 8
    mosaic_k: int = 1
    mosaic_prob: float = 0.0


@dataclass
class DataConfig:
    """Webdataset image shards (``mmfm data synth --kind images``) and how to read them.

    ``eval_shards``: held-out shards for fidelity before/after training (``None``: skipped).
    ``knn_shards``: labelled shards for the kNN bank (default: ``train_shards``).
    ``prefetch``: training batches built ahead on a background thread while the GPU runs (0: on the main
    thread); ``resize_workers``: threads resizing one batch's images (``mmfm.radio.step_batches``);
    ``decode_workers``: DataLoader processes decoding the training shards (0: decoded on the batch thread; the
    sample order depends on it, so resume with the same value); ``decode_threads``: threads decoding the next
    samples of each stream (no pickling, and the order does not depend on it).
    """

    train_shards: str = ""
    eval_shards: str | None = None
    knn_shards: str | None = None
    shuffle_buffer: int = 64
    prefetch: int = 2
    resize_workers: int = 4
    decode_workers: int = 0
    decode_threads: int = 0
    eval_images: int = 64
    eval_batch_size: int = 16
    knn_bank_images: int = 128


@dataclass
class NormalizerSchedule:
    """Fit before step 0 from ``init_batches`` batches, refit after every ``refit_every`` steps up to step
    ``refit_until`` (from all moments seen so far), frozen afterwards.

    ``carry_adaptors``: at each refit, re-express every feature head's last Linear in the new normalised
    space (``y_new = T_new (T_old^-1 y_old + mu_old - mu_new)``), so a refit does not change the student's
    teacher-space predictions. Without it a refit of PHI-S can rotate the targets arbitrarily when the
    covariance has near-equal eigenvalues (its ``U`` is then ill-determined) and the heads must re-learn.
    Not applied under DeepSpeed (its optimizer keeps separate master weights); a warning says so.
    """

    init_batches: int = 4
    refit_every: int = 100
    refit_until: int = 3000
    carry_adaptors: bool = True


@dataclass
class LossConfig:
    """``feature``: ``mse`` (normalised space) or ``cos_smoothl1`` (0.9 cos + 0.1 smooth-L1, AM-RADIO).
    ``match``: ``teacher_to_student`` or ``student_to_teacher`` (resolution matching, module docstring)."""

    feature: Literal["mse", "cos_smoothl1"] = "mse"
    match: Literal["teacher_to_student", "student_to_teacher"] = "teacher_to_student"
    summary_weight: float = 1.0
    feature_weight: float = 1.0


@dataclass
class BalancingConfig:
    """``fixed`` | ``adaloss`` (inverse running magnitude, ``momentum``) | ``uncertainty`` (learned)."""

    kind: Literal["fixed", "adaloss", "uncertainty"] = "fixed"
    momentum: float = 0.99
    eps: float = 1e-6


@dataclass
class RadioTrainConfig:
    """Everything one distillation run needs (YAML recipe + ``key=value`` overrides)."""

    seed: int = 0
    teachers: list[TeacherSpec] = field(default_factory=list)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partitions: list[PartitionConfig] = field(default_factory=lambda: [PartitionConfig()])
    normalizer: str = "phi_s"
    normalizer_schedule: NormalizerSchedule = field(default_factory=NormalizerSchedule)
    loss: LossConfig = field(default_factory=LossConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.02, warmup_steps=20, total_steps=300)))
    steps: int = 300
    ckpt_every: int = 100
    keep_last: int = 2
    eval_resolutions: list[int] = field(default_factory=list)  # default: every partition resolution
    export: bool = True
    # torch.compile the student's and teachers' repeated blocks, the adaptor MLPs and the feature-loss terms
    # (fuses norm / bias / activation / residual / loss kernels on GPUs; costs compile time at each new
    # resolution)
    compile: bool = False
    # torch.compile mode under compile: true: None (default), "max-autotune-no-cudagraphs" (Triton GEMM
    # templates autotuned per shape: minutes of compile per resolution; on an H100 with torch 2.11 cuBLAS beat
    # every template on the step's large GEMMs, BENCHMARKS.md) or "max-autotune"
    compile_mode: str | None = None
    # the normalisers' target transform ((tokens, C) x (C, C) on bf16 teacher features) on TF32 tensor cores
    # on GPUs (normalizers.tf32_matmuls: ~5e-4 relative rounding, below the features' own bf16 rounding); the
    # moments and the fit stay float64
    normalizer_tf32: bool = True
    # run the next micro-batch's teachers on a side CUDA stream during this one's student step
    # (radio/teacher_lookahead.py; same losses, more memory)
    overlap_teachers: bool = False
    # dense bf16 peak of one GPU (TFLOP/s) for the logged MFU; None: looked up by GPU name (H100/H200 989,
    # A100 312, ...), and no MFU is logged for an unknown device (TFLOP/s always is)
    peak_tflops: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field for inconsistent settings."""
        if not self.teachers:
            raise ValueError("teachers is empty: a distillation run needs at least one TeacherSpec")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if not self.partitions:
            raise ValueError("partitions is empty: give at least one resolution partition")
        p = self.student.patch_size
        pnames = [q.name for q in self.partitions]
        for q in self.partitions:
            if not q.resolutions:
                raise ValueError(f"partition {q.name!r} has no resolutions")
            if q.probability < 0:
                raise ValueError(f"partition {q.name!r}: probability must be >= 0, got {q.probability}")
            if q.batch_size < 1:
                raise ValueError(f"partition {q.name!r}: batch_size must be >= 1, got {q.batch_size}")
            if q.mosaic_k < 1 or not 0.0 <= q.mosaic_prob <= 1.0:
                raise ValueError(f"partition {q.name!r}: need mosaic_k >= 1 and 0 <= mosaic_prob <= 1, got "
                                 f"{q.mosaic_k}, {q.mosaic_prob}")
            for r in q.resolutions:
                step = p * (q.mosaic_k if q.mosaic_prob > 0 else 1)
                if r % step:
                    raise ValueError(f"partition {q.name!r}: resolution {r} must be a multiple of {step} "
                                     f"(student patch {p}" + (f" x mosaic_k {q.mosaic_k})" if step != p else ")"))
        if sum(q.probability for q in self.partitions) <= 0:
            raise ValueError("partitions: the probabilities must have a positive sum")
        for t in self.teachers:
            bad = [x for x in _teacher_partitions(t) if x not in pnames]
            if bad:
                raise ValueError(f"teacher {t.name!r} names unknown partitions {bad}; partitions: {pnames}")
        if self.steps < 1 or self.ckpt_every < 1:
            raise ValueError(f"steps and ckpt_every must be >= 1, got {self.steps}, {self.ckpt_every}")
        if self.normalizer_schedule.refit_every < 1:
            raise ValueError("normalizer_schedule.refit_every must be >= 1")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")


# ------------------------------------------------------------------- interface to teachers / normalisers
# The teacher, normaliser, loss and balancing modules belong to mmfm.radio.{teachers,normalizers,losses,
# balancing}; these helpers are the only places that touch their APIs.
def _teacher_partitions(spec: TeacherSpec) -> list[str]:
    return list(getattr(spec, "partitions", None) or [])


def _spec_get(spec: TeacherSpec, name: str, default: Any) -> Any:
    v = getattr(spec, name, None)
    return default if v is None else v


def build_teachers(cfg: RadioTrainConfig, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """Frozen teachers in eval mode, built in config order. Random-init teachers are seeded from
    ``(cfg.seed, index)`` so every rank, every resume and ``mmfm radio eval`` get the same weights."""
    from mmfm.radio.teachers import build_teacher

    out: dict[str, nn.Module] = {}
    for i, spec in enumerate(cfg.teachers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 7919 + 1000 + i)
            t = build_teacher(spec)
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
        t = t.to(device)
        if cfg.engine.precision == "bf16" and torch.device(device).type == "cuda":
            # frozen weights stored in bf16: autocast would otherwise re-cast every weight on every call
            # (it caches casts only for trainable leaves); the mean/std buffers of the wrapper stay fp32
            getattr(t, "model", t).to(torch.bfloat16)
        out[spec.name] = t
    return out


COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "max-autotune")


def compile_models(model: nn.Module, teachers: Mapping[str, nn.Module], mode: str | None = None,
                   heads_and_losses: bool = True) -> int:
    """What ``compile: true`` compiles: the student's and the teachers' repeated blocks and, with
    ``heads_and_losses``, the student's adaptor MLPs and ``DistillModel``'s feature-loss terms (their LayerNorm /
    GELU / cast / cosine / smooth-L1 kernels are elementwise passes over every token). Returns how many modules
    (blocks and heads) were compiled."""
    n = sum(compile_repeated_blocks(m, mode) for m in [model, *teachers.values()])
    if heads_and_losses:
        heads = [m for m in model.modules() if isinstance(m, ResidualMLP) and m._compiled_call_impl is None]
        for head in heads:
            head.compile(mode=mode)
        n += len(heads)
        if isinstance(model, DistillModel):
            model.compile_loss_terms(mode)
    return n


def compile_repeated_blocks(module: nn.Module, mode: str | None = None) -> int:
    """``torch.compile`` in place every block of each ``nn.ModuleList`` or ``nn.Sequential`` of >= 2 composite
    modules of one class (the transformer blocks of open_clip, transformers and mmfm models are ModuleLists,
    timm's are a Sequential; lists inside a compiled block are left to it); returns how many were compiled.
    Blocks of one class share one ``forward``, so one graph per input shape serves them all; state-dict keys
    are unchanged (``nn.Module.compile``)."""
    blocks = list(module) if isinstance(module, (nn.ModuleList, nn.Sequential)) else []
    composite = bool(blocks) and next(blocks[0].children(), None) is not None  # a block, not a leaf layer
    if len(blocks) >= 2 and len({type(b) for b in blocks}) == 1 and composite:
        for block in blocks:
            block.compile(mode=mode)
        return len(blocks)
    return sum(compile_repeated_blocks(child, mode) for child in module.children())


@dataclass
class TeacherInfo:
    """What the trainer needs to know about a teacher, probed with one forward pass."""

    summary_dim: int | None
    feature_dim: int | None
    patch_size: int


@torch.no_grad()
def probe_teacher(teacher: nn.Module, spec: TeacherSpec, device: torch.device | str = "cpu") -> TeacherInfo:
    """Output widths and patch size of ``teacher`` from one forward pass at its input size."""
    size = int(_spec_get(spec, "input_size", 0)) or 224
    x = torch.rand(1, 3, size, size, device=device)
    summary, feats = run_teacher(teacher, x)
    patch = getattr(teacher, "patch_size", None) or (size // feats.shape[-1] if feats is not None else 16)
    use_summary = bool(_spec_get(spec, "use_summary", True))
    use_features = bool(_spec_get(spec, "use_features", True))
    return TeacherInfo(summary.shape[-1] if (summary is not None and use_summary) else None,
                       feats.shape[1] if (feats is not None and use_features) else None, int(patch))


def build_upsamplers(cfg: RadioTrainConfig, teachers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """FeatSharp upsamplers of the teachers that name a ``featsharp_checkpoint`` (their ``upsample_factor``
    must equal the checkpoint's factor; a checkpoint trained for another teacher is a ValueError naming both)."""
    out: dict[str, nn.Module] = {}
    for spec in cfg.teachers:
        path = _spec_get(spec, "featsharp_checkpoint", None)
        if not path:
            continue
        from mmfm.radio.featsharp_cli import load_upsampler_for

        up = load_upsampler_for(path, spec, teachers[spec.name], what=f"featsharp_checkpoint of {spec.name!r}").eval()
        u = int(_spec_get(spec, "upsample_factor", 1) or 1)
        if up.cfg.factor != u:
            raise ValueError(f"teacher {spec.name!r}: featsharp_checkpoint {path} upsamples by {up.cfg.factor} but "
                             f"upsample_factor is {u}; set upsample_factor: {up.cfg.factor}")
        for p in up.parameters():
            p.requires_grad_(False)
        out[spec.name] = up
    return out


def run_teacher(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """images (B, 3, H, W) in [0, 1] at the teacher's input size -> (summary (B, C), features (B, C, h, w))."""
    out = teacher(images)
    if isinstance(out, Mapping):
        return out.get("summary"), out.get("features")
    summary, feats = out
    return summary, feats


def teacher_input_size(spec: TeacherSpec, info: TeacherInfo, student_hw: tuple[int, int],
                       student_patch: int) -> tuple[int, int]:
    """The teacher's native size for a student image (or mosaic tile) of ``student_hw`` (module doc, 3)."""
    fixed = int(_spec_get(spec, "input_size", 0) or 0)
    if fixed > 0 and not bool(_spec_get(spec, "match_student_resolution", False)):
        return fixed, fixed
    return student_hw[0] // student_patch * info.patch_size, student_hw[1] // student_patch * info.patch_size


def normalizer_kind(cfg: RadioTrainConfig, spec: TeacherSpec) -> str:
    return str(_spec_get(spec, "normalizer", "") or cfg.normalizer)


# ----------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StepPlan:
    """What step ``s`` trains on: partition index, student resolution (H, W), mosaic tiles per side (1 = none)."""

    partition: int
    resolution: tuple[int, int]
    mosaic_k: int

    @property
    def is_mosaic(self) -> bool:
        return self.mosaic_k > 1


def plan_step(cfg: RadioTrainConfig, step: int) -> StepPlan:
    """Deterministic per-step draw (module docstring, rule 1)."""
    rng = random.Random((cfg.seed * 0x9E3779B1 + step * 0x85EBCA6B + 0x1234567) & 0xFFFFFFFFFFFF)
    weights = [q.probability for q in cfg.partitions]
    pi = rng.choices(range(len(cfg.partitions)), weights=weights, k=1)[0]
    part = cfg.partitions[pi]
    r = part.resolutions[rng.randrange(len(part.resolutions))]
    k = part.mosaic_k if (part.mosaic_k > 1 and rng.random() < part.mosaic_prob) else 1
    return StepPlan(pi, (int(r), int(r)), k)


def teachers_for(cfg: RadioTrainConfig, plan: StepPlan) -> list[str]:
    """Names of the teachers assigned to the plan's partition."""
    pname = cfg.partitions[plan.partition].name
    return [t.name for t in cfg.teachers if not _teacher_partitions(t) or pname in _teacher_partitions(t)]


# ----------------------------------------------------------------------------------------------- images
def _sample_tensor(sample: Any, hw: tuple[int, int], patch: int) -> torch.Tensor:
    from mmfm.data.transforms import center_crop_to_multiple, to_tensor

    image = getattr(sample, "image", sample)
    return to_tensor(center_crop_to_multiple(image, patch, hw))


def samples_needed(cfg: RadioTrainConfig, plan: StepPlan) -> int:
    return cfg.partitions[plan.partition].batch_size * plan.mosaic_k**2


def build_batch(samples: Sequence[Any], plan: StepPlan, patch: int, pool: Executor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student images and the per-image (or per-tile) pictures the teachers see.

    Returns ``(student (B, 3, R, R), units (B*k*k, 3, T, T))``; without mosaic ``units`` is ``student``
    (``T = R``). Images in [0, 1]. ``pool`` resizes the samples in parallel (same result, same order).
    """
    from mmfm.data.transforms import mosaic

    k = plan.mosaic_k
    h, w = plan.resolution
    th, tw = h // k, w // k
    to_unit = functools.partial(_sample_tensor, hw=(th, tw), patch=patch)
    units = torch.stack(list(pool.map(to_unit, samples) if pool is not None else map(to_unit, samples)))
    if k == 1:
        return units, units
    if len(samples) % (k * k):
        raise ValueError(f"a {k}x{k} mosaic batch needs a multiple of {k * k} samples, got {len(samples)}")
    student = torch.stack([mosaic(list(units[i:i + k * k]), k)[0] for i in range(0, len(units), k * k)])
    return student, units


def resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w), bilinear; antialiased when shrinking images."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink and x.shape[1] <= 4)


def stitch_tiles(tiles: torch.Tensor, k: int) -> torch.Tensor:
    """Per-tile maps (B*k*k, C, h, w), tile ``i`` of image ``b`` at index ``b*k*k + i`` (row-major tiles)
    -> stitched maps (B, C, k*h, k*w): tile ``i`` lands at rows ``(i // k) * h``, columns ``(i % k) * w``."""
    n, c, h, w = tiles.shape
    if n % (k * k):
        raise ValueError(f"stitch_tiles: {n} tiles is not a multiple of k*k = {k * k}")
    b = n // (k * k)
    return tiles.reshape(b, k, k, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, k * h, k * w)


# ----------------------------------------------------------------------------------------------- student
def build_student(cfg: RadioTrainConfig, infos: Mapping[str, TeacherInfo]) -> RadioEncoder:
    """Student ViT with one class token per summary teacher (slot = ``TeacherSpec.token_slot`` or the order
    of the summary teachers) and one adaptor per teacher."""
    summary_teachers = [t for t in cfg.teachers if infos[t.name].summary_dim is not None]
    slots: dict[str, int] = {}
    for t in summary_teachers:  # explicit slots first, then the next free index in config order
        slot = _spec_get(t, "token_slot", None)
        if slot is not None and slot >= 0:
            if slot in slots.values():
                raise ValueError(f"teacher {t.name!r}: token_slot {slot} is already taken by another teacher")
            slots[t.name] = int(slot)
    for t in summary_teachers:
        if t.name not in slots:
            slots[t.name] = next(i for i in range(len(summary_teachers) + len(slots) + 1)
                                 if i not in slots.values())
    num_cls = max([s + 1 for s in slots.values()], default=1)
    sc = cfg.student
    student = create_student(sc.size, sc.patch_size, num_cls_tokens=num_cls, num_registers=sc.num_registers,
                             **sc.overrides)
    d = student.embed_dim
    adaptors: dict[str, TeacherAdaptor] = {}
    for t in cfg.teachers:
        info = infos[t.name]
        u = int(_spec_get(t, "upsample_factor", 1) or 1)
        spec = AdaptorSpec(head_idx=slots.get(t.name, 0), upsample_factor=u, feature_head=sc.feature_head)
        summ = MLPSpec(d, sc.adaptor_hidden, info.summary_dim, sc.adaptor_inner) if info.summary_dim else None
        feat = (MLPSpec(d, sc.adaptor_hidden, info.feature_dim, sc.adaptor_inner, upsample_factor=u)
                if info.feature_dim else None)
        adaptors[t.name] = TeacherAdaptor(spec, summ, feat)
    return RadioEncoder(student, summary_idxs=sorted(set(slots.values())) or None, adaptors=adaptors)


# ----------------------------------------------------------------------------------------------- losses
def _build_balancer(cfg: BalancingConfig, terms: Sequence[str]) -> nn.Module:
    return build_balancer(cfg.kind, list(terms), momentum=cfg.momentum, eps=cfg.eps)


class DistillModel(nn.Module):
    """What the ``Engine`` trains: the student ``RadioEncoder`` (with adaptors) and the loss balancer.

    ``forward(images, targets)`` -> dict of scalars: ``"loss"`` (to backpropagate) and detached metrics.
    ``targets[name]`` may hold ``"summary"`` (B, C_s) and/or ``"features"`` (B, C_f, h, w) (already
    normalised, on the grid decided by the trainer); teachers absent from ``targets`` or absent keys
    contribute zero-weighted terms (every parameter still gets a gradient).
    """

    def __init__(self, encoder: RadioEncoder, cfg: RadioTrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss_cfg = cfg.loss
        self.weights = {t.name: (float(_spec_get(t, "summary_weight", 1.0)) * cfg.loss.summary_weight,
                                 float(_spec_get(t, "feature_weight", 1.0)) * cfg.loss.feature_weight)
                        for t in cfg.teachers}
        self.terms = []
        for name, ad in encoder.adaptors.items():
            if ad.summary is not None:
                self.terms.append(f"{name}/summary")
            if ad.feature is not None:
                self.terms.append(f"{name}/feature")
        self.balancer = _build_balancer(cfg.balancing, self.terms)
        self.feature_terms: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = feature_terms

    def compile_loss_terms(self, mode: str | None = None) -> None:
        """``torch.compile`` the feature-loss terms: one fused kernel pass instead of ~20 elementwise passes
        over each (B, C, h, w) fp32 map (casts, cosine, smooth-L1, the metrics and their backward)."""
        self.feature_terms = torch.compile(feature_terms, mode=mode)

    def forward(self, images: torch.Tensor, targets: Mapping[str, Mapping[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        # the heads of a teacher with no targets this step (e.g. SAM outside its partition) are not run
        run = [n for n in self.encoder.adaptors if n in targets]
        out = self.encoder(images, feature_fmt="NCHW", adaptors=run or None)
        losses: dict[str, torch.Tensor] = {}
        present: dict[str, bool] = {}
        metrics: dict[str, torch.Tensor] = {}
        for name, ad in self.encoder.adaptors.items():
            if name not in out:
                # zero-weighted terms on the skipped heads' weights: every parameter still gets a (zero) gradient,
                # as DDP and ZeRO expect, without running the heads on every token
                for key, head in ((f"{name}/summary", ad.summary), (f"{name}/feature", ad.feature)):
                    if head is not None:
                        losses[key] = 0.0 * sum(p.float().sum() for p in head.parameters())
                        present[key] = False
                continue
            pred = out[name]
            tgt = targets.get(name, {})
            ws, wf = self.weights[name]
            if pred.summary is not None:
                key = f"{name}/summary"
                if "summary" in tgt:
                    s, t = pred.summary.float(), tgt["summary"].float()
                    losses[key] = ws * summary_loss(s, t)
                    present[key] = True
                    metrics[f"cos/{name}/summary"] = F.cosine_similarity(s, t, dim=-1).mean().detach()
                else:
                    losses[key] = 0.0 * pred.summary.float().sum()
                    present[key] = False
            if pred.features is not None:
                key = f"{name}/feature"
                if "features" in tgt:
                    f, t = pred.features, tgt["features"]
                    if f.shape[-2:] != t.shape[-2:]:  # "student_to_teacher"; the trainer did "teacher_to_student"
                        f, t = match_resolution(f.float(), t, "student_to_teacher")
                    loss, metrics[f"cos/{name}/feature"], metrics[f"fidelity/{name}"] = self.feature_terms(
                        f, t, self.loss_cfg.feature)
                    losses[key] = wf * loss
                    present[key] = True
                else:
                    losses[key] = 0.0 * pred.features.float().sum()
                    present[key] = False
        total, weights = self.balancer(losses, present)
        for key, v in losses.items():
            if present[key]:
                metrics[f"loss/{key}"] = v.detach()
        for key, w in weights.items():
            metrics[f"weight/{key}"] = torch.as_tensor(w).detach().float()
        return {"loss": total, **metrics}


def feature_terms(pred: torch.Tensor, target: torch.Tensor, kind: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher's feature term on matching (B, C, h, w) maps (any dtype; computed in fp32) -> (loss (to
    backpropagate, unweighted), mean cosine similarity over channels (detached), fidelity (detached))."""
    f, t = pred.float(), target.float()
    loss = feature_loss(f, t, kind=kind)
    with torch.no_grad():
        cos = F.cosine_similarity(f, t, dim=1).mean()
        return loss, cos, fidelity(f, t)


# ----------------------------------------------------------------------------------------------- targets
def _norm_forward(norm: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> normalised (B, C, h, w); the normaliser works on (..., C) tokens."""
    return norm(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm_inverse(norm: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) normalised -> teacher space (B, C, h, w)."""
    return norm.inverse(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm_alpha(norm: nn.Module) -> float | None:
    a = getattr(norm, "alpha", None)
    if a is None:
        return None
    return float(a)


class TargetMaker:
    """Runs the frozen teachers on a step's images and turns their outputs into targets (module doc, 3-5)."""

    def __init__(self, cfg: RadioTrainConfig, teachers: Mapping[str, nn.Module], infos: Mapping[str, TeacherInfo],
                 normalizers: Mapping[str, nn.Module], device: torch.device,
                 upsamplers: Mapping[str, nn.Module] | None = None) -> None:
        self.cfg = cfg
        self.upsamplers = dict(upsamplers or {})
        self.specs = {t.name: t for t in cfg.teachers}
        self.teachers = dict(teachers)
        self.infos = dict(infos)
        self.normalizers = dict(normalizers)
        self.device = device
        self.patch = cfg.student.patch_size
        # frozen teachers run in bf16 autocast on GPUs when the run is bf16
        self.bf16 = cfg.engine.precision == "bf16" and torch.device(device).type == "cuda"

    @torch.no_grad()
    def teacher_outputs(self, plan: StepPlan, units: torch.Tensor
                        ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Raw teacher outputs on the teacher-visible pictures (whole images or mosaic tiles)."""
        return {name: self.teacher_output(name, units) for name in teachers_for(self.cfg, plan)}

    @torch.no_grad()
    def teacher_output(self, name: str, units: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One teacher's raw (summary, features) on the pictures ``units`` (B, 3, H, W), at its input size."""
        spec, info = self.specs[name], self.infos[name]
        size = teacher_input_size(spec, info, tuple(units.shape[-2:]), self.patch)
        x = resize(units.to(self.device, non_blocking=True), size)  # non-blocking from pinned batches
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            summary, feats = run_teacher(self.teachers[name], x)
            if name in self.upsamplers and info.feature_dim:
                # FeatSharp: u-times finer features, mapped back to the teacher's space (the trainer's
                # own normaliser then standardises them like any other teacher map)
                _, feats = self.upsamplers[name].apply(x, denormalize=True)
        return (summary.float() if (summary is not None and info.summary_dim) else None,
                feats.float() if (feats is not None and info.feature_dim) else None)

    def observe(self, raw: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
        """Feed raw teacher features into the normalisers' streaming moments."""
        for name, (_, feats) in raw.items():
            if feats is not None and name in self.normalizers:
                self.normalizers[name].update(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))

    def fit(self, carry: nn.ModuleDict | None = None) -> None:
        """Refit every normaliser; with ``carry`` (the student's adaptors) re-express each feature head's
        last Linear in the new normalised space (``NormalizerSchedule.carry_adaptors``)."""
        for name, norm in self.normalizers.items():
            ad = carry[name] if carry is not None and name in carry else None
            if ad is None or ad.feature is None or not bool(norm.fitted):
                norm.fit()
                continue
            old_mean, old_inv = norm.mean.clone(), norm.inverse_transform.clone()
            norm.fit()
            # y_new = A y_old + c, A = T_new T_old^-1, c = T_new (mu_old - mu_new)
            a = norm.transform.double() @ old_inv.double()
            c = norm.transform.double() @ (old_mean.double() - norm.mean.double())
            _affine_outputs(_feature_last_linear(ad), a, c, blocks=ad.upsample_factor**2)

    @torch.no_grad()
    def targets(self, plan: StepPlan, raw: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]
                ) -> dict[str, dict[str, torch.Tensor]]:
        k = plan.mosaic_k
        tile = (plan.resolution[0] // k // self.patch, plan.resolution[1] // k // self.patch)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, (summary, feats) in raw.items():
            t: dict[str, torch.Tensor] = {}
            if summary is not None and k == 1:
                t["summary"] = summary.float()
            if feats is not None:
                f = feats
                if name in self.normalizers:
                    with tf32_matmuls(self.cfg.normalizer_tf32):
                        f = _norm_forward(self.normalizers[name], feats)
                if self.cfg.loss.match == "teacher_to_student":
                    u = int(_spec_get(self.specs[name], "upsample_factor", 1) or 1)
                    f = resize(f, (tile[0] * u, tile[1] * u))
                t["features"] = stitch_tiles(f, k) if k > 1 else f
            if t:
                out[name] = t
        return out


# ----------------------------------------------------------------------------------------------- export
@torch.no_grad()
def _affine_outputs(linear: nn.Linear, a: torch.Tensor, c: torch.Tensor, blocks: int = 1) -> None:
    """Replace ``linear``'s outputs ``y`` (``blocks`` groups of C channels) by ``a y + c`` in place (float64)."""
    out_dim = linear.out_features
    w = linear.weight.detach().double().reshape(blocks, out_dim // blocks, -1)
    b = linear.bias.detach().double().reshape(blocks, out_dim // blocks)
    a, c = a.to(w.device), c.to(w.device)
    linear.weight.copy_(torch.einsum("oc,gci->goi", a, w).reshape(out_dim, -1).to(linear.weight.dtype))
    linear.bias.copy_((b @ a.T + c).reshape(-1).to(linear.bias.dtype))


def _feature_last_linear(adaptor: TeacherAdaptor) -> nn.Linear:
    head = adaptor.feature
    mlp = head.mlp if hasattr(head, "mlp") else head
    return mlp.final[2]


def folded_encoder(encoder: RadioEncoder, normalizers: Mapping[str, nn.Module]) -> RadioEncoder:
    """A copy of ``encoder`` whose feature adaptors output teacher-space features (normaliser inverse folded
    into each feature head's last Linear)."""
    enc = copy.deepcopy(encoder).float().cpu().eval()
    for name, norm in normalizers.items():
        ad = enc.adaptors[name]
        if ad.feature is None:
            continue
        u = ad.upsample_factor
        copy.deepcopy(norm).cpu().fold_inverse_into_linear(_feature_last_linear(ad), blocks=u * u)
    return enc


def export(encoder: RadioEncoder, normalizers: Mapping[str, nn.Module], out_dir: str | Path,
           hf: bool = True) -> dict[str, Path]:
    """Write ``out_dir/model`` (mmfm checkpoint) and, for exportable ViT students, ``out_dir/hf`` (Hugging
    Face ``radio`` + ``mmfm_adaptors.*``), with the normalisers folded into the adaptors."""
    from mmfm.radio.encoder import save
    from mmfm.radio.hf_interop import export_hf

    enc = folded_encoder(encoder, normalizers)
    out = Path(out_dir)
    paths = {"model": save(enc, out / "model")}
    if hf:
        try:
            paths["hf"] = export_hf(enc, out / "hf")
        except ValueError as err:  # windowed attention / final norm / non-ViT: the HF format cannot hold it
            log.warning("skipping the Hugging Face export: %s", err)
    return paths


def teacher_space_predictor(encoder: RadioEncoder, normalizers: Mapping[str, nn.Module]
                            ) -> Callable[[torch.Tensor], dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """``images -> {teacher: (summary (B, C), features (B, C, h, w))}`` in teacher space (unfolded model)."""

    @torch.no_grad()
    def predict(images: torch.Tensor) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        out = encoder(images, feature_fmt="NCHW")
        res = {}
        for name in encoder.adaptors:
            s, f = out[name]
            if f is not None and name in normalizers:
                f = _norm_inverse(normalizers[name], f.float())
            res[name] = (s, f)
        return res

    return predict


# ----------------------------------------------------------------------------------------------- training
class SampleStream:
    """Endless, resumable sample stream over image shards (``EpochBatcher`` of single samples).

    ``decode_workers > 0`` decodes in that many DataLoader worker processes (``ShardDataset.loader``: position,
    order and skip counts stay exact; the order depends on the worker count, so a run resumes with the same
    count). ``decode_threads > 0`` decodes each stream's next samples on threads, in the same order."""

    def __init__(self, shards: str, shuffle_buffer: int, seed: int, decode_workers: int = 0,
                 decode_threads: int = 0) -> None:
        from mmfm.data.batching import EpochBatcher
        from mmfm.data.shards import read_shards
        from mmfm.distributed import get_rank, get_world_size

        self.dataset = read_shards(shards, schema="image", shuffle_buffer=shuffle_buffer, seed=seed,
                                   rank=get_rank(), world_size=get_world_size(), decode_threads=decode_threads)
        self.source = self.dataset.loader(num_workers=decode_workers) if decode_workers > 0 else self.dataset
        self.batcher = EpochBatcher(self.source, 1)

    def take(self, n: int) -> list[Any]:
        return [next(self.batcher)[0] for _ in range(n)]

    @property
    def skipped(self) -> int:
        return int(sum(self.source.skipped.values()))

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)


@dataclass
class _QueuedStep:
    """A step whose work is queued but whose scalars are not read yet (``_train_steps`` logs it one step late)."""

    step: int
    lr: float
    plan: StepPlan
    metrics: dict[str, torch.Tensor]
    n_images: int
    flops: float
    skipped_samples: int
    grad_norm: float | torch.Tensor | None  # ``Engine.step_grad_norm``: read when the step is logged


def _log_step(q: _QueuedStep, engine: Engine, logger: MetricLogger, normalizers: Mapping[str, nn.Module],
              peak_tflops: float | None, world: int, since: float) -> float:
    """Read ``q``'s scalars (the host waits for step ``q.step`` here, not for the step queued after it) and log
    them. The step's time is the host time from ``since`` (the previous read) to this read, which is returned."""
    scalars = _reduce_metrics(q.metrics)
    engine.settle(q.step)
    read = time.perf_counter()
    dt = read - since
    for name, norm in normalizers.items():
        alpha = _norm_alpha(norm)
        if alpha is not None:
            scalars[f"phi_s_alpha/{name}"] = alpha
    tflops = q.flops / max(dt, 1e-9) / 1e12  # per GPU
    if peak_tflops:
        scalars["mfu"] = tflops / peak_tflops
    logger.log(q.step, lr=q.lr, grad_norm=0.0 if q.grad_norm is None else float(q.grad_norm), resolution=q.plan.resolution[0], tflops=tflops,
               mosaic=q.plan.mosaic_k, img_per_s=q.n_images * world / max(dt, 1e-9),
               skipped_samples=q.skipped_samples, **scalars)
    logger.advance()
    return read


def _train_steps(cfg: RadioTrainConfig, start: int, engine: Engine, maker: TargetMaker, batches: StepBatches,
                 sched: RefitSchedule, step_flops: Mapping[StepPlan, StepFlops], peak_tflops: float | None,
                 logger: MetricLogger, normalizers: Mapping[str, nn.Module], ckpt_dir: Path, world: int,
                 crash_after: int | None) -> None:
    """Optimizer steps ``start .. cfg.steps - 1`` of ``train`` (module docstring, 1-9): log, refit, checkpoint.

    Step t's scalars are read and logged after step t + 1 is queued, so the host never waits for the GPU with
    nothing queued behind it (with ``engine.nonfinite_check: device`` nothing else in the step waits either).
    A checkpoint, a crash test and the last step log at once. Each step's time is the host time between two
    reads, which is the GPU's step time once the host runs ahead.
    """
    from mmfm.distributed import barrier

    accum = cfg.engine.grad_accum
    with_teachers = TeacherLookahead(batches, maker, engine.device, cfg.overlap_teachers)
    unlogged: _QueuedStep | None = None
    last_read = time.perf_counter()

    def log_unlogged() -> None:
        nonlocal unlogged, last_read
        if unlogged is not None:
            q, unlogged = unlogged, None
            last_read = _log_step(q, engine, logger, normalizers, peak_tflops, world, last_read)

    for step in range(start, cfg.steps):
        lr = engine.lr
        metrics: dict[str, torch.Tensor] = {}
        n_images, flops = 0, 0.0
        for _ in range(accum):
            batch, raw = next(with_teachers)
            plan, student_images = batch.plan, batch.student
            if sched.update_at(step):
                maker.observe(raw)
            targets = maker.targets(plan, raw)
            res = engine.forward(student_images.to(engine.device, non_blocking=True), targets)
            engine.backward(res["loss"])
            engine.step()
            n_images += student_images.shape[0]
            flops += step_flops[plan].total
            for k, v in res.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach().float() / accum
        log_unlogged()  # step - 1, while this step runs
        done = step + 1
        if sched.refit_at(step):
            carry = cfg.normalizer_schedule.carry_adaptors and not engine.uses_deepspeed
            if cfg.normalizer_schedule.carry_adaptors and engine.uses_deepspeed and step + 1 == sched.refit_every:
                log.warning("normalizer_schedule.carry_adaptors is not applied under DeepSpeed (separate master "
                            "weights): the adaptor heads re-learn after each normaliser refit")
            maker.fit(engine.module.encoder.adaptors if carry else None)
        unlogged = _QueuedStep(step, lr, plan, metrics, n_images, flops, batch.skipped, engine.step_grad_norm)
        checkpoint = done % cfg.ckpt_every == 0 or done == cfg.steps
        if checkpoint or done == crash_after:
            log_unlogged()
        if checkpoint:
            rank_state = {"data": batch.stream_state,
                          "normalizers": {n: v.state_dict() for n, v in normalizers.items()},
                          "balancer": engine.module.balancer.state_dict()}
            engine.save_checkpoint(ckpt_dir, done, extra={"step": done}, rank_extra=rank_state,
                                   keep_last=cfg.keep_last)
        if crash_after is not None and done == crash_after:
            logger.close()
            barrier()
            os.kill(os.getpid(), signal.SIGKILL)  # a real, unclean failure (tests)
    log_unlogged()


def eval_resolutions(cfg: RadioTrainConfig) -> list[int]:
    if cfg.eval_resolutions:
        return list(cfg.eval_resolutions)
    return sorted({int(r) for q in cfg.partitions for r in q.resolutions})


def _reduce_metrics(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    from mmfm.distributed import all_reduce_mean

    keys = sorted(metrics)
    if not keys:
        return {}
    vals = all_reduce_mean(torch.stack([metrics[k].detach().float().reshape(()) for k in keys]))
    return {k: float(v) for k, v in zip(keys, vals.tolist())}


def setup(cfg: RadioTrainConfig, device: torch.device | str = "cpu"
          ) -> tuple[dict[str, nn.Module], dict[str, TeacherInfo], DistillModel, dict[str, nn.Module]]:
    """Teachers, their probed shapes, the student model (seeded by ``cfg.seed``) and the normalisers, all eager:
    ``compile_models`` compiles them, after the FLOPs are counted (``mmfm.radio.flops`` says why)."""
    teachers = build_teachers(cfg, device)
    infos = {t.name: probe_teacher(teachers[t.name], t, device) for t in cfg.teachers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DistillModel(build_student(cfg, infos), cfg)
    normalizers = {t.name: build_normalizer(normalizer_kind(cfg, t), infos[t.name].feature_dim).to(device)
                   for t in cfg.teachers if infos[t.name].feature_dim}
    return teachers, infos, model, normalizers


def fit_normalizers_initial(cfg: RadioTrainConfig, maker: TargetMaker) -> None:
    """Fit every normaliser before step 0 from ``init_batches`` batches of an independent stream."""
    n = cfg.normalizer_schedule.init_batches
    if n < 1 or not maker.normalizers:
        if maker.normalizers:
            raise ValueError("normalizer_schedule.init_batches must be >= 1 to fit the normalisers")
        return
    stream = SampleStream(cfg.data.train_shards, cfg.data.shuffle_buffer, cfg.seed + 7_777)
    for i in range(n):
        # cover the partitions in their own proportions; the plan of step -1-i is not a training step
        plan = plan_step(cfg, -1 - i)
        _, units = build_batch(stream.take(samples_needed(cfg, plan)), plan, cfg.student.patch_size)
        maker.observe(maker.teacher_outputs(plan, units))
    maker.fit()


def train(cfg: RadioTrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          crash_after: int | None = None) -> dict[str, Any]:
    """Distil the student (module docstring); returns final metrics and the before/after evaluation."""
    from mmfm.checkpoint import find_latest
    from mmfm.config import save_config
    from mmfm.distributed import (
        barrier,
        get_rank,
        get_world_size,
        init_distributed,
        is_main_process,
        seed_everything,
    )
    from mmfm.logging_utils import MetricLogger, plot_loss_curves
    from mmfm.training import Engine

    cfg.validate()
    if not cfg.data.train_shards:
        raise ValueError("data.train_shards is empty: point it at image shards "
                         "(e.g. `mmfm data synth --kind images --n 512 --out data/images`)")
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    dist = init_distributed(force=cfg.engine.deepspeed_config is not None)
    device = dist.device
    rank, world = get_rank(), get_world_size()
    teachers, infos, model, normalizers = setup(cfg, device)
    maker = TargetMaker(cfg, teachers, infos, normalizers, device, build_upsamplers(cfg, teachers))
    # FLOPs of every plan, counted on the eager models before any compile (mmfm.radio.flops says why)
    model.to(device)
    step_flops = {plan: count_step_flops(maker, model.encoder, plan) for plan in possible_plans(cfg)}
    peak_tflops = cfg.peak_tflops or dense_bf16_peak_tflops(device)
    if cfg.compile:
        compile_models(model, teachers, cfg.compile_mode)
    seed_everything(cfg.seed, rank)
    max_batch = max(q.batch_size for q in cfg.partitions)
    engine = Engine.from_config(model, cfg.engine, micro_batch_size=max_batch)
    stream = SampleStream(cfg.data.train_shards, cfg.data.shuffle_buffer, cfg.seed, cfg.data.decode_workers,
                          cfg.data.decode_threads)
    sched = RefitSchedule(cfg.normalizer_schedule.refit_every, cfg.normalizer_schedule.refit_until)

    start = 0
    if resume and find_latest(ckpt_dir) is not None:
        ckpt = engine.load_checkpoint(ckpt_dir)
        start = int(ckpt.extra["step"])
        rs = ckpt.rank_state
        stream.load_state_dict(rs["data"])
        for name, norm in normalizers.items():
            norm.load_state_dict(rs["normalizers"][name])
        engine.module.balancer.load_state_dict(rs["balancer"])
        if is_main_process():
            print(f"resumed from {ckpt.path} at step {start}", flush=True)
    else:
        fit_normalizers_initial(cfg, maker)
        if is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")

    result: dict[str, Any] = {}
    evals = None
    if cfg.data.eval_shards and is_main_process():
        from mmfm.radio.evaluate import evaluate_fidelity, load_samples

        evals = load_samples(cfg.data.eval_shards, cfg.data.eval_images)
        if start == 0:
            engine.eval()
            with torch.random.fork_rng(devices=[]):
                result["eval_before"] = evaluate_fidelity(
                    teacher_space_predictor(engine.module.encoder, normalizers), teachers, cfg.teachers, infos,
                    evals, eval_resolutions(cfg), cfg.student.patch_size, cfg.data.eval_batch_size)
            (out / "eval_before.json").write_text(json.dumps(result["eval_before"], indent=2))
    logger = MetricLogger(out, total_steps=cfg.steps, start_step=start, progress=progress, desc="radio")
    engine.train()
    accum = cfg.engine.grad_accum
    # from here on only `batches` reads the stream (ahead, on its thread); checkpoints save the position and skip
    # count of the last batch consumed
    batches = StepBatches(cfg, stream, start * accum, cfg.steps * accum, cfg.data.prefetch,
                          cfg.data.resize_workers, pin_memory=device.type == "cuda")
    try:
        _train_steps(cfg, start, engine, maker, batches, sched, step_flops, peak_tflops, logger, normalizers,
                     ckpt_dir, world, crash_after)
    finally:
        batches.close()
    logger.close()
    result["final"] = dict(logger.latest)
    if is_main_process():
        final = copy.deepcopy(engine.module).float().cpu()
        if engine.ema is not None:
            engine.ema.copy_to(final)
        norms_cpu = {n: copy.deepcopy(v).float().cpu() for n, v in normalizers.items()}
        if cfg.export:
            paths = export(final.encoder, norms_cpu, out)
            result["export"] = {k: str(v) for k, v in paths.items()}
        if evals is not None:
            from mmfm.radio.encoder import load
            from mmfm.radio.evaluate import evaluate_fidelity

            enc = load(out / "model", adaptors="all") if cfg.export else folded_encoder(final.encoder, norms_cpu)
            cpu_teachers = {n: t.float().cpu() for n, t in teachers.items()}
            with torch.random.fork_rng(devices=[]):
                result["eval_after"] = evaluate_fidelity(
                    teacher_space_predictor(enc, {}), cpu_teachers, cfg.teachers, infos, evals,
                    eval_resolutions(cfg), cfg.student.patch_size, cfg.data.eval_batch_size)
        keys = ["loss"] + [k for k in logger.latest if k.startswith("loss/")]
        plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png", keys=keys, logy=True,
                         title="RADIO distillation")
        (out / "result.json").write_text(json.dumps(result, indent=2))
    barrier()
    return result
