"""Text tower for PS3: embeds local/global captions (contrastive targets) and prompts (top-down selection).

Real use: a local Hugging Face CLIP or SigLIP text model directory. Tests and the demo: a tiny
randomly initialised ``CLIPTextModelWithProjection`` over the offline synthetic tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class TextTower(nn.Module):
    """``encode(texts) -> (N, E)`` L2-normalised text embeddings.

    Args:
        model: a transformers text model returning ``text_embeds`` (CLIP-style with projection) or
            ``pooler_output``.
        tokenizer: the matching tokenizer (``PreTrainedTokenizerFast``).
        max_length: truncation length in tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 32) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "projection_dim", None) or cfg.hidden_size

    def forward(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            raise ValueError("TextTower got an empty list of texts")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        emb = getattr(out, "text_embeds", None)
        if emb is None:
            emb = out.pooler_output
        return F.normalize(emb.float(), dim=-1)

    encode = forward

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


def tiny_text_tower(tokenizer, width: int = 64, layers: int = 2, heads: int = 2, embed_dim: int = 64,
                    max_length: int = 32) -> TextTower:
    """A randomly initialised CLIP text transformer over ``tokenizer`` (offline)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    # CLIP pools the hidden state at the eos token (or the highest id when eos_token_id == 2, the legacy
    # rule); give it the tokenizer's real eos id so pooling lands on the last real token.
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                         projection_dim=embed_dim, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return TextTower(CLIPTextModelWithProjection(cfg), tokenizer, max_length)


def load_text_tower(path: str | Path, max_length: int = 64) -> TextTower:
    """Load a local CLIP/SigLIP text model directory (config.json + weights + tokenizer files)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection, SiglipTextModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text tower directory {path} has no config.json; give a local HF text model dir")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = SiglipTextModel if "siglip" in cfg.model_type else CLIPTextModelWithProjection
    model = cls.from_pretrained(path, local_files_only=True)
    return TextTower(model, AutoTokenizer.from_pretrained(path, local_files_only=True), max_length)
