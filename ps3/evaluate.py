"""PS3 evaluation on held-out region data.

- **top-down selection**: each box's caption is the prompt; of the ``k`` patches selected, the fraction
  that overlaps the box (hit rate@k), against the exact expectation for a uniformly random selection
  (the fraction of all selectable patches that overlap the box);
- **bottom-up selection**: the same with no prompt, against the union of the image's boxes;
- **local retrieval**: each region feature (patches under the box, selected by force) retrieves a caption
  among all distinct local captions of the set; top-1 accuracy, against the global-only baseline (the
  low-res global features pooled under the box) and chance.
"""

from __future__ import annotations

from typing import Any

import torch

from mmfm.ps3.losses import box_mask
from mmfm.ps3.model import PS3Encoder
from mmfm.ps3.objective import ObjectiveConfig, PS3Batch, PS3Objective, global_only_region_features, normalize


def _overlap_masks(encoder: PS3Encoder, boxes, hw) -> list[torch.Tensor]:
    """Per scale (g*s, g*s) bool: patches overlapping any of ``boxes``."""
    masks = []
    for side in encoder.grid_sizes():
        m = torch.zeros(side, side, dtype=torch.bool)
        for box in boxes:
            m |= box_mask(box, hw, side) > 0
        masks.append(m)
    return masks


def _hit_rate(positions: torch.Tensor, masks: list[torch.Tensor]) -> float:
    hits = [bool(masks[int(s)][int(y), int(x)]) for s, y, x in positions.tolist()]
    return sum(hits) / max(len(hits), 1)


def _random_rate(masks: list[torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


@torch.no_grad()
def evaluate_ps3(objective: PS3Objective, batches: list[PS3Batch], k: int = 16) -> dict[str, Any]:
    """Selection hit rates vs random and local retrieval vs the global-only baseline."""
    objective.eval()
    enc, text = objective.encoder, objective.text
    td, td_rand, bu, bu_rand = [], [], [], []
    region_feats, global_feats, captions = [], [], []
    for batch in batches:
        hw = tuple(batch.images.shape[-2:])
        tokens, kv = enc.encode_global(batch.images)
        gfeat = tokens[:, enc.vit.num_prefix_tokens:]
        bottom_up, _ = enc.saliency_maps(gfeat, None)
        bu_pos = enc.select(enc.upsample_maps(bottom_up), k)
        for i, boxes in enumerate(batch.boxes):
            masks = _overlap_masks(enc, boxes, hw)
            bu.append(_hit_rate(bu_pos[i], masks))
            bu_rand.append(_random_rate(masks))
            prompts = text(batch.local_captions[i])
            for j, box in enumerate(boxes):
                _, top_down = enc.saliency_maps(gfeat[i:i + 1], prompts[j:j + 1])
                pos = enc.select(enc.upsample_maps(top_down), k)[0]
                masks = _overlap_masks(enc, [box], hw)
                td.append(_hit_rate(pos, masks))
                td_rand.append(_random_rate(masks))
        scales, force = objective.box_targets(batch)
        positions = enc.select(enc.upsample_maps(bottom_up), k, force)
        local = enc.encode_local(batch.images, positions, kv)
        region_feats.append(enc.local_proj(objective.region_features(batch, positions, local, scales)))
        global_feats.append(enc.local_proj(global_only_region_features(enc, batch.images, batch.boxes)))
        captions.extend(c for caps in batch.local_captions for c in caps)
    vocab = sorted(set(captions))
    text_emb = normalize(text(vocab))
    truth = torch.tensor([vocab.index(c) for c in captions])

    def top1(feats: list[torch.Tensor]) -> float:
        pred = (normalize(torch.cat(feats)) @ text_emb.t()).argmax(-1)
        return float((pred == truth).float().mean())

    def mean(x: list[float]) -> float:
        return sum(x) / max(len(x), 1)

    return {
        "k": k,
        "top_down_hit_rate": mean(td), "top_down_random": mean(td_rand),
        "bottom_up_hit_rate": mean(bu), "bottom_up_random": mean(bu_rand),
        "local_retrieval_top1": top1(region_feats), "global_only_retrieval_top1": top1(global_feats),
        "retrieval_chance": 1.0 / len(vocab), "num_regions": len(captions), "num_captions": len(vocab),
    }


def format_table(metrics: dict[str, Any]) -> str:
    k = metrics["k"]
    rows = [
        (f"top-down selection, hit rate@{k}", metrics["top_down_hit_rate"], metrics["top_down_random"]),
        (f"bottom-up selection, hit rate@{k}", metrics["bottom_up_hit_rate"], metrics["bottom_up_random"]),
        ("local retrieval top-1 (PS3 local)", metrics["local_retrieval_top1"], metrics["retrieval_chance"]),
        ("local retrieval top-1 (global-only)", metrics["global_only_retrieval_top1"], metrics["retrieval_chance"]),
    ]
    lines = [f"{'metric':40s} {'value':>8s} {'random/chance':>14s}"]
    lines += [f"{name:40s} {v:8.3f} {r:14.3f}" for name, v, r in rows]
    return "\n".join(lines)


__all__ = ["ObjectiveConfig", "evaluate_ps3", "format_table"]
