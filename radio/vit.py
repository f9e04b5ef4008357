"""Student ViT with cropped position embedding, per-teacher class tokens and registers (own module).

Layout of one forward pass on normalised images ``x (B, 3, H, W)``, patch ``p``, grid ``h = H/p, w = W/p``::

    patchify  (B, h*w, 3*p*p)  channel-major patches (c, py, px), the layout of transformers' RadioModel
    proj      Linear(3*p*p -> D, no bias)
    + CPE     (cpe.py: random crop per sample in training, top-left window of the resized grid in eval)
    prefix    [num_cls_tokens class tokens, num_registers registers] prepended -> (B, S + h*w, D)
    blocks    pre-norm transformer blocks (SDPA attention; optional ViTDet windows; optional LayerScale)
    norm      optional final LayerNorm (RADIO students usually have none)

Class token ``i`` is trained against teacher ``i``'s summary; registers carry no target.

ViTDet windowed attention (``window_size`` in tokens, ``global_blocks`` = indices of blocks that keep global
attention): patch tokens are permuted once into window-contiguous order so that a windowed block only
reshapes ``(B, N, D) -> (B * nW, ws*ws, D)``; the prefix tokens sit out windowed blocks and rejoin at global
ones. Inputs must then be multiples of ``patch * window_size``.

Building blocks (``Attention``, ``Mlp``, ``Block``) and ``ViT.run_blocks`` / ``ViT.forward_sequence`` are
public so that PS3 can run the same blocks on selected tokens with its own position embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from mmfm.radio.cpe import CroppedPositionEmbedding

__all__ = [
    "Attention",
    "Block",
    "LayerScale",
    "Mlp",
    "ViT",
    "ViTConfig",
    "ViTFeatures",
    "VIT_SIZES",
    "create_student",
    "patchify",
]


@dataclass
class ViTConfig:
    """Hyper-parameters of the student ViT.

    Attributes:
        embed_dim, depth, num_heads: width D, number of blocks, attention heads (D % num_heads == 0).
        mlp_hidden_dim: MLP width; ``None`` means ``round(mlp_ratio * D)``.
        patch_size: 16 (14 allowed).
        max_resolution: largest supported side in pixels; the CPE grid has ``max_resolution // patch`` per side.
        preferred_resolution: the resolution the model was (or will mostly be) trained at.
        num_cls_tokens: class tokens, one per teacher with a summary target.
        num_registers: extra prefix tokens without a target.
        qkv_bias: bias on the fused qkv projection.
        layer_norm_eps: LayerNorm epsilon (1e-6 as in timm/transformers ViTs).
        layer_scale_init: LayerScale init value; ``None`` disables LayerScale.
        final_norm: apply a LayerNorm after the last block.
        pos_dropout, cpe_min_area, cpe_aspect_range: CPE training augmentation (cpe.py).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        window_size: ViTDet window side in tokens; ``None`` = all blocks global.
        global_blocks: indices of blocks with global attention when windowed; ``None`` = the last block of
            each quarter of the depth.
        grad_checkpointing: recompute blocks in backward to save activation memory.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_hidden_dim: int | None = None
    patch_size: int = 16
    in_chans: int = 3
    max_resolution: int = 2048
    preferred_resolution: int = 512
    num_cls_tokens: int = 1
    num_registers: int = 0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    final_norm: bool = False
    pos_dropout: float = 0.1
    cpe_min_area: float = 0.1
    cpe_aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    drop_path_rate: float = 0.0
    window_size: int | None = None
    global_blocks: tuple[int, ...] | None = None
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.cpe_aspect_range = tuple(self.cpe_aspect_range)
        if self.global_blocks is not None:
            self.global_blocks = tuple(int(i) for i in self.global_blocks)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_size < 1 or self.max_resolution % self.patch_size:
            raise ValueError(f"max_resolution {self.max_resolution} must be a multiple of patch_size "
                             f"{self.patch_size}")
        if self.num_cls_tokens < 0 or self.num_registers < 0:
            raise ValueError("num_cls_tokens and num_registers must be >= 0")
        if self.window_size is not None and self.window_size < 1:
            raise ValueError(f"window_size must be >= 1 or None, got {self.window_size}")

    @property
    def mlp_dim(self) -> int:
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else int(round(self.mlp_ratio * self.embed_dim))

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    def resolved_global_blocks(self) -> tuple[int, ...]:
        """Indices of blocks with global attention (all of them when not windowed)."""
        if self.window_size is None:
            return tuple(range(self.depth))
        if self.global_blocks is not None:
            return tuple(sorted(set(self.global_blocks)))
        period = max(1, self.depth // 4)
        glob = {i for i in range(self.depth) if (i + 1) % period == 0}
        glob.add(self.depth - 1)
        return tuple(sorted(glob))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpe_aspect_range"] = list(self.cpe_aspect_range)
        if self.global_blocks is not None:
            d["global_blocks"] = list(self.global_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; valid fields: {sorted(valid)}")
        return cls(**d)


# Sizes. tiny is for tests; the others follow the ViT / SigLIP-SO400M shapes RADIO students use.
VIT_SIZES: dict[str, ViTConfig] = {
    "tiny": ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, max_resolution=512,
                      preferred_resolution=64),
    "B": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "L": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "H": ViTConfig(embed_dim=1280, depth=32, num_heads=16),
    "g": ViTConfig(embed_dim=1536, depth=40, num_heads=24),
    "SO400M": ViTConfig(embed_dim=1152, depth=27, num_heads=16, mlp_hidden_dim=4304),
}


def create_student(size: str = "B", patch_size: int = 16, **overrides: Any) -> ViT:
    """Build a randomly initialised student ViT.

    Args:
        size: one of ``VIT_SIZES`` (``tiny``, ``B``, ``L``, ``H``, ``g``, ``SO400M``), optionally written with
            the patch, e.g. ``"H/16"`` or ``"vit_l_14"``-style ``"L/14"``.
        patch_size: 16 or 14 (ignored if ``size`` names a patch).
        **overrides: any ``ViTConfig`` field (``num_cls_tokens=3``, ``num_registers=4``, ``window_size=16``, ...).
    """
    name = size
    if "/" in size:
        name, p = size.split("/", 1)
        patch_size = int(p)
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)} (optionally '/16' or '/14')")
    if patch_size not in (14, 16) and name != "tiny":
        raise ValueError(f"patch_size must be 16 or 14 for size {name}, got {patch_size}")
    base = VIT_SIZES[name]
    cfg_kw: dict[str, Any] = {"patch_size": patch_size}
    if patch_size != 16:
        # keep the same number of tokens per side at the maximum resolution (2048 / 16 = 128 -> 1792 at p14)
        cfg_kw["max_resolution"] = base.max_resolution // 16 * patch_size
        cfg_kw["preferred_resolution"] = base.preferred_resolution // 16 * patch_size
    cfg_kw.update(overrides)
    valid = {f.name for f in fields(ViTConfig)}
    bad = sorted(set(cfg_kw) - valid)
    if bad:
        raise TypeError(f"unknown ViTConfig fields {bad}; valid fields: {sorted(valid)}")
    return ViT(replace(base, **cfg_kw))


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), row-major patches, each flattened channel-major (c, py, px)."""
    b, c, hh, ww = x.shape
    h, w = hh // patch_size, ww // patch_size
    x = x.reshape(b, c, h, patch_size, w, patch_size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h * w, c * patch_size * patch_size)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


_SDPA_NAMES = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and ``F.scaled_dot_product_attention``.

    ``qkv.weight`` rows are ``[q; k; v]``, each head-major (head h owns rows ``h*hd:(h+1)*hd``).
    ``sdpa_backends`` (``set_sdpa_backends``) optionally fixes SDPA's kernel preference order, e.g.
    ``("cudnn", "flash")`` on Hopper; ``None`` keeps PyTorch's default choice.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sdpa_backends: list[SDPBackend] | None = None

    def set_sdpa_backends(self, names: Sequence[str] | None) -> None:
        """Preferred SDPA kernels, best first (``flash``, ``cudnn``, ``efficient``, ``math``); ``None`` = default.
        The math kernel is always kept as the last resort."""
        if names is None:
            self.sdpa_backends = None
            return
        bad = [n for n in names if n not in _SDPA_NAMES]
        if bad:
            raise ValueError(f"unknown SDPA backends {bad}; choose from {sorted(_SDPA_NAMES)}")
        order = [_SDPA_NAMES[n] for n in names]
        self.sdpa_backends = order + [b for b in _SDPA_NAMES.values() if b not in order]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), optional additive/boolean ``attn_mask`` broadcastable to (B, heads, N, N) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
        if self.sdpa_backends is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            with sdpa_kernel(self.sdpa_backends, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU (exact) -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + layer_scale1(attn(norm1(x)))`` then ``x + layer_scale2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True, eps: float = 1e-6,
                 layer_scale_init: float | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.layer_scale1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.layer_scale2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_path == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        x = x + self._drop(self.layer_scale1(self.attn(self.norm1(x), attn_mask)))
        return x + self._drop(self.layer_scale2(self.mlp(self.norm2(x))))


class ViTFeatures(NamedTuple):
    """Backbone tokens after the final norm: class tokens (B, num_cls, D), registers (B, R, D),
    patch features (B, h*w, D) row-major."""

    cls_tokens: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor


class ViT(nn.Module):
    """Student ViT (see module docstring). Expects normalised images; ``RadioEncoder`` does the conditioning.

    State dict: ``patch_embed.proj.weight (D, 3p²)``, ``pos_embed.weight (1, G², D)``,
    ``prefix_tokens (num_cls + num_registers, D)``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,layer_scale1.lambda1,norm2,
    mlp.fc1,mlp.fc2,layer_scale2.lambda1}``, ``norm`` (if ``final_norm``).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(cfg.in_chans * cfg.patch_size**2, d, bias=False)
        self.pos_embed = CroppedPositionEmbedding(d, cfg.max_resolution // cfg.patch_size, cfg.pos_dropout,
                                                  cfg.cpe_min_area, cfg.cpe_aspect_range)
        self.prefix_tokens = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, d))
        dpr = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_dim, cfg.qkv_bias, cfg.layer_norm_eps, cfg.layer_scale_init, dpr[i])
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        self._global = set(cfg.resolved_global_blocks())
        self.grad_checkpointing = cfg.grad_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prefix_tokens, std=0.02)

    # ---- properties
    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def num_cls_tokens(self) -> int:
        return self.cfg.num_cls_tokens

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    @property
    def max_resolution(self) -> int:
        return self.cfg.max_resolution

    @property
    def preferred_resolution(self) -> int:
        return self.cfg.preferred_resolution

    @property
    def min_resolution_step(self) -> int:
        """H and W must be multiples of this: the patch size, times the window size when windowed."""
        return self.cfg.patch_size * (self.cfg.window_size or 1)

    @property
    def is_windowed(self) -> bool:
        return self.cfg.window_size is not None and len(self._global) < self.cfg.depth

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_sdpa_backends(self, names: Sequence[str] | None) -> None:
        """Preferred SDPA kernels of every block (see ``Attention.set_sdpa_backends``)."""
        for blk in self.blocks:
            blk.attn.set_sdpa_backends(names)

    def compile_blocks(self, **kwargs: Any) -> None:
        """``torch.compile`` each block in place (fuses LayerNorm / bias / GELU / residual kernels).

        All blocks share one ``Block.forward``, so the compiled graph is built once per input shape and reused
        by every block; ``kwargs`` go to ``nn.Module.compile``.
        """
        for blk in self.blocks:
            blk.compile(**kwargs)

    # ---- embedding
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images (B, C, H, W) -> tokens (B, S + h*w, D) (prefix first) and the grid (h, w)."""
        p = self.cfg.patch_size
        b, _, hh, ww = x.shape
        h, w = hh // p, ww // p
        patches = self.patch_embed.proj(patchify(x, p))
        patches = patches + self.pos_embed(b, h, w).to(patches.dtype)
        prefix = self.prefix_tokens.to(patches.dtype).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([prefix, patches], dim=1), (h, w)

    # ---- blocks
    def _run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _window_perm(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Permutation putting each ws x ws window's patches contiguously (row-major windows, row-major inside)."""
        ws = self.cfg.window_size
        idx = torch.arange(h * w, device=device).reshape(h // ws, ws, w // ws, ws)
        return idx.permute(0, 2, 1, 3).reshape(-1)

    def run_blocks(self, x: torch.Tensor, grid: tuple[int, int] | None = None, start: int = 0,
                   end: int | None = None, collect: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks ``start..end-1`` on a token sequence.

        Args:
            x: (B, S + N, D) with the ``S = num_prefix_tokens`` prefix tokens first. For windowed models the N
                patch tokens must be the row-major ``h x w`` ``grid``.
            grid: (h, w) of the patch tokens; required only for windowed models (ignored otherwise).
            collect: block indices whose outputs to return (same layout as ``x``).

        Returns:
            ``(tokens (B, S + N, D), {block index: (B, S + N, D)})``; the final norm is not applied.
        """
        end = self.cfg.depth if end is None else end
        want = set(collect)
        out: dict[int, torch.Tensor] = {}
        windowed = self.is_windowed and any(i not in self._global for i in range(start, end))
        if not windowed:
            for i in range(start, end):
                x = self._run_block(i, x)
                if i in want:
                    out[i] = x
            return x, out
        if grid is None:
            raise ValueError("grid=(h, w) is required to run windowed-attention blocks")
        h, w = grid
        ws = self.cfg.window_size
        if h % ws or w % ws:
            raise ValueError(f"token grid {h}x{w} is not a multiple of the window size {ws}; "
                             f"use images that are multiples of {self.min_resolution_step} px")
        s = self.num_prefix_tokens
        b, _, d = x.shape
        perm = self._window_perm(h, w, x.device)
        inv = torch.argsort(perm)
        prefix, patches = x[:, :s], x[:, s:].index_select(1, perm)
        n_win = (h // ws) * (w // ws)
        for i in range(start, end):
            if i in self._global:
                y = self._run_block(i, torch.cat([prefix, patches], dim=1))
                prefix, patches = y[:, :s], y[:, s:]
            else:
                # the prefix tokens sit out windowed blocks
                patches = self._run_block(i, patches.reshape(b * n_win, ws * ws, d)).reshape(b, h * w, d)
            if i in want:
                out[i] = torch.cat([prefix, patches.index_select(1, inv)], dim=1)
        return torch.cat([prefix, patches.index_select(1, inv)], dim=1), out

    def forward_sequence(self, patch_tokens: torch.Tensor, pos_embed: torch.Tensor | None,
                         grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Run the whole transformer on already-projected patch tokens with a caller-given position embedding.

        For PS3-style selective encoding: ``patch_tokens (B, N, D)`` (e.g. ``patch_embed.proj(patchify(x))``
        gathered at selected positions), ``pos_embed`` (B or 1, N, D) (e.g. gathered from
        ``pos_embed.window(h, w)``) or ``None``. Returns all tokens (B, S + N, D) after the final norm.
        """
        x = patch_tokens if pos_embed is None else patch_tokens + pos_embed.to(patch_tokens.dtype)
        b = x.shape[0]
        prefix = self.prefix_tokens.to(x.dtype).unsqueeze(0).expand(b, -1, -1)
        x, _ = self.run_blocks(torch.cat([prefix, x], dim=1), grid=grid)
        return self.norm(x)

    # ---- forward
    def split(self, tokens: torch.Tensor) -> ViTFeatures:
        c, s = self.num_cls_tokens, self.num_prefix_tokens
        return ViTFeatures(tokens[:, :c], tokens[:, c:s], tokens[:, s:])

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> all tokens after the final norm (B, S + h*w, D)."""
        tokens, grid = self.embed(x)
        tokens, _ = self.run_blocks(tokens, grid)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> ViTFeatures:
        """Normalised images (B, C, H, W) -> ``ViTFeatures(cls (B, C_cls, D), registers, patches (B, h*w, D))``."""
        return self.split(self.forward_tokens(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int], norm: bool = False,
                              stop_early: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Tokens after the given blocks.

        Args:
            x: normalised images (B, C, H, W).
            indices: block indices (negative counts from the end).
            norm: apply the final norm to each intermediate.
            stop_early: skip the blocks after the last requested one (then the final output is ``None``).

        Returns:
            ``(final tokens (B, S + h*w, D) or None, [tokens (B, S + h*w, D) per index, in the given order])``.
        """
        depth = self.cfg.depth
        idx = [i + depth if i < 0 else i for i in indices]
        bad = [i for i, j in zip(indices, idx) if not 0 <= j < depth]
        if bad:
            raise ValueError(f"block indices {bad} are out of range for depth {depth}")
        tokens, grid = self.embed(x)
        end = max(idx) + 1 if (stop_early and idx) else depth
        tokens, got = self.run_blocks(tokens, grid, end=end, collect=idx)
        inter = [self.norm(got[i]) if norm else got[i] for i in idx]
        final = self.norm(tokens) if end == depth else None
        return final, inter

    def forward(self, x: torch.Tensor) -> ViTFeatures:
        return self.forward_features(x)
