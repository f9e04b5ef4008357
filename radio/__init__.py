"""mmfm.radio: agglomerative (RADIO-style) vision encoders.

Feature extraction::

    enc = mmfm.radio.load("ckpt_dir")            # mmfm checkpoint or Hugging Face `radio` directory
    out = enc(images)                            # images (B, 3, H, W) in [0, 1]
    out.summary, out.features                    # (B, k*D), (B, h*w, D)

Students: ``create_student("B/16")`` (CPE ViT, ``vit.py``), ``MambaVision`` (``mambavision.py``).
Export to ``transformers.RadioModel``: ``export_hf(enc, out_dir)``.
"""

from mmfm.radio.adaptors import AdaptorSpec, MLPSpec, ResidualMLP, TeacherAdaptor
from mmfm.radio.compression import (
    COMPRESSORS,
    AvgPoolCompressor,
    IdentityCompressor,
    PixelUnshuffleCompressor,
    TokenCompressor,
    ToMeCompressor,
    ToMeOutput,
    build_compressor,
)
from mmfm.radio.cpe import CroppedPositionEmbedding
from mmfm.radio.encoder import RadioEncoder, RadioOutput, Resolution, load, save
from mmfm.radio.hf_interop import export_hf
from mmfm.radio.mambavision import (
    MAMBAVISION_SIZES,
    MambaVision,
    MambaVisionConfig,
    create_mambavision,
    param_count_table,
)
from mmfm.radio.vit import VIT_SIZES, Attention, Block, Mlp, ViT, ViTConfig, create_student

__all__ = [
    "COMPRESSORS",
    "MAMBAVISION_SIZES",
    "AvgPoolCompressor",
    "IdentityCompressor",
    "MambaVision",
    "MambaVisionConfig",
    "PixelUnshuffleCompressor",
    "ToMeCompressor",
    "ToMeOutput",
    "TokenCompressor",
    "build_compressor",
    "create_mambavision",
    "param_count_table",
    "AdaptorSpec",
    "Attention",
    "Block",
    "CroppedPositionEmbedding",
    "MLPSpec",
    "Mlp",
    "RadioEncoder",
    "RadioOutput",
    "ResidualMLP",
    "Resolution",
    "TeacherAdaptor",
    "VIT_SIZES",
    "ViT",
    "ViTConfig",
    "create_student",
    "export_hf",
    "load",
    "save",
]
