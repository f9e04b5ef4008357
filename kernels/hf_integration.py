"""Make transformers' Mamba-2 based models (``NemotronHForCausalLM``, ``Mamba2ForCausalLM``) use mmfm kernels.

transformers (>= 5.x) calls module-level functions from the mixers' ``forward``:
``mamba2_chunk_scan`` (prefill / training scan), ``causal_conv1d_fn`` (prefill conv),
``causal_conv1d_update`` (decode conv step) and ``mamba2_selective_state_update`` (decode SSM step).
Without mamba-ssm / causal-conv1d installed these are slow pure-PyTorch fallbacks. Because ``forward``
looks the names up in the module's globals at call time, rebinding them in the modeling modules is
enough to route every mixer (already built or not) through :mod:`mmfm.kernels`, with no mamba-ssm::

    from mmfm.kernels.hf_integration import use_mmfm_kernels
    model = use_mmfm_kernels(model)      # or patch_transformers() before building models

``unpatch_transformers()`` restores the originals; ``mmfm_kernels()`` is a context manager doing both.
The fused training shortcut ``mamba2_split_conv1d_scan_combined`` is left alone: its fallback returns
None and the mixer then runs the unfused path, which is exactly the patched functions above.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["patch_transformers", "unpatch_transformers", "use_mmfm_kernels", "mmfm_kernels", "is_patched"]

MODELING_MODULES = (
    "transformers.models.nemotron_h.modeling_nemotron_h",
    "transformers.models.mamba2.modeling_mamba2",
)

# (module, attribute) -> original object, for every name we rebound.
_ORIGINALS: dict[tuple[str, str], object] = {}


def _seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(n + 1,) cumulative lengths of packed sequences -> (1, L) sequence ids."""
    pos = torch.arange(seqlen, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)[None].to(torch.int32)


def mmfm_chunk_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    z: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' ``mamba2_chunk_scan`` signature -> :func:`mmfm.kernels.ssd.ssd_chunk_scan`."""
    from mmfm.kernels.ssd import ssd_chunk_scan

    if seq_idx is None and cu_seqlens is not None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, hidden_states.shape[1]).expand(
            hidden_states.shape[0], -1
        )
    return ssd_chunk_scan(
        hidden_states, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
        return_final_states=return_final_states,
    )  # fmt: skip


def mmfm_causal_conv1d_fn(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' ``causal_conv1d_fn`` signature -> :func:`mmfm.kernels.causal_conv1d.causal_conv1d`."""
    from mmfm.kernels.causal_conv1d import causal_conv1d

    if seq_idx is None and cu_seqlens is not None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, hidden_states.shape[-1]).expand(
            hidden_states.shape[0], -1
        )
    # transformers' fallback convolves in the weight's dtype and returns the input's dtype.
    out = causal_conv1d(
        hidden_states.to(weight.dtype), weight, bias, activation=activation, initial_states=initial_states,
        return_final_states=return_final_states, seq_idx=seq_idx,
    )  # fmt: skip
    if return_final_states:
        return out[0].to(hidden_states.dtype), out[1]
    return out.to(hidden_states.dtype)


def mmfm_causal_conv1d_update(
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    **kwargs,
):
    """transformers' ``causal_conv1d_update`` -> :func:`mmfm.kernels.causal_conv1d.causal_conv1d_update`."""
    from mmfm.kernels.causal_conv1d import causal_conv1d_update

    return causal_conv1d_update(hidden_states.to(weight.dtype), conv_state, weight, bias, activation).to(
        hidden_states.dtype
    )


def mmfm_selective_state_update(
    state: torch.Tensor,
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    z: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' ``mamba2_selective_state_update`` -> mmfm's ``selective_state_update`` (decode step)."""
    # Imported lazily: it lives in its own module and is only needed when decoding.
    from mmfm.kernels.selective_state_update import selective_state_update

    return selective_state_update(
        state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
    )


# transformers name -> our replacement
_REPLACEMENTS = {
    "mamba2_chunk_scan": mmfm_chunk_scan,
    "causal_conv1d_fn": mmfm_causal_conv1d_fn,
    "causal_conv1d_update": mmfm_causal_conv1d_update,
    "mamba2_selective_state_update": mmfm_selective_state_update,
}


def patch_transformers() -> list[str]:
    """Rebind transformers' Mamba-2 kernel entry points to mmfm's. Idempotent.

    Returns:
        the patched names as ``"module.attribute"``.

    Raises:
        ImportError: if transformers has none of the expected modeling modules / names (an
            incompatible version), so a silent no-op cannot masquerade as acceleration.
    """
    patched = []
    for mod_name in MODELING_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr, fn in _REPLACEMENTS.items():
            if not hasattr(module, attr):
                continue
            key = (mod_name, attr)
            if key not in _ORIGINALS:
                _ORIGINALS[key] = getattr(module, attr)
            setattr(module, attr, fn)
            patched.append(f"{mod_name}.{attr}")
    if not patched:
        import transformers

        raise ImportError(
            f"transformers {transformers.__version__} exposes none of {sorted(_REPLACEMENTS)} in "
            f"{MODELING_MODULES}; mmfm's integration needs transformers >= 5.0"
        )
    logger.debug("mmfm kernels patched into transformers: %s", patched)
    return patched


def unpatch_transformers() -> None:
    """Restore every name rebound by :func:`patch_transformers`."""
    for (mod_name, attr), original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(mod_name), attr, original)
        del _ORIGINALS[(mod_name, attr)]


def is_patched() -> bool:
    return bool(_ORIGINALS)


def use_mmfm_kernels(model: torch.nn.Module | None = None) -> torch.nn.Module | None:
    """Route transformers' Mamba-2 mixers (NemotronH, Mamba2) through mmfm kernels; returns ``model``.

    The patch is module-level, so it covers every model of those classes; ``model`` is accepted for
    a fluent call (``model = use_mmfm_kernels(model)``) and checked to be a ``torch.nn.Module``.
    """
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    patch_transformers()
    return model


@contextlib.contextmanager
def mmfm_kernels() -> Iterator[None]:
    """Context manager: patch on enter, restore the originals on exit (if this call patched them)."""
    was = is_patched()
    patch_transformers()
    try:
        yield
    finally:
        if not was:
            unpatch_transformers()
