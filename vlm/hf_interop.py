"""Interop with transformers' ``nemotron_h_omni`` format (``NemotronH_Omni_Reasoning_V3``).

The mmfm VLM "RADIO ViT -> 2x2 pixel unshuffle -> RMSNorm/Linear/relu2/Linear projector -> NemotronH" is the
architecture transformers calls ``nemotron_h_omni``. :func:`export_hf_omni` writes an mmfm VLM as such a
directory and :func:`load_hf_omni` reads one (local paths only) back into an mmfm :class:`~mmfm.vlm.model.VLM`.

Directory layout (what ``NemotronH_Omni_Reasoning_V3.save_pretrained`` writes; the names are the released
checkpoints' originals, renamed by transformers at load time)::

    config.json                 model_type "nemotron_h_omni": vision_config (radio), text_config (nemotron_h),
                                downsample_ratio 0.5, projector_hidden_size, vision_hidden_size, image_token_id
    model.safetensors           vision_model.radio_model.model.{patch_generator.*, blocks.*},
                                vision_model.radio_model.summary_idxs,
                                mlp1.0.weight (RMSNorm), mlp1.1.weight (Linear 1), mlp1.3.weight (Linear 2),
                                language_model.backbone.*, language_model.lm_head.weight
    preprocessor_config.json    the omni image processor: image_mean / image_std = the encoder's conditioning
    tokenizer files             tokenizer.json, tokenizer_config.json, ...

How the two models meet:

- **Input normalisation.** The omni model calls ``vision_model.make_preprocessor_external()``: RADIO's
  ``(x - mean) / std`` is done by the image processor, not the model. So the encoder's ``input_mean`` /
  ``input_std`` go to ``preprocessor_config.json`` (and ``vision_config.norm_mean/norm_std``); the radio input
  conditioner is *not* written as weights. :func:`omni_image_inputs` turns ``[0, 1]`` images into the
  ``pixel_values (total_patches, 3*p*p)`` / ``image_grid_hw (num_images, 2)`` pair the processor produces.
- **Pixel shuffle channel order.** Omni's ``pixel_shuffle`` and mmfm's ``PixelUnshuffleCompressor`` both
  turn an ``(h, w)`` grid of D-vectors into an ``(h/2, w/2)`` grid of 4D-vectors, but nothing guarantees the
  same channel order. :func:`pixel_shuffle_permutation` derives it numerically by pushing unique integers
  through both (transformers' own ``pixel_shuffle`` is called): ``omni[..., c] == mmfm[..., perm[c]]``.
  RMSNorm's statistic does not depend on the channel order, so the projector is made equivalent by permuting
  the RMSNorm weight and the first Linear's input columns: ``g_omni = g[perm]``, ``W1_omni = W1[:, perm]``.
  (With transformers 5.23 the derived permutation happens to be the identity, i.e. both order a cell's
  channels as ``(di, dj, d)``; the code does not rely on it.)
- **Video embedder.** The omni vision tower always has a video patch projection for
  ``video_temporal_patch_size = 2`` frames. mmfm encodes images only; the export writes it as the frame
  average of the image patch projection, ``[W / 2, W / 2]``, so a video of identical frames embeds like the
  image. :func:`load_hf_omni` drops it (and any audio branch).
- **Odd grids.** mmfm's compressor zero-pads an odd token grid; omni's pixel shuffle needs even grids (its
  image processor always resizes to them). Logits agree for images whose patch grid is even.

What does not fit (``export_hf_omni`` raises ``ValueError`` listing every reason): a non-ViT or windowed /
final-norm ViT encoder (see :func:`mmfm.radio.hf_interop.hf_config_from_vit`; a final norm
fits with an MTP language model, below), a compressor other than 2x2
pixel unshuffle, a projector other than RMSNorm(eps 1e-5) -> Linear -> relu2 -> Linear without biases, a
language model other than ``NemotronHForCausalLM``. A language model with MTP layers
(``num_nextn_predict_layers > 0``) makes omni normalise the vision features with ``vision_final_layernorm``:
that is mmfm's ViT final LayerNorm (``final_norm=True``), so such a pair exports and loads, and other pairs
of ViT final norm / MTP do not fit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmfm.radio.compression import PixelUnshuffleCompressor
from mmfm.radio.encoder import CLIP_MEAN, CLIP_STD, RadioEncoder, load_state_checked, write_safetensors
from mmfm.radio.hf_interop import hf_config_from_vit, hf_state_to_vit, vit_state_to_hf
from mmfm.radio.vit import VIT_SIZES, ViT
from mmfm.vlm.model import VLM
from mmfm.vlm.projector import Projector, RMSNorm, SquaredReLU

__all__ = [
    "OMNI_ARCHITECTURE",
    "OMNI_MODEL_TYPE",
    "check_omni_fits",
    "export_hf_omni",
    "load_hf_omni",
    "omni_image_inputs",
    "pixel_shuffle_permutation",
]

log = logging.getLogger(__name__)

OMNI_MODEL_TYPE = "nemotron_h_omni"
OMNI_ARCHITECTURE = "NemotronH_Omni_Reasoning_V3"
VIDEO_TEMPORAL_PATCH_SIZE = 2  # omni's default; its config requires vision_config to carry the same value
PROJECTOR_EPS = 1e-5  # omni builds its projector RMSNorm with this eps (not configurable)
_VISION = "vision_model."
_LM = "language_model."
_MLP1 = {"layer_norm": "mlp1.0.weight", "linear_1": "mlp1.1.weight", "linear_2": "mlp1.3.weight"}
_BLOCK_CHARS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                "moe": "E"}


# ---- shared pieces
def _omni_pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """transformers' own ``NemotronH_Omni_Reasoning_V3.pixel_shuffle`` (it uses no state), scale 0.5."""
    from transformers import NemotronH_Omni_Reasoning_V3

    return NemotronH_Omni_Reasoning_V3.pixel_shuffle(None, x, scale_factor=0.5)


def pixel_shuffle_permutation(dim: int, grid: tuple[int, int] = (4, 6)) -> torch.Tensor:
    """Channel permutation between mmfm's 2x2 ``PixelUnshuffleCompressor`` and omni's ``pixel_shuffle``.

    Unique integers on an ``(h, w)`` grid of ``dim``-vectors go through both; returns ``perm`` ``(4*dim,)`` with
    ``omni_tokens[..., c] == mmfm_tokens[..., perm[c]]`` for every output token. Raises ``ValueError`` if the two
    disagree on which input tokens form an output token or on the output token order (then no channel
    permutation could reconcile them).
    """
    h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"grid must have even sides for a 2x2 pixel shuffle, got {grid}")
    x = torch.arange(h * w * dim, dtype=torch.long).view(1, h * w, dim)  # value = token * dim + channel
    ours = PixelUnshuffleCompressor(2)(x, (h, w))[0]  # (h/2 * w/2, 4D)
    theirs = _omni_pixel_shuffle(x.view(1, h, w, dim)).reshape(-1, 4 * dim)
    if ours.shape != theirs.shape:
        raise ValueError(f"pixel shuffle shapes differ: mmfm {tuple(ours.shape)} vs omni {tuple(theirs.shape)}")
    # where each omni channel value sits among the same output token's mmfm channels
    match = theirs[:, :, None] == ours[:, None, :]  # (K, 4D, 4D)
    if not bool(match.any(-1).all()):
        raise ValueError("omni's pixel_shuffle groups or orders tokens differently from mmfm's "
                         "PixelUnshuffleCompressor; no channel permutation maps one onto the other")
    perm = match.float().argmax(-1)  # (K, 4D)
    if not bool((perm == perm[:1]).all()):
        raise ValueError("the pixel-shuffle channel permutation differs between output tokens")
    return perm[0].clone()


def omni_image_inputs(images: torch.Tensor | list[torch.Tensor], mean, std, patch_size: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[0, 1]`` images -> ``(pixel_values (total_patches, 3*p*p), image_grid_hw (num_images, 2))`` as the omni
    image processor makes them for images already at their target size (no resize): ``(x - mean) / std`` in
    fp32, then row-major patches, each laid out channel-major ``(3, p, p)``.

    Args:
        images: ``(N, 3, H, W)`` or a list of ``(3, H, W)`` / ``(n, 3, H, W)``; H, W multiples of ``patch_size``.
        mean, std: per-channel statistics (the encoder's ``input_mean`` / ``input_std``).
    """
    items = [images] if isinstance(images, torch.Tensor) else list(images)
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    patches, grids = [], []
    for i, batch in enumerate(items):
        batch = batch.unsqueeze(0) if batch.dim() == 3 else batch
        if batch.dim() != 4 or batch.shape[1] != mean_t.shape[1]:
            raise ValueError(f"images[{i}] must be (n, {mean_t.shape[1]}, H, W), got {tuple(batch.shape)}")
        n, c, hh, ww = batch.shape
        if hh % patch_size or ww % patch_size:
            raise ValueError(f"images[{i}] is {hh}x{ww}, not a multiple of patch_size {patch_size}; resize it")
        gh, gw = hh // patch_size, ww // patch_size
        x = (batch.float() - mean_t.to(batch.device)) / std_t.to(batch.device)
        x = x.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
        patches.append(x.reshape(n * gh * gw, c * patch_size * patch_size))
        grids.append(torch.tensor([[gh, gw]] * n, dtype=torch.long))
    return torch.cat(patches), torch.cat(grids)


# ---- mmfm -> HF
def check_omni_fits(vlm: VLM) -> None:
    """Raise ``ValueError`` naming every part of ``vlm`` the ``nemotron_h_omni`` format cannot express."""
    from transformers import NemotronHForCausalLM

    problems: list[str] = []
    enc, lm = vlm.vision_encoder, vlm.language_model
    mtp = isinstance(lm, NemotronHForCausalLM) and _has_mtp(lm.config)
    if not isinstance(enc, RadioEncoder) or not isinstance(enc.student, ViT):
        student = type(getattr(enc, "student", enc)).__name__
        problems.append(f"vision encoder must be an mmfm RadioEncoder with a ViT student (got "
                        f"{type(enc).__name__} / {student})")
    else:
        vit_cfg = enc.student.cfg
        if mtp and not vit_cfg.final_norm:
            problems.append("the language model has MTP layers (num_nextn_predict_layers > 0), for which omni "
                            "normalises the vision features with a LayerNorm; this VLM's ViT has no final norm")
        try:
            # with an MTP language model, omni's vision_final_layernorm is the ViT's final norm
            hf_config_from_vit(replace(vit_cfg, final_norm=vit_cfg.final_norm and not mtp),
                               enc.summary_idxs.tolist(), enc.input_mean, enc.input_std)
        except ValueError as err:
            problems.append(f"vision encoder: {err}")
    comp = vlm.compressor
    if not isinstance(comp, PixelUnshuffleCompressor) or comp.factor != 2:
        desc = type(comp).__name__ + (f"(factor={comp.factor})" if hasattr(comp, "factor") else "")
        problems.append(f"compressor must be a 2x2 PixelUnshuffleCompressor (omni's pixel_shuffle with "
                        f"downsample_ratio 0.5), got {desc}")
    proj = vlm.projector
    norm, act = getattr(proj, "layer_norm", None), getattr(proj, "act", None)
    l1, l2 = getattr(proj, "linear_1", None), getattr(proj, "linear_2", None)
    if not (isinstance(norm, RMSNorm) and isinstance(act, SquaredReLU) and isinstance(l1, nn.Linear)
            and isinstance(l2, nn.Linear)):
        problems.append(f"projector must be RMSNorm -> Linear -> relu2 -> Linear (mmfm Projector(norm='rms', "
                        f"activation='relu2')), got norm={type(norm).__name__}, activation={type(act).__name__}")
    else:
        if l1.bias is not None or l2.bias is not None:
            problems.append("projector Linears must have no bias (omni's projector has none)")
        if norm.eps != PROJECTOR_EPS:
            problems.append(f"projector RMSNorm eps must be {PROJECTOR_EPS} (omni's fixed value), got {norm.eps}")
        if isinstance(enc, RadioEncoder) and l1.in_features != 4 * enc.embed_dim:
            problems.append(f"projector input width {l1.in_features} != 4 * encoder width {enc.embed_dim}")
    if not isinstance(lm, NemotronHForCausalLM):
        problems.append(f"language model must be transformers' NemotronHForCausalLM, got {type(lm).__name__}")
    if isinstance(l2, nn.Linear) and hasattr(lm, "config") and l2.out_features != lm.config.hidden_size:
        problems.append(f"projector output width {l2.out_features} != LM hidden size {lm.config.hidden_size}")
    if problems:
        raise ValueError("this VLM does not fit the HF nemotron_h_omni format: " + "; ".join(problems))


def _has_mtp(text_config) -> bool:
    """Omni adds ``vision_final_layernorm`` exactly when the language model config has MTP layers."""
    return int(getattr(text_config, "num_nextn_predict_layers", 0) or 0) > 0


def _projector_to_omni(proj: Projector, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        _MLP1["layer_norm"]: proj.layer_norm.weight.detach()[perm],
        _MLP1["linear_1"]: proj.linear_1.weight.detach()[:, perm],
        _MLP1["linear_2"]: proj.linear_2.weight.detach(),
    }


def _projector_from_omni(weights: dict[str, torch.Tensor], perm: torch.Tensor, eps: float = PROJECTOR_EPS,
                         ) -> Projector:
    """Inverse of :func:`_projector_to_omni`: ``mlp1.*`` weights in omni's channel order -> mmfm ``Projector``."""
    norm_w, w1, w2 = (weights[_MLP1[n]].detach() for n in ("layer_norm", "linear_1", "linear_2"))
    projector = Projector(w1.shape[1], w1.shape[0], w2.shape[0], norm="rms", activation="relu2", bias=False,
                          eps=eps).to(w1.dtype)
    with torch.no_grad():
        projector.layer_norm.weight[perm] = norm_w
        projector.linear_1.weight[:, perm] = w1
        projector.linear_2.weight.copy_(w2)
    return projector


def _lm_to_omni(lm: nn.Module) -> dict[str, torch.Tensor]:
    # lm_head is written even when tied to the embeddings: omni does not tie weights across its sub-models, so
    # a missing lm_head would be randomly initialised (write_safetensors stores tied tensors as copies)
    out: dict[str, torch.Tensor] = {}
    for k, v in lm.state_dict().items():
        out[_LM + ("backbone." + k[len("model."):] if k.startswith("model.") else k)] = v
    return out


def _preprocessor_config(enc: RadioEncoder, image_size: int | None) -> dict[str, Any]:
    p = enc.patch_size
    # images of the VLM's training size keep their size (min_num_patches = its patch count); larger ones are
    # scaled down within omni's default budget
    min_patches = (image_size // p) ** 2 if image_size else 1024
    return {
        "image_processor_type": "NemotronH_Omni_Reasoning_V3ImageProcessor",
        "do_convert_rgb": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(enc.input_mean),
        "image_std": list(enc.input_std),
        "resample": 3,  # bicubic
        "patch_size": p,
        "downsample_ratio": 0.5,
        "min_num_patches": min_patches,
        "max_num_patches": max(13312, min_patches),
    }


def export_hf_omni(vlm: VLM, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``vlm`` as a transformers ``nemotron_h_omni`` directory; ``NemotronH_Omni_Reasoning_V3.from_pretrained``
    on it gives the same logits for the same ``input_ids`` and images (pixel values from :func:`omni_image_inputs`).

    Args:
        vlm: RADIO ViT encoder + 2x2 pixel unshuffle + RMSNorm/relu2 projector without bias + NemotronH LM.
        tokenizer: the VLM's tokenizer (saved beside the weights).
        out_dir: directory to create / overwrite files in.

    Raises:
        ValueError: the architecture does not fit (every reason is listed).
    """
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    check_omni_fits(vlm)
    enc: RadioEncoder = vlm.vision_encoder
    student: ViT = enc.student
    dtype = next(student.parameters()).dtype
    lm = vlm.language_model
    final_norm = student.cfg.final_norm  # only here with an MTP LM: written as omni's vision_final_layernorm
    vision_cfg = hf_config_from_vit(replace(student.cfg, final_norm=False), enc.summary_idxs.tolist(),
                                    enc.input_mean, enc.input_std, dtype)
    vision_cfg["video_temporal_patch_size"] = VIDEO_TEMPORAL_PATCH_SIZE
    image_size = getattr(getattr(vlm, "config", None), "image_size", None)
    config = NemotronH_Omni_Reasoning_V3_Config(
        vision_config=vision_cfg, text_config=lm.config.to_dict(), downsample_ratio=0.5,
        projector_hidden_size=vlm.projector.linear_1.out_features, vision_hidden_size=enc.embed_dim,
        image_token_id=int(vlm.image_token_id), force_image_size=image_size,
        video_temporal_patch_size=VIDEO_TEMPORAL_PATCH_SIZE)
    config.architectures = [OMNI_ARCHITECTURE]
    config.dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")

    weights: dict[str, torch.Tensor] = {}
    vit_state = {k: v for k, v in student.state_dict().items() if not k.startswith("norm.")}
    for k, v in vit_state_to_hf(vit_state, student.cfg).items():
        weights[_VISION + k] = v
    weights[_VISION + "radio_model.summary_idxs"] = enc.summary_idxs.to(torch.long)
    w_img = weights[_VISION + "radio_model.model.patch_generator.embedder.weight"]
    weights[_VISION + "radio_model.model.patch_generator.video_embedder.weight"] = torch.cat(
        [w_img / VIDEO_TEMPORAL_PATCH_SIZE] * VIDEO_TEMPORAL_PATCH_SIZE, dim=1)
    if final_norm:
        weights["vision_final_layernorm.weight"] = student.norm.weight
        weights["vision_final_layernorm.bias"] = student.norm.bias
    weights.update(_projector_to_omni(vlm.projector, pixel_shuffle_permutation(enc.embed_dim)))
    weights.update(_lm_to_omni(lm))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(weights, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    tmp = out / ".preprocessor_config.json.tmp"
    tmp.write_text(json.dumps(_preprocessor_config(enc, image_size), indent=2) + "\n")
    os.replace(tmp, out / "preprocessor_config.json")
    tokenizer.save_pretrained(out)
    return out


# ---- HF -> mmfm
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except Exception as err:
        raise ValueError(f"corrupt JSON file {path}: {err}") from err


def _conditioning(path: Path, vision_cfg: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Normalisation the omni model expects: its image processor's, else the vision config's, else CLIP."""
    pre = path / "preprocessor_config.json"
    proc = _read_json(pre) if pre.is_file() else {}
    mean = proc.get("image_mean", proc.get("norm_mean", vision_cfg.get("norm_mean", CLIP_MEAN)))
    std = proc.get("image_std", proc.get("norm_std", vision_cfg.get("norm_std", CLIP_STD)))
    return [float(v) for v in mean], [float(v) for v in std]


def _vlm_config(omni_cfg, vit: ViT, projector_hidden: int, tokenizer_dir: Path):
    from mmfm.vlm.build import DecoderSpec, EncoderSpec, VLMConfig

    tc = omni_cfg.text_config
    # informational (save_vlm records the exact ViT config): a named size only when it is exactly that size
    size = next((name for name, c in VIT_SIZES.items() if replace(c, patch_size=vit.cfg.patch_size) == vit.cfg),
                "custom")
    pattern = getattr(tc, "hybrid_override_pattern", None) or "".join(
        _BLOCK_CHARS.get(b, "?") for b in (getattr(tc, "layers_block_type", None) or [])) or DecoderSpec.pattern
    dec = DecoderSpec(path=None, kind="nemotron_h", pattern=pattern, hidden_size=int(tc.hidden_size),
                      mamba_heads=int(tc.mamba_num_heads), mamba_head_dim=int(tc.mamba_head_dim),
                      n_groups=int(tc.n_groups), num_heads=int(tc.num_attention_heads),
                      num_kv_heads=int(tc.num_key_value_heads), intermediate_size=int(tc.intermediate_size),
                      state_size=int(tc.ssm_state_size))
    image_size = omni_cfg.force_image_size or vit.cfg.preferred_resolution
    return VLMConfig(encoder=EncoderSpec(path=None, size=size, patch_size=vit.cfg.patch_size), decoder=dec,
                     compressor="pixel_unshuffle", compress_factor=2, projector_hidden=int(projector_hidden),
                     projector_norm="rms", projector_activation="relu2", freeze_vision=True,
                     image_size=int(image_size), tokenizer=str(tokenizer_dir))


def load_hf_omni(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VLM, Any]:
    """Load a local transformers ``nemotron_h_omni`` directory as an mmfm :class:`VLM`; returns (vlm, tokenizer).

    transformers reads the weights (all its renames and conversions apply); the RADIO tower becomes an mmfm
    ``RadioEncoder`` (conditioning = the image processor's mean/std), the pixel shuffle a 2x2
    ``PixelUnshuffleCompressor`` with the projector permuted to match, and the ``NemotronHForCausalLM`` is used
    as is. The video projection and any audio branch are dropped (mmfm's VLM takes images and text).
    ``vlm.config`` is a matching ``VLMConfig``, so ``mmfm.vlm.build.save_vlm`` works on the result.
    """
    from transformers import NemotronH_Omni_Reasoning_V3

    from mmfm.data.tokenizer import load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"HF nemotron_h_omni directory not found: {p} (give a local directory)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json; it is not a Hugging Face model directory")
    raw = _read_json(p / "config.json")
    if raw.get("model_type") != OMNI_MODEL_TYPE:
        raise ValueError(f"{p / 'config.json'} has model_type {raw.get('model_type')!r}; load_hf_omni reads "
                         f"{OMNI_MODEL_TYPE!r} directories")
    model, info = NemotronH_Omni_Reasoning_V3.from_pretrained(p, local_files_only=True, dtype="auto",
                                                              output_loading_info=True)
    ignorable = re.compile(r"vision_final_layernorm\.|layer_scale\d\.lambda1|video_patch_projection|audio_tower\.|"
                           r"embed_audio\.")
    missing = [k for k in info.get("missing_keys", []) if not ignorable.search(k)]
    if missing:
        raise ValueError(f"{p} lacks weights for {sorted(missing)}; the checkpoint is incomplete")
    cfg = model.config
    if abs(float(cfg.downsample_ratio) - 0.5) > 1e-9:
        raise ValueError(f"{p}: downsample_ratio {cfg.downsample_ratio} is not supported; mmfm's VLM maps omni's "
                         "pixel shuffle with downsample_ratio 0.5 (2x2) only")
    if model.audio_tower is not None:
        log.warning("dropping the audio branch of %s: mmfm's VLM takes images and text", p)

    # vision tower -> mmfm ViT (in-memory RadioModel names are understood by the radio converter)
    vision_cfg = cfg.vision_config.to_dict()
    vstate = {k: v for k, v in model.vision_model.state_dict().items() if "video_patch_projection" not in k}
    vit_cfg, vit_state, extras = hf_state_to_vit(vstate, vision_cfg)
    if model.vision_final_layernorm is not None:
        # MTP checkpoints normalise the tower's features; mmfm's ViT final LayerNorm is the same op on patches
        ln = model.vision_final_layernorm
        if ln.eps != vit_cfg.layer_norm_eps:
            raise ValueError(f"{p}: vision_final_layernorm eps {ln.eps} != ViT layer_norm_eps "
                             f"{vit_cfg.layer_norm_eps}; mmfm's ViT final norm cannot express it")
        vit_cfg = replace(vit_cfg, final_norm=True)
        vit_state["norm.weight"], vit_state["norm.bias"] = ln.weight.detach(), ln.bias.detach()
    student = ViT(vit_cfg).to(next(model.vision_model.parameters()).dtype)
    load_state_checked(student, vit_state, where=f"the vision tower of {p}")
    summary_idxs = extras["summary_idxs"].tolist() if "summary_idxs" in extras else vision_cfg.get("summary_idxs")
    mean, std = _conditioning(p, vision_cfg)
    encoder = RadioEncoder(student, summary_idxs, {}, mean, std)

    # projector, channels permuted from omni's pixel-shuffle order to mmfm's
    omni_proj = model.multi_modal_projector
    d = vit_cfg.embed_dim
    projector = _projector_from_omni(
        {key: getattr(omni_proj, name).weight for name, key in _MLP1.items()}, pixel_shuffle_permutation(d),
        eps=omni_proj.layer_norm.variance_epsilon)

    lm = model.language_model
    tokenizer = load_tokenizer(p)
    image_token_id = cfg.image_token_id
    if image_token_id is None:
        raise ValueError(f"{p / 'config.json'} has no image_token_id (or img_context_token_id)")
    vlm = VLM(encoder, PixelUnshuffleCompressor(2), projector, lm, int(image_token_id), freeze_vision=True)
    vlm.config = _vlm_config(cfg, student, omni_proj.linear_1.out_features, p)
    return vlm.to(device).eval(), tokenizer
