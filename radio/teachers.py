"""Frozen teachers behind one interface: ``teacher(images) -> (summary (B, C_s), features (B, C_f, h, w))``.

``images`` are (B, 3, H, W) RGB in [0, 1]. The teacher resizes them to its own ``input_size`` (unless
``match_student_resolution`` or ``input_size == 0``, where it runs at the size it is given, snapped down to
a multiple of its patch size), applies its own
mean/std normalisation and runs frozen, in eval mode, without gradients, under bf16 autocast on CUDA; a teacher whose weights are all
bf16 (or fp16) runs natively in that dtype instead (the trainer stores them so on bf16 GPU runs).
Outputs are float32.

Families (``TeacherSpec.family``):

* ``open_clip``: CLIP / SigLIP / DFN / EVA image towers. ``model_name`` is an open_clip built-in name
  (``open_clip.create_model(name, pretrained=None)``) or empty with ``model_kwargs`` holding an open_clip
  model config (``{"embed_dim": .., "vision_cfg": {..}}``, text tower optional). Features: the last block's
  patch tokens after the final norm (``forward_intermediates``); summary: the pooled + projected embedding.
* ``timm``: DINOv2 (with/without registers), SAM ViT (``samvit_*``), SigLIP, any ViT.
  ``timm.create_model(model_name, pretrained=False, num_classes=0, img_size=input_size, **model_kwargs)``.
  Features: ``forward_features`` with the ``num_prefix_tokens`` prefix dropped (NCHW outputs, as SAM's neck,
  are used as they are); summary: ``forward_head(pre_logits=True)`` for token models, the spatial mean for
  NCHW models (SAM has no summary token).
* ``toy``: a random-init timm ``VisionTransformer`` of ``width`` x ``depth`` (``heads`` default 4) with
  dynamic image size, for tests and the CPU demo (teachers of different widths / patch sizes / input sizes).
* ``transformers``: ``model_name`` is one of ``siglip``, ``siglip2``, ``dinov2``, ``dinov2_registers``,
  ``dinov3``, ``sam``, ``radio``. ``checkpoint`` a directory -> ``from_pretrained(dir)``; otherwise built from
  ``model_kwargs`` (config kwargs, random init) and optionally loaded from a weights file. Summary: pooler
  output (SigLIP attention pool, DINO CLS after norm), the RADIO summary, or the spatial mean (SAM).

Weights are local only (no downloads): ``checkpoint`` is a ``.safetensors`` / ``.pt`` / ``.bin`` file (or an
HF directory). ``pretrained: true`` without a checkpoint is an error.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HFTeacher", "OpenClipTeacher", "Teacher", "TeacherSpec", "TimmTeacher", "build_teacher",
           "load_state_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass
class TeacherSpec:
    """One frozen teacher of a distillation run (YAML: an entry of ``teachers:``).

    Attributes:
        name: key of this teacher's adaptor, losses and logs (e.g. ``"clip"``).
        family: ``open_clip`` | ``timm`` | ``transformers``.
        model_name: the family's model name (module docstring).
        checkpoint: local weights file / HF directory; ``None`` = random init (tests, demo).
        pretrained: weights are required (then ``checkpoint`` must be set; nothing is downloaded).
        input_size: the teacher's native square input size in pixels; 0 = run at the student's resolution
            (scale-equivariant teachers; same as ``match_student_resolution``, probed at 224).
        patch_size: teacher patch size; inferred from the model when ``None``.
        use_summary / use_features: which outputs are distilled.
        token_slot: the student's summary (CLS) token index matched to this teacher (``None``: next free).
        summary_weight / feature_weight: loss weights.
        normalizer: feature normaliser name (``phi_s``, ``channel``, ... ``None`` = the run's default).
        upsample_factor: feature target upsampling ``u`` (pixel-shuffle head / FeatSharp).
        featsharp_checkpoint: a trained FeatSharp upsampler (safetensors) producing the ``u``-times targets.
        partitions: resolution partitions this teacher runs on (empty = all).
        match_student_resolution: run at the student's resolution instead of ``input_size``.
        model_kwargs: extra constructor arguments (timm kwargs, open_clip model config, HF config kwargs).
        mean / std: override the input normalisation (defaults come from the model's config).
        width / depth / heads: size of a ``toy`` teacher.
        gelu_epilogue: run each MLP's first Linear + GELU (timm ``Mlp``, open_clip blocks) as one cuBLASLt GEMM
            with a GELU epilogue on CUDA bf16 / fp16 (``mmfm.kernels.linear_gelu``). That GELU is the tanh
            approximation, on every device: bf16 outputs move by less than the teacher's own rounding (the
            op's docstring).
    """

    name: str
    family: Literal["open_clip", "timm", "transformers", "toy"] = "timm"
    model_name: str = ""
    checkpoint: str | None = None
    pretrained: bool = False
    input_size: int = 224
    patch_size: int | None = None
    use_summary: bool = True
    use_features: bool = True
    token_slot: int | None = None
    summary_weight: float = 1.0
    feature_weight: float = 1.0
    normalizer: str | None = None
    upsample_factor: int = 1
    featsharp_checkpoint: str | None = None
    partitions: list[str] = field(default_factory=list)
    match_student_resolution: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    gelu_epilogue: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("open_clip", "timm", "transformers", "toy"):
            raise ValueError(f"TeacherSpec {self.name!r}: family must be 'open_clip', 'timm', 'transformers' or "
                             f"'toy', got {self.family!r}")
        if int(self.input_size) < 0:
            raise ValueError(f"TeacherSpec {self.name!r}: input_size must be >= 0 (0 = student resolution), "
                             f"got {self.input_size}")
        if self.input_size == 0:
            self.match_student_resolution = True
        if int(self.upsample_factor) < 1:
            raise ValueError(f"TeacherSpec {self.name!r}: upsample_factor must be >= 1, got {self.upsample_factor}")
        if self.pretrained and not self.checkpoint:
            raise ValueError(f"TeacherSpec {self.name!r}: pretrained=True needs a local `checkpoint` path "
                             "(mmfm never downloads weights); set checkpoint or pretrained=false for random init")


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``); unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}`` containers."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path!r} (set TeacherSpec.checkpoint to an "
                                "existing local file, or null for random init)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"teacher checkpoint {path!r} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _strip(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    for p in prefixes:
        if any(k.startswith(p) for k in state):
            return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: Sequence[str] = ()) -> None:
    res = module.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not any(k.startswith(i) for i in ignore)]
    if missing:
        raise ValueError(f"{what}: checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}; "
                         "is it a checkpoint of this model_name / config?")


class Teacher(nn.Module):
    """Frozen teacher wrapper (module docstring). Subclasses implement ``extract(x)`` on normalised inputs.

    Attributes: ``spec``, ``model``, ``input_size`` (int), ``patch_size`` (int), buffers ``mean``/``std``
    (1, 3, 1, 1).
    """

    def __init__(self, spec: TeacherSpec, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 patch_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.input_size = int(spec.input_size) or 224  # 0: runs at the given size; 224 is the probe size
        self.patch_size = int(spec.patch_size or patch_size)
        mean = spec.mean if spec.mean is not None else mean
        std = spec.std if spec.std is not None else std
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> Teacher:
        # teachers are frozen: stay in eval mode whatever the trainer does
        super().train(False)
        return self

    def target_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The size the teacher runs at for an input of ``hw``."""
        if self.spec.match_student_resolution:
            p = self.patch_size
            return max(p, hw[0] // p * p), max(p, hw[1] // p * p)
        return self.input_size, self.input_size

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, 3, H, W) -> (summary (B, C_s), features (B, C_f, h, w)); overridden per family."""
        out = self.model(x)
        if isinstance(out, tuple) and len(out) == 2:
            return out
        raise TypeError(f"{type(self.model).__name__} does not return (summary, features); use a Teacher family")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> (summary (B, C_s) float32, features (B, C_f, h, w) float32)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"teacher {self.spec.name!r}: images must be (B, 3, H, W) in [0, 1], got {shape}")
        size = self.target_size((images.shape[-2], images.shape[-1]))
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        low = self.low_precision_weights()
        if low is not None:
            # weights already in bf16/fp16 (the trainer stores them so on bf16 GPU runs): run natively, without
            # autocast, whose fp32 LayerNorm outputs and re-casts cost ~10% of a ViT-L's time (the residual
            # stream is bf16 under autocast too, so only where the LN output is rounded changes)
            x = x.to(low)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and low is None):
            summary, feats = self.extract(x)
        return summary.float(), feats.float()

    def low_precision_weights(self) -> torch.dtype | None:
        """bf16/fp16 when every floating-point weight of the model has that dtype, else None (autocast)."""
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        dtypes |= {b.dtype for b in self.model.buffers() if b.is_floating_point()}
        if len(dtypes) == 1 and (d := dtypes.pop()) in (torch.bfloat16, torch.float16):
            return d
        return None


def _tokens_to_nchw(tokens: torch.Tensor, hw: tuple[int, int], prefix: int, who: str) -> torch.Tensor:
    """(B, P + h*w, C) -> (B, C, h, w) dropping the first ``prefix`` tokens."""
    b, n, c = tokens.shape
    h, w = hw
    if n - prefix != h * w:
        raise ValueError(f"{who}: {n} tokens minus {prefix} prefix tokens is not the {h}x{w} patch grid")
    return tokens[:, prefix:].transpose(1, 2).reshape(b, c, h, w)


class OpenClipTeacher(Teacher):
    """open_clip image tower (``model`` = ``CLIP.visual``)."""

    def extract(self, x):
        out = self.model.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NCHW")
        return out["image_features"], out["image_intermediates"][-1]


class TimmTeacher(Teacher):
    """timm model with ``forward_features`` / ``forward_head``."""

    def extract(self, x):
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # SAM-style neck output (B, C, h, w): no summary token, use the mean
            return feats.mean(dim=(2, 3)), feats
        hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        spatial = _tokens_to_nchw(feats, hw, prefix, f"timm teacher {self.spec.name!r}")
        if hasattr(self.model, "forward_head"):
            summary = self.model.forward_head(feats, pre_logits=True)
            if summary.ndim == 2:
                return summary, spatial
        summary = feats[:, 0] if prefix > 0 else spatial.mean(dim=(2, 3))
        return summary, spatial


class HFTeacher(Teacher):
    """transformers vision model (SigLIP, SigLIP2, DINOv2/v3, SAM, RADIO)."""

    def extract(self, x):
        kind = self.spec.model_name
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if kind == "siglip2":
            b = x.shape[0]
            patches = x.reshape(b, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * 3)
            shapes = torch.tensor([[h, w]] * b, device=x.device, dtype=torch.long)
            mask = torch.ones(b, h * w, device=x.device, dtype=torch.long)
            out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        else:
            out = self.model(pixel_values=x)
        if kind == "radio":
            return out.summary, _tokens_to_nchw(out.features, (h, w), 0, "radio teacher")
        last = out.last_hidden_state
        if last.ndim == 4:  # SAM vision encoder: (B, C, h, w) neck output
            return last.mean(dim=(2, 3)), last
        prefix = last.shape[1] - h * w
        spatial = _tokens_to_nchw(last, (h, w), prefix, f"transformers teacher {self.spec.name!r}")
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None and pooled.ndim == 2:
            return pooled, spatial
        return (last[:, 0] if prefix > 0 else spatial.mean(dim=(2, 3))), spatial


# ----------------------------------------------------------------------------------------------- builders
def _build_open_clip(spec: TeacherSpec) -> Teacher:
    import open_clip

    if spec.match_student_resolution:
        raise ValueError(f"teacher {spec.name!r}: open_clip towers have a fixed input size; set input_size > 0 "
                         "and match_student_resolution=false (or use a timm/toy teacher with dynamic size)")

    if spec.model_name:
        model = open_clip.create_model(spec.model_name, pretrained=None, pretrained_text=False,
                                       force_image_size=spec.input_size, **spec.model_kwargs)
    else:
        cfg = dict(spec.model_kwargs)
        if "embed_dim" not in cfg or "vision_cfg" not in cfg:
            raise ValueError(f"teacher {spec.name!r}: open_clip needs model_name or model_kwargs with "
                             f"'embed_dim' and 'vision_cfg' (got keys {sorted(cfg)})")
        vision = dict(cfg["vision_cfg"])
        vision.setdefault("image_size", spec.input_size)
        text = cfg.get("text_cfg") or {"context_length": 8, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}
        extra = {k: v for k, v in cfg.items() if k not in ("embed_dim", "vision_cfg", "text_cfg")}
        model = open_clip.model.CLIP(cfg["embed_dim"], vision, text, **extra)
    visual = model.visual
    _open_clip_packed_attention(visual)
    if spec.checkpoint:
        state = _strip(load_state_file(spec.checkpoint), ("module.", "model."))
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        _load_into(visual, state, f"teacher {spec.name!r} ({spec.checkpoint})")
    del model  # only the image tower is kept
    pcfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = pcfg.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN
    std = pcfg.get("std") or getattr(visual, "image_std", None) or CLIP_STD
    ps = getattr(visual, "patch_size", None)
    if ps is None and hasattr(visual, "trunk"):
        ps = visual.trunk.patch_embed.patch_size
    patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps or 16)
    return OpenClipTeacher(spec, visual, mean, std, patch)


def _packed_self_attention(self: nn.Module, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                           v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.attention`` for unmasked self-attention: one packed qkv projection
    and one SDPA call on (B, heads, N, head_dim) views, with the block's own ``nn.MultiheadAttention`` weights.

    ``nn.MultiheadAttention`` transposes batch-first inputs to sequence-first and back around its kernels; the
    fused inference kernel it takes under ``no_grad`` avoids that, but a compiled block cannot use it: the
    compiled ViT-L/14-336 teacher (batch 64, H100) took 62.1 ms with it and 55.1 ms with this (BENCHMARKS.md).
    Same math. Other calls (cross-attention, masks) go to open_clip's method. q_x (B, N, D) -> (B, N, D)."""
    mha = self.attn
    if k_x is not None or v_x is not None or attn_mask is not None:
        return type(self).attention(self, q_x, k_x, v_x, attn_mask)
    b, n, d = q_x.shape
    heads = mha.num_heads
    qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, d))


def _open_clip_packed_attention(model: nn.Module) -> int:
    """Route every open_clip ``ResidualAttentionBlock`` of ``model`` whose attention is a batch-first, packed,
    bias-free-extras ``nn.MultiheadAttention`` through ``_packed_self_attention``; returns how many."""
    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        mha = getattr(m, "attn", None)
        if (isinstance(m, ResidualAttentionBlock) and isinstance(mha, nn.MultiheadAttention) and mha.batch_first
                and mha._qkv_same_embed_dim and mha.in_proj_bias is not None and mha.bias_k is None
                and not mha.add_zero_attn):
            m.attention = types.MethodType(_packed_self_attention, m)
            n += 1
    return n


def _build_timm(spec: TeacherSpec) -> Teacher:
    import timm

    if not spec.model_name:
        raise ValueError(f"teacher {spec.name!r}: timm needs model_name (e.g. 'vit_large_patch14_dinov2')")
    kwargs = {"num_classes": 0, "img_size": spec.input_size or 224, **spec.model_kwargs}
    if spec.match_student_resolution:
        kwargs.setdefault("dynamic_img_size", True)  # position embeddings interpolated to any grid
    model = timm.create_model(spec.model_name, pretrained=False, **kwargs)
    _sam_attention_in_4d(model)
    _sam_contiguous_tokens(model)
    if spec.checkpoint:
        state = _strip(load_state_file(spec.checkpoint), ("module.", "model."))
        state = {k: v for k, v in state.items() if not k.startswith("head.") or k in model.state_dict()}
        _load_into(model, state, f"teacher {spec.name!r} ({spec.checkpoint})", ignore=("head.",))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    ps = model.patch_embed.patch_size if hasattr(model, "patch_embed") else 16
    patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    return TimmTeacher(spec, model, mean, std, patch)


def _rel_pos_in_qk(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                   h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold SAM's decomposed relative-position bias into the query and key, so SDPA needs no dense bias.

    The bias of query i and key j = (row kh, column kw) is ``rel_h[i, kh] + rel_w[i, kw]`` (timm's
    ``get_decomposed_rel_pos_bias``), the dot product of ``[rel_h[i], rel_w[i]]`` with the one-hot rows of
    ``kh`` and ``kw``. Appending those to q and k (the one-hots times sqrt(C), which SDPA's 1 / sqrt(C) undoes)
    gives ``q.k / sqrt(C) + bias`` in the attention kernel. timm instead materialises the bias,
    (B, heads, N, N): 8.6 GB per global block of SAM-L at 1024 px and batch 16, which cost more than the
    attention itself. q, k (B, heads, h * w, C) -> (B, heads, h * w, C') with C' = C + h + w rounded up to a
    multiple of 8 (the fused kernels' head-size granularity; the padding is zeros).
    """
    from timm.models.vision_transformer_sam import get_rel_pos

    b, heads, n, c = q.shape
    rh, rw = get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w)  # (h, h, C), (w, w, C)
    qg = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", qg, rh.to(q.dtype)).reshape(b, heads, n, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", qg, rw.to(q.dtype)).reshape(b, heads, n, w)
    pad = -(c + h + w) % 8
    kh = torch.arange(n, device=q.device) // w
    kw = torch.arange(n, device=q.device) % w
    onehot = torch.cat([F.one_hot(kh, h), F.one_hot(kw, w), kh.new_zeros(n, pad)], dim=-1).to(k.dtype) * c**0.5
    q = torch.cat([q, rel_h, rel_w, q.new_zeros(b, heads, n, pad)], dim=-1)
    k = torch.cat([k, onehot.expand(b, heads, n, h + w + pad)], dim=-1)
    return q, k


def _sam_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a timm SAM attention layer as (B, heads, H * W, C) views of one qkv projection (q / k
    normed over the head dim, as timm does on (B * heads, N, C)). x (B, H, W, D)."""
    b, h, w, _ = x.shape
    n = h * w
    q, k, v = attn.qkv(x.reshape(b, n, -1)).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _sam_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's SAM ViT attention (decomposed relative-position bias) as one fused SDPA call on 4-D inputs.

    timm passes (B * heads, N, C) and a dense (B * heads, N, N) bias; PyTorch's flash / memory-efficient
    kernels take 4-D inputs only, so a bf16 CUDA run fell back to the math kernel, which computes in fp32
    (SAM-L at 1024 px: 6% MFU on an H200, BENCHMARKS.md), and the dense bias alone took ~200 ms a step on an
    H100. Here the bias rides in q and k (``_rel_pos_in_qk``); v keeps its own head width (PyTorch 2.11 picks
    cuDNN's fused kernel for that on an H100; zero-padding v to q's width measured slower,
    ``scripts/bench_sam_attention.py``). Same math: x (B, H, W, C) -> (B, H, W, C).
    """
    b, h, w, _ = x.shape
    q, k, v = _sam_qkv(self, x)
    c = v.shape[-1]
    if self.use_rel_pos:
        q, k = _rel_pos_in_qk(q, k, self.rel_pos_h, self.rel_pos_w, h, w)
    out = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
    return self.proj(out.transpose(1, 2).reshape(b, h * w, -1)).view(b, h, w, -1)


def _sam_attention_in_4d(model: nn.Module) -> int:
    """Route the eval-time attention of a timm SAM ViT through ``_sam_attention_forward``; other models (and
    SAM variants with rotary embeddings) are left alone. Returns how many attention modules were changed."""
    try:
        from timm.models.vision_transformer_sam import Attention as SamAttention
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if (isinstance(m, SamAttention) and getattr(m, "rope", None) is None
                and all(hasattr(m, a) for a in ("q_norm", "k_norm", "use_rel_pos"))):
            m.forward = types.MethodType(_sam_attention_forward, m)
            n += 1
    return n


def _sam_contiguous_tokens(model: nn.Module) -> bool:
    """Make a timm SAM ViT's token grid contiguous once, after the patch embedding.

    timm's patch embedding returns the convolution's (B, C, H, W) output permuted to (B, H, W, C), and every
    residual add keeps that channels-first memory layout, so each of the 24 blocks of SAM-L copied its input
    for the LayerNorms and reshapes and ran its residual adds on strided tensors (~55 ms of the SAM-L teacher
    at 1024 px and batch 16 on an H100, BENCHMARKS.md). Same values. Returns whether a hook was added."""
    try:
        from timm.models.vision_transformer_sam import VisionTransformerSAM
    except ImportError:
        return False
    if not isinstance(model, VisionTransformerSAM):
        return False
    model.patch_embed.register_forward_hook(lambda module, args, out: out.contiguous())
    return True


def _gelu_epilogue_mlps(model: nn.Module) -> int:
    """Fuse the first Linear and the ``nn.GELU`` of every timm ``Mlp`` (``fc1``, ``act``) and open_clip block MLP
    (``c_fc``, ``gelu``) of ``model`` into one :class:`~mmfm.kernels.linear_gelu.LinearGELU` (same parameters and
    state-dict keys; the GELU becomes ``nn.Identity``). Returns how many MLPs were fused."""
    from mmfm.kernels.linear_gelu import LinearGELU

    try:
        from timm.layers import Mlp as TimmMlp
    except ImportError:
        TimmMlp = ()  # noqa: N806 - isinstance(m, ()) is False
    n = 0
    for m in model.modules():
        # only these two forwards are known to apply the GELU straight to the Linear's output (timm's GluMlp
        # / SwiGLU also have fc1 + act, but gate half of fc1's output)
        if type(m) is TimmMlp:
            names = ("fc1", "act")
        elif type(m) is nn.Sequential and list(m._modules)[:2] == ["c_fc", "gelu"]:
            names = ("c_fc", "gelu")
        else:
            continue
        lin_name, act_name = names
        lin, act = getattr(m, lin_name), getattr(m, act_name)
        if type(lin) is nn.Linear and isinstance(act, nn.GELU):
            setattr(m, lin_name, LinearGELU.from_linear(lin))
            setattr(m, act_name, nn.Identity())
            n += 1
    return n


_HF_KINDS = {
    # kind: (model class, config class, default mean, default std)
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", HALF, HALF),
    "siglip2": ("Siglip2VisionModel", "Siglip2VisionConfig", HALF, HALF),
    "dinov2": ("Dinov2Model", "Dinov2Config", IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", IMAGENET_MEAN, IMAGENET_STD),
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", IMAGENET_MEAN, IMAGENET_STD),
    "sam": ("SamVisionModel", "SamVisionConfig", IMAGENET_MEAN, IMAGENET_STD),
    # RadioModel normalises [0, 1] inputs itself (its input conditioner)
    "radio": ("RadioModel", "RadioConfig", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def _build_transformers(spec: TeacherSpec) -> Teacher:
    import transformers

    if spec.model_name not in _HF_KINDS:
        raise ValueError(f"teacher {spec.name!r}: transformers model_name must be one of {sorted(_HF_KINDS)}, "
                         f"got {spec.model_name!r}")
    model_cls_name, cfg_cls_name, mean, std = _HF_KINDS[spec.model_name]
    model_cls = getattr(transformers, model_cls_name)
    ckpt = spec.checkpoint
    if ckpt and os.path.isdir(ckpt):
        model = model_cls.from_pretrained(ckpt)
    else:
        if ckpt and not os.path.exists(ckpt):
            raise FileNotFoundError(f"teacher checkpoint not found: {ckpt!r} (an HF directory or a weights file)")
        kwargs = dict(spec.model_kwargs)
        if spec.model_name in ("siglip", "dinov2", "dinov2_registers", "dinov3", "sam"):
            kwargs.setdefault("image_size", spec.input_size)
        if spec.model_name == "siglip2":
            p = int(kwargs.get("patch_size", 16))
            kwargs.setdefault("num_patches", (spec.input_size // p) ** 2)
        config = getattr(transformers, cfg_cls_name)(**kwargs)
        model = model_cls(config)
        if ckpt:
            state = _strip(load_state_file(ckpt), ("module.",))
            _load_into(model, state, f"teacher {spec.name!r} ({ckpt})")
    cfg = model.config
    ps = getattr(cfg, "patch_size", 16)
    patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    if spec.model_name == "sam":
        # the SAM neck keeps the patch grid; its input is the full padded image_size
        patch = int(getattr(cfg, "patch_size", 16))
    return HFTeacher(spec, model, mean, std, patch)


def _build_toy(spec: TeacherSpec) -> Teacher:
    from timm.models.vision_transformer import VisionTransformer

    if not spec.width or not spec.depth or not spec.patch_size:
        raise ValueError(f"teacher {spec.name!r}: family 'toy' needs width, depth and patch_size "
                         f"(got width={spec.width}, depth={spec.depth}, patch_size={spec.patch_size})")
    heads = spec.heads or (4 if spec.width % 4 == 0 else 1)
    if spec.width % heads:
        raise ValueError(f"teacher {spec.name!r}: width={spec.width} is not divisible by heads={heads}")
    model = VisionTransformer(img_size=spec.input_size or 224, patch_size=spec.patch_size, embed_dim=spec.width,
                              depth=spec.depth, num_heads=heads, num_classes=0, dynamic_img_size=True,
                              **spec.model_kwargs)
    if spec.checkpoint:
        _load_into(model, load_state_file(spec.checkpoint), f"teacher {spec.name!r} ({spec.checkpoint})")
    return TimmTeacher(spec, model, HALF, HALF, spec.patch_size)


def build_teacher(spec: TeacherSpec) -> Teacher:
    """A frozen :class:`Teacher` from its spec (random init unless ``spec.checkpoint``)."""
    if not isinstance(spec, TeacherSpec):
        raise TypeError(f"build_teacher: expected TeacherSpec, got {type(spec).__name__}")
    if spec.checkpoint and not os.path.exists(spec.checkpoint):
        raise FileNotFoundError(f"teacher {spec.name!r}: checkpoint not found: {spec.checkpoint!r} (set "
                                "TeacherSpec.checkpoint to an existing local file/directory, or null for random init)")
    builder = {"open_clip": _build_open_clip, "timm": _build_timm, "transformers": _build_transformers,
               "toy": _build_toy}[spec.family]
    teacher = builder(spec)
    if spec.gelu_epilogue and not _gelu_epilogue_mlps(teacher.model):
        raise ValueError(f"teacher {spec.name!r}: gelu_epilogue=true but its model has no Linear + nn.GELU MLP "
                         "(timm Mlp or open_clip block) to fuse; set gelu_epilogue: false")
    if spec.input_size % teacher.patch_size and not spec.match_student_resolution:
        raise ValueError(f"teacher {spec.name!r}: input_size={spec.input_size} is not a multiple of its patch size "
                         f"{teacher.patch_size}; use e.g. {math.ceil(spec.input_size / teacher.patch_size) * teacher.patch_size}")
    return teacher
