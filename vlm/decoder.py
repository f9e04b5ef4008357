"""Language-model decoders for the VLM: builders for tiny hybrid Nemotron-H and Llama-style models
(random init, for tests and the demo) and loading of local Hugging Face checkpoints.

Nemotron-H layer patterns use transformers' characters: ``M`` Mamba-2, ``*`` attention, ``-`` MLP
(e.g. ``"M-M*M-"``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

PATTERN_TO_BLOCK = {"M": "mamba", "*": "attention", "-": "mlp"}
MAMBA2_MODEL_TYPES = ("nemotron_h", "mamba2")


def route_mamba_to_mmfm_kernels(model: nn.Module, device) -> bool:
    """On CUDA, make a transformers Mamba-2 based LM (Nemotron-H, Mamba2) run its scans and convolutions
    with :mod:`mmfm.kernels` instead of transformers' slow PyTorch fallback (no mamba-ssm needed).

    Returns True when the kernels were routed in. CPU keeps transformers' own path (the patched functions
    would only dispatch to the same reference math there).
    """
    import torch

    if torch.device(device).type != "cuda" or getattr(model.config, "model_type", "") not in MAMBA2_MODEL_TYPES:
        return False
    from mmfm.kernels.hf_integration import use_mmfm_kernels

    use_mmfm_kernels(model)
    return True


def pattern_to_block_types(pattern: str) -> list[str]:
    """``"M-M*"`` -> ``["mamba", "mlp", "mamba", "attention"]``."""
    unknown = sorted(set(pattern) - set(PATTERN_TO_BLOCK))
    if unknown or not pattern:
        raise ValueError(f"layer pattern {pattern!r} may only use {sorted(PATTERN_TO_BLOCK)} (got {unknown})")
    return [PATTERN_TO_BLOCK[c] for c in pattern]


def tiny_nemotron_h(vocab_size: int, hidden_size: int = 64, pattern: str = "M-M*M-", num_heads: int = 4,
                    num_kv_heads: int = 2, mamba_heads: int = 8, mamba_head_dim: int = 16, n_groups: int = 2,
                    state_size: int = 16, intermediate_size: int = 128, chunk_size: int = 32,
                    pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> nn.Module:
    """A randomly initialised ``NemotronHForCausalLM`` (Mamba-2 + attention + MLP layers)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    if (mamba_heads * mamba_head_dim) != 2 * hidden_size:
        raise ValueError(f"mamba_heads * mamba_head_dim ({mamba_heads}*{mamba_head_dim}) must equal 2 * hidden_size "
                         f"({2 * hidden_size}) for expand=2")
    config = NemotronHConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, layers_block_type=pattern_to_block_types(pattern),
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, ssm_state_size=state_size, mamba_num_heads=mamba_heads,
        mamba_head_dim=mamba_head_dim, n_groups=n_groups, conv_kernel=4, expand=2, chunk_size=chunk_size,
        max_position_embeddings=4096, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    return NemotronHForCausalLM(config)


def tiny_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
               intermediate_size: int = 128, pad_token_id: int = 0, bos_token_id: int = 1,
               eos_token_id: int = 2, num_kv_heads: int | None = None) -> nn.Module:
    """A randomly initialised attention-only ``LlamaForCausalLM`` for comparisons (``num_kv_heads``: GQA;
    default = ``num_heads``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=4096,
                         pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return LlamaForCausalLM(config)


def load_causal_lm(path: str | Path, dtype=None) -> nn.Module:
    """Load a local Hugging Face causal LM directory (never from the hub)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"language model directory {path} has no config.json; give a local HF model dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
