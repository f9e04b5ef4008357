"""Per-teacher adaptor heads: map the student's class token and patch features into a teacher's space.

A ``TeacherAdaptor`` holds
- ``summary``: a residual MLP ("v2") from the student's class token at ``head_idx`` to the teacher summary;
- ``feature``: a residual MLP from each patch feature to the teacher's features, optionally predicting a
  ``u x u`` finer grid by pixel shuffle (the MLP outputs ``u*u*C`` channels per token, laid out ``(u1, u2, c)``),
  or an attention head (transformer blocks over the patch grid, then the MLP).

Residual MLP v2::

    [LN -> GELU]? -> fc1 Linear(in, hidden) -> [x + Linear(GELU(LN(x)))] * k -> LN -> GELU -> Linear(hidden, out)

Every shape (in, hidden, out, k, number of attention blocks) is read back from a state dict
(``*_spec_from_state``); only ``head_idx``, ``upsample_factor`` and the attention head count are metadata.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from mmfm.radio.vit import Block

__all__ = [
    "AdaptorSpec",
    "AttnFeatureHead",
    "MLPSpec",
    "ResidualMLP",
    "TeacherAdaptor",
    "adaptor_from_state",
    "mlp_spec_from_state",
    "pixel_shuffle_tokens",
]


@dataclass
class MLPSpec:
    """Shapes of a ``ResidualMLP``: ``out_dim`` is per output token, i.e. before the ``u*u`` expansion."""

    in_dim: int
    hidden_dim: int
    out_dim: int
    num_inner: int = 1
    pre_norm: bool = False
    upsample_factor: int = 1


class ResidualMLP(nn.Module):
    """Residual MLP v2 (module docstring). (..., in_dim) -> (..., out_dim * upsample_factor**2)."""

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self.spec = spec
        self.pre_norm = nn.Sequential(nn.LayerNorm(spec.in_dim), nn.GELU()) if spec.pre_norm else nn.Identity()
        self.fc1 = nn.Linear(spec.in_dim, spec.hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(spec.hidden_dim), nn.GELU(), nn.Linear(spec.hidden_dim, spec.hidden_dim))
            for _ in range(spec.num_inner))
        self.final = nn.Sequential(nn.LayerNorm(spec.hidden_dim), nn.GELU(),
                                   nn.Linear(spec.hidden_dim, spec.out_dim * spec.upsample_factor**2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.pre_norm(x))
        for blk in self.blocks:
            x = x + blk(x)
        return self.final(x)


def pixel_shuffle_tokens(x: torch.Tensor, grid: tuple[int, int], u: int) -> torch.Tensor:
    """(B, h*w, u*u*C) with channels ``(u1, u2, c)`` -> (B, (h*u)*(w*u), C), row-major on the finer grid."""
    if u == 1:
        return x
    b, n, cu = x.shape
    h, w = grid
    c = cu // (u * u)
    x = x.reshape(b, h, w, u, u, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * u * w * u, c)


class AttnFeatureHead(nn.Module):
    """Attention feature head: ``depth`` pre-norm transformer blocks (LayerScale) over the patch tokens, then
    a ``ResidualMLP``. (B, N, D) -> (B, N, out * u*u)."""

    def __init__(self, dim: int, num_heads: int, mlp: MLPSpec, depth: int = 2, layer_scale_init: float = 1e-5,
                 block_mlp_hidden: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        hidden = block_mlp_hidden if block_mlp_hidden is not None else 4 * dim
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, hidden, layer_scale_init=layer_scale_init) for _ in range(depth))
        self.mlp = ResidualMLP(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.mlp(x)


@dataclass
class AdaptorSpec:
    """Metadata of one teacher adaptor that shapes alone cannot give.

    Attributes:
        head_idx: the student class token that feeds the summary head.
        upsample_factor: u of the feature head's pixel shuffle.
        feature_head: ``"mlp"`` or ``"attn"``.
        attn_heads: attention heads of an ``"attn"`` feature head.
    """

    head_idx: int = 0
    upsample_factor: int = 1
    feature_head: str = "mlp"
    attn_heads: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TeacherAdaptor(nn.Module):
    """Summary + feature heads of one teacher.

    Args:
        spec: metadata (``head_idx``, ``upsample_factor``, head type).
        summary: MLP spec of the summary head, or ``None`` for teachers without a summary target.
        feature: MLP spec of the feature head (its ``upsample_factor`` must equal ``spec.upsample_factor``),
            or ``None`` for summary-only teachers.
        attn_depth: transformer blocks of an ``"attn"`` feature head.
        attn_mlp_hidden: MLP width inside those blocks (default 4 * D).
    """

    def __init__(self, spec: AdaptorSpec, summary: MLPSpec | None, feature: MLPSpec | None,
                 attn_depth: int = 2, attn_mlp_hidden: int | None = None) -> None:
        super().__init__()
        if summary is None and feature is None:
            raise ValueError("an adaptor needs a summary head, a feature head, or both")
        if spec.feature_head not in ("mlp", "attn"):
            raise ValueError(f"feature_head must be 'mlp' or 'attn', got {spec.feature_head!r}")
        self.spec = spec
        self.summary = ResidualMLP(summary) if summary is not None else None
        self.feature: nn.Module | None = None
        if feature is not None:
            feature.upsample_factor = spec.upsample_factor
            if spec.feature_head == "attn":
                self.feature = AttnFeatureHead(feature.in_dim, spec.attn_heads, feature, depth=attn_depth,
                                               block_mlp_hidden=attn_mlp_hidden)
            else:
                self.feature = ResidualMLP(feature)

    @property
    def head_idx(self) -> int:
        return self.spec.head_idx

    @property
    def upsample_factor(self) -> int:
        return self.spec.upsample_factor

    def forward_summary(self, cls_tokens: torch.Tensor) -> torch.Tensor | None:
        """cls_tokens (B, num_cls, D) -> teacher summary (B, D_t), or None without a summary head."""
        if self.summary is None:
            return None
        if not 0 <= self.head_idx < cls_tokens.shape[1]:
            raise ValueError(f"adaptor head_idx {self.head_idx} is out of range for {cls_tokens.shape[1]} "
                             "class tokens")
        return self.summary(cls_tokens[:, self.head_idx])

    def forward_features(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        """features (B, h*w, D) -> teacher features (B, (h*u)*(w*u), D_t) row-major, or None."""
        if self.feature is None:
            return None
        return pixel_shuffle_tokens(self.feature(features), grid, self.upsample_factor)


# ---- shapes from a state dict
def mlp_spec_from_state(state: Mapping[str, torch.Tensor], prefix: str = "", upsample_factor: int = 1) -> MLPSpec:
    """Read a ``ResidualMLP``'s shapes from its weights (keys under ``prefix``)."""
    try:
        fc1 = state[prefix + "fc1.weight"]
        last = state[prefix + "final.2.weight"]
    except KeyError as err:
        raise ValueError(f"state dict has no residual MLP under {prefix!r}: missing key {err}") from None
    inner = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    out_total = last.shape[0]
    if out_total % (upsample_factor**2):
        raise ValueError(f"{prefix}final.2.weight has {out_total} outputs, not a multiple of "
                         f"upsample_factor**2 = {upsample_factor**2}")
    return MLPSpec(in_dim=fc1.shape[1], hidden_dim=fc1.shape[0], out_dim=out_total // upsample_factor**2,
                   num_inner=len(inner), pre_norm=(prefix + "pre_norm.0.weight") in state,
                   upsample_factor=upsample_factor)


def adaptor_from_state(state: Mapping[str, torch.Tensor], spec: AdaptorSpec, prefix: str = "") -> TeacherAdaptor:
    """Build a ``TeacherAdaptor`` whose shapes match ``state`` (keys ``summary.*``/``feature.*`` under prefix)
    and load the weights into it."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    summary = mlp_spec_from_state(sub, "summary.") if any(k.startswith("summary.") for k in sub) else None
    feature = None
    attn_depth, attn_hidden = 2, None
    if any(k.startswith("feature.") for k in sub):
        mlp_prefix = "feature.mlp." if spec.feature_head == "attn" else "feature."
        feature = mlp_spec_from_state(sub, mlp_prefix, spec.upsample_factor)
        if spec.feature_head == "attn":
            attn_depth = len({int(m.group(1)) for k in sub if (m := re.match(r"feature\.blocks\.(\d+)\.", k))})
            if "feature.blocks.0.mlp.fc1.weight" in sub:
                attn_hidden = sub["feature.blocks.0.mlp.fc1.weight"].shape[0]
    adaptor = TeacherAdaptor(spec, summary, feature, attn_depth=attn_depth, attn_mlp_hidden=attn_hidden)
    missing, unexpected = adaptor.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise ValueError(f"adaptor state dict under {prefix!r} does not match its inferred shapes: "
                         f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
    return adaptor

