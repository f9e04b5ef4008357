"""Sample schemas, one per job. Each is a plain dataclass that round-trips through a webdataset
sample dict (``to_wds`` / ``from_wds``): images as PNG/JPEG bytes, metadata as JSON.

- :class:`ImageSample`: an image with an optional caption and class label (RADIO distillation).
- :class:`RegionSample`: an image with boxes in pixel coordinates, one local caption per box and
  an optional global caption (PS3 pre-training).
- :class:`ConversationSample`: one or more images and a multi-turn conversation in which the user
  turns hold one ``<image>`` placeholder per image, in image order; optional VQA answer lists (VLM).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    """Encode a PIL image to ``png`` or ``jpg`` bytes."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else "PNG", quality=95)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises ``PIL.UnidentifiedImageError``/``OSError`` if corrupt."""
    image = Image.open(io.BytesIO(data))
    image.load()  # force full decode so truncated files fail here, not later
    return image.convert("RGB")


@dataclass
class ImageSample:
    key: str
    image: Image.Image
    caption: str | None = None
    label: int | None = None

    def to_wds(self, image_format: str = "png") -> dict[str, Any]:
        meta = {"caption": self.caption, "label": self.label}
        return {"__key__": self.key, image_format: encode_image(self.image, image_format), "json": json.dumps(meta)}

    @classmethod
    def from_wds(cls, sample: dict[str, Any]) -> ImageSample:
        meta = json.loads(_get(sample, "json"))
        return cls(key=sample["__key__"], image=decode_image(_image_bytes(sample)), caption=meta.get("caption"),
                   label=meta.get("label"))


@dataclass
class Region:
    """A box ``(x0, y0, x1, y1)`` in pixel coordinates of the full image, with its local caption."""

    box: tuple[float, float, float, float]
    caption: str

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"Region box must satisfy x1 > x0 and y1 > y0, got {self.box}")
        self.box = (float(x0), float(y0), float(x1), float(y1))


@dataclass
class RegionSample:
    key: str
    image: Image.Image
    regions: list[Region]
    caption: str | None = None

    def to_wds(self, image_format: str = "png") -> dict[str, Any]:
        meta = {"caption": self.caption, "regions": [asdict(r) for r in self.regions]}
        return {"__key__": self.key, image_format: encode_image(self.image, image_format), "json": json.dumps(meta)}

    @classmethod
    def from_wds(cls, sample: dict[str, Any]) -> RegionSample:
        meta = json.loads(_get(sample, "json"))
        regions = [Region(box=tuple(r["box"]), caption=r["caption"]) for r in meta["regions"]]
        return cls(key=sample["__key__"], image=decode_image(_image_bytes(sample)), regions=regions,
                   caption=meta.get("caption"))


@dataclass
class Message:
    role: str  # "user" | "assistant" | "system"
    content: str


@dataclass
class ConversationSample:
    """Images are stored as ``0.png``, ``1.png``, ... and consumed in placeholder order.

    ``answers`` holds, for VQA data, the reference answers (VQAv2 style: 10 per question) of the
    last assistant turn; ``category`` names the question type for per-category metrics.
    """

    key: str
    images: list[Image.Image]
    messages: list[Message]
    answers: list[str] | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in self.messages)
        if n_placeholders != len(self.images):
            raise ValueError(
                f"ConversationSample {self.key!r}: {len(self.images)} images but {n_placeholders} "
                f"{IMAGE_PLACEHOLDER} placeholders; put one placeholder per image in the user turns"
            )

    def to_wds(self, image_format: str = "png") -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": self.key}
        for i, image in enumerate(self.images):
            sample[f"{i}.{image_format}"] = encode_image(image, image_format)
        meta = {"messages": [asdict(m) for m in self.messages], "answers": self.answers, "category": self.category,
                "meta": self.meta, "num_images": len(self.images)}
        sample["json"] = json.dumps(meta)
        return sample

    @classmethod
    def from_wds(cls, sample: dict[str, Any]) -> ConversationSample:
        meta = json.loads(_get(sample, "json"))
        images = []
        for i in range(meta["num_images"]):
            data = next((sample[k] for k in (f"{i}.png", f"{i}.jpg", f"{i}.jpeg") if k in sample), None)
            if data is None:
                raise KeyError(f"{i}.png")
            images.append(decode_image(data))
        return cls(key=sample["__key__"], images=images, messages=[Message(**m) for m in meta["messages"]],
                   answers=meta.get("answers"), category=meta.get("category"), meta=meta.get("meta") or {})


SCHEMAS = {"image": ImageSample, "regions": RegionSample, "conversation": ConversationSample}


def _get(sample: dict[str, Any], key: str) -> Any:
    if key not in sample:
        raise KeyError(key)
    value = sample[key]
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for key in ("png", "jpg", "jpeg", "webp"):
        if key in sample:
            return sample[key]
    raise KeyError("png|jpg")
