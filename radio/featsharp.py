"""FeatSharp-style feature upsampler for low-resolution teachers (clean-room implementation of the idea).

Given a frozen teacher with native input ``R`` (grid ``h = R / p``) and an upsample factor ``u``:

1. **Views.** The image is resized to ``R`` (low-res view) and to ``u R``; the enlarged image is cut into
   ``u x u`` tiles of ``R x R``. The teacher runs **once** on the batch ``[low-res; tiles]`` and the tile
   features are re-assembled into a ``(B, C, u h, u h)`` map. Features are normalised (PHI-S by default).
2. **De-bias.** A learned buffer ``bias (1, C, h, h)`` (zero init) is added to the low-res map and to every
   tile: fixed-position teacher artifacts are inconsistent across jittered views, so the buffer learns to
   cancel them.
3. **JBU stack.** Joint bilateral upsampling, one level per prime factor of ``u``: the map is bilinearly
   upsampled, then filtered with weights ``softmax_j(-|g_i - g_j|^2 / T) * exp(-d_ij^2 / 2 sigma^2)``
   (renormalised) over a ``(2r+1)^2`` neighbourhood, where ``g`` is a learned 1x1 projection of the guidance
   image at that resolution, ``T`` and ``sigma`` learned.
4. **Fusion.** ``[JBU ; tiles + tile-position embedding]`` (``2C`` channels per fine token) goes through one
   pre-norm transformer block whose attention is restricted to a ``window x window`` neighbourhood and whose
   MLP outputs ``C`` channels, added to the JBU channels with LayerScale: ``hr = jbu + ...``.

Training (:func:`featsharp_loss`, :func:`train_featsharp`): multi-view consistency. For each of ``n_views``
random crops (scale jitter) with random horizontal flips, the high-res map is warped into the view with
``grid_sample``, reduced by a learned downsampler (softmax-weighted ``u x u`` pooling with a learned
position prior and a content score), and compared (MSE) with the teacher's own low-res features of the
view (normalised + de-biased). The tile-seam weighting and the uncertainty head of the paper are not
implemented here.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfm.radio.normalizers import FeatureNormalizer, build_normalizer

__all__ = ["FeatSharpConfig", "FeatSharpTeacher", "FeatSharpUpsampler", "JBULevel", "LearnedDownsampler", "LocalFusionBlock",
           "featsharp_loss", "train_featsharp"]


def _prime_factors(n: int) -> list[int]:
    out, f = [], 2
    while n > 1:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    return out


@dataclass
class FeatSharpConfig:
    """``factor``: upsampling u; ``jbu_radius``: JBU neighbourhood radius r; ``guidance_dim``: JBU guidance
    projection width; ``heads`` / ``window`` / ``mlp_ratio`` / ``layer_scale``: fusion block; ``normalizer``:
    feature normaliser name (``phi_s``, ``identity``, ...)."""

    factor: int = 2
    jbu_radius: int = 3
    guidance_dim: int = 16
    heads: int = 4
    window: int = 7
    mlp_ratio: float = 2.0
    layer_scale: float = 0.1
    normalizer: str = "phi_s"


class JBULevel(nn.Module):
    """Joint bilateral upsampling by an integer ``scale``: (B, C, h, w) + guidance (B, 3, H, W) ->
    (B, C, h*scale, w*scale)."""

    def __init__(self, scale: int, radius: int = 3, guidance_dim: int = 16) -> None:
        super().__init__()
        self.scale, self.radius = int(scale), int(radius)
        self.proj = nn.Sequential(nn.Conv2d(3, guidance_dim, 1), nn.GELU(), nn.Conv2d(guidance_dim, guidance_dim, 1))
        self.log_temp = nn.Parameter(torch.zeros(()))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(max(radius, 1) / 2.0)))

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """guidance (B, 3, H, W) at the output size -> weights (B, k*k, H, W), summing to 1 over k*k."""
        b, _, h, w = guidance.shape
        k = 2 * self.radius + 1
        g = self.proj(guidance)
        gp = F.pad(g, [self.radius] * 4, mode="reflect")
        nb = F.unfold(gp, k).view(b, g.shape[1], k * k, h, w)
        rng = -(nb - g.unsqueeze(2)).pow(2).sum(1) / self.log_temp.exp()  # (B, k*k, H, W)
        rng = torch.softmax(rng, dim=1)
        d = torch.arange(k, device=g.device, dtype=g.dtype) - self.radius
        d2 = (d[:, None] ** 2 + d[None, :] ** 2).reshape(1, k * k, 1, 1)
        spatial = torch.exp(-d2 / (2 * self.log_sigma.exp() ** 2))
        wgt = rng * spatial
        return wgt / wgt.sum(1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        size = (h * self.scale, w * self.scale)
        up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        guid = F.interpolate(guidance, size=size, mode="bilinear", align_corners=False, antialias=True)
        wgt = self.kernel(guid)
        k = 2 * self.radius + 1
        nb = F.unfold(F.pad(up, [self.radius] * 4, mode="reflect"), k).view(b, c, k * k, *size)
        return (nb * wgt.unsqueeze(1)).sum(2)


class LocalFusionBlock(nn.Module):
    """Pre-norm transformer block on (B, N = H*W, 2C) tokens with window-local attention; MLP -> C channels.

    ``out = x[..., :C] + ls2 * mlp(norm2(x'))`` with ``x' = x + ls1 * attn(norm1(x))``."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float = 2.0, layer_scale: float = 0.1) -> None:
        super().__init__()
        d2 = 2 * dim
        if d2 % heads:
            raise ValueError(f"LocalFusionBlock: 2*dim={d2} is not divisible by heads={heads}")
        self.dim, self.heads, self.window = dim, heads, int(window)
        self.norm1 = nn.LayerNorm(d2)
        self.qkv = nn.Linear(d2, 3 * d2)
        self.proj = nn.Linear(d2, d2)
        self.norm2 = nn.LayerNorm(d2)
        hidden = int(d2 * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d2, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls1 = nn.Parameter(torch.full((d2,), layer_scale))
        self.ls2 = nn.Parameter(torch.full((dim,), layer_scale))

    def local_mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(N, N) bool: True where key j is within the ``window x window`` square around query i."""
        yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        yy, xx = yy.flatten(), xx.flatten()
        r = self.window // 2
        return ((yy[:, None] - yy[None, :]).abs() <= r) & ((xx[:, None] - xx[None, :]).abs() <= r)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, d2 = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d2 // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.local_mask(*hw, x.device))
        x = x + self.ls1 * self.proj(a.transpose(1, 2).reshape(b, n, d2))
        return x[..., : self.dim] + self.ls2 * self.mlp(self.norm2(x))


class LearnedDownsampler(nn.Module):
    """(B, C, u*h, u*w) -> (B, C, h, w): softmax-weighted pooling of each ``u x u`` cell; the weights are a
    learned position prior (u*u logits) plus a content score (1x1 conv)."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.factor = int(factor)
        self.prior = nn.Parameter(torch.zeros(self.factor * self.factor))
        self.score = nn.Conv2d(dim, 1, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        u = self.factor
        h, w = hh // u, ww // u
        cells = F.unfold(x, u, stride=u).view(b, c, u * u, h, w)
        logits = F.unfold(self.score(x), u, stride=u).view(b, 1, u * u, h, w) + self.prior.view(1, 1, -1, 1, 1)
        return (cells * torch.softmax(logits, dim=2)).sum(2)


class FeatSharpUpsampler(nn.Module):
    """Upsample a frozen teacher's features by ``factor`` (module docstring).

    Args:
        teacher: a frozen :class:`mmfm.radio.teachers.Teacher` (or any module with ``input_size`` and
            ``forward(images in [0, 1]) -> (summary, features (B, C, h, h))``).
        factor: u >= 2.
        config: the rest of :class:`FeatSharpConfig` (``factor`` overrides ``config.factor``).

    ``apply(images) -> (lr (B, C, h, h), hr (B, C, u h, u h))`` in normalised space (``denormalize=True``
    maps both back to the teacher's space). The teacher's weights are not part of ``state_dict`` saved by
    :meth:`save`.
    """

    def __init__(self, teacher: nn.Module, factor: int = 2, config: FeatSharpConfig | None = None) -> None:
        super().__init__()
        cfg = FeatSharpConfig(**{**asdict(config or FeatSharpConfig()), "factor": int(factor)})
        if cfg.factor < 2:
            raise ValueError(f"FeatSharpUpsampler: factor must be >= 2, got {cfg.factor}")
        self.cfg = cfg
        self.teacher = teacher
        self.input_size = int(teacher.input_size)
        with torch.no_grad():
            dev = next(iter(teacher.buffers()), torch.zeros(())).device
            _, f = teacher(torch.zeros(1, 3, self.input_size, self.input_size, device=dev))
        self.dim, self.grid = int(f.shape[1]), (int(f.shape[2]), int(f.shape[3]))
        self.normalizer: FeatureNormalizer = build_normalizer(cfg.normalizer, self.dim)
        self.bias = nn.Parameter(torch.zeros(1, self.dim, *self.grid))
        self.tile_pos = nn.Parameter(torch.zeros(1, self.dim, *self.grid))
        self.jbu = nn.ModuleList(JBULevel(s, cfg.jbu_radius, cfg.guidance_dim) for s in _prime_factors(cfg.factor))
        self.fusion = LocalFusionBlock(self.dim, cfg.heads, cfg.window, cfg.mlp_ratio, cfg.layer_scale)
        self.downsampler = LearnedDownsampler(self.dim, cfg.factor)

    # ------------------------------------------------------------------ teacher passes
    def _norm(self, f: torch.Tensor) -> torch.Tensor:
        return self.normalizer(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def teacher_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> raw teacher (summary (B, C_s), lr (B, C, h, w),
        tiles (B, C, u h, u w)) from one batched teacher pass over the low-res image and the u x u tiles of
        the u-times enlarged image (tile (i, j) lands at rows i*h.., columns j*w.. of the tile map)."""
        b, r, u = images.shape[0], self.input_size, self.cfg.factor
        low = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        big = F.interpolate(images, size=(r * u, r * u), mode="bilinear", align_corners=False, antialias=True)
        tiles = big.view(b, 3, u, r, u, r).permute(0, 2, 4, 1, 3, 5).reshape(b * u * u, 3, r, r)
        summary, feats = self.teacher(torch.cat([low, tiles]))
        lr, tf = feats[:b], feats[b:]
        c, h, w = tf.shape[1:]
        tf = tf.view(b, u, u, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, u * h, u * w)
        return summary[:b], lr, tf

    def teacher_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> raw teacher (lr (B, C, h, w), tiles (B, C, u h, u w)); see :meth:`teacher_pass`."""
        _, lr, tiles = self.teacher_pass(images)
        return lr, tiles

    def _bias(self, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(self.bias.shape[-2:]) == hw:
            return self.bias
        return F.interpolate(self.bias, size=hw, mode="bilinear", align_corners=False)

    def lr_features(self, lr_raw: torch.Tensor) -> torch.Tensor:
        """Raw teacher low-res map -> normalised + de-biased (B, C, h, w)."""
        return self._norm(lr_raw) + self._bias(tuple(lr_raw.shape[-2:]))

    def upsample(self, images: torch.Tensor, lr_raw: torch.Tensor, tiles_raw: torch.Tensor) -> torch.Tensor:
        """-> hr (B, C, u h, u w) in normalised space."""
        u = self.cfg.factor
        lr = self.lr_features(lr_raw)
        h, w = lr.shape[-2:]
        tiles = self._norm(tiles_raw) + self._bias((h, w)).repeat(1, 1, u, u)
        tiles = tiles + self.tile_pos.repeat(1, 1, u, u)
        x = lr
        for level in self.jbu:
            x = level(x, images)
        b, c, hh, ww = x.shape
        tokens = torch.cat([x, tiles], dim=1).flatten(2).transpose(1, 2)  # (B, N, 2C)
        out = self.fusion(tokens, (hh, ww))
        return out.transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> (lr (B, C, h, w), hr (B, C, u h, u w)), normalised space."""
        lr_raw, tiles_raw = self.teacher_views(images)
        return self.lr_features(lr_raw), self.upsample(images, lr_raw, tiles_raw)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, denormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: (lr, hr) for a batch (no grad), both de-biased (the buffer cancels fixed-position
        teacher artifacts). ``denormalize``: map both back to the teacher's feature space."""
        lr, hr = self(images)
        if denormalize:
            inv = self.normalizer.inverse
            lr = inv(lr.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            hr = inv(hr.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return lr, hr

    # ------------------------------------------------------------------ save / load
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def save(self, path: str) -> None:
        """Safetensors file with the upsampler's weights, normaliser buffers and config (metadata)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state().items()}
        save_file(state, path, metadata={"featsharp_config": json.dumps(asdict(self.cfg))})

    @classmethod
    def load(cls, path: str, teacher: nn.Module) -> FeatSharpUpsampler:
        """Rebuild from :meth:`save`'s file around the same (frozen) ``teacher``."""
        import os

        from safetensors import safe_open
        from safetensors.torch import load_file

        if not os.path.exists(path):
            raise FileNotFoundError(f"FeatSharp checkpoint not found: {path!r}")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "featsharp_config" not in meta:
            raise ValueError(f"{path!r} is not a FeatSharp checkpoint (no featsharp_config metadata)")
        cfg = FeatSharpConfig(**json.loads(meta["featsharp_config"]))
        model = cls(teacher, cfg.factor, cfg)
        state = load_file(path)
        res = model.load_state_dict(state, strict=False)
        missing = [k for k in res.missing_keys if not k.startswith("teacher.")]
        if missing or res.unexpected_keys:
            raise ValueError(f"{path!r}: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")
        return model


class FeatSharpTeacher(nn.Module):
    """A teacher whose features are FeatSharp-upsampled: same interface as
    :class:`mmfm.radio.teachers.Teacher`, ``forward(images in [0, 1]) -> (summary (B, C_s),
    features (B, C, u h, u w))`` with the features in the teacher's own space (de-biased, denormalised), so a
    trainer can normalise them with its own normaliser. The summary is the low-res teacher's (FeatSharp does
    not change it). ``input_size``, ``patch_size`` are the teacher's; ``upsample_factor`` is u."""

    def __init__(self, upsampler: FeatSharpUpsampler) -> None:
        super().__init__()
        self.upsampler = upsampler.eval()
        for p in self.upsampler.parameters():
            p.requires_grad_(False)
        self.input_size = upsampler.input_size
        self.patch_size = getattr(upsampler.teacher, "patch_size", None)
        self.upsample_factor = upsampler.cfg.factor

    def train(self, mode: bool = True) -> FeatSharpTeacher:
        super().train(False)  # frozen
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.upsampler
        summary, lr_raw, tiles_raw = up.teacher_pass(images)
        hr = up.upsample(images, lr_raw, tiles_raw)
        hr = up.normalizer.inverse(hr.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return summary, hr

    @classmethod
    def from_spec(cls, spec, teacher: nn.Module) -> FeatSharpTeacher:
        """Wrap ``teacher`` with the upsampler saved at ``spec.featsharp_checkpoint`` (a TeacherSpec)."""
        path = getattr(spec, "featsharp_checkpoint", None)
        if not path:
            raise ValueError(f"teacher {getattr(spec, 'name', '?')!r}: featsharp_checkpoint is not set")
        up = FeatSharpUpsampler.load(path, teacher)
        if getattr(spec, "upsample_factor", up.cfg.factor) not in (1, up.cfg.factor):
            raise ValueError(f"teacher {spec.name!r}: upsample_factor={spec.upsample_factor} but the FeatSharp "
                             f"checkpoint {path!r} upsamples by {up.cfg.factor}")
        return cls(up)


# ----------------------------------------------------------------------------------------------- training
def _random_view(b: int, gen: random.Random, min_scale: float) -> list[tuple[float, float, float, bool]]:
    """Per sample (x0, y0, size, flip) in [0, 1] image coordinates (square crops)."""
    out = []
    for _ in range(b):
        s = gen.uniform(min_scale, 1.0)
        out.append((gen.uniform(0, 1 - s), gen.uniform(0, 1 - s), s, gen.random() < 0.5))
    return out


def _view_grid(views: list[tuple[float, float, float, bool]], size: int, device, dtype) -> torch.Tensor:
    """Sampling grids (B, size, size, 2) in [-1, 1] (align_corners=False) for the crops/flips."""
    lin = (torch.arange(size, device=device, dtype=dtype) + 0.5) / size  # pixel centres in [0, 1]
    grids = []
    for x0, y0, s, flip in views:
        xs = x0 + s * (1 - lin if flip else lin)
        ys = y0 + s * lin
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grids.append(torch.stack([gx, gy], -1) * 2 - 1)
    return torch.stack(grids)


def featsharp_loss(up: FeatSharpUpsampler, images: torch.Tensor, n_views: int = 2, min_scale: float = 0.5,
                   rng: random.Random | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-view consistency loss for one batch of images (B, 3, H, W) in [0, 1] -> (scalar, metrics).

    For each view: the HR map warped into the crop (``grid_sample``), downsampled by the learned
    downsampler, vs. the teacher's normalised + de-biased low-res features of the view image (MSE)."""
    rng = rng or random.Random()
    b = images.shape[0]
    lr_raw, tiles_raw = up.teacher_views(images)
    hr = up.upsample(images, lr_raw, tiles_raw)
    hh, ww = hr.shape[-2:]
    r = up.input_size
    losses = []
    # identity view: downsampled HR must reproduce the teacher's own low-res map
    losses.append(F.mse_loss(up.downsampler(hr), up.lr_features(lr_raw)))
    view_imgs, hr_views = [], []
    for _ in range(n_views):
        views = _random_view(b, rng, min_scale)
        view_imgs.append(F.grid_sample(images, _view_grid(views, r, images.device, images.dtype),
                                       mode="bilinear", align_corners=False))
        hr_views.append(F.grid_sample(hr, _view_grid(views, hh, hr.device, hr.dtype), mode="bilinear",
                                      align_corners=False))
    with torch.no_grad():
        _, tfeat = up.teacher(torch.cat(view_imgs))
    target = up.lr_features(tfeat)
    pred = up.downsampler(torch.cat(hr_views))
    losses.append(F.mse_loss(pred, target))
    loss = torch.stack(losses).mean()
    return loss, {"loss": float(loss.detach()), "identity": float(losses[0].detach()),
                  "views": float(losses[1].detach())}


def _cycle(source: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Endless batches from ``source``: re-iterated when it is a re-iterable, else consumed once."""
    reiterable = iter(source) is not source
    count = 0
    while True:
        for x in source:
            count += 1
            yield x
        if count == 0:
            raise ValueError("train_featsharp: images_iter yielded no batches")
        if not reiterable:
            raise ValueError(f"train_featsharp: the images iterator ran out after {count} batches; pass a "
                             "re-iterable (a list or DataLoader) to cycle through it, or a longer iterator")


def train_featsharp(teacher: nn.Module, images_iter: Iterable[torch.Tensor], steps: int, factor: int = 2,
                    config: FeatSharpConfig | None = None, lr: float = 5e-4, n_views: int = 2,
                    fit_batches: int = 4, seed: int = 0, upsampler: FeatSharpUpsampler | None = None,
                    ) -> tuple[FeatSharpUpsampler, list[float]]:
    """Fit the normaliser on ``fit_batches`` batches, then train ``steps`` AdamW steps.

    ``images_iter`` yields (B, 3, H, W) batches in [0, 1]. A re-iterable (list, DataLoader) is iterated again
    when it runs out; a one-shot iterator must last ``fit_batches + steps`` batches (nothing is cached, so
    memory does not grow with the step count). Returns the upsampler and the per-step losses."""
    if steps < 1:
        raise ValueError(f"train_featsharp: steps must be >= 1, got {steps}")
    up = upsampler or FeatSharpUpsampler(teacher, factor, config)
    batches = _cycle(images_iter)

    def next_batch() -> torch.Tensor:
        return next(batches)

    if not bool(up.normalizer.fitted):
        for _ in range(max(1, fit_batches)):
            with torch.no_grad():
                lr_raw, _ = up.teacher_views(next_batch())
            up.normalizer.update(lr_raw.permute(0, 2, 3, 1))
        up.normalizer.fit()
    params = [p for n, p in up.named_parameters() if not n.startswith("teacher.") and p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    up.train()
    for _ in range(steps):
        loss, _ = featsharp_loss(up, next_batch(), n_views=n_views, rng=rng)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_featsharp: non-finite loss {loss.item()} at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    up.eval()
    return up, losses
