"""Interop with the Hugging Face ``radio`` format (``transformers.RadioModel`` / ``RadioConfig``).

On disk a ``radio`` directory is ``config.json`` (``model_type: "radio"``) + ``model.safetensors`` (or shards with
``model.safetensors.index.json``). ``transformers`` stores the weights under the original RADIO names and
renames them at load time (``transformers/conversion_mapping.py``), so the file keys are::

    radio_model.input_conditioner.norm_mean / norm_std      (3, 1, 1)
    radio_model.summary_idxs                                (k,) int64
    radio_model.model.patch_generator.embedder.weight       (D, C*p*p)   channel-major patches
    radio_model.model.patch_generator.pos_embed             (1, G*G, D)
    radio_model.model.patch_generator.cls_token.token       (num_cls + num_registers, D)
    radio_model.model.blocks.{i}.{norm1, attn.qkv, attn.proj, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2,
                                  layer_scale2.lambda1}.{weight, bias}

mmfm's ``ViT`` was laid out to match: its keys are the same up to the prefixes, with a fused ``attn.qkv``. The
in-memory names of ``RadioModel`` (``embeddings.*``, ``encoder.layer.{i}.attention.{q,k,v,o}_proj``) are read too.

What the HF format cannot express, so ``export_hf`` refuses it with a ``ValueError``: ViTDet windowed
attention (RadioModel attends globally in every layer), a final LayerNorm, non-ViT students (MambaVision).
Adaptor heads are not part of ``RadioModel``; ``export_hf`` writes them beside it (``mmfm_adaptors.json`` +
``mmfm_adaptors.safetensors``), which transformers ignores and ``mmfm.radio.load`` reads back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmfm.radio.encoder import (
    CLIP_MEAN,
    CLIP_STD,
    RadioEncoder,
    build_adaptors,
    load_state_checked,
    read_config,
    read_safetensors,
    select_adaptor_names,
    write_safetensors,
)
from mmfm.radio.vit import ViT, ViTConfig

__all__ = ["export_hf", "hf_config_from_vit", "hf_state_to_vit", "load_hf_radio", "vit_state_to_hf"]

log = logging.getLogger(__name__)

ADAPTORS_CONFIG = "mmfm_adaptors.json"
ADAPTORS_WEIGHTS = "mmfm_adaptors.safetensors"
_PG = "radio_model.model.patch_generator."
_BLOCKS = "radio_model.model.blocks."


# ---- mmfm -> HF
def _mlp_ratio_for(dim: int, hidden: int) -> float:
    """A float r with ``int(dim * r) == hidden`` (transformers sizes the MLP with ``int(hidden_size * mlp_ratio)``)."""
    r = hidden / dim
    for _ in range(4):
        if int(dim * r) == hidden:
            return r
        r = math.nextafter(r, math.inf)
    raise ValueError(f"MLP width {hidden} cannot be written as int({dim} * mlp_ratio)")


def hf_config_from_vit(cfg: ViTConfig, summary_idxs: Sequence[int], mean: Sequence[float], std: Sequence[float],
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict of transformers' ``RadioConfig`` for a ViT student (raises if inexpressible)."""
    if cfg.window_size is not None and len(cfg.resolved_global_blocks()) < cfg.depth:
        raise ValueError(
            f"this ViT uses ViTDet windowed attention (window_size={cfg.window_size}, global blocks "
            f"{list(cfg.resolved_global_blocks())} of {cfg.depth}); transformers' RadioModel attends globally in "
            "every layer and cannot express it. Export a copy built with window_size=None (same weights, "
            "global attention everywhere) if global attention is acceptable.")
    if cfg.final_norm:
        raise ValueError("this ViT has a final LayerNorm (final_norm=True); transformers' RadioModel has none, so "
                         "the HF radio format cannot express it")
    return {
        "architectures": ["RadioModel"],
        "model_type": "radio",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": _mlp_ratio_for(cfg.embed_dim, cfg.mlp_dim),
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_probs_dropout_prob": 0.0,
        "hidden_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": False,
        "qkv_bias": cfg.qkv_bias,
        "layerscale_value": 1.0,
        "num_channels": cfg.in_chans,
        "patch_size": cfg.patch_size,
        "image_size": cfg.preferred_resolution,
        "max_img_size": cfg.max_resolution,
        "num_cls_tokens": cfg.num_cls_tokens,
        "num_registers": cfg.num_registers,
        "video_temporal_patch_size": None,
        "summary_idxs": [int(i) for i in summary_idxs],
        "norm_mean": [float(v) for v in mean],
        "norm_std": [float(v) for v in std],
        "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."),
    }


def vit_state_to_hf(state: Mapping[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """mmfm ``ViT`` state dict -> HF ``radio`` file keys (without conditioner / summary_idxs)."""
    out: dict[str, torch.Tensor] = {
        _PG + "embedder.weight": state["patch_embed.proj.weight"],
        _PG + "pos_embed": state["pos_embed.weight"],
        _PG + "cls_token.token": state["prefix_tokens"],
    }
    for k, v in state.items():
        if k.startswith("blocks."):
            out["radio_model.model." + k] = v
    ref = state["patch_embed.proj.weight"]
    for i in range(cfg.depth):
        for j in (1, 2):
            key = f"{_BLOCKS}{i}.layer_scale{j}.lambda1"
            # no LayerScale in mmfm == LayerScale of ones in RadioModel
            out.setdefault(key, torch.ones(cfg.embed_dim, dtype=ref.dtype, device=ref.device))
    return out


def export_hf(encoder: RadioEncoder, out_dir: str | os.PathLike, include_adaptors: bool = True) -> Path:
    """Write ``encoder`` as a Hugging Face ``radio`` directory that ``transformers.RadioModel.from_pretrained``
    loads with the same outputs (summary and features).

    Args:
        encoder: a ``RadioEncoder`` with a ``ViT`` student (no windowed attention, no final norm).
        out_dir: directory to create / overwrite files in.
        include_adaptors: also write the adaptor heads to ``mmfm_adaptors.{json,safetensors}``.
    """
    if not isinstance(encoder, RadioEncoder):
        raise TypeError(f"encoder must be a RadioEncoder, got {type(encoder).__name__}")
    student = encoder.student
    if not isinstance(student, ViT):
        raise ValueError(f"only ViT students export to the HF radio format; this encoder's student is "
                         f"{type(student).__name__}, which transformers' RadioModel cannot express")
    dtype = next(student.parameters()).dtype
    config = hf_config_from_vit(student.cfg, encoder.summary_idxs.tolist(), encoder.input_mean, encoder.input_std,
                                dtype)
    import transformers

    config["transformers_version"] = transformers.__version__
    weights = vit_state_to_hf(student.state_dict(), student.cfg)
    weights["radio_model.input_conditioner.norm_mean"] = torch.tensor(encoder.input_mean).view(-1, 1, 1)
    weights["radio_model.input_conditioner.norm_std"] = torch.tensor(encoder.input_std).view(-1, 1, 1)
    weights["radio_model.summary_idxs"] = encoder.summary_idxs.to(torch.long)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if include_adaptors and len(encoder.adaptors):
        ad_state = {k[len("adaptors."):]: v for k, v in encoder.state_dict().items() if k.startswith("adaptors.")}
        write_safetensors(ad_state, out / ADAPTORS_WEIGHTS, metadata={"format": "pt"})
        specs = {name: ad.spec.to_dict() for name, ad in encoder.adaptors.items()}
        (out / ADAPTORS_CONFIG).write_text(json.dumps(specs, indent=2) + "\n")
    return out


# ---- HF -> mmfm
def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except Exception as err:
            raise ValueError(f"corrupt safetensors index {index}: {err}") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(path / shard))
        return state
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {path}; "
                            "only safetensors checkpoints are read")


_INTERNAL_RENAMES = (
    ("embeddings.patch_projection.weight", _PG + "embedder.weight"),
    ("embeddings.video_patch_projection.weight", _PG + "video_embedder.weight"),
    ("embeddings.position_embedding", _PG + "pos_embed"),
    ("embeddings.cls_register_token", _PG + "cls_token.token"),
    ("input_conditioner.", "radio_model.input_conditioner."),
    ("summary_idxs", "radio_model.summary_idxs"),
)


def _to_file_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring in-memory ``RadioModel`` names (embeddings.*, encoder.layer.*, q/k/v_proj) to the file names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("model.") and not k.startswith("model.radio_model"):
            k = k[len("model."):]
        if k.startswith("radio_model."):
            out[k] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", k)
        if m:
            i, rest = m.groups()
            mq = re.match(r"attention\.([qkv])_proj\.(weight|bias)$", rest)
            if mq:
                qkv.setdefault(f"{_BLOCKS}{i}.attn.qkv.{mq.group(2)}", {})[mq.group(1)] = v
                continue
            rest = rest.replace("attention.o_proj.", "attn.proj.")
            out[f"{_BLOCKS}{i}.{rest}"] = v
            continue
        for src, dst in _INTERNAL_RENAMES:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            out[k] = v  # left for the mismatch report
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete q/k/v projections for {key}: found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def hf_state_to_vit(state: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any],
                    ) -> tuple[ViTConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HF ``radio`` weights + config -> ``(ViTConfig, ViT state dict, extras)``; extras holds the conditioner
    statistics and ``summary_idxs`` when the file has them."""
    c = dict(hf_config)
    if c.get("use_swiglu_ffn"):
        raise ValueError("HF radio checkpoint uses a SwiGLU MLP (use_swiglu_ffn=true); mmfm's ViT student has a "
                         "GELU MLP only")
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"HF radio checkpoint uses hidden_act={c.get('hidden_act')!r}; mmfm's ViT supports 'gelu'")
    hidden = int(c.get("hidden_size", 1280))
    heads = int(c.get("num_attention_heads", 16))
    if c.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"HF radio checkpoint has head_dim {c['head_dim']} != hidden_size / heads")
    patch = int(c.get("patch_size", 16))
    files = _to_file_names(state)
    extras: dict[str, torch.Tensor] = {}
    vit: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    lambdas: dict[str, torch.Tensor] = {}
    for k, v in files.items():
        if k == "radio_model.summary_idxs":
            extras["summary_idxs"] = v
        elif k.startswith("radio_model.input_conditioner."):
            extras[k.rsplit(".", 1)[1]] = v
        elif k == _PG + "embedder.weight":
            vit["patch_embed.proj.weight"] = v
        elif k == _PG + "pos_embed":
            vit["pos_embed.weight"] = v
        elif k == _PG + "cls_token.token":
            vit["prefix_tokens"] = v
        elif k == _PG + "video_embedder.weight":
            log.warning("dropping the video patch projection of the HF radio checkpoint (mmfm encodes images)")
        elif k.startswith(_BLOCKS):
            rest = k[len("radio_model.model."):]
            if re.search(r"\.layer_scale[12]\.lambda1$", rest):
                lambdas[rest] = v
            else:
                vit[rest] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise ValueError(f"HF radio checkpoint has keys mmfm cannot map: {sorted(unexpected)}")
    depth = int(c.get("num_hidden_layers", 32))
    ls_value = float(c.get("layerscale_value", 1.0))
    use_ls = any(not torch.all(t == 1) for t in lambdas.values()) or (not lambdas and ls_value != 1.0)
    if use_ls:
        for i in range(depth):
            for j in (1, 2):
                key = f"blocks.{i}.layer_scale{j}.lambda1"
                vit[key] = lambdas.get(key, torch.full((hidden,), ls_value))
    mlp_ratio = float(c.get("mlp_ratio", 4.0))
    cfg = ViTConfig(
        embed_dim=hidden, depth=depth, num_heads=heads, mlp_hidden_dim=int(hidden * mlp_ratio),
        patch_size=patch, in_chans=int(c.get("num_channels", 3)),
        max_resolution=int(c.get("max_img_size", 2048)) // patch * patch,
        preferred_resolution=int(c.get("image_size", 512)), num_cls_tokens=int(c.get("num_cls_tokens", 3)),
        num_registers=int(c.get("num_registers", 7)), qkv_bias=bool(c.get("qkv_bias", True)),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-6)), layer_scale_init=1.0 if use_ls else None,
        drop_path_rate=float(c.get("drop_path_rate", 0.0)))
    return cfg, vit, extras


def load_hf_radio(path: str | os.PathLike, adaptors: str | Sequence[str] | None = None,
                  config: Mapping[str, Any] | None = None) -> RadioEncoder:
    """Load a Hugging Face ``radio`` directory into a ``RadioEncoder`` with a ``ViT`` student.

    Adaptors come from ``mmfm_adaptors.{json,safetensors}`` when ``export_hf`` wrote them.
    """
    p = Path(path)
    cfg = dict(config) if config is not None else read_config(p)
    if cfg.get("model_type") != "radio":
        raise ValueError(f"{p / 'config.json'} is not a HF radio config (model_type={cfg.get('model_type')!r})")
    vit_cfg, vit_state, extras = hf_state_to_vit(_read_hf_weights(p), cfg)
    student = ViT(vit_cfg)
    summary_idxs = extras.get("summary_idxs")
    summary_idxs = summary_idxs.tolist() if summary_idxs is not None else cfg.get("summary_idxs", [0, 1])
    mean = extras["norm_mean"].flatten().tolist() if "norm_mean" in extras else cfg.get("norm_mean", CLIP_MEAN)
    std = extras["norm_std"].flatten().tolist() if "norm_std" in extras else cfg.get("norm_std", CLIP_STD)
    specs: dict[str, Any] = {}
    ad_state: dict[str, torch.Tensor] = {}
    if (p / ADAPTORS_CONFIG).is_file():
        try:
            specs = json.loads((p / ADAPTORS_CONFIG).read_text())
        except Exception as err:
            raise ValueError(f"corrupt adaptor config {p / ADAPTORS_CONFIG}: {err}") from err
        if specs and adaptors is not None:
            ad_state = read_safetensors(p / ADAPTORS_WEIGHTS)
    names = select_adaptor_names(list(specs), adaptors)
    built = build_adaptors(ad_state, specs, names, prefix="")
    load_state_checked(student, vit_state, where=f"HF radio checkpoint {p}")
    return RadioEncoder(student, summary_idxs, built, mean, std)
