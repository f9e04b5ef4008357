"""PS3 high-resolution encoder: a global low-res pass, region selection, and a local pass over only the
selected high-resolution patches.

One ViT (``mmfm.radio.vit``) serves both passes.

1. **Global pass**: the image is resized to ``base_resolution`` (square), giving a ``g x g`` token grid
   (``g = base_resolution / patch``). Each block's keys/values are kept.
2. **Saliency**: per scale ``s`` in ``scales`` a map over that scale's ``(g*s) x (g*s)`` patch grid.
   Bottom-up: a light head on the global patch features predicts one logit per scale per low-res token.
   Top-down: a prompt embedding (text tower, or an LLM hidden state through ``prompt_dim``) is scored
   against the global patch features, plus a learned per-scale bias. Low-res maps are upsampled
   bilinearly to each scale's grid and optionally smoothed (``smooth_kernel``) so picks form regions.
3. **Selection**: the top ``num_look_close`` patches over all scales (or ``"all"``); ``force`` masks
   (training: the patches inside annotated boxes) are always taken first.
4. **Local pass**: each selected patch's pixels are sampled straight from the full-size image
   (``grid_sample`` of a ``p x p`` grid at that patch's location at scale ``s``), embedded with the ViT's
   patch projection, and run through the same blocks, attending to each other and to the global
   tokens' cached keys/values. Cost grows with the budget ``k``, not with the image size.

Position scheme: a patch at scale ``s`` and grid position ``(y, x)`` gets the ViT's CPE inference
embedding of the ``(g*s) x (g*s)`` grid at ``(y, x)`` (the learned grid resized to that grid, i.e. the
patch's absolute location in the image), plus a learned embedding of the scale index. The global pass
uses scale index 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.ps3.context_attention import block_forward
from mmfm.radio.vit import ViT, ViTConfig, create_student

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class PS3Config:
    """PS3 encoder. ``vit`` holds ``mmfm.radio.vit.create_student`` overrides (size via ``vit_size``)."""

    vit_size: str = "tiny"
    patch_size: int = 16
    vit: dict[str, Any] = field(default_factory=dict)
    base_resolution: int = 256
    scales: tuple[int, ...] = (2, 4)
    embed_dim: int = 64  # contrastive embedding width
    prompt_dim: int = 64  # width of prompt embeddings (text tower output or an LLM hidden state)
    smooth_kernel: int = 3
    num_look_close: int = 64

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        if self.base_resolution % self.patch_size:
            raise ValueError(f"base_resolution {self.base_resolution} must be a multiple of the patch size "
                             f"{self.patch_size}")
        if not self.scales or any(s < 2 for s in self.scales):
            raise ValueError(f"scales must be integers >= 2 (multiples of the base resolution), got {self.scales}")

    @property
    def base_grid(self) -> int:
        return self.base_resolution // self.patch_size

    @property
    def max_resolution(self) -> int:
        return self.base_resolution * max(self.scales)


class PS3Output(NamedTuple):
    """Outputs of :class:`PS3Encoder`.

    global_summary: (B, D) first class token of the global pass.
    global_features: (B, g*g, D) global patch features, row-major.
    local_features: (B, k, D) features of the selected high-res patches.
    positions: (B, k, 3) int64 ``(scale index into cfg.scales, y, x)`` of each selected patch on its
        scale's ``(g*s) x (g*s)`` grid.
    saliency: list over scales of (B, g*s, g*s) selection logits (the map used for selection).
    bottom_up: (B, S, g, g) bottom-up logits at low resolution.
    top_down: (B, S, g, g) top-down logits at low resolution, or None without a prompt.
    """

    global_summary: torch.Tensor
    global_features: torch.Tensor
    local_features: torch.Tensor
    positions: torch.Tensor
    saliency: list[torch.Tensor]
    bottom_up: torch.Tensor
    top_down: torch.Tensor | None


class PS3Encoder(nn.Module):
    def __init__(self, cfg: PS3Config) -> None:
        super().__init__()
        self.cfg = cfg
        vit_kw = {"max_resolution": cfg.max_resolution, "num_cls_tokens": 1, **cfg.vit}
        self.vit: ViT = create_student(cfg.vit_size, patch_size=cfg.patch_size, **vit_kw)
        d = self.vit.embed_dim
        n_scales = len(cfg.scales)
        self.scale_embed = nn.Parameter(torch.zeros(n_scales + 1, d))
        self.bottom_up_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, n_scales))
        self.prompt_proj = nn.Linear(cfg.prompt_dim, d)
        self.feature_norm = nn.LayerNorm(d)
        self.top_down_bias = nn.Parameter(torch.zeros(n_scales))
        self.global_proj = nn.Linear(d, cfg.embed_dim)
        self.local_proj = nn.Linear(d, cfg.embed_dim)
        self.register_buffer("mean", torch.tensor(SIGLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SIGLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    def grid_sizes(self) -> list[int]:
        """Tokens per side of each scale's grid."""
        return [self.cfg.base_grid * s for s in self.cfg.scales]

    def num_patches(self) -> int:
        """Selectable high-res patches over all scales."""
        return sum(g * g for g in self.grid_sizes())

    # ---- global pass
    def encode_global(self, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Images (B, 3, H, W) in [0, 1] -> (tokens (B, S + g*g, D) after the final norm, per-block (k, v))."""
        base = self.cfg.base_resolution
        x = F.interpolate(images, size=(base, base), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        tokens, _ = self.vit.embed(x)
        s = self.vit.num_prefix_tokens
        tokens = torch.cat([tokens[:, :s], tokens[:, s:] + self.scale_embed[0].to(tokens.dtype)], dim=1)
        kv = []
        for block in self.vit.blocks:
            tokens, block_kv = block_forward(block, tokens)
            kv.append(block_kv)
        return self.vit.norm(tokens), kv

    # ---- saliency and selection
    def saliency_maps(self, global_features: torch.Tensor, prompt: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Low-res logits: bottom-up (B, S, g, g) and top-down (B, S, g, g) or None."""
        g = self.cfg.base_grid
        b = global_features.shape[0]
        bottom_up = self.bottom_up_head(global_features).transpose(1, 2).reshape(b, -1, g, g)
        if prompt is None:
            return bottom_up, None
        if prompt.dim() != 2 or prompt.shape[0] != b or prompt.shape[1] != self.cfg.prompt_dim:
            raise ValueError(f"prompt must be (B={b}, prompt_dim={self.cfg.prompt_dim}), got {tuple(prompt.shape)}")
        q = self.prompt_proj(prompt.to(global_features.dtype))  # (B, D)
        score = torch.einsum("bnd,bd->bn", self.feature_norm(global_features), q) / q.shape[-1] ** 0.5
        top_down = score.view(b, 1, g, g) + self.top_down_bias.view(1, -1, 1, 1)
        return bottom_up, top_down

    def upsample_maps(self, low_res: torch.Tensor) -> list[torch.Tensor]:
        """(B, S, g, g) -> per scale (B, g*s, g*s), bilinear, smoothed by ``smooth_kernel``."""
        maps = []
        for i, side in enumerate(self.grid_sizes()):
            m = F.interpolate(low_res[:, i:i + 1], size=(side, side), mode="bilinear", align_corners=False)
            k = self.cfg.smooth_kernel
            if k and k > 1:
                m = F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
            maps.append(m[:, 0])
        return maps

    def select(self, maps: list[torch.Tensor], num_look_close: int | str,
               force: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Top-k patches over all scales -> positions (B, k, 3) = (scale index, y, x), scale-major order.

        ``force``: per scale (B, g*s, g*s) bool masks of patches that must be selected (taken first);
        ``k`` grows to the largest forced count in the batch if that exceeds the budget.
        """
        total = self.num_patches()
        if num_look_close == "all":
            k = total
        else:
            k = int(num_look_close)
            if not 1 <= k <= total:
                raise ValueError(f"num_look_close={k} must be in [1, {total}] (the patch count over scales "
                                 f"{self.cfg.scales}), or 'all'")
        flat = torch.cat([m.flatten(1) for m in maps], dim=1).float()  # (B, total)
        if force is not None:
            forced = torch.cat([f.flatten(1) for f in force], dim=1)
            k = max(k, int(forced.sum(1).max()))
            flat = flat.masked_fill(forced, float("inf"))
        idx = flat.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), scale-major then row-major
        return self.unflatten_index(idx)

    def unflatten_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat indices over the concatenated scale grids (B, k) -> (B, k, 3) (scale index, y, x)."""
        sides = torch.tensor(self.grid_sizes(), device=idx.device)
        offsets = torch.cumsum(sides * sides, 0) - sides * sides
        scale = torch.searchsorted(offsets, idx, right=True) - 1
        local = idx - offsets[scale]
        side = sides[scale]
        return torch.stack([scale, local // side, local % side], dim=-1)

    # ---- local pass
    def sample_patches(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pixels of the selected patches, sampled from the full-size image: (B, k, 3*p*p), channel-major.

        A patch at scale ``s`` covers ``1 / (g*s)`` of the image per side; its ``p x p`` pixels are read with
        bilinear ``grid_sample`` (antialiasing is not applied, so very large images should be pre-resized to
        about ``base_resolution * max(scales)``).
        """
        p = self.cfg.patch_size
        b, k, _ = positions.shape
        sides = torch.tensor(self.grid_sizes(), device=images.device, dtype=torch.float32)[positions[..., 0]]
        offs = (torch.arange(p, device=images.device, dtype=torch.float32) + 0.5) / p  # pixel centres in a patch
        ys = (positions[..., 1:2].float() + offs) / sides[..., None]  # (B, k, p) in [0, 1]
        xs = (positions[..., 2:3].float() + offs) / sides[..., None]
        grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)  # (B, k, p, p, 2)
        grid = (grid * 2 - 1).reshape(b, k * p, p, 2)
        pix = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)  # (B, 3, k*p, p)
        pix = pix.reshape(b, 3, k, p, p).permute(0, 2, 1, 3, 4)  # (B, k, 3, p, p)
        return pix.reshape(b, k, 3 * p * p)

    def local_position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, k, 3) -> (B, k, D): CPE window of the scale's grid at (y, x) plus the scale embedding."""
        out = positions.new_zeros(positions.shape[:2] + (self.vit.embed_dim,), dtype=self.scale_embed.dtype)
        for i, side in enumerate(self.grid_sizes()):
            sel = positions[..., 0] == i
            if not bool(sel.any()):
                continue
            table = self.vit.pos_embed.window(side, side)[0]  # (side*side, D)
            flat = positions[..., 1][sel] * side + positions[..., 2][sel]
            out[sel] = table[flat].to(out.dtype) + self.scale_embed[i + 1]
        return out

    def encode_local(self, images: torch.Tensor, positions: torch.Tensor,
                     global_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Selected patches -> features (B, k, D), attending to each other and to the global tokens."""
        pixels = (self.sample_patches(images, positions) - 0.5) / 0.5  # SigLIP normalisation, channel-major
        x = self.vit.patch_embed.proj(pixels.to(self.vit.patch_embed.proj.weight.dtype))
        x = x + self.local_position_embedding(positions).to(x.dtype)
        for block, kv in zip(self.vit.blocks, global_kv):
            x, _ = block_forward(block, x, context=kv)
        return self.vit.norm(x)

    # ---- full forward
    def forward(self, images: torch.Tensor, num_look_close: int | str | None = None,
                prompt: torch.Tensor | None = None, force: list[torch.Tensor] | None = None) -> PS3Output:
        """Encode ``images (B, 3, H, W)`` in [0, 1] (H, W >= base_resolution).

        Args:
            num_look_close: high-res patch budget over all scales (default ``cfg.num_look_close``), or "all".
            prompt: (B, prompt_dim) embeddings for top-down selection; bottom-up without.
            force: per scale (B, g*s, g*s) bool masks of patches to always select (training).
        """
        self._check_images(images)
        tokens, kv = self.encode_global(images)
        s = self.vit.num_prefix_tokens
        summary, global_features = tokens[:, 0], tokens[:, s:]
        bottom_up, top_down = self.saliency_maps(global_features, prompt)
        maps = self.upsample_maps(top_down if top_down is not None else bottom_up)
        budget = self.cfg.num_look_close if num_look_close is None else num_look_close
        positions = self.select(maps, budget, force)
        local = self.encode_local(images, positions, kv)
        return PS3Output(summary, global_features, local, positions, maps, bottom_up, top_down)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
        h, w = images.shape[-2:]
        if min(h, w) < self.cfg.base_resolution:
            raise ValueError(f"image {h}x{w} is smaller than the base resolution {self.cfg.base_resolution}; "
                             f"PS3 is for high-resolution inputs: upsample it or lower base_resolution")

    # ---- persistence
    def save(self, out_dir: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` (atomically: temp file then rename)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.safetensors.tmp"
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(out / "model.safetensors")
        (out / "ps3_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))


def load(path: str | Path, device: str | torch.device = "cpu") -> PS3Encoder:
    """Load a PS3 encoder saved by :meth:`PS3Encoder.save` (safetensors only; no pickled code)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "ps3_config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"PS3 checkpoint file {f} is missing")
    cfg = PS3Config(**json.loads(cfg_file.read_text()))
    model = PS3Encoder(cfg)
    state = load_file(str(weights), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the PS3 config: missing keys {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def vit_config_of(model: PS3Encoder) -> ViTConfig:
    return model.vit.cfg
