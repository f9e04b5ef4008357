"""mmfm.vlm: vision-language models on hybrid Mamba-Transformer decoders.

``vlm, tok = mmfm.vlm.load(dir)`` (mmfm VLM dirs and HF ``nemotron_h_omni`` dirs);
``mmfm.vlm.export_hf(vlm, out_dir)`` writes ``nemotron_h_omni`` when the architecture fits;
training in :mod:`mmfm.vlm.train`, evaluation in :mod:`mmfm.vlm.evaluate`, metrics in
:mod:`mmfm.vlm.metrics`, Minitron compression in :mod:`mmfm.vlm.compress`.
"""

from __future__ import annotations

from pathlib import Path

from mmfm.vlm.build import VLMConfig, build_vlm, load, save_vlm
from mmfm.vlm.model import VLM


def export_hf(vlm: VLM, out_dir: str | Path, tokenizer=None) -> Path:
    """Write the HF ``nemotron_h_omni`` format (tokenizer: the VLM's own when omitted)."""
    from mmfm.vlm.build import build_tokenizer
    from mmfm.vlm.hf_interop import export_hf_omni

    return export_hf_omni(vlm, tokenizer or build_tokenizer(vlm.config), out_dir)


__all__ = ["VLM", "VLMConfig", "build_vlm", "export_hf", "load", "save_vlm"]
