"""Cropped position embedding (CPE) for resolution-flexible ViT students.

One learned grid of position embeddings covers the maximum resolution (``max_resolution / patch`` tokens
per side, 128 x 128 for 2048 px at patch 16). A smaller token grid ``(h, w)`` reads a viewport of it:

- **Inference** (``model.eval()``): resize the whole grid bilinearly (``align_corners=False``, in fp32) to
  ``(max(h, w), max(h, w))`` and take the top-left ``h x w`` window. Both axes share one scale, so
  non-square inputs see the same geometry as square ones. This is bit-for-bit the rule of
  ``transformers.RadioModel`` so that exported checkpoints give the same outputs.
- **Training**: every sample reads a random crop of the grid, resampled with ``grid_sample`` onto the
  token grid. The crop's area is ``U[min_area, 1]`` of the inference window and its aspect ratio is
  log-uniform in ``aspect_range`` on top of the image's own aspect ratio; its offset is uniform. So the model
  learns that position embeddings are a relative viewport, which is what makes any resolution work.
  With probability ``pos_dropout`` the whole embedding of a sample is zeroed.

``video_frames(t)`` makes ``t`` consecutive samples share one crop (clips stacked as ``(B*t, ...)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CroppedPositionEmbedding"]


class CroppedPositionEmbedding(nn.Module):
    """Learned ``(1, G*G, D)`` position grid read through a crop (training) or a top-left window (inference).

    Args:
        embed_dim: D.
        max_grid: G, tokens per side at the maximum resolution.
        pos_dropout: probability of zeroing a sample's whole embedding during training.
        min_area: smallest crop area (fraction of the inference window) during training.
        aspect_range: (low, high) of the log-uniform aspect-ratio jitter during training.
    """

    def __init__(self, embed_dim: int, max_grid: int, pos_dropout: float = 0.1, min_area: float = 0.1,
                 aspect_range: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        if max_grid < 1:
            raise ValueError(f"max_grid must be >= 1, got {max_grid}")
        if not 0.0 <= pos_dropout < 1.0:
            raise ValueError(f"pos_dropout must be in [0, 1), got {pos_dropout}")
        if not 0.0 < min_area <= 1.0:
            raise ValueError(f"min_area must be in (0, 1], got {min_area}")
        self.embed_dim = embed_dim
        self.max_grid = max_grid
        self.pos_dropout = pos_dropout
        self.min_area = min_area
        self.aspect_range = (float(aspect_range[0]), float(aspect_range[1]))
        self.weight = nn.Parameter(torch.randn(1, max_grid * max_grid, embed_dim) * embed_dim**-0.5)
        self._frames = 1

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, max_grid={self.max_grid}, pos_dropout={self.pos_dropout}"

    @contextlib.contextmanager
    def video_frames(self, t: int) -> Iterator[None]:
        """Within this context, each run of ``t`` consecutive samples shares one training crop."""
        if t < 1:
            raise ValueError(f"t must be >= 1, got {t}")
        old, self._frames = self._frames, t
        try:
            yield
        finally:
            self._frames = old

    def grid(self) -> torch.Tensor:
        """The raw grid as an image, (1, D, G, G)."""
        g = self.max_grid
        return self.weight.reshape(1, g, g, self.embed_dim).permute(0, 3, 1, 2)

    def window(self, h: int, w: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Inference embedding for an ``h x w`` token grid, (1, h*w, D), row-major.

        The grid is resized to ``max(h, w)`` per side and the top-left ``h x w`` window kept.
        """
        self._check_grid(h, w)
        side = max(h, w)
        pos = self.grid().float()
        if side != self.max_grid:
            pos = F.interpolate(pos, size=(side, side), mode="bilinear", align_corners=False)
        pos = pos[:, :, :h, :w]
        return pos.flatten(2).transpose(1, 2).to(dtype or self.weight.dtype)

    def random_crops(self, batch: int, h: int, w: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training embedding: one random crop per sample, (B, h*w, D), with whole-sample dropout."""
        self._check_grid(h, w)
        if batch % self._frames:
            raise ValueError(f"batch {batch} is not a multiple of the video clip length {self._frames}")
        n = batch // self._frames
        dev = self.weight.device
        rand = torch.rand(n, 5, device=dev, generator=generator)
        lo, hi = math.log(self.aspect_range[0]), math.log(self.aspect_range[1])
        area = self.min_area + (1.0 - self.min_area) * rand[:, 0]
        aspect = torch.exp(lo + (hi - lo) * rand[:, 1])
        # Base window = the inference window (keeps the image's aspect ratio), then scale and jitter it.
        side = max(h, w)
        sx = (w / side * torch.sqrt(area * aspect)).clamp(max=1.0)
        sy = (h / side * torch.sqrt(area / aspect)).clamp(max=1.0)
        ox = (1.0 - sx) * rand[:, 2]
        oy = (1.0 - sy) * rand[:, 3]
        # Token centres in [0, 1] of the crop; align_corners=True maps 0/1 to the corner cells' centres, so a
        # full crop at the maximum grid reproduces the grid exactly.
        lin_x = torch.linspace(0, 1, w, device=dev) if w > 1 else torch.full((1,), 0.5, device=dev)
        lin_y = torch.linspace(0, 1, h, device=dev) if h > 1 else torch.full((1,), 0.5, device=dev)
        gx = ox[:, None] + sx[:, None] * lin_x[None]  # (n, w)
        gy = oy[:, None] + sy[:, None] * lin_y[None]  # (n, h)
        coords = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (n, h, w, 2)
        coords = coords * 2 - 1
        # All n crops read the one grid: stacked along the output height they are one (1, n*h, w) sampling of
        # it. Sampling each from a batch-expanded copy of the grid would materialise n copies of the whole
        # (D, G, G) grid and of its gradient (3 GiB each for ViT-B at G = 128, B = 64).
        pos = F.grid_sample(self.grid().float(), coords.reshape(1, n * h, w, 2), mode="bilinear",
                            align_corners=True)  # (1, D, n*h, w)
        pos = pos.reshape(-1, n, h * w).permute(1, 2, 0)  # (n, h*w, D)
        if self.pos_dropout > 0:
            keep = (rand[:, 4] >= self.pos_dropout).to(pos.dtype)
            pos = pos * keep[:, None, None]
        if self._frames > 1:
            pos = pos.repeat_interleave(self._frames, dim=0)
        return pos.to(self.weight.dtype)

    def forward(self, batch: int, h: int, w: int) -> torch.Tensor:
        """Position embedding for a ``(batch, h*w)`` token grid: random crops in training, else the window.

        Returns (B, h*w, D) in training and (1, h*w, D) in eval mode (broadcasts over the batch).
        """
        if self.training:
            return self.random_crops(batch, h, w)
        return self.window(h, w)

    def _check_grid(self, h: int, w: int) -> None:
        if h < 1 or w < 1:
            raise ValueError(f"token grid must be at least 1x1, got {h}x{w}")
        if max(h, w) > self.max_grid:
            raise ValueError(
                f"token grid {h}x{w} exceeds the position grid {self.max_grid}x{self.max_grid}; "
                "use a smaller image (at most max_resolution per side)")
