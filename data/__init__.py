"""mmfm.data: sample schemas, webdataset shards (write / streaming resumable read), transforms
(patch-multiple sizes, multi-resolution batches, mosaic, normalisation), synthetic data
(:mod:`mmfm.data.synth`) and tokenizers with a chat template (:mod:`mmfm.data.tokenizer`)."""

from mmfm.data.schemas import (
    IMAGE_PLACEHOLDER,
    ConversationSample,
    ImageSample,
    Message,
    Region,
    RegionSample,
)
from mmfm.data.shards import ResumableLoader, ShardDataset, ShardError, expand_urls, read_shards, write_shards
from mmfm.data.tokenizer import apply_chat_template, build_tokenizer, load_tokenizer, synthetic_tokenizer
from mmfm.data.transforms import (
    NORMALIZATION,
    MultiResolutionBatchSampler,
    ResolutionSchedule,
    center_crop_to_multiple,
    mosaic,
    multires_batches,
    normalize,
    resize_to_multiple,
    to_tensor,
    unmosaic,
)

__all__ = [
    "IMAGE_PLACEHOLDER", "ConversationSample", "ImageSample", "Message", "Region", "RegionSample",
    "ResumableLoader", "ShardDataset", "ShardError", "expand_urls", "read_shards", "write_shards",
    "apply_chat_template", "build_tokenizer", "load_tokenizer", "synthetic_tokenizer",
    "NORMALIZATION", "MultiResolutionBatchSampler", "ResolutionSchedule", "center_crop_to_multiple", "mosaic",
    "multires_batches", "normalize", "resize_to_multiple", "to_tensor", "unmosaic",
]
