"""mmfm.ps3: PS3 high-resolution encoders (global low-res pass + selective high-res local pass)."""

from mmfm.ps3.model import PS3Config, PS3Encoder, PS3Output, load

__all__ = ["PS3Config", "PS3Encoder", "PS3Output", "load"]
