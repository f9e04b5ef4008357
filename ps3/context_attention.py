"""Running ``mmfm.radio.vit.Block`` with extra key/value context.

PS3's local pass attends to the selected high-resolution tokens *and* to the global (low-res) tokens.
The global pass records each block's keys/values once; the local pass then appends them to its own
keys/values, so the low-res pass is never recomputed. These functions use the block's own modules
(``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``, layer scales): the same weights as the ViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.radio.vit import Block

KV = tuple[torch.Tensor, torch.Tensor]


def block_forward(block: Block, x: torch.Tensor, context: KV | None = None) -> tuple[torch.Tensor, KV]:
    """One pre-norm block on ``x (B, N, D)``, optionally attending to ``context`` keys/values too.

    Args:
        block: a ViT block.
        x: tokens (B, N, D).
        context: ``(k, v)`` each (B, heads, M, hd) from another pass, appended after ``x``'s own keys.

    Returns:
        ``(x_out (B, N, D), (k, v))`` with ``x``'s own keys/values (B, heads, N, hd), for later passes.
    """
    attn = block.attn
    b, n, d = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if context is None:
        k_all, v_all = k, v
    else:
        k_all = torch.cat([k, context[0].to(k.dtype)], dim=2)
        v_all = torch.cat([v, context[1].to(v.dtype)], dim=2)
    out = F.scaled_dot_product_attention(q, k_all, v_all)
    out = attn.proj(out.transpose(1, 2).reshape(b, n, d))
    x = x + block._drop(block.layer_scale1(out))
    x = x + block._drop(block.layer_scale2(block.mlp(block.norm2(x))))
    return x, (k, v)
