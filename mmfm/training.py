"""One training engine for every mmfm trainer, with or without DeepSpeed.

``Engine`` owns the model wrapper (plain / DDP / DeepSpeed), the optimizer, the cosine LR schedule with
linear warm-up, gradient accumulation and clipping, bf16 autocast, an optional EMA of the weights,
non-finite loss handling, and checkpoints with exact resume. A trainer's loop is the same on every path::

    engine = Engine(model, OptimizerConfig(lr=3e-4, warmup_steps=100, total_steps=10_000),
                    deepspeed_config=args.deepspeed, precision="bf16", grad_clip=1.0, grad_accum=2)
    for micro_batch in batches:
        out = engine.forward(micro_batch["x"])        # runs the wrapped model (autocast / DDP sync)
        loss = criterion(out, micro_batch["y"])
        engine.backward(loss)                         # scaled by 1/grad_accum on both paths
        if engine.step():                             # True when an optimizer step happened
            log(engine.global_step, loss, engine.lr)
    engine.save_checkpoint(out_dir / "checkpoints", extra={"data_step": i})
    ...
    ckpt = engine.load_checkpoint(out_dir / "checkpoints")   # model, optimizer, counters, EMA, RNG
    data_step = ckpt.extra["data_step"]

The LR multiplier is computed by ``cosine_schedule(step, ...)`` and written into the optimizer's param
groups before every optimizer step, on both paths, so the schedule state is just ``global_step``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmfm.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from mmfm.distributed import all_reduce_sum, get_world_size, init_distributed

__all__ = [
    "EMA",
    "Engine",
    "EngineConfig",
    "NonFiniteLossError",
    "OptimizerConfig",
    "build_optimizer",
    "cosine_schedule",
    "load_deepspeed_config",
]

Precision = Literal["fp32", "bf16"]


class NonFiniteLossError(FloatingPointError):
    """A loss (or gradient norm) was NaN/Inf; the message names the optimizer step."""


@dataclass
class OptimizerConfig:
    """Optimizer and LR schedule. ``lr`` is the peak LR reached after ``warmup_steps``."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0  # final LR = lr * min_lr_ratio
    # Biases and norm gains (ndim <= 1) get no weight decay, as in every ViT/LLM recipe.
    no_decay_1d: bool = True


@dataclass
class EngineConfig:
    """Everything ``Engine`` needs besides the model; embed it in a trainer's dataclass config."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: Precision = "fp32"
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema_decay: float | None = None
    on_nonfinite: Literal["raise", "skip"] = "raise"
    nonfinite_check: Literal["host", "device"] = "host"
    deepspeed_config: str | None = None
    micro_batch_size: int = 1  # fills DeepSpeed's train_micro_batch_size_per_gpu


def cosine_schedule(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up then cosine decay.

    ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step already moves), then
    ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1].
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"cosine_schedule: need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"cosine_schedule: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(
    model: nn.Module, cfg: OptimizerConfig, param_groups: Iterable[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    if param_groups is not None:
        groups = []
        for i, g in enumerate(param_groups):
            if "params" not in g:
                raise ValueError(f"param_groups[{i}] needs a 'params' entry, got keys {sorted(g)}")
            params = [p for p in g["params"] if p.requires_grad]
            lr_scale = float(g.get("lr_scale", 1.0))
            extra = {k: v for k, v in g.items() if k not in ("params", "lr_scale")}
            groups.append(
                {
                    "params": params,
                    "weight_decay": cfg.weight_decay,
                    **extra,
                    "lr": cfg.lr * lr_scale,
                    "base_lr": cfg.lr * lr_scale,
                }
            )
        return [g for g in groups if g["params"]]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen parts (teachers, a frozen encoder) are never handed to the optimizer
        (no_decay if cfg.no_decay_1d and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "base_lr": cfg.lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    cfg: OptimizerConfig,
    param_groups: Iterable[Mapping[str, Any]] | None = None,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """The torch optimizer named by ``cfg`` over ``model``'s trainable parameters.

    ``param_groups``: optional list of ``{"params": [...], "lr_scale": float, "weight_decay": float}``
    (e.g. a smaller LR for the vision encoder); each group's peak LR is ``cfg.lr * lr_scale``.
    ``fused``: PyTorch's fused implementation (it can skip a step on the device through ``found_inf``);
    None: fused Adam/AdamW on GPUs, PyTorch's default elsewhere.
    """
    groups = _param_groups(model, cfg, param_groups)
    if not groups:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    if fused is None and cfg.name in ("adamw", "adam"):
        # one fused kernel per step on GPUs (the foreach default launches several per parameter chunk)
        fused = True if all(p.is_cuda for g in groups for p in g["params"]) else None
    if cfg.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    raise ValueError(f"OptimizerConfig.name must be 'adamw', 'adam' or 'sgd', got {cfg.name!r}")


class EMA:
    """Exponential moving average of a module's trainable parameters, kept in fp32.

    ``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        pairs = [(self.shadow[n], p.detach()) for n, p in module.named_parameters() if n in self.shadow]
        # one multi-tensor kernel per chunk of parameters on GPUs, not one launch per parameter
        torch._foreach_lerp_([s for s, _ in pairs], [p.to(s.dtype) for s, p in pairs], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with EMA weights in place of the trainable parameters."""
        sd = module.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in sd.items()}

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s trainable parameters with the EMA weights (e.g. before export)."""
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))


def load_deepspeed_config(
    config: str | Path | Mapping[str, Any],
    *,
    precision: Precision,
    grad_clip: float | None,
    grad_accum: int,
    micro_batch_size: int,
) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill the fields the Engine owns (``"auto"`` in the shipped files).

    Sets ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``gradient_clipping``,
    ``bf16.enabled`` (and fp16 off), drops ``train_batch_size`` (DeepSpeed derives it) and allows the
    torch optimizer the Engine passes in. The optimizer and LR schedule come from ``OptimizerConfig``:
    a DeepSpeed ``optimizer``/``scheduler`` section is a ValueError.
    """
    if isinstance(config, Mapping):
        cfg = copy.deepcopy(dict(config))
        where = "<dict>"
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path} (pass e.g. configs/deepspeed/zero2.json)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
        where = str(path)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(
                f"DeepSpeed config {where} has a '{section}' section; the Engine builds the optimizer and LR "
                "schedule from OptimizerConfig - remove it"
            )
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    cfg.pop("train_batch_size", None)
    cfg["gradient_clipping"] = float(grad_clip) if grad_clip else 0.0
    cfg.setdefault("bf16", {})["enabled"] = precision == "bf16"
    if "fp16" in cfg:
        cfg["fp16"]["enabled"] = False
    cfg["zero_allow_untested_optimizer"] = True

    def find_auto(node: Any, prefix: str) -> None:
        if node == "auto":
            raise ValueError(f"DeepSpeed config {where}: '{prefix}' is 'auto' but the Engine does not fill it")
        if isinstance(node, dict):
            for k, v in node.items():
                find_auto(v, f"{prefix}.{k}" if prefix else k)

    find_auto(cfg, "")
    return cfg


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


class Engine:
    """Model + optimizer + schedule + accumulation + precision + EMA + checkpoints, one interface.

    Args:
        model: the module to train (moved to this rank's device). Frozen parameters are not optimized.
        optimizer_cfg: optimizer and cosine/warm-up schedule.
        deepspeed_config: path or dict of a DeepSpeed config; None trains with plain PyTorch (DDP when
            ``WORLD_SIZE > 1``). Under DeepSpeed the process group is created if needed (gloo on CPU).
        precision: ``"fp32"`` or ``"bf16"`` (autocast with fp32 weights without DeepSpeed; DeepSpeed's
            bf16 mode with fp32 master weights under DeepSpeed).
        grad_clip: max global gradient L2 norm, None/0 for no clipping.
        grad_accum: micro-batches per optimizer step.
        ema_decay: keep an fp32 EMA of the trainable weights (None: off). Not supported with ZeRO-3.
        on_nonfinite: ``"raise"`` -> ``NonFiniteLossError`` naming the step; ``"skip"`` -> the micro-batch
            contributes no gradient on any rank (counted in ``skipped_microbatches``); a window made only
            of skipped micro-batches takes no optimizer step (DeepSpeed: a step with LR 0), counted in
            ``skipped_steps``; a non-finite gradient norm also skips the step (non-DeepSpeed path).
        nonfinite_check: where the non-finite checks read their values. ``"host"``: every micro-batch's loss
            and every step's gradient norm are read on the host, one sync each, so a bad micro-batch is
            dropped alone and ``"raise"`` raises at once. ``"device"`` (not with DeepSpeed): nothing is read
            during the step, so the host can queue the next step while this one runs. The gradient norm is
            tested on the device and a non-finite one makes the fused optimizer skip the whole step there
            (weights, moments and its step count unchanged). ``settle()`` reads those results later (one sync)
            and updates ``skipped_steps`` and ``last_grad_norm``; under ``"raise"`` it raises for the first bad
            step. A non-finite loss poisons its whole accumulation window (counted in ``skipped_steps``, not in
            ``skipped_microbatches``).
        micro_batch_size: per-rank micro-batch size (DeepSpeed bookkeeping only).
        param_groups: optional custom groups, see ``build_optimizer``.
        find_unused_parameters: passed to DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_cfg: OptimizerConfig | None = None,
        deepspeed_config: str | Path | Mapping[str, Any] | None = None,
        precision: Precision = "fp32",
        grad_clip: float | None = 1.0,
        grad_accum: int = 1,
        *,
        ema_decay: float | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        nonfinite_check: Literal["host", "device"] = "host",
        micro_batch_size: int = 1,
        param_groups: Iterable[Mapping[str, Any]] | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Engine: model must be an nn.Module, got {type(model).__name__}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"Engine: precision must be 'fp32' or 'bf16', got {precision!r}")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"Engine: grad_accum must be an int >= 1, got {grad_accum!r}")
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"Engine: grad_clip must be >= 0 or None, got {grad_clip}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Engine: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if nonfinite_check not in ("host", "device"):
            raise ValueError(f"Engine: nonfinite_check must be 'host' or 'device', got {nonfinite_check!r}")
        if nonfinite_check == "device" and deepspeed_config is not None:
            raise ValueError("Engine: nonfinite_check='device' needs the plain PyTorch path (DeepSpeed's step reads "
                             "its gradient norm on the host); use nonfinite_check='host' with DeepSpeed")
        self.optimizer_cfg = optimizer_cfg or OptimizerConfig()
        self.precision: Precision = precision
        self.grad_clip = grad_clip or None
        self.grad_accum = grad_accum
        self.on_nonfinite = on_nonfinite
        self.nonfinite_check = nonfinite_check
        self._unread: list[tuple[int, torch.Tensor]] = []  # (optimizer step, its gradient norm) not yet settled
        self.global_step = 0  # optimizer steps taken (the LR schedule's step)
        self.micro_step = 0  # micro-batches consumed
        self.skipped_microbatches = 0
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self._window_skipped = 0  # skipped micro-batches in the current accumulation window
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._ds = None

        self.dist = init_distributed(force=deepspeed_config is not None)
        self.device = self.dist.device
        if deepspeed_config is None:
            model = model.to(self.device)  # first: the optimizer picks its fused GPU kernel from where the weights are
        optimizer = build_optimizer(model, self.optimizer_cfg, param_groups,
                                    fused=True if nonfinite_check == "device" else None)
        if deepspeed_config is not None:
            import deepspeed

            ds_cfg = load_deepspeed_config(
                deepspeed_config,
                precision=precision,
                grad_clip=grad_clip,
                grad_accum=grad_accum,
                micro_batch_size=micro_batch_size,
            )
            self.deepspeed_config = ds_cfg
            self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
            if self.zero_stage == 3 and (ema_decay is not None or on_nonfinite == "skip"):
                raise ValueError(
                    "Engine: ema_decay and on_nonfinite='skip' need full parameters on every rank; "
                    "they are not supported with ZeRO-3 (use ZeRO-2 or drop them)"
                )
            self._ds, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_cfg
            )
            self.module = self._ds.module
            self.model: nn.Module = self._ds
            self.device = self._ds.device
        else:
            self.deepspeed_config = None
            self.zero_stage = 0
            self.module = model  # already on self.device
            self.optimizer = optimizer
            if get_world_size() > 1:
                self._ddp = nn.parallel.DistributedDataParallel(
                    self.module,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=find_unused_parameters,
                )
                self.model = self._ddp
            else:
                self.model = self.module
        self.ema = EMA(self.module, ema_decay) if ema_decay is not None else None
        self._trainable = [p for p in self.module.parameters() if p.requires_grad]

    @classmethod
    def from_config(cls, model: nn.Module, cfg: EngineConfig, **kwargs: Any) -> Engine:
        """``Engine`` built from an ``EngineConfig`` (``kwargs`` override / add e.g. ``param_groups``)."""
        args: dict[str, Any] = dict(
            optimizer_cfg=cfg.optimizer,
            deepspeed_config=cfg.deepspeed_config,
            precision=cfg.precision,
            grad_clip=cfg.grad_clip,
            grad_accum=cfg.grad_accum,
            ema_decay=cfg.ema_decay,
            on_nonfinite=cfg.on_nonfinite,
            nonfinite_check=cfg.nonfinite_check,
            micro_batch_size=cfg.micro_batch_size,
        )
        args.update(kwargs)
        return cls(model, **args)

    # ------------------------------------------------------------------------------------ properties
    @property
    def uses_deepspeed(self) -> bool:
        return self._ds is not None

    @property
    def deepspeed_engine(self) -> Any:
        """The underlying ``deepspeed.DeepSpeedEngine`` (None without DeepSpeed)."""
        return self._ds

    @property
    def is_accumulation_boundary(self) -> bool:
        """Whether the current micro-batch is the last of its accumulation window."""
        return (self.micro_step + 1) % self.grad_accum == 0

    @property
    def lr_multiplier(self) -> float:
        c = self.optimizer_cfg
        return cosine_schedule(self.global_step, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    @property
    def lr(self) -> float:
        """Peak-group LR used by the next optimizer step."""
        return self.optimizer_cfg.lr * self.lr_multiplier

    def train(self, mode: bool = True) -> Engine:
        self.model.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on the non-DeepSpeed bf16 path (no-op otherwise); ``forward`` uses it already."""
        if self.precision == "bf16" and self._ds is None:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    # ------------------------------------------------------------------------------------ train step
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model (DDP gradient sync only on the accumulation boundary)."""
        if self._ddp is not None:
            # What DDP.no_sync() does: skip the gradient all-reduce until the window's last micro-batch.
            self._ddp.require_backward_grad_sync = self.is_accumulation_boundary
        if self._ds is not None and self.precision == "bf16":
            args, kwargs = _cast_floats(args, torch.bfloat16), _cast_floats(kwargs, torch.bfloat16)
        with self.autocast():
            return self.model(*args, **kwargs)

    __call__ = forward

    def _zero_loss(self) -> torch.Tensor:
        # A loss whose gradient is exactly zero for every trainable parameter: keeps DDP/ZeRO gradient
        # hooks and collectives in step on all ranks while the micro-batch contributes nothing.
        return sum((p.reshape(-1)[:1].float() * 0.0).sum() for p in self._trainable)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (un-scaled) mean loss; scaled by ``1/grad_accum`` here."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"Engine.backward: loss must be a scalar tensor, got {type(loss).__name__}"
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if self.nonfinite_check == "device":
            (loss / self.grad_accum).backward()  # a non-finite loss shows in the gradient norm (step)
            return
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0, device=loss.device)
        n_bad = int(all_reduce_sum(bad).item())  # every rank takes the same decision (no hangs)
        if n_bad:
            where = (
                f"optimizer step {self.global_step} (micro-batch {self.micro_step % self.grad_accum + 1} of "
                f"{self.grad_accum}, {n_bad} rank(s))"
            )
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"non-finite loss {loss.detach().float().item()} at {where}; set on_nonfinite='skip' "
                    "to skip such batches"
                )
            self.skipped_microbatches += 1
            self._window_skipped += 1
            loss = self._zero_loss()
        if self._ds is not None:
            self._ds.backward(loss)
        else:
            (loss / self.grad_accum).backward()

    def _set_lr(self, optimizer: torch.optim.Optimizer, zero: bool = False) -> None:
        mult = 0.0 if zero else self.lr_multiplier
        for g in optimizer.param_groups:
            g["lr"] = g.get("base_lr", self.optimizer_cfg.lr) * mult

    def step(self) -> bool:
        """Finish the micro-batch; on the accumulation boundary clip, step the optimizer, update EMA.

        Returns True when an optimizer step was taken (``global_step`` advanced).
        """
        boundary = self.is_accumulation_boundary
        window_dead = boundary and self._window_skipped == self.grad_accum
        if self._ds is not None:
            if boundary:
                # A window whose every micro-batch was skipped still runs DeepSpeed's step (its
                # bookkeeping needs it) but with LR 0: the weights do not move.
                self._set_lr(self.optimizer, zero=window_dead)
                if window_dead:
                    self.skipped_steps += 1
            self._ds.step()
            if boundary:
                norm = self._ds.get_global_grad_norm()
                self.last_grad_norm = None if norm is None else float(norm)
        elif boundary:
            self._set_lr(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.grad_clip or float("inf"))
            if self.nonfinite_check == "device":
                # the fused kernel leaves weights, moments and step counts untouched where found_inf is 1
                self.optimizer.found_inf = (~torch.isfinite(norm)).float()
                self.optimizer.step()
                self._unread.append((self.global_step, norm.detach()))
            else:
                self.last_grad_norm = float(norm)
                if window_dead:
                    self.skipped_steps += 1  # nothing but skipped micro-batches: no optimizer step at all
                elif math.isfinite(self.last_grad_norm):
                    self.optimizer.step()
                elif self.on_nonfinite == "raise":
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"non-finite gradient norm {self.last_grad_norm} at optimizer step {self.global_step}"
                    )
                else:
                    self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1
        if boundary:
            self._window_skipped = 0
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(self.module)
        return boundary

    @property
    def step_grad_norm(self) -> float | torch.Tensor | None:
        """The latest optimizer step's gradient norm without waiting for the GPU: a float on the host path (read
        already), a 0-d device tensor under ``nonfinite_check="device"`` (reading it waits for that step only)."""
        return self._unread[-1][1] if self._unread else self.last_grad_norm

    def settle(self, through_step: int | None = None) -> None:
        """Read the device-side checks (``nonfinite_check="device"``) of optimizer steps ``<= through_step``
        (default: all taken so far) in one host sync: ``last_grad_norm`` and ``skipped_steps`` catch up, and
        under ``on_nonfinite="raise"`` a non-finite step raises ``NonFiniteLossError``. A no-op on the host path.

        A trainer that logs step t after queueing step t + 1 calls ``settle(t)``: it waits for step t only.
        """
        n = len(self._unread) if through_step is None else sum(s <= through_step for s, _ in self._unread)
        if n == 0:
            return
        read, self._unread = self._unread[:n], self._unread[n:]
        norms = torch.stack([v.float().reshape(()) for _, v in read]).tolist()
        self.last_grad_norm = norms[-1]
        bad = [(s, v) for (s, _), v in zip(read, norms) if not math.isfinite(v)]
        self.skipped_steps += len(bad)
        if bad and self.on_nonfinite == "raise":
            s, v = bad[0]
            raise NonFiniteLossError(
                f"non-finite gradient norm {v} at optimizer step {s} (checked on the device: that step was "
                f"skipped, the weights are those before it); set on_nonfinite='skip' to skip such steps"
            )

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, optimizer (non-DeepSpeed) and EMA: plain tensors/containers."""
        self.settle()
        state: dict[str, Any] = {
            "global_step": self.global_step,
            "micro_step": self.micro_step,
            "skipped_microbatches": self.skipped_microbatches,
            "skipped_steps": self.skipped_steps,
        }
        if self._ds is None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._unread = []  # checks of steps the restored state replaces
        for key in ("global_step", "micro_step", "skipped_microbatches", "skipped_steps"):
            if key not in state:
                raise ValueError(f"Engine.load_state_dict: state lacks {key!r}; got keys {sorted(state)}")
            setattr(self, key, int(state[key]))
        if self._ds is None:
            if "optimizer" not in state:
                raise ValueError("Engine.load_state_dict: state has no 'optimizer' (saved under DeepSpeed?)")
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("Engine.load_state_dict: EMA is enabled but the state has no 'ema'")
            self.ema.load_state_dict(state["ema"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unwrapped) model weights; under ZeRO-3 gathered (collective: call on every rank)."""
        if self._ds is not None and self.zero_stage == 3:
            return self._ds._zero3_consolidated_16bit_state_dict() or {}
        return self.module.state_dict()

    def save_checkpoint(
        self,
        ckpt_dir: str | Path,
        step: int | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        rank_extra: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Atomic checkpoint ``ckpt_dir/step_<step>`` (default step: ``global_step``).

        Writes ``model.safetensors`` (+ ``ema.safetensors``), optimizer and counters (DeepSpeed's own files
        under DeepSpeed), per-rank RNG. ``extra``: trainer state shared by all ranks (data position,
        normaliser buffers...) as plain tensors/containers; ``rank_extra``: per-rank state.
        Collective: every rank calls it.
        """
        state = self.state_dict()
        tensors = {"model": self.model_state_dict()}
        ema = state.pop("ema", None)
        if ema is not None:
            tensors["ema"] = ema
        state["extra"] = dict(extra or {})
        return save_checkpoint(
            ckpt_dir,
            self.global_step if step is None else step,
            tensors=tensors,
            state=state,
            rank_state=rank_extra,
            deepspeed_engine=self._ds,
            keep_last=keep_last,
            metadata=metadata,
        )

    def load_checkpoint(
        self, path: str | Path, *, load_optimizer: bool = True, strict: bool = True, restore_rng: bool = True
    ) -> LoadedCheckpoint:
        """Restore model, optimizer, counters, EMA and RNG from ``path`` (a checkpoint or a dir of them).

        ``load_optimizer=False`` loads weights (and EMA) only, e.g. to fine-tune from a checkpoint.
        Returns the ``LoadedCheckpoint``; the trainer's state is ``ckpt.extra``. Collective.
        """
        ckpt = load_checkpoint(
            path,
            restore_rng=restore_rng,
            deepspeed_engine=self._ds,
            load_optimizer_states=load_optimizer,
            tensor_names=None if self._ds is None else (["ema"] if self.ema is not None else []),
        )
        if self._ds is None:
            if "model" not in ckpt.tensors:
                raise ValueError(f"checkpoint {ckpt.path} has no model.safetensors")
            self.module.load_state_dict(ckpt.tensors["model"], strict=strict)
        state = dict(ckpt.state)
        if self.ema is not None:
            if "ema" not in ckpt.tensors:
                raise ValueError(f"EMA is enabled but checkpoint {ckpt.path} has no ema.safetensors")
            state["ema"] = ckpt.tensors["ema"]
        if load_optimizer:
            self.load_state_dict(state)
        elif self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        return ckpt
