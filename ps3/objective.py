"""PS3 pre-training objective: local + global contrastive losses and selection supervision.

For each box the *scale that covers it* is the smallest scale at which the box spans at least
``min_box_tokens`` patches per side (else the largest scale). During training the patches under every
box at its scale are forced into the selection (the rest of the budget is filled bottom-up), so each
box has local features; a box's region feature is the mean of its selected patches' features.

- local contrastive: region features (``local_proj``) vs the local captions' text embeddings;
- global contrastive: the global summary (``global_proj``) vs the global caption (keeps low-res quality);
- selection supervision: bottom-up logits of a box's scale channel vs the union of box coverage
  assigned to that scale; top-down logits, with one box's caption embedding as the prompt, vs that
  box's coverage (both at the low-res grid, class-balanced BCE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.ps3.losses import ContrastiveLoss, box_mask, selection_loss
from mmfm.ps3.model import PS3Encoder
from mmfm.ps3.text import TextTower

Box = tuple[float, float, float, float]


@dataclass
class PS3Batch:
    """images (B, 3, S, S) in [0, 1]; boxes[i] in pixel coordinates of images[i]; one caption per box."""

    images: torch.Tensor
    boxes: list[list[Box]]
    local_captions: list[list[str]]
    global_captions: list[str]


@dataclass
class ObjectiveConfig:
    loss: str = "siglip"  # or "clip"
    local_weight: float = 1.0
    global_weight: float = 1.0
    selection_weight: float = 1.0
    min_box_tokens: int = 2
    num_look_close: int = 64


def clip_region(region, width: int, height: int, key: str):
    """A region with its box clamped to the image (documented clamp: boxes that stick out are cut at the border);
    a box that lies wholly outside the image is a ValueError naming the sample."""
    x0, y0, x1, y1 = region.box
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(f"sample {key!r}: region box {region.box} ({region.caption!r}) lies outside the "
                         f"{width}x{height} image; fix the shard's boxes (pixel coordinates of the full image)")
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return region
    return type(region)(box=(cx0, cy0, cx1, cy1), caption=region.caption)


def batch_from_samples(samples, image_size: int) -> PS3Batch:
    """RegionSamples -> a PS3Batch with images resized to ``image_size`` square and boxes rescaled."""
    import numpy as np

    images, boxes, captions, global_captions = [], [], [], []
    for s in samples:
        w, h = s.image.size
        img = s.image.convert("RGB").resize((image_size, image_size))
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        sx, sy = image_size / w, image_size / h
        boxes.append([(r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy)
                      for r in (clip_region(r, w, h, getattr(s, "key", "?")) for r in s.regions)])
        captions.append([r.caption for r in s.regions])
        global_captions.append(s.caption or "")
    return PS3Batch(torch.stack(images), boxes, captions, global_captions)


def scale_for_box(box: Box, image_hw: tuple[int, int], grid_sizes: list[int], min_tokens: int) -> int:
    """Index of the smallest scale at which the box spans ``min_tokens`` patches per side (else the largest)."""
    h, w = image_hw
    side = min((box[2] - box[0]) / w, (box[3] - box[1]) / h)
    for i, g in enumerate(grid_sizes):
        if side * g >= min_tokens:
            return i
    return len(grid_sizes) - 1


class PS3Objective(nn.Module):
    """Holds the encoder, text tower and loss temperatures; ``forward(batch)`` returns the loss terms."""

    def __init__(self, encoder: PS3Encoder, text: TextTower, cfg: ObjectiveConfig) -> None:
        super().__init__()
        if text.embed_dim != encoder.cfg.embed_dim or text.embed_dim != encoder.cfg.prompt_dim:
            raise ValueError(f"text tower width {text.embed_dim} must equal PS3 embed_dim "
                             f"{encoder.cfg.embed_dim} and prompt_dim {encoder.cfg.prompt_dim}")
        self.encoder = encoder
        self.text = text
        self.cfg = cfg
        self.local_loss = ContrastiveLoss(cfg.loss)
        self.global_loss = ContrastiveLoss(cfg.loss)

    def box_targets(self, batch: PS3Batch) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Scale index per box, and per scale the (B, g*s, g*s) bool masks of patches under its boxes."""
        enc = self.encoder
        sides = enc.grid_sizes()
        hw = tuple(batch.images.shape[-2:])
        scales = [[scale_for_box(b, hw, sides, self.cfg.min_box_tokens) for b in boxes] for boxes in batch.boxes]
        force = [torch.zeros(len(batch.boxes), s, s, dtype=torch.bool, device=batch.images.device) for s in sides]
        for i, boxes in enumerate(batch.boxes):
            for box, si in zip(boxes, scales[i]):
                force[si][i] |= box_mask(box, hw, sides[si]).to(force[si].device) > 0
        return scales, force

    def region_features(self, batch: PS3Batch, positions: torch.Tensor, local: torch.Tensor,
                        scales: list[list[int]]) -> torch.Tensor:
        """Mean local feature of the selected patches under each box, (num_boxes, D), boxes in batch order."""
        sides = self.encoder.grid_sizes()
        hw = tuple(batch.images.shape[-2:])
        feats = []
        for i, boxes in enumerate(batch.boxes):
            for box, si in zip(boxes, scales[i]):
                cover = box_mask(box, hw, sides[si]).to(local.device)
                pos = positions[i]
                side = sides[si]
                at_scale = pos[:, 0] == si
                inside = at_scale & (cover[pos[:, 1].clamp(max=side - 1), pos[:, 2].clamp(max=side - 1)] > 0)
                feats.append(local[i][inside].mean(0))
        return torch.stack(feats)

    def forward(self, batch: PS3Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        enc = self.encoder
        images = batch.images
        scales, force = self.box_targets(batch)
        tokens, kv = enc.encode_global(images)
        s = enc.vit.num_prefix_tokens
        summary, global_features = tokens[:, 0], tokens[:, s:]
        # Top-down prompt: one random box per image, its caption embedding.
        all_captions = [c for caps in batch.local_captions for c in caps]
        text_local = self.text(all_captions)  # (num_boxes, E)
        starts = torch.tensor([0] + [len(c) for c in batch.local_captions]).cumsum(0)
        pick = [int(torch.randint(len(c), (1,), generator=generator)) for c in batch.local_captions]
        prompt_idx = torch.stack([starts[i] + pick[i] for i in range(len(pick))])
        bottom_up, top_down = enc.saliency_maps(global_features, text_local[prompt_idx])
        maps = enc.upsample_maps(bottom_up)
        positions = enc.select(maps, self.cfg.num_look_close, force)
        local = enc.encode_local(images, positions, kv)

        regions = enc.local_proj(self.region_features(batch, positions, local, scales))
        loss_local = self.local_loss(regions, text_local)
        loss_global = self.global_loss(enc.global_proj(summary), self.text(batch.global_captions))

        g = enc.cfg.base_grid
        hw = tuple(images.shape[-2:])
        bu_target = torch.zeros_like(bottom_up)
        td_target = torch.zeros_like(bottom_up)
        for i, boxes in enumerate(batch.boxes):
            for j, (box, si) in enumerate(zip(boxes, scales[i])):
                cover = box_mask(box, hw, g).to(bottom_up.device)
                bu_target[i, si] = torch.maximum(bu_target[i, si], cover)
                if j == pick[i]:
                    td_target[i, si] = cover
        loss_select = selection_loss(bottom_up, bu_target) + selection_loss(top_down, td_target)
        total = (self.cfg.local_weight * loss_local + self.cfg.global_weight * loss_global
                 + self.cfg.selection_weight * loss_select)
        return {"loss": total, "loss_local": loss_local.detach(), "loss_global": loss_global.detach(),
                "loss_select": loss_select.detach(), "k": torch.tensor(float(positions.shape[1]))}


def global_only_region_features(encoder: PS3Encoder, images: torch.Tensor, boxes: list[list[Box]]) -> torch.Tensor:
    """Baseline: coverage-weighted mean of the *low-res* global patch features under each box, (num_boxes, D)."""
    tokens, _ = encoder.encode_global(images)
    feats = tokens[:, encoder.vit.num_prefix_tokens:]
    g = encoder.cfg.base_grid
    hw = tuple(images.shape[-2:])
    out = []
    for i, bs in enumerate(boxes):
        for box in bs:
            w = box_mask(box, hw, g).flatten().to(feats.device)
            out.append((w[:, None] * feats[i]).sum(0) / w.sum().clamp(min=1e-6))
    return torch.stack(out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
