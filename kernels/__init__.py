"""mmfm.kernels: selective scan (Mamba-1), chunked SSD scan (Mamba-2), causal depthwise conv1d and decode
state updates, single-query attention over a static KV cache for decoding, and Linear + GELU as one GEMM
(``linear_gelu``, for frozen ViT teachers). Each op has a PyTorch reference (the specification, any device)
and GPU kernels: Triton with autograd (``backend="auto"|"reference"|"triton"`` or ``MMFM_KERNEL_BACKEND``
picks the path), and cuBLASLt's bias + GELU epilogue for ``linear_gelu``.
Semantics and argument names follow mamba-ssm and causal-conv1d, so they are drop-in replacements;
:func:`use_mmfm_kernels` routes transformers' Mamba-2 models through them.
"""

from mmfm.kernels.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_reference,
    causal_conv1d_update,
    causal_conv1d_update_reference,
)
from mmfm.kernels.decode_attention import decode_attention, decode_attention_reference
from mmfm.kernels.hf_integration import (
    mmfm_kernels,
    patch_transformers,
    unpatch_transformers,
    use_mmfm_kernels,
)
from mmfm.kernels.linear_gelu import LinearGELU, linear_gelu, linear_gelu_reference
from mmfm.kernels.selective_scan import selective_scan, selective_scan_ref
from mmfm.kernels.selective_state_update import selective_state_update, selective_state_update_ref
from mmfm.kernels.ssd import ssd_chunk_scan, ssd_chunked_reference, ssd_reference

__all__ = [
    "LinearGELU",
    "linear_gelu",
    "linear_gelu_reference",
    "causal_conv1d",
    "causal_conv1d_reference",
    "causal_conv1d_update",
    "causal_conv1d_update_reference",
    "decode_attention",
    "decode_attention_reference",
    "mmfm_kernels",
    "patch_transformers",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "ssd_chunk_scan",
    "ssd_chunked_reference",
    "ssd_reference",
    "unpatch_transformers",
    "use_mmfm_kernels",
]
