"""Image transforms for patch-based vision encoders.

- :func:`resize_to_multiple` / :func:`center_crop_to_multiple`: sizes that are multiples of the
  patch size (an invalid requested size is an error naming the nearest valid sizes).
- :func:`to_tensor`: PIL -> ``(3, H, W)`` float in ``[0, 1]``.
- :data:`NORMALIZATION` / :func:`normalize`: mean/std of the usual model families.
- :class:`ResolutionSchedule`, :class:`MultiResolutionBatchSampler`, :func:`multires_batches`:
  one resolution per batch, drawn deterministically from ``(seed, step)`` with configurable
  probabilities (map-style datasets through the sampler, streams through ``multires_batches``).
- :func:`mosaic` / :func:`unmosaic`: ``k x k`` tiles into one image and back, with tile boxes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# (mean, std) per model family, RGB order, for inputs in [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "openai_clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DINOv2 uses ImageNet statistics
    "sam": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # SAM's (123.675, 116.28, 103.53) / 255
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

Size = tuple[int, int]


# --------------------------------------------------------------------------------------------- sizes


def _as_hw(size: int | Sequence[int], name: str = "size") -> Size:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, (int, np.integer)) for s in size):
        return int(size[0]), int(size[1])
    raise TypeError(f"{name}={size!r}: expected an int or an (H, W) pair of ints")


def nearest_multiples(value: int, multiple: int) -> tuple[int, int]:
    """The nearest multiples of ``multiple`` below and above ``value`` (the lower one is >= multiple)."""
    lower = max(multiple, value // multiple * multiple)
    upper = max(multiple, -(-value // multiple) * multiple)
    return lower, upper


def check_size(size: int | Sequence[int], patch_size: int, name: str = "size") -> Size:
    """Validate that ``size`` (int or (H, W)) is a positive multiple of ``patch_size``; returns ``(H, W)``."""
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r}: must be a positive int")
    hw = _as_hw(size, name)
    for dim, v in zip(("height", "width"), hw):
        if v < 1 or v % patch_size:
            lo, hi = nearest_multiples(max(v, 1), patch_size)
            nearest = str(lo) if lo == hi else f"{lo} or {hi}"
            raise ValueError(f"{name}={size!r}: {dim} {v} is not a multiple of patch_size={patch_size}; "
                             f"nearest valid {dim}: {nearest}")
    return hw


def _image_hw(image: Image.Image | torch.Tensor) -> Size:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4):
        return int(image.shape[-2]), int(image.shape[-1])
    raise TypeError(f"image: expected a PIL image or a (3, H, W) / (B, 3, H, W) tensor, got {type(image).__name__}"
                    + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""))


def _resize(image: Image.Image | torch.Tensor, hw: Size) -> Image.Image | torch.Tensor:
    if _image_hw(image) == hw:
        return image
    if isinstance(image, Image.Image):
        return image.resize((hw[1], hw[0]), Image.BICUBIC)
    x = image if image.ndim == 4 else image[None]
    out = F.interpolate(x.float(), size=hw, mode="bicubic", align_corners=False, antialias=True).to(image.dtype)
    return out if image.ndim == 4 else out[0]


def resize_to_multiple(image: Image.Image | torch.Tensor, size: int | Sequence[int] | None = None,
                       patch_size: int = 16) -> Image.Image | torch.Tensor:
    """Resize ``image`` (PIL, ``(3, H, W)`` or ``(B, 3, H, W)``) to a patch-size multiple.

    With ``size`` (int = square, or (H, W)): resize to exactly that size, which must be a multiple
    of ``patch_size`` (else ValueError naming the nearest valid sizes). Without ``size``: resize to
    the nearest multiple of ``patch_size`` of each side (aspect ratio approximately kept).
    """
    if size is None:
        h, w = _image_hw(image)
        hw = tuple(max(patch_size, round(v / patch_size) * patch_size) for v in (h, w))
        check_size(hw, patch_size)
        return _resize(image, hw)  # type: ignore[arg-type]
    return _resize(image, check_size(size, patch_size))


def center_crop_to_multiple(image: Image.Image | torch.Tensor, patch_size: int = 16,
                            size: int | Sequence[int] | None = None) -> Image.Image | torch.Tensor:
    """Center-crop ``image`` to a patch-size multiple.

    Without ``size``: crop each side down to its largest multiple of ``patch_size`` (no resampling;
    an image smaller than one patch is an error). With ``size`` (a valid multiple, int or (H, W)):
    resize so that the image covers ``size`` keeping the aspect ratio, then center-crop to it.
    """
    h, w = _image_hw(image)
    if size is None:
        if h < patch_size or w < patch_size:
            raise ValueError(f"image of size {h}x{w} is smaller than one patch ({patch_size}); resize it first")
        th, tw = h // patch_size * patch_size, w // patch_size * patch_size
    else:
        th, tw = check_size(size, patch_size)
        scale = max(th / h, tw / w)
        image = _resize(image, (max(th, round(h * scale)), max(tw, round(w * scale))))
        h, w = _image_hw(image)
    top, left = (h - th) // 2, (w - tw) // 2
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + tw, top + th))
    return image[..., top:top + th, left:left + tw]


# --------------------------------------------------------------------------------------------- tensors


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or ``(H, W, 3)`` uint8 array -> float32 tensor ``(3, H, W)`` in ``[0, 1]``."""
    if isinstance(image, Image.Image):
        array = np.array(image.convert("RGB"))  # a writable copy (torch warns on read-only)
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        array = image
    else:
        raise TypeError(f"image: expected a PIL image or an (H, W, 3) array, got {type(image).__name__}")
    if array.dtype != np.uint8:
        raise TypeError(f"image array dtype {array.dtype}: expected uint8 (0..255)")
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def _stats(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in NORMALIZATION:
        raise ValueError(f"normalization {name!r} unknown; use one of {sorted(NORMALIZATION)}")
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"x of shape {tuple(x.shape)}: expected (3, H, W) or (B, 3, H, W)")
    mean, std = NORMALIZATION[name]
    shape = (3, 1, 1)
    return (torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape),
            torch.tensor(std, dtype=x.dtype, device=x.device).view(shape))


def normalize(x: torch.Tensor, name: str = "openai_clip") -> torch.Tensor:
    """``(x - mean) / std`` for ``x`` of shape ``(3, H, W)`` or ``(B, 3, H, W)`` in ``[0, 1]``."""
    mean, std = _stats(name, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, name: str = "openai_clip") -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    mean, std = _stats(name, x)
    return x * std + mean


# --------------------------------------------------------------------------------------------- multi-res


class ResolutionSchedule:
    """One resolution per training step, drawn from ``resolutions`` with ``probabilities``.

    The draw for step ``s`` depends only on ``(seed, s)``, so a resumed job gets the same
    resolutions and all ranks agree without communication.
    """

    def __init__(self, resolutions: Sequence[int | Sequence[int]], probabilities: Sequence[float] | None = None,
                 seed: int = 0, patch_size: int | None = None) -> None:
        if not resolutions:
            raise ValueError("resolutions: need at least one resolution, e.g. [224, 448]")
        self.resolutions: list[Size] = [
            check_size(r, patch_size, "resolutions") if patch_size else _as_hw(r, "resolutions") for r in resolutions
        ]
        if probabilities is None:
            probabilities = [1.0] * len(self.resolutions)
        if len(probabilities) != len(self.resolutions):
            raise ValueError(f"probabilities has {len(probabilities)} entries for {len(self.resolutions)} resolutions")
        if any(p < 0 for p in probabilities) or sum(probabilities) <= 0:
            raise ValueError(f"probabilities={list(probabilities)}: must be >= 0 with a positive sum")
        total = float(sum(probabilities))
        self.probabilities = [p / total for p in probabilities]
        self.seed = seed

    def resolution(self, step: int) -> Size:
        """The ``(H, W)`` of batch ``step``."""
        rng = random.Random((self.seed * 0x9E3779B1 + step * 0x85EBCA6B) & 0xFFFFFFFFFFFF)
        return rng.choices(self.resolutions, weights=self.probabilities, k=1)[0]


class MultiResolutionBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for map-style datasets: yields lists of ``(index, (H, W))``, one resolution per
    batch from a :class:`ResolutionSchedule`. ``batch_size`` is an int or a dict ``{resolution:
    batch size}`` (e.g. smaller batches at high resolution). The dataset's ``__getitem__`` receives
    the ``(index, (H, W))`` pair. Index order per epoch comes from ``torch.randperm`` seeded by
    ``(seed, epoch)`` when ``shuffle``.
    """

    def __init__(self, num_samples: int, batch_size: int | dict[Any, int], schedule: ResolutionSchedule,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r}: must be a positive int")
        self.num_samples = num_samples
        self.schedule = schedule
        if isinstance(batch_size, dict):
            self.batch_sizes = {_as_hw(k, "batch_size key"): int(v) for k, v in batch_size.items()}
            missing = [r for r in schedule.resolutions if r not in self.batch_sizes]
            if missing:
                raise ValueError(f"batch_size dict lacks resolutions {missing}")
        elif isinstance(batch_size, int) and batch_size > 0:
            self.batch_sizes = {r: batch_size for r in schedule.resolutions}
        else:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive int or a dict resolution -> int")
        if any(v < 1 for v in self.batch_sizes.values()):
            raise ValueError(f"batch_size={batch_size!r}: every batch size must be >= 1")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start_step = 0  # global step of the first batch of this epoch (for the schedule)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, Size]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        pos, step = 0, self.start_step
        while pos < len(order):
            res = self.schedule.resolution(step)
            bs = self.batch_sizes[res]
            chunk = order[pos:pos + bs]
            if len(chunk) < bs and self.drop_last:
                return
            yield [(i, res) for i in chunk]
            pos += bs
            step += 1


def multires_batches(samples: Iterable[Any], schedule: ResolutionSchedule, batch_size: int,
                     to_image: Callable[[Any], Image.Image] = lambda s: s.image, patch_size: int = 16,
                     normalization: str | None = None, start_step: int = 0,
                     ) -> Iterator[tuple[torch.Tensor, list[Any], Size]]:
    """Batch a stream (e.g. a :class:`~mmfm.data.shards.ShardDataset`) with one resolution per batch.

    Yields ``(images (B, 3, H, W), samples, (H, W))``: each image is center-cropped to the batch
    resolution, converted to ``[0, 1]`` and optionally normalized. The last batch may be smaller.
    """
    step, buf = start_step, []
    for sample in samples:
        buf.append(sample)
        if len(buf) == batch_size:
            yield _batch(buf, schedule.resolution(step), to_image, patch_size, normalization)
            buf, step = [], step + 1
    if buf:
        yield _batch(buf, schedule.resolution(step), to_image, patch_size, normalization)


def _batch(samples: list[Any], res: Size, to_image: Callable, patch_size: int,
           normalization: str | None) -> tuple[torch.Tensor, list[Any], Size]:
    images = torch.stack([to_tensor(center_crop_to_multiple(to_image(s), patch_size, res)) for s in samples])
    if normalization:
        images = normalize(images, normalization)
    return images, samples, res


# --------------------------------------------------------------------------------------------- mosaic


def mosaic(images: Sequence[torch.Tensor] | torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile ``k * k`` images ``(3, h, w)`` row-major into one ``(3, k*h, k*w)`` image.

    Returns ``(image, boxes)`` with ``boxes`` ``(k*k, 4)`` float ``(x0, y0, x1, y1)`` in pixels of the
    mosaic (tile ``i`` at row ``i // k``, column ``i % k``), so each tile can be processed separately.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be a positive int")
    tiles = list(images)
    if len(tiles) != k * k:
        raise ValueError(f"mosaic with k={k} needs {k * k} images, got {len(tiles)}")
    shape = tiles[0].shape
    if len(shape) != 3:
        raise ValueError(f"images must be (C, h, w) tensors, got shape {tuple(shape)}")
    bad = [i for i, t in enumerate(tiles) if t.shape != shape]
    if bad:
        raise ValueError(f"mosaic images must share one shape {tuple(shape)}; image {bad[0]} has "
                         f"{tuple(tiles[bad[0]].shape)} (resize them first)")
    c, h, w = shape
    grid = torch.stack(tiles).view(k, k, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, k * h, k * w)
    return grid, tile_boxes(k, h, w)


def tile_boxes(k: int, h: int, w: int) -> torch.Tensor:
    """``(k*k, 4)`` boxes ``(x0, y0, x1, y1)`` of a ``k x k`` mosaic of ``(h, w)`` tiles, row-major."""
    rows, cols = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    x0, y0 = (cols.reshape(-1) * w).float(), (rows.reshape(-1) * h).float()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def unmosaic(image: torch.Tensor, k: int) -> torch.Tensor:
    """Split a ``(C, k*h, k*w)`` (or ``(B, C, k*h, k*w)``) mosaic into ``(k*k, C, h, w)``
    (or ``(B, k*k, C, h, w)``), row-major: the inverse of :func:`mosaic`."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be a positive int")
    if image.ndim not in (3, 4):
        raise ValueError(f"image of shape {tuple(image.shape)}: expected (C, H, W) or (B, C, H, W)")
    H, W = image.shape[-2:]
    if H % k or W % k:
        raise ValueError(f"image of size {H}x{W} cannot be split into {k}x{k} equal tiles")
    x = image if image.ndim == 4 else image[None]
    b, c = x.shape[:2]
    h, w = H // k, W // k
    tiles = x.reshape(b, c, k, h, k, w).permute(0, 2, 4, 1, 3, 5).reshape(b, k * k, c, h, w)
    return tiles if image.ndim == 4 else tiles[0]
