"""Building, saving and loading VLMs from a dataclass config.

An mmfm VLM directory holds ``vlm_config.json``, ``model.safetensors`` (all weights, written
atomically) and ``tokenizer/``; :func:`load` reads it back (and HF ``nemotron_h_omni`` directories via
:mod:`mmfm.vlm.hf_interop`). Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmfm.vlm.model import VLM
from mmfm.vlm.projector import Projector


@dataclass
class EncoderSpec:
    """Vision encoder: a local mmfm/HF radio directory, or a random student ``size`` (tests, demo)."""

    path: str | None = None
    size: str = "tiny"
    patch_size: int = 16
    # ViTConfig overrides for the random student, e.g. {embed_dim: 128, depth: 4, num_heads: 4}
    vit: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecoderSpec:
    """Language model: a local HF causal-LM directory, or a random tiny Nemotron-H (``pattern``) / Llama."""

    path: str | None = None
    kind: str = "nemotron_h"  # or "llama" (random init only)
    pattern: str = "M-M*M-"
    hidden_size: int = 64
    mamba_heads: int = 8
    mamba_head_dim: int = 16
    n_groups: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    state_size: int = 16
    num_layers: int = 4  # llama only


@dataclass
class VLMConfig:
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
    compressor: str = "pixel_unshuffle"  # "none" | "pixel_unshuffle" | "avgpool" | "tome"
    compress_factor: int = 2
    compress_tokens: int = 16  # ToMe target K
    projector_hidden: int = 256
    projector_norm: str = "rms"
    projector_activation: str = "relu2"
    freeze_vision: bool = True
    image_size: int = 64
    # where a user turn's images go: "first" ("<image>\n{text}", LLaVA's order) or "after_text"
    # ("{text}\n<image>": a causal decoder then reads the image already knowing the question)
    image_position: str = "first"
    tokenizer: str | None = None  # local HF tokenizer dir; None = the offline synthetic tokenizer


def build_compressor_from(cfg: VLMConfig):
    from mmfm.radio.compression import build_compressor

    if cfg.compressor in ("pixel_unshuffle", "avgpool"):
        return build_compressor(cfg.compressor, factor=cfg.compress_factor)
    if cfg.compressor == "tome":
        return build_compressor("tome", num_tokens=cfg.compress_tokens)
    return build_compressor(cfg.compressor)


def build_tokenizer(cfg: VLMConfig):
    from mmfm.data.tokenizer import load_tokenizer, synthetic_tokenizer

    return load_tokenizer(cfg.tokenizer) if cfg.tokenizer else synthetic_tokenizer()


def build_vlm(cfg: VLMConfig, tokenizer=None) -> tuple[VLM, Any]:
    """Randomly initialised (or locally loaded) parts assembled into a :class:`VLM`; returns (vlm, tokenizer)."""
    from mmfm.data.schemas import IMAGE_PLACEHOLDER
    from mmfm.radio import RadioEncoder, create_student
    from mmfm.radio import load as load_radio
    from mmfm.vlm.decoder import load_causal_lm, tiny_llama, tiny_nemotron_h

    tokenizer = tokenizer or build_tokenizer(cfg)
    encoder = load_radio(cfg.encoder.path) if cfg.encoder.path else RadioEncoder(
        create_student(cfg.encoder.size, patch_size=cfg.encoder.patch_size, **cfg.encoder.vit))
    d = cfg.decoder
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if d.path:
        lm = load_causal_lm(d.path)
    elif d.kind == "nemotron_h":
        lm = tiny_nemotron_h(len(tokenizer), hidden_size=d.hidden_size, pattern=d.pattern, num_heads=d.num_heads,
                             num_kv_heads=d.num_kv_heads, mamba_heads=d.mamba_heads, mamba_head_dim=d.mamba_head_dim,
                             n_groups=d.n_groups, state_size=d.state_size, intermediate_size=d.intermediate_size,
                             **ids)
    elif d.kind == "llama":
        lm = tiny_llama(len(tokenizer), hidden_size=d.hidden_size, num_layers=d.num_layers, num_heads=d.num_heads,
                        intermediate_size=d.intermediate_size, **ids)
    else:
        raise ValueError(f"decoder.kind must be 'nemotron_h' or 'llama', got {d.kind!r}")
    compressor = build_compressor_from(cfg)
    in_dim = compressor.output_dim(encoder.embed_dim)
    projector = Projector(in_dim, cfg.projector_hidden, lm.config.hidden_size, norm=cfg.projector_norm,
                          activation=cfg.projector_activation)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER!r} token; add it as a special token")
    vlm = VLM(encoder, compressor, projector, lm, image_token_id, freeze_vision=cfg.freeze_vision)
    vlm.config = cfg
    return vlm, tokenizer


def save_vlm(vlm: VLM, tokenizer, out_dir: str | Path) -> Path:
    """Write an mmfm VLM directory (config, safetensors weights, tokenizer); atomic per file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in vlm.state_dict().items()}
    # transformers ties lm_head to the embeddings in some configs: store shared storage once
    seen: dict[int, str] = {}
    for k in list(state):
        ptr = state[k].data_ptr()
        if ptr in seen and state[k].shape == state[seen[ptr]].shape:
            state[k] = state[k].clone()
        seen[ptr] = k
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    cfg = getattr(vlm, "config", None)
    if cfg is None:
        raise ValueError("save_vlm needs a VLM built by build_vlm (it carries its VLMConfig)")
    record = asdict(cfg)
    record["language_model_config"] = vlm.language_model.config.to_dict()
    record["vision_encoder_config"] = vlm.vision_encoder.config_dict()
    tmp_cfg = out / ".vlm_config.json.tmp"
    tmp_cfg.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp_cfg, out / "vlm_config.json")
    tokenizer.save_pretrained(out / "tokenizer")
    return out


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[VLM, Any]:
    """Load an mmfm VLM directory or an HF ``nemotron_h_omni`` directory; returns (vlm, tokenizer)."""
    from mmfm.config import config_from_dict
    from mmfm.data.tokenizer import load_tokenizer

    path = Path(path)
    cfg_file = path / "vlm_config.json"
    if not cfg_file.is_file():
        if (path / "config.json").is_file():
            from mmfm.vlm.hf_interop import load_hf_omni

            return load_hf_omni(path, device=device)
        raise FileNotFoundError(f"{path} is neither an mmfm VLM directory (vlm_config.json) nor an HF "
                                f"nemotron_h_omni directory (config.json)")
    record = json.loads(cfg_file.read_text())
    lm_config = record.pop("language_model_config")
    enc_config = record.pop("vision_encoder_config")
    cfg = config_from_dict(VLMConfig, record)
    tokenizer = load_tokenizer(path / "tokenizer")
    vlm = _build_from_records(cfg, tokenizer, lm_config, enc_config)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"VLM weights {weights} are missing")
    from safetensors.torch import load_file

    state = load_file(str(weights))
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {cfg_file}: missing keys {missing}, unexpected {unexpected}")
    return vlm.to(device).eval(), tokenizer


def _build_from_records(cfg: VLMConfig, tokenizer, lm_config: dict, enc_config: dict) -> VLM:
    """Rebuild the exact architecture recorded at save time (random init; weights are loaded after)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmfm.data.schemas import IMAGE_PLACEHOLDER
    from mmfm.radio.encoder import RadioEncoder, _build_student

    lm_cfg = AutoConfig.for_model(**lm_config)
    lm = AutoModelForCausalLM.from_config(lm_cfg)
    stud = enc_config["student"]
    encoder = RadioEncoder(_build_student(stud["type"], stud["config"]), enc_config.get("summary_idxs"), {},
                           enc_config["input_mean"], enc_config["input_std"])
    compressor = build_compressor_from(cfg)
    projector = Projector(compressor.output_dim(encoder.embed_dim), cfg.projector_hidden, lm_cfg.hidden_size,
                          norm=cfg.projector_norm, activation=cfg.projector_activation)
    vlm = VLM(encoder, compressor, projector, lm, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
              freeze_vision=cfg.freeze_vision)
    vlm.config = cfg
    return vlm
