"""Pictures of PS3's selection: chosen high-resolution patches drawn on the image, one colour per scale."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

SCALE_COLOURS = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (200, 80, 255)]


def draw_selection(image: Image.Image, positions: torch.Tensor, grid_sizes: list[int],
                   boxes: list[tuple[float, float, float, float]] | None = None) -> Image.Image:
    """Outline every selected patch ``positions (k, 3)`` = (scale index, y, x) on ``image``; optional
    ground-truth ``boxes`` in white."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out, "RGBA")
    w, h = out.size
    for s, y, x in positions.tolist():
        side = grid_sizes[s]
        x0, y0 = x * w / side, y * h / side
        colour = SCALE_COLOURS[s % len(SCALE_COLOURS)]
        draw.rectangle([x0, y0, x0 + w / side, y0 + h / side], outline=colour + (255,), fill=colour + (60,))
    for box in boxes or []:
        draw.rectangle(list(box), outline=(255, 255, 255, 255), width=max(1, w // 256))
    return out


def save_selection(image: Image.Image, positions: torch.Tensor, grid_sizes: list[int], out: str | Path,
                   boxes=None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_selection(image, positions, grid_sizes, boxes).save(out)
    return out
