"""Procedural "shapes" world: synthetic images, region and VQA samples with exact ground truth.

Nothing is downloaded: scenes are drawn with numpy + PIL and are deterministic for a seed. Sample
``i`` of a stream depends only on ``(kind, seed, i)``, so a longer stream starts with the shorter one.

Scene contents:
- a textured background (``plain``, ``striped``, ``gradient``, ``noisy``, ``checkered``) in muted
  greyish tones, so that every shape colour (saturated, or pure white / black) stands out;
- 1-6 shapes of :data:`SHAPES` kinds in :data:`COLORS`, ``small`` or ``large``;
- optionally a short word drawn on a light label (uppercase; answers and captions use it lowercase
  in VQA, as VQAv2 answers are lowercase).

Kinds (see :func:`iter_synthetic`):
- ``"images"`` -> :class:`~mmfm.data.schemas.ImageSample` (224 px by default) with a caption
  ("a red circle and two blue squares on a striped background") and a class label: the index in
  :data:`SHAPES` of the kind of the largest shape (largest radius; radii are continuous so ties do
  not occur in practice).
- ``"regions"`` -> :class:`~mmfm.data.schemas.RegionSample` (1024 px by default) for PS3: a few large
  shapes plus 1-4 SMALL details (small shapes whose diameter is 2-5 % of the image side, short codes
  whose text height is 2-3 % of the side) that can only be identified at full resolution. Every
  item has a box in pixel coordinates and a local caption ("a small green star", "the text 'K7'").
- ``"vqa"`` -> :class:`~mmfm.data.schemas.ConversationSample` (224 px by default), one image, the user
  turn ``"<image>\\n{question}"`` and the assistant answer, 10 VQAv2-style reference answers and a
  ``category`` in :data:`VQA_CATEGORIES` (round-robin over the stream). Answers are balanced per
  category (uniform over colours / shapes / counts 0-5 / yes-no / left-right ...), so always
  answering the majority answer scores far below what a model that sees the image can reach.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mmfm.data.schemas import (
    IMAGE_PLACEHOLDER,
    ConversationSample,
    ImageSample,
    Message,
    Region,
    RegionSample,
)

# Saturated, nameable colours (RGB). White and black contrast with the mid-grey backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "gradient", "noisy", "checkered")
SIZES: tuple[str, ...] = ("small", "large")
VQA_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position", "relation", "existence", "text")
KINDS: tuple[str, ...] = ("images", "regions", "vqa")
# Short words drawn on VQA / image scenes (read back by the "text" questions).
TEXT_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "map", "box", "cup", "key", "pen", "hat", "car", "bus", "egg", "fox", "owl",
    "ant", "bee", "ice", "jam", "kit", "log", "net", "oak", "pig", "rat", "zip", "ok", "go", "hi",
    "12", "17", "23", "34", "42", "56", "68", "75", "81", "99",
)
# Characters of the small codes hidden in high-resolution region scenes (no O/0, I/1 look-alikes).
CODE_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CHAT_WORDS: tuple[str, ...] = (
    "user", "assistant", "system", "You are a helpful assistant.",
    "Answer the question using a single word or phrase.", "Describe the image.", "image", "shape",
    "shapes", "color", "colour", "object", "objects", "background", "small", "large", "text", "word",
    "left", "right", "top", "bottom", "above", "below", "yes", "no", "none",
)
DEFAULT_SIZES = {"images": 224, "regions": 1024, "vqa": 224}
_KIND_IDS = {"images": 1, "regions": 2, "vqa": 3}


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------
@dataclass
class Shape:
    """One drawn shape. ``(cx, cy)`` and ``radius`` in pixels; ``box`` is the tight pixel box
    ``(x0, y0, x1, y1)`` of the drawn polygon; ``cell`` is ``(col, row)`` in the 3x3 grid of
    grid-laid scenes, or ``None`` for freely placed (region) scenes."""

    kind: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    cell: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class TextItem:
    """A short text drawn on a light label; ``box`` covers the label, in pixels."""

    text: str
    box: tuple[float, float, float, float]
    height: float
    cell: tuple[int, int] | None = None


@dataclass
class Scene:
    """Exact description of one synthetic image."""

    width: int
    height: int
    background: str
    bg_colors: list[tuple[int, int, int]]
    bg_param: float
    shapes: list[Shape] = field(default_factory=list)
    texts: list[TextItem] = field(default_factory=list)

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum((kind is None or s.kind == kind) and (color is None or s.color == color) for s in self.shapes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (tuples become lists), as stored in shard metadata."""
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def _muted_color(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(85, 170))
    tint = rng.integers(-22, 23, size=3)
    return tuple(int(np.clip(grey + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def _sample_background(rng: np.random.Generator) -> tuple[str, list[tuple[int, int, int]], float]:
    name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colors = [_muted_color(rng), _muted_color(rng)]
    param = float(rng.uniform(0.0, 1.0))  # stripe width / orientation / noise seed, per texture
    return name, colors, param


def _render_background(scene: Scene) -> np.ndarray:
    """Background pixels ``(H, W, 3)`` uint8, a deterministic function of the scene fields."""
    h, w = scene.height, scene.width
    c0 = np.array(scene.bg_colors[0], dtype=np.float32)
    c1 = np.array(scene.bg_colors[1], dtype=np.float32)
    p = scene.bg_param
    name = scene.background
    if name == "plain":
        img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    elif name in ("striped", "checkered"):
        period = max(4, int(round(min(h, w) * (0.04 + 0.08 * p))))
        yy = np.arange(h)[:, None]
        xx = np.arange(w)[None, :]
        if name == "striped":
            orient = int(p * 1000) % 3  # horizontal, vertical, diagonal
            coord = yy + 0 * xx if orient == 0 else (xx + 0 * yy if orient == 1 else xx + yy)
            mask = (coord // period) % 2
        else:
            mask = (yy // period + xx // period) % 2
        img = np.where(mask[..., None] == 1, c1, c0).astype(np.float32)
    elif name == "gradient":
        angle = 2 * math.pi * p
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx / max(w - 1, 1)) * math.cos(angle) + (yy / max(h - 1, 1)) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 + (c1 - c0) * t[..., None]
    elif name == "noisy":
        noise_rng = np.random.default_rng(int(p * 2**31))
        # Greyscale noise on a coarse grid, upsampled: a cheap texture even at 2048 px.
        step = 2 if max(h, w) > 512 else 1
        gh, gw = -(-h // step), -(-w // step)
        noise = noise_rng.integers(-28, 29, size=(gh, gw, 1)).astype(np.float32)
        if step > 1:
            noise = np.repeat(np.repeat(noise, step, axis=0), step, axis=1)[:h, :w]
        img = c0 + noise
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape inside the square ``[cx +- r, cy +- r]`` (None for a circle)."""
    if kind == "circle":
        return None
    if kind == "square":
        a = 0.85 * r
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if kind == "cross":
        a, t = 0.95 * r, 0.32 * r
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t),
                (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t),
                (cx - a, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def _shape_box(kind: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    poly = _shape_polygon(kind, cx, cy, r)
    if poly is None:
        return (cx - r, cy - r, cx + r, cy + r)
    xs, ys = [x for x, _ in poly], [y for _, y in poly]
    return (min(xs), min(ys), max(xs), max(ys))


def _make_shape(kind: str, color: str, size: str, cx: float, cy: float, r: float,
                cell: tuple[int, int] | None = None) -> Shape:
    return Shape(kind=kind, color=color, size=size, cx=float(cx), cy=float(cy), radius=float(r),
                 box=tuple(float(v) for v in _shape_box(kind, cx, cy, r)), cell=cell)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled default font at ``px`` pixels (Pillow >= 10.1), else the fixed bitmap font."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, AttributeError, ImportError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_mask(text: str, height: int) -> Image.Image:
    """An ``L`` mask of ``text`` whose ink is ``height`` pixels tall (rendered with PIL's default font)."""
    font = _font(max(6, int(height)))
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font)
    if mask.height != height:  # font size != ink height (and the bitmap fallback is fixed): scale the ink
        w = max(1, round(mask.width * height / mask.height))
        mask = mask.resize((w, max(1, int(height))), Image.BILINEAR)
    return mask


def _text_label_size(text: str, height: int) -> tuple[int, int]:
    mask = _text_mask(text, height)
    pad = max(2, height // 4)
    return mask.width + 2 * pad, mask.height + 2 * pad


def render_scene(scene: Scene) -> Image.Image:
    """Draw a :class:`Scene` into an RGB PIL image of ``(scene.width, scene.height)``."""
    image = Image.fromarray(_render_background(scene), "RGB")
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = COLORS[s.color]
        poly = _shape_polygon(s.kind, s.cx, s.cy, s.radius)
        if poly is None:
            draw.ellipse((s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius), fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    for t in scene.texts:
        x0, y0, x1, y1 = (int(round(v)) for v in t.box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(235, 235, 225))
        mask = _text_mask(t.text, int(t.height))
        ox = x0 + (x1 - x0 - mask.width) // 2
        oy = y0 + (y1 - y0 - mask.height) // 2
        image.paste((15, 15, 15), (ox, oy, ox + mask.width, oy + mask.height), mask)
    return image


# --------------------------------------------------------------------------------------------------
# Grid scenes (images, vqa): 3x3 cells, at most one item per cell, so positions are unambiguous
# --------------------------------------------------------------------------------------------------
_ALL_CELLS = [(c, r) for r in range(3) for c in range(3)]


def cell_labels(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell ground truth of grid scenes: (shape, colour) class indices, each (n, 9) in row-major cell
    order; ``len(SHAPES)`` / ``len(COLOR_NAMES)`` marks an empty cell."""
    shape = torch.full((len(scenes), 9), len(SHAPES))
    color = torch.full((len(scenes), 9), len(COLOR_NAMES))
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            shape[i, s.cell[1] * 3 + s.cell[0]] = SHAPES.index(s.kind)
            color[i, s.cell[1] * 3 + s.cell[0]] = COLOR_NAMES.index(s.color)
    return shape, color


def tokens_by_cell(tokens: torch.Tensor) -> torch.Tensor:
    """A square token grid over a grid scene, (n, side * side, d), -> (n, 9, (side / 3)^2 * d): the tokens
    over each of the 3x3 cells (row-major), concatenated in row-major order within the cell."""
    n, k, d = tokens.shape
    side = round(k**0.5)
    if side * side != k or side % 3:
        raise ValueError(f"{k} tokens do not tile the 3x3 scene grid: need a square grid with a side divisible by 3")
    f = side // 3
    return tokens.reshape(n, 3, f, 3, f, d).permute(0, 1, 3, 2, 4, 5).reshape(n, 9, f * f * d)


@dataclass
class _Spec:
    kind: str
    color: str
    cell: tuple[int, int] | None = None


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _place_in_cell(rng: np.random.Generator, size_px: int, cell: tuple[int, int], size: str) -> tuple[float, float, float]:
    cell_px = size_px / 3
    r = size_px * (rng.uniform(0.115, 0.14) if size == "large" else rng.uniform(0.06, 0.08))
    slack = max(0.0, cell_px / 2 - r - 1.5)
    cx = (cell[0] + 0.5) * cell_px + rng.uniform(-slack, slack)
    cy = (cell[1] + 0.5) * cell_px + rng.uniform(-slack, slack)
    return cx, cy, r


def _grid_scene(rng: np.random.Generator, size_px: int, specs: list[_Spec], n_extra: int,
                extra_ok: Callable[[str, str], bool] | None = None, text: str | None = None,
                text_prob: float = 0.2) -> Scene:
    """Build a grid scene with the required ``specs`` (kind, colour, optional cell) plus ``n_extra``
    random shapes whose ``(kind, colour)`` satisfy ``extra_ok``; a word label is added if ``text``
    is given (or with probability ``text_prob``) and a cell is free."""
    bg, bg_colors, bg_param = _sample_background(rng)
    scene = Scene(width=size_px, height=size_px, background=bg, bg_colors=bg_colors, bg_param=bg_param)
    fixed = {s.cell for s in specs if s.cell is not None}
    free = [c for c in _ALL_CELLS if c not in fixed]
    order = rng.permutation(len(free))
    free = [free[i] for i in order]
    pairs = [(s.kind, s.color) for s in specs]
    for _ in range(n_extra):
        for _attempt in range(200):
            kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
            if extra_ok is None or extra_ok(kind, color):
                break
        else:  # constraints leave nothing: skip this extra shape
            continue
        pairs.append((kind, color))
    cells: list[tuple[int, int] | None] = [s.cell for s in specs] + [None] * (len(pairs) - len(specs))
    for i, c in enumerate(cells):
        if c is None:
            cells[i] = free.pop()
    for (kind, color), cell in zip(pairs, cells):
        size = _choice(rng, SIZES)
        cx, cy, r = _place_in_cell(rng, size_px, cell, size)
        scene.shapes.append(_make_shape(kind, color, size, cx, cy, r, cell=cell))
    if text is None and free and rng.uniform() < text_prob:
        text = _choice(rng, TEXT_WORDS)
    if text is not None and free:
        cell = free.pop()
        height = max(7, int(round(size_px * rng.uniform(0.065, 0.08))))
        w, h = _text_label_size(text.upper(), height)
        cell_px = size_px / 3
        slack_x = max(0.0, (cell_px - w) / 2 - 1)
        slack_y = max(0.0, (cell_px - h) / 2 - 1)
        x0 = (cell[0] + 0.5) * cell_px - w / 2 + rng.uniform(-slack_x, slack_x)
        y0 = (cell[1] + 0.5) * cell_px - h / 2 + rng.uniform(-slack_y, slack_y)
        x0, y0 = max(0.0, min(x0, size_px - w)), max(0.0, min(y0, size_px - h))
        scene.texts.append(TextItem(text=text.upper(), box=(float(round(x0)), float(round(y0)),
                                                            float(round(x0) + w), float(round(y0) + h)),
                                    height=float(height), cell=cell))
    return scene


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------
def _plural(kind: str) -> str:
    return kind + "es" if kind.endswith(("s", "x", "ch", "sh")) else kind + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count_phrase(n: int, color: str, kind: str) -> str:
    if n == 1:
        return f"{_article(color)} {color} {kind}"
    number = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{number} {color} {_plural(kind)}"


def _join(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_shapes(shapes: list[Shape]) -> str:
    """'a red circle and two blue squares' (grouped by colour and kind, in drawing order)."""
    groups: Counter[tuple[str, str]] = Counter((s.color, s.kind) for s in shapes)
    return _join([_count_phrase(n, color, kind) for (color, kind), n in groups.items()])


def scene_caption(scene: Scene) -> str:
    """Global caption of a grid scene, e.g. 'a red circle and two blue squares on a striped background'."""
    caption = f"{describe_shapes(scene.shapes)} on {_article(scene.background)} {scene.background} background"
    if scene.texts:
        caption += ", with the text " + " and ".join(f"'{t.text.lower()}'" for t in scene.texts)
    return caption


# Names of the 3x3 grid cells, indexed by (col, row).
CELL_NAMES: dict[tuple[int, int], str] = {
    (c, r): {(1, 1): "center"}.get((c, r), f"{('top', 'middle', 'bottom')[r]} {('left', 'center', 'right')[c]}")
    for r in range(3) for c in range(3)
}


def grounded_caption(scene: Scene) -> str:
    """Caption that names every item with its grid cell, in reading order (row by row), e.g.
    'top left: red circle; center: blue star; bottom right: text cat; striped background'.

    Unlike :func:`scene_caption` it says where each object is, so with one visual token per cell (a 96 px
    image, 16 px patches, 2x2 compression) each phrase supervises one token: grounded-caption pre-training.
    """
    items = [*scene.shapes, *scene.texts]
    if any(it.cell is None for it in items):
        raise ValueError("grounded_caption needs a grid scene (kind 'images' or 'vqa'); this one has no cells")
    items.sort(key=lambda it: (it.cell[1], it.cell[0]))  # type: ignore[index]
    phrases = [f"{CELL_NAMES[it.cell]}: " + (f"{it.color} {it.kind}" if isinstance(it, Shape) else f"text {it.text.lower()}")
               for it in items]  # type: ignore[index]
    return "; ".join(phrases + [f"{scene.background} background"])


CAPTION_STYLES: dict[str, Callable[[Scene], str]] = {"global": scene_caption, "grounded": grounded_caption}


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def _image_scene(rng: np.random.Generator, size_px: int) -> Scene:
    n = int(rng.integers(1, 7))
    return _grid_scene(rng, size_px, [], n_extra=n, text_prob=0.25)


def image_label(scene: Scene) -> int:
    """Class label: index in :data:`SHAPES` of the kind of the largest shape (largest radius)."""
    largest = max(scene.shapes, key=lambda s: s.radius)
    return SHAPES.index(largest.kind)


# --------------------------------------------------------------------------------------------------
# regions (high resolution, small details)
# --------------------------------------------------------------------------------------------------
def _boxes_overlap(a, b, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _region_scene(rng: np.random.Generator, size_px: int) -> Scene:
    bg, bg_colors, bg_param = _sample_background(rng)
    scene = Scene(width=size_px, height=size_px, background=bg, bg_colors=bg_colors, bg_param=bg_param)
    taken: list[tuple[float, float, float, float]] = []
    margin = 0.01 * size_px

    def place(w: float, h: float) -> tuple[float, float] | None:
        for _ in range(100):
            x0 = rng.uniform(margin, size_px - margin - w)
            y0 = rng.uniform(margin, size_px - margin - h)
            box = (x0, y0, x0 + w, y0 + h)
            if not any(_boxes_overlap(box, t, margin) for t in taken):
                taken.append(box)
                return x0, y0
        return None

    for _ in range(int(rng.integers(2, 5))):
        r = size_px * rng.uniform(0.07, 0.13)
        pos = place(2 * r, 2 * r)
        if pos is not None:
            kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
            scene.shapes.append(_make_shape(kind, color, "large", pos[0] + r, pos[1] + r, r))
    n_small = int(rng.integers(1, 5))
    for _ in range(n_small):
        if rng.uniform() < 0.6:
            # diameter 2-5 % of the side: ~4-10 px once the image is shrunk to 224 px
            r = size_px * rng.uniform(0.01, 0.025)
            pos = place(2 * r, 2 * r)
            if pos is not None:
                kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
                scene.shapes.append(_make_shape(kind, color, "small", pos[0] + r, pos[1] + r, r))
        else:
            code = "".join(_choice(rng, CODE_CHARS) for _ in range(int(rng.integers(2, 4))))
            height = max(6, int(round(size_px * rng.uniform(0.02, 0.03))))
            w, h = _text_label_size(code, height)
            pos = place(w, h)
            if pos is not None:
                x0, y0 = float(round(pos[0])), float(round(pos[1]))
                scene.texts.append(TextItem(text=code, box=(x0, y0, x0 + w, y0 + h), height=float(height)))
    return scene


def region_caption(item: Shape | TextItem) -> str:
    if isinstance(item, TextItem):
        return f"the text '{item.text}'"
    return f"{_article(item.size)} {item.size} {item.color} {item.kind}"


def _region_global_caption(scene: Scene) -> str:
    large = [s for s in scene.shapes if s.size == "large"]
    n_small = sum(s.size == "small" for s in scene.shapes) + len(scene.texts)
    base = describe_shapes(large) if large else "nothing large"
    caption = f"{base} on {_article(scene.background)} {scene.background} background"
    if n_small:
        caption += f" with {NUMBER_WORDS[n_small] if n_small < len(NUMBER_WORDS) else n_small} small detail" + \
            ("s" if n_small > 1 else "")
    return caption


# --------------------------------------------------------------------------------------------------
# vqa
# --------------------------------------------------------------------------------------------------
@dataclass
class VQAItem:
    """A question about a scene, its true answer, 10 VQAv2-style references and its category."""

    scene: Scene
    question: str
    answer: str
    answers: list[str]
    category: str


def _desc(kind: str, color: str) -> str:
    return f"{color} {kind}"


def _variants(truth: str, category: str) -> list[str]:
    """Benign spellings that the official VQA normalisation maps back to ``truth``."""
    if category == "count":
        n = int(truth)
        return [NUMBER_WORDS[n]] + (["none"] if n == 0 else [])
    if category in ("color", "shape", "position"):
        return [f"the {truth}", f"{truth}."] if category != "color" else [f"{truth}."]
    if category in ("relation", "existence"):
        return [f"{truth}.", f"{truth}!"]
    return [f"{truth}."]  # text


def _alternatives(truth: str, category: str) -> list[str]:
    """Plausible wrong answers (annotator disagreement) for a category."""
    pool = {
        "color": list(COLOR_NAMES), "shape": list(SHAPES), "count": [str(i) for i in range(7)],
        "relation": ["yes", "no"], "existence": ["yes", "no"], "text": [w for w in TEXT_WORDS],
        "position": {"left": ["right", "center"], "right": ["left", "center"],
                     "top": ["bottom", "middle"], "bottom": ["top", "middle"]}.get(truth, []),
    }[category]
    if category == "count":  # off-by-one miscounts, as human annotators make
        n = int(truth)
        pool = [str(n - 1), str(n + 1)] if n > 0 else ["1"]
    return [a for a in pool if a != truth]


def _reference_answers(rng: np.random.Generator, truth: str, category: str, n: int = 10) -> list[str]:
    """``n`` references: the raw truth at least 6 times, <= 2 benign variants, <= 2 wrong answers."""
    n_wrong = int(rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15]))
    n_var = int(rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15]))
    alts, variants = _alternatives(truth, category), _variants(truth, category)
    answers = [truth] * (n - n_wrong - n_var)
    answers += [_choice(rng, variants) for _ in range(n_var)]
    answers += [_choice(rng, alts) for _ in range(n_wrong)] if alts else [truth] * n_wrong
    order = rng.permutation(len(answers))
    return [answers[i] for i in order]


def _q_color(rng, size_px):
    kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    scene = _grid_scene(rng, size_px, [_Spec(kind, color)], int(rng.integers(0, 6)),
                        extra_ok=lambda k, c: k != kind)
    q = _choice(rng, [f"What color is the {kind}?", f"What is the color of the {kind}?",
                      f"Which color does the {kind} have?"])
    return scene, q, color


def _q_shape(rng, size_px):
    kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    scene = _grid_scene(rng, size_px, [_Spec(kind, color)], int(rng.integers(0, 6)),
                        extra_ok=lambda k, c: c != color)
    q = _choice(rng, [f"What shape is the {color} object?", f"What is the shape of the {color} object?",
                      f"Which shape is {color}?"])
    return scene, q, kind


def _q_count(rng, size_px):
    target = int(rng.integers(0, 6))
    by_kind = rng.uniform() < 0.5
    kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    if by_kind:
        specs = [_Spec(kind, _choice(rng, COLOR_NAMES)) for _ in range(target)]
        ok = lambda k, c: k != kind  # noqa: E731
        q = _choice(rng, [f"How many {_plural(kind)} are there?", f"How many {_plural(kind)} are in the image?"])
    else:
        specs = [_Spec(_choice(rng, SHAPES), color) for _ in range(target)]
        ok = lambda k, c: c != color  # noqa: E731
        q = _choice(rng, [f"How many {color} shapes are there?", f"How many {color} objects are in the image?"])
    n_extra = int(rng.integers(1 if target == 0 else 0, 6 - target + 1))
    scene = _grid_scene(rng, size_px, specs, n_extra, extra_ok=ok)
    truth = scene.count(kind=kind) if by_kind else scene.count(color=color)
    return scene, q, str(truth)


def _unique_pair_ok(pairs: list[tuple[str, str]]) -> Callable[[str, str], bool]:
    return lambda k, c: (k, c) not in pairs


def _q_position(rng, size_px):
    kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    horizontal = rng.uniform() < 0.5
    side = int(_choice(rng, [0, 2]))
    other = int(rng.integers(0, 3))
    cell = (side, other) if horizontal else (other, side)
    scene = _grid_scene(rng, size_px, [_Spec(kind, color, cell)], int(rng.integers(0, 6)),
                        extra_ok=_unique_pair_ok([(kind, color)]))
    d = _desc(kind, color)
    if horizontal:
        q = _choice(rng, [f"Is the {d} on the left or the right?", f"Is the {d} on the left or right side?"])
        truth = "left" if side == 0 else "right"
    else:
        q = _choice(rng, [f"Is the {d} at the top or the bottom?", f"Is the {d} in the top or bottom part?"])
        truth = "top" if side == 0 else "bottom"
    return scene, q, truth


def _q_relation(rng, size_px):
    (ka, ca), (kb, cb) = (_choice(rng, SHAPES), _choice(rng, COLOR_NAMES)), (None, None)
    while kb is None or (kb, cb) == (ka, ca):
        kb, cb = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    relation = _choice(rng, ["left of", "right of", "above", "below"])
    want_yes = rng.uniform() < 0.5
    lo, hi = sorted(int(v) for v in rng.choice(3, size=2, replace=False))
    # A is left of / above B when its column / row index is smaller
    a_first = want_yes if relation in ("left of", "above") else not want_yes
    a_idx, b_idx = (lo, hi) if a_first else (hi, lo)
    o1, o2 = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    if relation in ("left of", "right of"):
        cell_a, cell_b = (a_idx, o1), (b_idx, o2)
    else:
        cell_a, cell_b = (o1, a_idx), (o2, b_idx)
    scene = _grid_scene(rng, size_px, [_Spec(ka, ca, cell_a), _Spec(kb, cb, cell_b)], int(rng.integers(0, 5)),
                        extra_ok=_unique_pair_ok([(ka, ca), (kb, cb)]))
    a, b = _desc(ka, ca), _desc(kb, cb)
    phrase = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
    q = f"Is the {a} {phrase[relation]} the {b}?"
    return scene, q, "yes" if want_yes else "no"


def _q_existence(rng, size_px):
    kind, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    exists = rng.uniform() < 0.5
    specs = [_Spec(kind, color)] if exists else []
    if not exists:  # hard negatives: same colour or same kind, but not both
        if rng.uniform() < 0.5:
            specs.append(_Spec(_choice(rng, [k for k in SHAPES if k != kind]), color))
        if rng.uniform() < 0.5:
            specs.append(_Spec(kind, _choice(rng, [c for c in COLOR_NAMES if c != color])))
    n_extra = int(rng.integers(1 if not specs else 0, 6 - len(specs) + 1))
    scene = _grid_scene(rng, size_px, specs, n_extra, extra_ok=_unique_pair_ok([(kind, color)]))
    q = _choice(rng, [f"Is there {_article(color)} {color} {kind}?", f"Is there {_article(color)} {color} {kind} in the image?"])
    return scene, q, "yes" if exists else "no"


def _q_text(rng, size_px):
    word = _choice(rng, TEXT_WORDS)
    scene = _grid_scene(rng, size_px, [], int(rng.integers(1, 6)), text=word)
    q = _choice(rng, ["What does the text say?", "What word is written in the image?", "What is written on the label?"])
    return scene, q, word


_QUESTION_MAKERS = {"color": _q_color, "shape": _q_shape, "count": _q_count, "position": _q_position,
                    "relation": _q_relation, "existence": _q_existence, "text": _q_text}


def make_vqa_item(rng: np.random.Generator, category: str, size_px: int = 224) -> VQAItem:
    """Sample a scene and a ``category`` question about it (no rendering)."""
    if category not in _QUESTION_MAKERS:
        raise ValueError(f"category={category!r} is not a VQA category; expected one of {VQA_CATEGORIES}")
    scene, question, answer = _QUESTION_MAKERS[category](rng, size_px)
    return VQAItem(scene=scene, question=question, answer=answer,
                   answers=_reference_answers(rng, answer, category), category=category)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _check_args(kind: str, n: int, seed: int, image_size: int | None, caption_style: str = "global") -> int:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a synthetic kind; expected one of {KINDS}")
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption_style={caption_style!r} is not a caption style; expected one of "
                         f"{tuple(CAPTION_STYLES)}")
    if caption_style != "global" and kind != "images":
        raise ValueError(f"caption_style={caption_style!r} applies to kind 'images' only, got kind {kind!r}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int (number of samples)")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    size = DEFAULT_SIZES[kind] if image_size is None else image_size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 64:
        raise ValueError(f"image_size={image_size!r} must be an int >= 64 pixels (or None for the default "
                         f"{DEFAULT_SIZES[kind]} of kind {kind!r})")
    return int(size)


def _rng(kind: str, seed: int, index: int) -> np.random.Generator:
    # One independent stream per sample: sample i does not depend on n or on earlier samples.
    return np.random.default_rng([int(seed), _KIND_IDS[kind], int(index)])


def sample_scene(kind: str, index: int, seed: int = 0, image_size: int | None = None) -> Scene:
    """Ground-truth :class:`Scene` of sample ``index`` of the ``kind`` stream (no rendering)."""
    size = _check_args(kind, 1, seed, image_size)
    rng = _rng(kind, seed, index)
    if kind == "images":
        return _image_scene(rng, size)
    if kind == "regions":
        return _region_scene(rng, size)
    return make_vqa_item(rng, VQA_CATEGORIES[index % len(VQA_CATEGORIES)], size).scene


def iter_vqa_items(n: int, seed: int = 0, image_size: int | None = None) -> Iterator[VQAItem]:
    """The questions, answers and scenes of ``iter_synthetic("vqa", n, seed)`` without rendering
    images (fast: for answer statistics, baselines and tokenizer corpora)."""
    size = _check_args("vqa", n, seed, image_size)
    return (make_vqa_item(_rng("vqa", seed, i), VQA_CATEGORIES[i % len(VQA_CATEGORIES)], size) for i in range(n))


def make_sample(kind: str, index: int, seed: int = 0, image_size: int | None = None, caption_style: str = "global"):
    """Sample ``index`` of the ``kind`` stream for ``seed`` (what :func:`iter_synthetic` yields)."""
    size = _check_args(kind, 1, seed, image_size, caption_style)
    rng = _rng(kind, seed, index)
    key = f"{kind}-s{seed}-{index:08d}"
    if kind == "images":
        scene = _image_scene(rng, size)
        return ImageSample(key=key, image=render_scene(scene), caption=CAPTION_STYLES[caption_style](scene),
                           label=image_label(scene))
    if kind == "regions":
        scene = _region_scene(rng, size)
        items: list[Shape | TextItem] = [*scene.shapes, *scene.texts]
        regions = [Region(box=tuple(min(max(v, 0.0), float(size)) for v in it.box),  # type: ignore[arg-type]
                          caption=region_caption(it)) for it in items]
        return RegionSample(key=key, image=render_scene(scene), regions=regions, caption=_region_global_caption(scene))
    category = VQA_CATEGORIES[index % len(VQA_CATEGORIES)]
    item = make_vqa_item(rng, category, size)
    messages = [Message("user", f"{IMAGE_PLACEHOLDER}\n{item.question}"), Message("assistant", item.answer)]
    meta = {"question": item.question, "answer": item.answer, "scene": item.scene.to_dict()}
    return ConversationSample(key=key, images=[render_scene(item.scene)], messages=messages, answers=item.answers,
                              category=item.category, meta=meta)


def iter_synthetic(kind: str, n: int, seed: int = 0, image_size: int | None = None,
                   caption_style: str = "global") -> Iterator[Any]:
    """Yield ``n`` synthetic samples of ``kind``: ``"images"`` -> ImageSample, ``"regions"`` ->
    RegionSample, ``"vqa"`` -> ConversationSample. Deterministic for ``seed``; ``image_size`` (pixels,
    square) defaults to 224 for images/vqa and 1024 for regions. ``caption_style`` (images only):
    ``"global"`` (:func:`scene_caption`) or ``"grounded"`` (:func:`grounded_caption`); the images are the same."""
    _check_args(kind, n, seed, image_size, caption_style)  # eagerly: bad arguments fail at the call
    return (make_sample(kind, i, seed, image_size, caption_style) for i in range(n))


def write_synthetic(kind: str, n: int, out_dir: str | Path, seed: int = 0, samples_per_shard: int = 256,
                    image_size: int | None = None, caption_style: str = "global") -> list[Path]:
    """Generate ``n`` samples of ``kind`` and write them as webdataset shards in ``out_dir``
    (through :func:`mmfm.data.shards.write_shards`); returns the shard paths."""
    _check_args(kind, n, seed, image_size, caption_style)
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard!r} must be a positive int")
    from mmfm.data.shards import write_shards  # lazy: the shard layer is only needed to write

    paths = write_shards(iter_synthetic(kind, n, seed=seed, image_size=image_size, caption_style=caption_style), out_dir,
                         samples_per_shard=samples_per_shard)
    return [Path(p) for p in paths]


def corpus_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Every kind of text the generators produce, for training a tokenizer: ``n`` scenes' worth of
    image captions, region local + global captions, VQA questions and all reference answers, plus
    the vocabulary (colours, shapes, number words, text words, chat words). No image is rendered."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int")
    texts: list[str] = []
    for i in range(n):
        scene = _image_scene(_rng("images", seed, i), 224)
        texts.append(scene_caption(scene))
        rscene = _region_scene(_rng("regions", seed, i), 1024)
        texts.append(_region_global_caption(rscene))
        texts.extend(region_caption(it) for it in [*rscene.shapes, *rscene.texts])
        item = make_vqa_item(_rng("vqa", seed, i), VQA_CATEGORIES[i % len(VQA_CATEGORIES)], 224)
        texts.append(item.question)
        texts.extend(dict.fromkeys(item.answers))
    vocab = [*COLOR_NAMES, *SHAPES, *(_plural(s) for s in SHAPES), *BACKGROUNDS, *NUMBER_WORDS,
             *(str(i) for i in range(11)), *TEXT_WORDS, *(w.upper() for w in TEXT_WORDS), *CHAT_WORDS,
             *VQA_CATEGORIES, *CODE_CHARS]
    texts.extend(vocab)
    return texts
