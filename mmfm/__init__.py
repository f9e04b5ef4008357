"""mmfm: multimodal foundation-model toolkit.

Sub-packages: ``mmfm.data`` (shards, transforms, synthetic data), ``mmfm.kernels`` (scan kernels),
``mmfm.radio`` (agglomerative vision encoders), ``mmfm.ps3`` (high-resolution encoders),
``mmfm.vlm`` (vision-language models). Import them explicitly; this module stays light.
"""

from mmfm._checkout_path import move_checkout_root_behind_site_packages
from mmfm.version import __version__

move_checkout_root_behind_site_packages()  # before anything imports transformers (see the module)

__all__ = ["__version__"]
