"""Conversation samples -> model inputs: chat template, image-placeholder expansion, padding.

Each ``<image>`` token of the chat template is expanded to the ``K`` placeholder tokens its image
needs (``vlm.tokens_per_image(H, W)``, one per compressed visual token); labels stay ``-100`` there.
Training batches are right-padded (labels ``-100`` on padding); generation prompts are left-padded so
each row's last real token is last (padding never enters Mamba states: the attention mask zeros it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmfm.data.schemas import IMAGE_PLACEHOLDER, ConversationSample, ImageSample, Message
from mmfm.data.tokenizer import IGNORE_INDEX, apply_chat_template

CAPTION_PROMPT = f"{IMAGE_PLACEHOLDER}\nDescribe the image."


IMAGE_POSITIONS = ("first", "after_text")


def place_images(content: str, position: str = "first") -> str:
    """Put a user turn's ``<image>`` placeholders first (``"<image>\\n{text}"``) or after its text."""
    if position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {position!r}")
    n = content.count(IMAGE_PLACEHOLDER)
    text = content.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
    if n == 0:
        return content
    images = "\n".join([IMAGE_PLACEHOLDER] * n)
    return f"{images}\n{text}" if position == "first" else f"{text}\n{images}"


def image_to_tensor(image, size: int | None = None) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1], optionally resized (antialiased) to ``size x size``."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int, counts: Sequence[int]
                        ) -> tuple[list[int], list[int]]:
    """Replace the i-th ``image_token_id`` with ``counts[i]`` copies (labels -100)."""
    out_ids, out_labels, i = [], [], 0
    for t, lab in zip(ids, labels):
        if t == image_token_id:
            if i >= len(counts):
                raise ValueError(f"conversation has more {IMAGE_PLACEHOLDER} tokens than its {len(counts)} images")
            out_ids += [t] * counts[i]
            out_labels += [IGNORE_INDEX] * counts[i]
            i += 1
        else:
            out_ids.append(t)
            out_labels.append(lab)
    if i != len(counts):
        raise ValueError(f"conversation has {i} {IMAGE_PLACEHOLDER} tokens but {len(counts)} images")
    return out_ids, out_labels


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # each (3, H, W)


def caption_conversation(sample: ImageSample) -> ConversationSample:
    """Stage-1 (alignment) data: an image and its caption as a one-turn conversation."""
    if not sample.caption:
        raise ValueError(f"image sample {sample.key!r} has no caption; alignment needs captioned images")
    return ConversationSample(key=sample.key, images=[sample.image],
                              messages=[Message("user", CAPTION_PROMPT), Message("assistant", sample.caption)])


def encode_sample(sample: ConversationSample, tokenizer, image_token_id: int,
                  tokens_per_image: Callable[[int, int], int], image_size: int | None,
                  max_length: int | None = None, image_position: str = "first") -> Encoded:
    """Tokenize a conversation for training (labels only on assistant answers); ``image_position`` moves the
    placeholders of user turns (:func:`place_images`; ``"first"`` keeps the sample as written)."""
    messages = sample.messages
    if image_position != "first":
        messages = [Message(m.role, place_images(m.content, image_position)) if m.role == "user" else m
                    for m in messages]
    enc = apply_chat_template(tokenizer, messages)
    images = [image_to_tensor(im, image_size) for im in sample.images]
    counts = [tokens_per_image(*im.shape[-2:]) for im in images]
    ids, labels = expand_image_tokens(enc["input_ids"], enc["labels"], image_token_id, counts)
    if max_length is not None and len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            raise ValueError(f"sample {sample.key!r}: {len(ids)} tokens exceed max_length={max_length} inside an "
                             f"image's placeholders; raise max_length or compress images more")
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, images)


def collate_train(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Right-padded ``input_ids``/``labels``/``attention_mask`` (B, L) and the images in placeholder order."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "images": [im for e in batch for im in e.images]}


def build_prompts(tokenizer, questions: Sequence[str], image_token_id: int, tokens_per_image: int,
                  system: str | None = None, image_position: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded generation prompts, one image each: ``(input_ids, attention_mask)`` (B, L).

    A question without ``<image>`` gets one, placed by ``image_position`` (default first:
    ``"<image>\\n" + question``); with ``"after_text"`` placeholders move after the text.
    """
    rows = []
    for q in questions:
        content = q if IMAGE_PLACEHOLDER in q else f"{IMAGE_PLACEHOLDER}\n{q}"
        if image_position != "first":
            content = place_images(content, image_position)
        messages = ([Message("system", system)] if system else []) + [Message("user", content)]
        enc = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
        n_img = enc["num_images"]
        ids, _ = expand_image_tokens(enc["input_ids"], enc["labels"], image_token_id, [tokens_per_image] * n_img)
        rows.append(ids)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask
