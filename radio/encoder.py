"""``RadioEncoder``: the feature-extraction API around a student backbone, and its checkpoint format.

``RadioEncoder`` = input conditioning ((x - mean) / std, in fp32) -> student -> summary + dense features
(-> per-teacher adaptors). The student is either the CPE ``ViT`` (``vit.py``) or any backbone whose
``forward(x)`` returns ``RadioOutput(summary (B, D), features (B, h*w, D))`` on normalised images and that has
``patch_size`` (its total stride) and ``embed_dim`` (e.g. ``MambaVision``).

Checkpoint directory (written by ``save``, read by ``load``)::

    config.json         {"format": "mmfm.radio", "format_version": 1,
                         "student": {"type": "vit" | "mambavision", "config": {...}},
                         "summary_idxs": [...], "input_mean": [...], "input_std": [...],
                         "adaptors": {"<teacher>": {"head_idx": ..., "upsample_factor": ..., ...}}}
                        (config.yaml with the same content is accepted too)
    model.safetensors   ``student.*`` and ``adaptors.<teacher>.*`` weights (adaptor shapes are read from these)

``load`` also reads Hugging Face ``radio`` directories (``transformers.RadioModel``; see ``hf_interop.py``).
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from mmfm.radio.adaptors import AdaptorSpec, TeacherAdaptor, adaptor_from_state
from mmfm.radio.vit import ViT, ViTConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CONFIG_NAME",
    "FORMAT_NAME",
    "InputConditioner",
    "RadioEncoder",
    "RadioOutput",
    "Resolution",
    "WEIGHTS_NAME",
    "load",
    "read_safetensors",
    "save",
]

# OpenAI-CLIP statistics, the default input conditioning of RADIO students.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FORMAT_NAME = "mmfm.radio"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class RadioOutput(NamedTuple):
    """``summary`` (B, k*D) (None for feature-only adaptors); ``features`` (B, h*w, D) for ``"NLC"`` or
    (B, D, h, w) for ``"NCHW"``, row-major token grid."""

    summary: torch.Tensor | None
    features: torch.Tensor | None


class Resolution(NamedTuple):
    height: int
    width: int


class InputConditioner(nn.Module):
    """(B, C, H, W) in [0, 1] -> ``(x - mean) / std`` computed in fp32, returned in ``dtype`` (default: x's)."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        super().__init__()
        self.register_buffer("norm_mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("norm_std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def _apply(self, fn, recurse: bool = True):
        # the statistics stay fp32 under model.to(bfloat16) & co (only their device follows), so conditioning
        # is the same in every model precision
        old = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, b in old.items():
            if self._buffers[n].dtype != b.dtype:
                self._buffers[n] = b.to(self._buffers[n].device)
        return self

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        y = (x.float() - self.norm_mean.float()) / self.norm_std.float()
        return y.to(dtype or x.dtype)


class _External(nn.Module):
    """Stands in for the conditioner after ``make_preprocessor_external``: only casts."""

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return x.to(dtype or x.dtype)


# ---- students
def _build_student(kind: str, cfg: Mapping[str, Any]) -> nn.Module:
    if kind == "vit":
        return ViT(ViTConfig.from_dict(dict(cfg)))
    if kind == "mambavision":
        from mmfm.radio.mambavision import MambaVision, MambaVisionConfig

        return MambaVision(_dataclass_from_dict(MambaVisionConfig, cfg))
    raise ValueError(f"unknown student type {kind!r} in the checkpoint config; known: ['mambavision', 'vit']")


def _dataclass_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    # JSON turns tuples into lists; the configs use tuples (frozen / hashable)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _student_record(student: nn.Module) -> dict[str, Any]:
    if isinstance(student, ViT):
        return {"type": "vit", "config": student.cfg.to_dict()}
    cfg = getattr(student, "cfg", None)
    if type(student).__name__ == "MambaVision" and is_dataclass(cfg):
        return {"type": "mambavision",
                "config": {f.name: _jsonable(getattr(cfg, f.name)) for f in fields(cfg)}}
    raise TypeError(f"cannot save a student of type {type(student).__name__}; supported: ViT, MambaVision")


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


class RadioEncoder(nn.Module):
    """Student backbone + input conditioning + optional per-teacher adaptors.

    Args:
        student: a ``ViT`` or a backbone returning ``RadioOutput`` (see module docstring).
        summary_idxs: class tokens concatenated into the backbone summary (default: all of them).
        adaptors: ``{teacher name: TeacherAdaptor}``.
        input_mean, input_std: conditioning statistics (OpenAI CLIP by default).
    """

    def __init__(self, student: nn.Module, summary_idxs: Sequence[int] | None = None,
                 adaptors: Mapping[str, TeacherAdaptor] | None = None,
                 input_mean: Sequence[float] = CLIP_MEAN, input_std: Sequence[float] = CLIP_STD) -> None:
        super().__init__()
        self.student = student
        self._is_vit = isinstance(student, ViT)
        if not self._is_vit:
            for attr in ("patch_size", "embed_dim"):
                if not hasattr(student, attr):
                    raise TypeError(f"student {type(student).__name__} has no {attr!r}; a RadioEncoder student "
                                    "needs patch_size, embed_dim and forward(x) -> RadioOutput")
            if hasattr(student, "make_preprocessor_external"):
                student.make_preprocessor_external()  # the encoder conditions the input once
        num_cls = self.num_cls_tokens
        idxs = list(range(num_cls)) if summary_idxs is None else [int(i) for i in summary_idxs]
        bad = [i for i in idxs if not 0 <= i < num_cls]
        if bad:
            raise ValueError(f"summary_idxs {bad} are out of range for {num_cls} class tokens")
        self.register_buffer("summary_idxs", torch.tensor(idxs, dtype=torch.long), persistent=False)
        self.input_mean = tuple(float(v) for v in input_mean)
        self.input_std = tuple(float(v) for v in input_std)
        self.input_conditioner: nn.Module = InputConditioner(self.input_mean, self.input_std)
        self.adaptors = nn.ModuleDict(dict(adaptors or {}))

    # ---- properties
    @property
    def patch_size(self) -> int:
        return int(self.student.patch_size)

    @property
    def min_resolution_step(self) -> int:
        return int(getattr(self.student, "min_resolution_step", self.patch_size))

    @property
    def max_resolution(self) -> int:
        return int(getattr(self.student, "max_resolution", 2048))

    @property
    def preferred_resolution(self) -> Resolution:
        r = int(getattr(self.student, "preferred_resolution", 512))
        return Resolution(r, r)

    @property
    def embed_dim(self) -> int:
        return int(self.student.embed_dim)

    @property
    def num_cls_tokens(self) -> int:
        return int(self.student.num_cls_tokens) if self._is_vit else 1

    @property
    def summary_dim(self) -> int:
        return len(self.summary_idxs) * self.embed_dim

    @property
    def adaptor_names(self) -> list[str]:
        return list(self.adaptors.keys())

    @property
    def in_chans(self) -> int:
        return int(self.student.cfg.in_chans) if hasattr(self.student, "cfg") else 3

    def make_preprocessor_external(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Stop normalising inside the model; returns the conditioner the caller must now apply."""
        cond = self.input_conditioner
        if isinstance(cond, _External):
            raise RuntimeError("the preprocessor is already external")
        self.input_conditioner = _External()
        return cond

    def get_nearest_supported_resolution(self, height: int, width: int) -> Resolution:
        """Nearest (H, W) that are positive multiples of ``min_resolution_step`` and within ``max_resolution``."""
        step = self.min_resolution_step
        top = self.max_resolution // step * step

        def near(v: int) -> int:
            return min(top, max(step, int(round(v / step)) * step))

        return Resolution(near(height), near(width))

    # ---- forward
    def _check_images(self, images: Any) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}; "
                             "add a batch dimension with images[None] for one image")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}; "
                            "convert with images.float() / 255")
        if images.shape[1] != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels (RGB), got {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")
        h, w = images.shape[-2:]
        step = self.min_resolution_step
        if h % step or w % step or max(h, w) > self.max_resolution:
            nh, nw = self.get_nearest_supported_resolution(h, w)
            why = (f"not a multiple of {step}" if h % step or w % step
                   else f"larger than max_resolution {self.max_resolution}")
            raise ValueError(f"image size {h}x{w} (HxW) is {why}; resize to the nearest supported "
                             f"size {nh}x{nw} (encoder.get_nearest_supported_resolution(h, w))")

    def _model_dtype(self) -> torch.dtype:
        for p in self.student.parameters():
            return p.dtype
        return torch.float32

    def _backbone(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """images -> (class tokens (B, C, D), patch features (B, h*w, D), grid (h, w))."""
        x = self.input_conditioner(images, self._model_dtype())
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        if self._is_vit:
            feats = self.student.forward_features(x)
            return feats.cls_tokens, feats.patches, grid
        out = self.student(x)
        return out.summary[:, None], out.features, grid

    @staticmethod
    def _fmt(features: torch.Tensor, grid: tuple[int, int], feature_fmt: str) -> torch.Tensor:
        if feature_fmt == "NLC":
            return features
        b, _, d = features.shape
        return features.transpose(1, 2).reshape(b, d, grid[0], grid[1])

    def _select_adaptors(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return self.adaptor_names
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.adaptors]
        if unknown:
            raise ValueError(f"unknown adaptor name(s) {unknown}; available adaptors: {self.adaptor_names}")
        return list(names)

    def forward(self, images: torch.Tensor, feature_fmt: str = "NLC", adaptors: Sequence[str] | None = None,
                ) -> RadioOutput | dict[str, RadioOutput]:
        """Encode images.

        Args:
            images: (B, 3, H, W) floats in [0, 1] (already normalised after ``make_preprocessor_external``);
                H, W multiples of ``min_resolution_step``.
            feature_fmt: ``"NLC"`` -> features (B, h*w, D); ``"NCHW"`` -> (B, D, h, w).
            adaptors: which attached adaptors to run (default: all of them).

        Returns:
            ``RadioOutput(summary (B, k*D), features)`` without adaptors; otherwise
            ``{"backbone": RadioOutput, "<teacher>": RadioOutput(summary (B, D_t), features on the (h*u, w*u) grid)}``.
        """
        if feature_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"feature_fmt must be 'NLC' or 'NCHW', got {feature_fmt!r}")
        names = self._select_adaptors(adaptors)
        self._check_images(images)
        cls_tokens, feats, grid = self._backbone(images)
        summary = cls_tokens[:, self.summary_idxs].flatten(1)
        backbone = RadioOutput(summary, self._fmt(feats, grid, feature_fmt))
        if not names:
            return backbone
        out: dict[str, RadioOutput] = {"backbone": backbone}
        for name in names:
            ad: TeacherAdaptor = self.adaptors[name]
            f = ad.forward_features(feats, grid)
            u = ad.upsample_factor
            out[name] = RadioOutput(ad.forward_summary(cls_tokens),
                                    None if f is None else self._fmt(f, (grid[0] * u, grid[1] * u), feature_fmt))
        return out

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Features after intermediate blocks (ViT) or stages (hierarchical students).

        Args:
            images: as in ``forward``.
            indices: block indices (negative from the end) or an int n = the last n blocks; default all.
            return_prefix_tokens: return ``RadioOutput(summary (B, k*D), features)`` per index instead of features.
            norm: apply the final norm to the intermediates (ViT).
            stop_early: do not run blocks after the last requested one (ViT; implies intermediates_only).
            output_fmt: ``"NCHW"`` -> (B, D, h, w) or ``"NLC"`` -> (B, h*w, D).
            intermediates_only: return only the list.

        Returns:
            ``list`` of intermediates, or ``(final RadioOutput, list)``.
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        self._check_images(images)
        x = self.input_conditioner(images, self._model_dtype())
        hh, ww = images.shape[-2:]
        if not self._is_vit:
            if not hasattr(self.student, "forward_intermediates"):
                raise TypeError(f"student {type(self.student).__name__} has no forward_intermediates")
            stages = None if indices is None else ([indices] if isinstance(indices, int) else list(indices))
            final, inter = self.student.forward_intermediates(x, stages=stages)
            outs = []
            for t in inter:
                stride = int(round((hh * ww / t.shape[1]) ** 0.5))
                outs.append(self._fmt(t, (hh // stride, ww // stride), output_fmt))
            if intermediates_only:
                return outs
            g = (hh // self.patch_size, ww // self.patch_size)
            return RadioOutput(final.summary, self._fmt(final.features, g, output_fmt)), outs
        depth = self.student.cfg.depth
        if indices is None:
            idx = list(range(depth))
        elif isinstance(indices, int):
            idx = list(range(depth - indices, depth))
        else:
            idx = list(indices)
        final, inter = self.student.forward_intermediates(x, idx, norm=norm, stop_early=stop_early)
        grid = (hh // self.patch_size, ww // self.patch_size)
        outs = []
        for t in inter:
            f = self.student.split(t)
            feats = self._fmt(f.patches, grid, output_fmt)
            outs.append(RadioOutput(f.cls_tokens[:, self.summary_idxs].flatten(1), feats)
                        if return_prefix_tokens else feats)
        if intermediates_only or final is None:
            return outs
        f = self.student.split(final)
        return RadioOutput(f.cls_tokens[:, self.summary_idxs].flatten(1), self._fmt(f.patches, grid, output_fmt)), outs

    # ---- persistence
    def config_dict(self) -> dict[str, Any]:
        """The ``config.json`` record of this encoder."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "student": _student_record(self.student),
            "summary_idxs": [int(i) for i in self.summary_idxs.tolist()],
            "input_mean": list(self.input_mean),
            "input_std": list(self.input_std),
            "adaptors": {name: ad.spec.to_dict() for name, ad in self.adaptors.items()},
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """Tensors saved in ``model.safetensors`` (student and adaptors; the conditioner is in the config)."""
        sd = self.state_dict()
        return {k: v for k, v in sd.items() if not k.startswith("input_conditioner.")}

    def save(self, out_dir: str | os.PathLike) -> Path:
        return save(self, out_dir)


# ---- files
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                      ) -> None:
    """Write tensors atomically (temp file + rename); tensors are copied to CPU, contiguous and unshared."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(clean, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; missing -> FileNotFoundError, corrupt -> ValueError, both naming the file."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        return load_file(str(p))
    except Exception as err:  # safetensors raises SafetensorError / OSError for truncated or foreign files
        raise ValueError(f"corrupt or unreadable safetensors file {p}: {err}") from err


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` (or ``config.yaml``/``.yml``) of a checkpoint directory as a dict."""
    for name in (CONFIG_NAME, "config.yaml", "config.yml"):
        f = path / name
        if f.is_file():
            try:
                text = f.read_text()
                if name.endswith(".json"):
                    cfg = json.loads(text)
                else:
                    import yaml

                    cfg = yaml.safe_load(text)
            except Exception as err:
                raise ValueError(f"corrupt config file {f}: {err}") from err
            if not isinstance(cfg, dict):
                raise ValueError(f"config file {f} does not hold a mapping")
            return cfg
    raise FileNotFoundError(f"no config.json or config.yaml in checkpoint directory {path}")


def save(encoder: RadioEncoder, out_dir: str | os.PathLike) -> Path:
    """Write ``encoder`` as an mmfm checkpoint directory (``config.json`` + ``model.safetensors``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(encoder.weights(), out / WEIGHTS_NAME, metadata={"format": "pt", "mmfm": FORMAT_NAME})
    _atomic_write_bytes(out / CONFIG_NAME, (json.dumps(encoder.config_dict(), indent=2) + "\n").encode())
    return out


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` that reports mismatches as a ValueError listing the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        raise ValueError(f"state dict of {where} does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {shape}")
    module.load_state_dict(state, strict=True)


def load(path: str | os.PathLike, adaptors: str | Sequence[str] | None = None,
         device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> RadioEncoder:
    """Load a ``RadioEncoder`` from an mmfm checkpoint directory or a Hugging Face ``radio`` directory.

    Args:
        path: the directory.
        adaptors: teacher adaptors to attach: ``None`` (none; forward returns a ``RadioOutput``), ``"all"``, or
            a list of names (unknown names raise ``ValueError`` listing the available ones).
        device, dtype: where / in what precision to put the model (default CPU, stored dtype).

    Returns:
        The encoder in eval mode.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise ValueError(f"path must be a checkpoint directory (config.json + model.safetensors), got file {p}")
    cfg = read_config(p)
    if cfg.get("model_type") == "radio":
        from mmfm.radio.hf_interop import load_hf_radio

        enc = load_hf_radio(p, adaptors=adaptors, config=cfg)
    else:
        if cfg.get("format") != FORMAT_NAME:
            raise ValueError(f"{p} is neither an mmfm radio checkpoint (config 'format': {FORMAT_NAME!r}) nor a "
                             f"Hugging Face radio checkpoint (config 'model_type': 'radio'); got keys {sorted(cfg)}")
        enc = _load_mmfm(p, cfg, adaptors)
    enc.eval()
    if device is not None or dtype is not None:
        enc.to(device=device, dtype=dtype)
    return enc


def select_adaptor_names(available: Sequence[str], adaptors: str | Sequence[str] | None) -> list[str]:
    """Resolve the ``adaptors`` argument of ``load`` against the names a checkpoint holds."""
    if adaptors is None:
        return []
    if isinstance(adaptors, str):
        adaptors = list(available) if adaptors == "all" else [adaptors]
    unknown = [n for n in adaptors if n not in available]
    if unknown:
        raise ValueError(f"unknown adaptor name(s) {unknown}; available adaptors: {sorted(available)}")
    return list(adaptors)


def build_adaptors(state: Mapping[str, torch.Tensor], specs: Mapping[str, Mapping[str, Any]],
                   names: Sequence[str], prefix: str = "adaptors.") -> dict[str, TeacherAdaptor]:
    """Instantiate and load the named adaptors from ``state`` (keys ``{prefix}{name}.summary.*`` / ``feature.*``)."""
    out = {}
    for name in names:
        spec = _dataclass_from_dict(AdaptorSpec, specs[name])
        out[name] = adaptor_from_state(state, spec, prefix=f"{prefix}{name}.")
    return out


def _load_mmfm(path: Path, cfg: dict[str, Any], adaptors: str | Sequence[str] | None) -> RadioEncoder:
    version = cfg.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME} has format_version {version}; this mmfm reads <= {FORMAT_VERSION}")
    try:
        stud = cfg["student"]
        student = _build_student(stud["type"], stud["config"])
    except KeyError as err:
        raise ValueError(f"{path / CONFIG_NAME} lacks the field {err}") from None
    state = read_safetensors(path / WEIGHTS_NAME)
    specs = cfg.get("adaptors", {}) or {}
    names = select_adaptor_names(list(specs), adaptors)
    built = build_adaptors(state, specs, names)
    enc = RadioEncoder(student, cfg.get("summary_idxs"), built, cfg.get("input_mean", CLIP_MEAN),
                       cfg.get("input_std", CLIP_STD))
    # unselected adaptors' weights are not part of the model
    keep = {k: v for k, v in state.items()
            if not k.startswith("adaptors.") or k.split(".", 2)[1] in built}
    load_state_checked(enc, {**keep, **{f"input_conditioner.{k}": v
                                         for k, v in enc.input_conditioner.state_dict().items()}},
                       where=str(path / WEIGHTS_NAME))
    return enc
