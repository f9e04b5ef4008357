"""Vision-to-language projector: norm -> Linear -> activation -> Linear.

The parameter names (``layer_norm``, ``linear_1``, ``linear_2``) and the default RMSNorm + squared-ReLU
match transformers' ``nemotron_h_omni`` projector, so a trained projector exports without renaming.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 with the weight applied before casting back (as Nemotron-H)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


ACTIVATIONS = {"relu2": SquaredReLU, "gelu": nn.GELU, "silu": nn.SiLU}
NORMS = {"rms": RMSNorm, "layer": nn.LayerNorm, "none": nn.Identity}


class Projector(nn.Module):
    """Maps compressed vision tokens ``(B, K, D_in)`` to language-model embeddings ``(B, K, D_lm)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str = "rms", activation: str = "relu2",
                 bias: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"projector norm must be one of {sorted(NORMS)}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"projector activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.layer_norm = NORMS[norm](in_dim, eps=eps) if norm != "none" else nn.Identity()
        self.linear_1 = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.linear_2 = nn.Linear(hidden_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))
