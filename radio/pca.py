"""PCA-to-RGB pictures of dense features: the first three principal components of the patch features of one
image, each mapped to a colour channel.

Each component's sign is fixed (the largest-magnitude projection is positive) so that pictures are
deterministic, and each channel is stretched between its ``q`` and ``1 - q`` quantiles so that a few extreme
tokens do not wash out the picture.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["feature_pca_picture", "pca_components", "pca_rgb"]


def pca_components(features: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` principal directions of ``features`` (N, D).

    Returns:
        ``(projections (N, k), components (k, D))`` of the centred features, sign-fixed so that each projection's
        largest-magnitude entry is positive. Fewer than ``k`` components are padded with zeros.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    x = features.detach().double()
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:k]
    proj = x @ comps.T
    idx = proj.abs().argmax(dim=0)
    sign = torch.sign(proj[idx, torch.arange(proj.shape[1])])
    sign[sign == 0] = 1
    proj, comps = proj * sign, comps * sign[:, None]
    if proj.shape[1] < k:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], k - proj.shape[1])], dim=1)
        comps = torch.cat([comps, comps.new_zeros(k - comps.shape[0], comps.shape[1])], dim=0)
    return proj.float(), comps.float()


def pca_rgb(features: torch.Tensor, grid: tuple[int, int], q: float = 0.01) -> np.ndarray:
    """Features (h*w, D) on a row-major ``grid`` -> RGB picture (h, w, 3) uint8."""
    h, w = grid
    if features.shape[0] != h * w:
        raise ValueError(f"features hold {features.shape[0]} tokens, grid {h}x{w} needs {h * w}")
    proj, _ = pca_components(features, 3)
    lo = torch.quantile(proj, q, dim=0)
    hi = torch.quantile(proj, 1 - q, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return (rgb.reshape(h, w, 3).numpy() * 255).round().astype(np.uint8)


def feature_pca_picture(features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int] | None = None,
                        image: Image.Image | None = None) -> Image.Image:
    """PCA picture of one image's features (h*w, D), upscaled (nearest) to ``size`` = (W, H) if given, and put
    to the right of ``image`` if given."""
    pic = Image.fromarray(pca_rgb(features, grid))
    if size is not None:
        pic = pic.resize(size, Image.NEAREST)
    if image is None:
        return pic
    image = image.convert("RGB").resize(pic.size, Image.BILINEAR)
    canvas = Image.new("RGB", (image.width + pic.width, pic.height))
    canvas.paste(image, (0, 0))
    canvas.paste(pic, (image.width, 0))
    return canvas
