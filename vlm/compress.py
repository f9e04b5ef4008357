"""Minitron-style compression of hybrid Nemotron-H decoders: importance estimation, group-aware SSM
pruning, FFN / attention-head / embedding-channel / depth pruning, and distillation retraining.

Importance is activation-based on a small calibration set (Minitron):

- FFN neurons: mean ``|a|`` of the intermediate activation (input of ``down_proj``).
- attention heads: mean L2 norm of each head's output (input of ``o_proj``).
- embedding channels: mean ``|LN(x)|`` of every pre-mixer norm and the final norm, summed.
- Mamba heads / head channels: mean ``|y|`` of the gated-normed scan output (input of ``out_proj``),
  viewed as ``(H, P)``: a head's score sums its channels, a channel's score sums over heads.
- layers: increase of the LM loss when the layer is skipped (drop-one-layer).

Group-aware SSM pruning (Minitron-SSM): Mamba-2 heads are split into ``n_groups`` contiguous groups
that share B/C projections and a gated-norm group. Pruning keeps ``n_groups``, removes the same
number of heads inside every group (ranked within the group), keeps the kept heads in their group,
and slices ``in_proj`` (z, x, dt rows), ``conv1d``, ``A_log``, ``D``, ``dt_bias``, ``norm`` and
``out_proj`` consistently; head channels are pruned uniformly across heads. The naive baseline
(``group_aware=False``) ranks heads globally, so surviving heads are silently re-assigned to other
groups' B/C and norm groups.

Nemotron-H configs hold one width per layer kind, so every layer of a kind is pruned to the same size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Importance:
    """Per-structure importance scores (higher = keep). Layer lists are indexed by layer number."""

    hidden: torch.Tensor | None = None  # (D,)
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (I,)
    attention_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hq,)
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H,)
    mamba_channels: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (P,)
    layers: torch.Tensor | None = None  # (num_layers,) loss increase when the layer is skipped


@dataclass
class PruneTarget:
    """Target sizes; ``None`` keeps a dimension. ``drop_layers`` removes that many least important layers."""

    hidden_size: int | None = None
    ffn_intermediate: int | None = None
    attention_heads: int | None = None
    mamba_heads: int | None = None
    mamba_head_dim: int | None = None
    drop_layers: int = 0
    group_aware: bool = True


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def _block_kinds(model: nn.Module) -> list[str]:
    """``"mamba" | "attention" | "mlp"`` per layer (transformers >= 5.2x names them ``linear_attention`` /
    ``full_attention``)."""
    names = {"linear_attention": "mamba", "full_attention": "attention"}
    return [names.get(t, t) for t in model.config.layers_block_type]


def lm_loss(model: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token loss over ``batches`` of token ids ``(B, L)``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            total += float(model(input_ids=ids, labels=ids).loss) * ids.numel()
            count += ids.numel()
    return total / max(count, 1)


@torch.no_grad()
def estimate_importance(model: nn.Module, batches: list[torch.Tensor], layers: bool = True) -> Importance:
    """Activation-based importance of every prunable structure of a ``NemotronHForCausalLM``.

    Args:
        model: the (trained) decoder, in eval mode.
        batches: calibration token ids, each ``(B, L)``.
        layers: also compute drop-one-layer importance (one extra pass per layer).
    """
    cfg = model.config
    # accumulate on the model's device (hooks see its activations); returned on the CPU
    imp = Importance(hidden=torch.zeros(cfg.hidden_size, device=next(model.parameters()).device))
    handles = []

    def add(store: dict, key: int, value: torch.Tensor) -> None:
        store[key] = store.get(key, 0) + value.double()

    def norm_hook(_mod, _inp, out):
        imp.hidden += out.detach().abs().float().reshape(-1, out.shape[-1]).mean(0)

    for i, (block, kind) in enumerate(zip(_blocks(model), _block_kinds(model))):
        handles.append(block.norm.register_forward_hook(norm_hook))
        mixer = block.mixer
        if kind == "mlp":
            handles.append(mixer.down_proj.register_forward_pre_hook(
                lambda _m, a, i=i: add(imp.ffn, i, a[0].abs().float().reshape(-1, a[0].shape[-1]).mean(0))))
        elif kind == "attention":
            hd = mixer.head_dim
            handles.append(mixer.o_proj.register_forward_pre_hook(
                lambda _m, a, i=i, hd=hd: add(imp.attention_heads, i, a[0].float().unflatten(-1, (-1, hd))
                                               .norm(dim=-1).reshape(-1, a[0].shape[-1] // hd).mean(0))))
        elif kind == "mamba":
            p = mixer.head_dim

            def mamba_hook(_m, a, i=i, p=p):
                y = a[0].float().abs().unflatten(-1, (-1, p)).reshape(-1, a[0].shape[-1] // p, p).mean(0)  # (H, P)
                add(imp.mamba_heads, i, y.sum(-1))
                add(imp.mamba_channels, i, y.sum(0))

            handles.append(mixer.out_proj.register_forward_pre_hook(mamba_hook))
    handles.append(model.model.norm_f.register_forward_hook(norm_hook))
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    if layers:
        base = lm_loss(model, batches)
        scores = []
        for block in _blocks(model):
            handle = block.register_forward_hook(lambda _m, args, kwargs, _out: _skip_output(args, kwargs),
                                                 with_kwargs=True)
            try:
                scores.append(lm_loss(model, batches) - base)
            finally:
                handle.remove()
        imp.layers = torch.tensor(scores)
    return _to_cpu(imp)


def _to_cpu(imp: Importance) -> Importance:
    def cpu(x):
        return x.cpu() if isinstance(x, torch.Tensor) else x

    return Importance(hidden=cpu(imp.hidden), layers=cpu(imp.layers),
                      **{k: {i: cpu(v) for i, v in getattr(imp, k).items()}
                         for k in ("ffn", "attention_heads", "mamba_heads", "mamba_channels")})


def _skip_output(args: tuple, kwargs: dict) -> torch.Tensor:
    """Forward-hook output that makes a residual block the identity."""
    return args[0] if args else kwargs["hidden_states"]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order (keeps the original layout)."""
    return scores.topk(k).indices.sort().values


def select_mamba_heads(scores: torch.Tensor, n_groups: int, keep: int, group_aware: bool = True) -> torch.Tensor:
    """Heads to keep ``(keep,)``, sorted.

    Group-aware: ``keep / n_groups`` heads ranked within each group (group ``g`` owns heads
    ``[g*H/G, (g+1)*H/G)``), so every kept head stays in its group. Naive: the global top ``keep``.
    """
    num_heads = scores.numel()
    if keep % n_groups:
        raise ValueError(f"mamba_heads target {keep} must be a multiple of n_groups={n_groups} to keep groups intact")
    if not group_aware:
        return _top(scores, keep)
    per_group, keep_per_group = num_heads // n_groups, keep // n_groups
    kept = [_top(scores[g * per_group:(g + 1) * per_group], keep_per_group) + g * per_group
            for g in range(n_groups)]
    return torch.cat(kept)


def _keep_attention_heads(scores: torch.Tensor, num_kv: int, keep: int) -> torch.Tensor:
    """Query heads to keep, the same number inside every KV group (GQA stays valid)."""
    if keep % num_kv:
        raise ValueError(f"attention_heads target {keep} must be a multiple of num_key_value_heads={num_kv}")
    per, keep_per = scores.numel() // num_kv, keep // num_kv
    return torch.cat([_top(scores[g * per:(g + 1) * per], keep_per) + g * per for g in range(num_kv)])


def prune(model: nn.Module, imp: Importance, target: PruneTarget) -> nn.Module:
    """Return a new, smaller ``NemotronHForCausalLM`` with weights sliced by importance.

    The result's config is a valid ``NemotronHConfig`` (loads in transformers and mmfm).
    """
    from transformers import NemotronHForCausalLM

    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blocks = _blocks(model)
    new_cfg = copy.deepcopy(cfg)
    kinds = _block_kinds(model)

    # Depth: drop the least important layers.
    keep_layers = list(range(len(blocks)))
    if target.drop_layers:
        if imp.layers is None:
            raise ValueError("drop_layers needs layer importance: estimate_importance(..., layers=True)")
        drop = set(imp.layers.topk(target.drop_layers, largest=False).indices.tolist())
        keep_layers = [i for i in keep_layers if i not in drop]

    hidden_idx = _top(imp.hidden, target.hidden_size) if target.hidden_size else None
    new_sd: dict[str, torch.Tensor] = {}

    def rows(w, idx):
        return w if idx is None else w.index_select(0, idx)

    def cols(w, idx):
        return w if idx is None else w.index_select(1, idx)

    for new_i, old_i in enumerate(keep_layers):
        src, dst = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        kind = kinds[old_i]
        block = blocks[old_i]
        new_sd[dst + "norm.weight"] = rows(sd[src + "norm.weight"], hidden_idx)
        m = src + "mixer."
        o = dst + "mixer."
        if kind == "mlp":
            idx = _top(imp.ffn[old_i], target.ffn_intermediate) if target.ffn_intermediate else None
            new_sd[o + "up_proj.weight"] = cols(rows(sd[m + "up_proj.weight"], idx), hidden_idx)
            new_sd[o + "down_proj.weight"] = rows(cols(sd[m + "down_proj.weight"], idx), hidden_idx)
        elif kind == "attention":
            hd = block.mixer.head_dim
            heads = (_keep_attention_heads(imp.attention_heads[old_i], cfg.num_key_value_heads, target.attention_heads)
                     if target.attention_heads else None)
            qidx = None if heads is None else (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
            new_sd[o + "q_proj.weight"] = cols(rows(sd[m + "q_proj.weight"], qidx), hidden_idx)
            for name in ("k_proj", "v_proj"):
                new_sd[o + f"{name}.weight"] = cols(sd[m + f"{name}.weight"], hidden_idx)
            new_sd[o + "o_proj.weight"] = rows(cols(sd[m + "o_proj.weight"], qidx), hidden_idx)
        elif kind == "mamba":
            new_sd.update(_prune_mamba(sd, m, o, block.mixer, imp, old_i, target, hidden_idx))
        else:
            raise ValueError(f"layer {old_i}: pruning of block type {kind!r} is not supported")
    new_sd["model.embeddings.weight"] = cols(sd["model.embeddings.weight"], hidden_idx)
    new_sd["model.norm_f.weight"] = rows(sd["model.norm_f.weight"], hidden_idx)
    new_sd["lm_head.weight"] = cols(sd["lm_head.weight"], hidden_idx)

    new_cfg.layers_block_type = [cfg.layers_block_type[i] for i in keep_layers]
    if target.hidden_size:
        new_cfg.hidden_size = target.hidden_size
    if target.ffn_intermediate:
        new_cfg.intermediate_size = target.ffn_intermediate
    if target.attention_heads:
        new_cfg.num_attention_heads = target.attention_heads
    if target.mamba_heads:
        new_cfg.mamba_num_heads = target.mamba_heads
    if target.mamba_head_dim:
        new_cfg.mamba_head_dim = target.mamba_head_dim
    if hasattr(new_cfg, "num_hidden_layers"):
        new_cfg.num_hidden_layers = len(keep_layers)
    pruned = NemotronHForCausalLM(new_cfg)
    missing, unexpected = pruned.load_state_dict(new_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"pruned state dict does not fit the pruned config: missing {missing}, "
                           f"unexpected {unexpected}")
    return pruned.to(next(model.parameters()).dtype).eval()


def _prune_mamba(sd: dict, m: str, o: str, mixer: nn.Module, imp: Importance, layer: int, target: PruneTarget,
                 hidden_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Slice one Mamba-2 mixer. ``in_proj`` rows are ``[z (H*P), x (H*P), B (G*N), C (G*N), dt (H)]``."""
    num_heads, head_dim, groups, state = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    d_inner = num_heads * head_dim
    heads = (select_mamba_heads(imp.mamba_heads[layer], groups, target.mamba_heads, target.group_aware)
             if target.mamba_heads else torch.arange(num_heads))
    channels = (_top(imp.mamba_channels[layer], target.mamba_head_dim) if target.mamba_head_dim
                else torch.arange(head_dim))
    inner = (heads[:, None] * head_dim + channels).reshape(-1)  # kept indices into (H*P)
    bc = torch.arange(2 * groups * state)
    conv_idx = torch.cat([inner, d_inner + bc])
    proj_idx = torch.cat([inner, d_inner + conv_idx, 2 * d_inner + 2 * groups * state + heads])
    out = {
        o + "in_proj.weight": sd[m + "in_proj.weight"].index_select(0, proj_idx),
        o + "conv1d.weight": sd[m + "conv1d.weight"].index_select(0, conv_idx),
        o + "A_log": sd[m + "A_log"].index_select(0, heads),
        o + "D": sd[m + "D"].index_select(0, heads),
        o + "dt_bias": sd[m + "dt_bias"].index_select(0, heads),
        o + "norm.weight": sd[m + "norm.weight"].index_select(0, inner),
        o + "out_proj.weight": sd[m + "out_proj.weight"].index_select(1, inner),
    }
    if m + "conv1d.bias" in sd:
        out[o + "conv1d.bias"] = sd[m + "conv1d.bias"].index_select(0, conv_idx)
    for key in ("in_proj.bias", "out_proj.bias"):
        if m + key in sd:
            idx = proj_idx if key.startswith("in") else hidden_idx
            out[o + key] = sd[m + key] if idx is None else sd[m + key].index_select(0, idx)
    if hidden_idx is not None:
        out[o + "in_proj.weight"] = out[o + "in_proj.weight"].index_select(1, hidden_idx)
        out[o + "out_proj.weight"] = out[o + "out_proj.weight"].index_select(0, hidden_idx)
    return out


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL ``KL(p_teacher || p_student)`` at ``temperature``, scaled by ``T^2``; logits ``(B, L, V)``."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, L)
    if mask is not None:
        kl = kl[mask.bool()]
    return kl.mean() * t * t


@dataclass
class DistillConfig:
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 10
    temperature: float = 1.0
    lm_weight: float = 0.0  # mix of the plain LM loss (0 = pure KD)
    hidden_weight: float = 0.0  # cosine loss between final hidden states (same width only)
    grad_clip: float = 1.0


def distill(student: nn.Module, teacher: nn.Module | None, batches: list[torch.Tensor], cfg: DistillConfig,
            log_every: int = 0) -> list[float]:
    """Retrain ``student`` with logit KD from ``teacher`` (``None`` trains from labels alone).

    ``batches`` are cycled; returns the per-step training loss.
    """
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1))))
    student.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    losses = []
    for step in tqdm(range(cfg.steps), desc="distill", disable=not log_every):
        ids = batches[step % len(batches)]
        out = student(input_ids=ids, labels=ids, output_hidden_states=cfg.hidden_weight > 0)
        if teacher is None:
            loss = out.loss
        else:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, output_hidden_states=cfg.hidden_weight > 0)
            loss = kd_loss(out.logits[:, :-1], t_out.logits[:, :-1], cfg.temperature)
            if cfg.lm_weight:
                loss = loss + cfg.lm_weight * out.loss
            if cfg.hidden_weight and out.hidden_states[-1].shape == t_out.hidden_states[-1].shape:
                loss = loss + cfg.hidden_weight * (
                    1 - F.cosine_similarity(out.hidden_states[-1], t_out.hidden_states[-1], dim=-1).mean())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"distillation loss is {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    student.eval()
    return losses
