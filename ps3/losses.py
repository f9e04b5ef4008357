"""PS3 pre-training losses: contrastive (SigLIP sigmoid or CLIP softmax) and selection supervision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveLoss(nn.Module):
    """Image/region embeddings ``(N, E)`` vs text embeddings ``(N, E)``; row ``i`` matches row ``i``.

    ``kind="siglip"``: pairwise sigmoid loss with learned temperature and bias (SigLIP), averaged per
    image. ``kind="clip"``: symmetric softmax cross-entropy with a learned temperature.
    """

    def __init__(self, kind: str = "siglip", init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__()
        if kind not in ("siglip", "clip"):
            raise ValueError(f"contrastive loss kind must be 'siglip' or 'clip', got {kind!r}")
        self.kind = kind
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())
        self.bias = nn.Parameter(torch.tensor(float(init_bias) if kind == "siglip" else 0.0),
                                 requires_grad=kind == "siglip")

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
        return a @ b.t() * self.log_scale.exp().clamp(max=100) + self.bias

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"contrastive inputs must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        logits = self.logits(a, b)
        n = logits.shape[0]
        if self.kind == "siglip":
            labels = 2 * torch.eye(n, device=logits.device) - 1
            return -F.logsigmoid(labels * logits).sum() / n
        target = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def box_mask(box: tuple[float, float, float, float], image_hw: tuple[int, int], side: int) -> torch.Tensor:
    """Fraction of each cell of a ``side x side`` grid over the image covered by ``box`` (x0, y0, x1, y1), (side, side)."""
    h, w = image_hw
    x0, y0, x1, y1 = box
    edges = torch.arange(side + 1, dtype=torch.float32) / side
    cy0, cy1 = edges[:-1] * h, edges[1:] * h
    cx0, cx1 = edges[:-1] * w, edges[1:] * w
    oy = (torch.minimum(cy1, torch.tensor(y1)) - torch.maximum(cy0, torch.tensor(y0))).clamp(min=0) / (h / side)
    ox = (torch.minimum(cx1, torch.tensor(x1)) - torch.maximum(cx0, torch.tensor(x0))).clamp(min=0) / (w / side)
    return oy[:, None] * ox[None, :]


def selection_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of saliency logits ``(..., g, g)`` against soft box coverage ``(..., g, g)``.

    Positives are rare (small boxes), so they are up-weighted to balance the two classes.
    """
    pos = target.sum().clamp(min=1.0)
    neg = (1 - target).sum().clamp(min=1.0)
    weight = torch.where(target > 0, neg / pos, torch.ones_like(target))
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), weight=weight)
