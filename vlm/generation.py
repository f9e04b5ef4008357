"""Batched generation for the VLM with left padding and the language model's own cache.

Prefill runs once on the spliced embeddings; decoding then feeds one token at a time. For
Nemotron-H the cache keeps constant-size conv + SSM states for Mamba layers and a KV cache only for
attention layers (transformers' hybrid cache), so decode memory does not grow with Mamba layers.
Left padding keeps every row's last real token at the end; the attention mask tells Mamba layers to
zero padded positions so padding never enters their states.

On CUDA, Nemotron-H and Llama-family models decode through :class:`mmfm.vlm.static_decode.StaticDecoder`
(static caches, one CUDA-graph replay per token) unless ``static=False``; other models and the CPU use the
model's own cache step by step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


def cache_argument(model: torch.nn.Module) -> str:
    """The name a causal LM's forward takes its cache by: ``cache`` in transformers >= 5.2x, else
    ``past_key_values``. Passing the deprecated name still works but goes through transformers' deprecation
    wrapper on every call, which costs tens of ms per decode step on a GPU."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache of a model output under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token ``(B,)`` from ``logits (B, V)``: greedy, or temperature + nucleus sampling."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_from_embeds(language_model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                         max_new_tokens: int, eos_token_id: int | None = None, pad_token_id: int = 0,
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                         generator: torch.Generator | None = None,
                         on_token: Callable[[torch.Tensor], None] | None = None,
                         static: bool | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` for left-padded ``inputs_embeds (B, L, D)``; returns ``(B, T)`` ids.

    Rows that produced ``eos_token_id`` are padded with ``pad_token_id`` afterwards. ``on_token`` is
    called with each new ``(B,)`` token batch (for streaming). ``static``: decode with
    :class:`~mmfm.vlm.static_decode.StaticDecoder` (default: on CUDA for the model types it supports).
    """
    from mmfm.vlm.static_decode import SUPPORTED, StaticDecoder

    if attention_mask[:, -1].eq(0).any():
        raise ValueError("generation needs left padding: the last position of every row must be a real token")
    if static is None:
        static = inputs_embeds.device.type == "cuda" and language_model.config.model_type in SUPPORTED
    batch = inputs_embeds.shape[0]
    if static:
        dec = StaticDecoder(language_model, batch, inputs_embeds.shape[1] + max(max_new_tokens, 1))
        logits = dec.prefill(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        advance = dec.step
    else:
        out = language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True)
        state = {"cache": output_cache(out), "mask": attention_mask}
        cache_arg = cache_argument(language_model)
        logits = out.logits[:, -1]

        def advance(nxt: torch.Tensor) -> torch.Tensor:
            mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            out = language_model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position_ids,
                                 use_cache=True, **{cache_arg: state["cache"]})
            state.update(cache=output_cache(out), mask=mask)
            return out.logits[:, -1]

    finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    tokens = []
    for i in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        logits = advance(nxt)
    if not tokens:
        return torch.empty(batch, 0, dtype=torch.long, device=inputs_embeds.device)
    return torch.stack(tokens, dim=1)
