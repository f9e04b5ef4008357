"""MambaVision student: a hierarchical conv / Mamba-mixer / attention backbone (own implementation).

Layout (total stride 32, widths ``C, 2C, 4C, 8C`` for ``C = cfg.dim``)::

    images (B, 3, H, W) in [0, 1]
      -> input conditioning ((x - mean) / std, detachable with ``make_preprocessor_external()``)
      -> stem: conv3x3/2 -> BN -> ReLU -> conv3x3/2 -> BN -> ReLU          (B, C, H/4, W/4)
      -> stage 0: residual conv blocks                                    (B, C, H/4, W/4)
      -> downsample conv3x3/2 -> stage 1: residual conv blocks           (B, 2C, H/8, W/8)
      -> downsample -> stage 2: tokens (B, H/16 * W/16, 4C), row-major;
         first half of the blocks are MambaVision mixer blocks, second half self-attention blocks
      -> downsample -> stage 3: same scheme on (B, H/32 * W/32, 8C)
      -> LayerNorm -> summary = mean of the tokens (or a class token), features = the tokens

The MambaVision mixer (after Hatamizadeh & Kautz, "MambaVision", 2024; ideas only, no code taken) splits a
linear in-projection into two halves. Branch 1: non-causal depthwise conv1d ("same" padding) -> SiLU ->
selective scan (Mamba-1 SSM with input-dependent ``dt, B, C``). Branch 2, the symmetric branch without an
SSM: depthwise conv1d -> SiLU. Both are concatenated and projected back. The scan is
``mmfm.kernels.selective_scan.selective_scan`` (mamba-ssm ``selective_scan_fn`` semantics).

Differences from the paper, chosen for a resolution-flexible distillation student:
- stages 2-3 run the mixer and attention over the whole token grid (row-major) instead of fixed windows,
  so any input that is a multiple of 32 works without window padding (at the paper's 224 px the T windows,
  14 and 7 tokens, cover the whole 14x14 and 7x7 grids, so there the two agree);
- the output is LayerNorm-ed tokens (the paper's classifier uses BatchNorm2d + avg-pool + Linear head;
  there is no classification head here);
- ``dt_proj``'s bias is applied once, as the scan's ``delta_bias``.

Sizes (widths/depths as in the paper's T/S/B/L; parameter counts without a head: ``param_count_table()``):

=====  =====  ======  ==============  ============  ===========
size   dim C  stem    depths          heads (s2,s3)  layer scale
=====  =====  ======  ==============  ============  ===========
tiny   16     8       (1, 1, 2, 2)    (2, 4)         None
T      80     32      (1, 3, 8, 4)    (8, 16)        None
S      96     64      (3, 3, 7, 5)    (8, 16)        None
B      128    64      (3, 3, 10, 5)   (8, 16)        1e-5
L      196    64      (3, 3, 10, 5)   (16, 32)       1e-5
=====  =====  ======  ==============  ============  ===========
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmfm.radio.encoder import RadioOutput  # the output type shared with the ViT student

__all__ = [
    "MambaVision",
    "MambaVisionConfig",
    "MambaVisionMixer",
    "MAMBAVISION_SIZES",
    "RadioOutput",
    "create_mambavision",
    "param_count_table",
]

# OpenAI-CLIP statistics, the input conditioning RADIO students use by default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MambaVisionConfig:
    """Hyper-parameters of a MambaVision student.

    Attributes:
        dim: width C of stage 0; stage i has width ``C * 2**i``.
        stem_dim: width of the stem's first convolution.
        depths: blocks per stage (stages 0-1 conv, 2-3 mixer + attention).
        num_heads: attention heads of stages 2 and 3.
        mlp_ratio: hidden width of the MLP in mixer/attention blocks, relative to the stage width.
        d_state: SSM state size N of the mixer.
        d_conv: kernel size of the mixer's depthwise conv1d.
        expand: inner width of the mixer relative to the stage width (split in two branches).
        dt_rank: rank of the ``dt`` projection; ``None`` -> ``ceil(width / 16)``.
        layer_scale: initial layer-scale of mixer/attention blocks (``None``: no layer scale).
        layer_scale_conv: initial layer-scale of conv blocks (``None``: no layer scale).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        class_token: prepend a learned class token to stage 3 and use it as the summary
            (default: the summary is the mean of the final tokens).
        qkv_bias: bias in the attention's qkv projection.
        in_chans: input channels.
        input_mean, input_std: per-channel input conditioning applied inside the model.
        grad_checkpointing: recompute each block in backward to save memory.
    """

    dim: int = 80
    stem_dim: int = 32
    depths: tuple[int, int, int, int] = (1, 3, 8, 4)
    num_heads: tuple[int, int] = (8, 16)
    mlp_ratio: float = 4.0
    d_state: int = 8
    d_conv: int = 3
    expand: int = 1
    dt_rank: int | None = None
    layer_scale: float | None = None
    layer_scale_conv: float | None = None
    drop_path_rate: float = 0.0
    class_token: bool = False
    qkv_bias: bool = True
    in_chans: int = 3
    input_mean: tuple[float, ...] = CLIP_MEAN
    input_std: tuple[float, ...] = CLIP_STD
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be 4 positive ints (conv, conv, mixer/attn, mixer/attn), got {self.depths}")
        if len(self.num_heads) != 2:
            raise ValueError(f"num_heads must give the heads of stages 2 and 3, got {self.num_heads}")
        for i, h in enumerate(self.num_heads):
            width = self.dim * 2 ** (i + 2)
            if width % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage width {width}; change dim or num_heads")
        if (self.dim * 4 * self.expand) % 2:
            raise ValueError(f"mixer inner width dim*4*expand must be even, got dim={self.dim} expand={self.expand}")
        if len(self.input_mean) != self.in_chans or len(self.input_std) != self.in_chans:
            raise ValueError(f"input_mean/input_std need {self.in_chans} values (in_chans)")


MAMBAVISION_SIZES: dict[str, MambaVisionConfig] = {
    "tiny": MambaVisionConfig(dim=16, stem_dim=8, depths=(1, 1, 2, 2), num_heads=(2, 4), d_state=4),
    "T": MambaVisionConfig(dim=80, stem_dim=32, depths=(1, 3, 8, 4), num_heads=(8, 16)),
    "S": MambaVisionConfig(dim=96, stem_dim=64, depths=(3, 3, 7, 5), num_heads=(8, 16)),
    "B": MambaVisionConfig(dim=128, stem_dim=64, depths=(3, 3, 10, 5), num_heads=(8, 16), layer_scale=1e-5,
                           layer_scale_conv=None),
    "L": MambaVisionConfig(dim=196, stem_dim=64, depths=(3, 3, 10, 5), num_heads=(16, 32), layer_scale=1e-5,
                           layer_scale_conv=None),
}

TOTAL_STRIDE = 32


# ----------------------------------------------------------------------------------------------- utilities
def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``p`` (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch; ``dim_index`` is the channel axis."""

    def __init__(self, dim: int, init: float, dim_index: int = -1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))
        self.dim_index = dim_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim_index == 1:
            return x * self.gamma.view(1, -1, *([1] * (x.ndim - 2)))
        return x * self.gamma


class Mlp(nn.Module):
    """Linear -> GELU -> Linear over the last dim: (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# ----------------------------------------------------------------------------------------------- conv part
class Stem(nn.Module):
    """(B, 3, H, W) -> (B, C, H/4, W/4): two stride-2 3x3 convolutions."""

    def __init__(self, in_chans: int, stem_dim: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, dim, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class ConvBlock(nn.Module):
    """Residual block (B, C, h, w) -> (B, C, h, w): conv3x3 -> BN -> GELU -> conv3x3 -> BN, plus input."""

    def __init__(self, dim: int, layer_scale: float | None, drop_path: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(dim)
        self.ls = LayerScale(dim, layer_scale, dim_index=1) if layer_scale is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(self.conv1(x)), approximate="tanh")
        y = self.ls(self.bn2(self.conv2(y)))
        return x + _drop_path(y, self.drop_path, self.training)


class Downsample(nn.Module):
    """(B, C, h, w) -> (B, 2C, h/2, w/2): one stride-2 3x3 convolution."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ----------------------------------------------------------------------------------------------- mixer part
class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer: (B, L, D) -> (B, L, D), non-causal over the sequence.

    ``in_proj`` maps D to ``d_inner = expand * D``, split into ``x`` and ``z`` halves of ``d_inner / 2``.
    ``x``: depthwise conv1d ("same" padding) -> SiLU -> ``x_proj`` gives ``(dt, B, C)`` per token ->
    ``dt = dt_proj.weight @ dt`` -> selective scan with ``A = -exp(A_log)``, skip ``D``,
    ``delta_bias = dt_proj.bias`` and softplus on ``delta``. ``z``: depthwise conv1d -> SiLU (no SSM).
    ``out_proj(cat[y, z])`` gives the output.

    Args:
        dim: model width D.
        d_state: SSM state size N.
        d_conv: depthwise conv kernel size.
        expand: inner width factor.
        dt_rank: rank of the ``dt`` projection (``None``: ``ceil(D / 16)``).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba's initialisation).
        scan_backend: ``backend`` argument passed to ``selective_scan`` ("auto" dispatches by device).
    """

    def __init__(self, dim: int, d_state: int = 8, d_conv: int = 3, expand: int = 1, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.d_inner = int(expand * dim)
        if self.d_inner % 2:
            raise ValueError(f"expand * dim must be even to split in two branches, got {self.d_inner}")
        half = self.d_inner // 2
        self.d_state = d_state
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(dim / 16)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(dim, self.d_inner, bias=False)
        self.conv_x = nn.Conv1d(half, half, d_conv, groups=half, padding="same", bias=False)
        self.conv_z = nn.Conv1d(half, half, d_conv, groups=half, padding="same", bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        self.A_log = nn.Parameter(torch.empty(half, d_state))
        self.D = nn.Parameter(torch.empty(half))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba-1 initialisation: S4D-real ``A``, ``D = 1``, ``dt`` log-uniform in [dt_min, dt_max]."""
        dt_min, dt_max, floor = self._dt_init
        half = self.d_inner // 2
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D.fill_(1.0)

    def scan_inputs(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the scan needs for ``hidden`` (B, L, D): u, delta (B, d, L); A (d, N); B, C (B, N, L);
        D, delta_bias (d,); and the SSM-free branch ``z`` (B, d, L). ``d = d_inner / 2``."""
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv_x(x))
        z = F.silu(self.conv_z(z))
        dbc = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added by the scan
        return {
            "u": x.contiguous(),
            "delta": delta.contiguous(),
            "A": -torch.exp(self.A_log.float()),
            "B": b.transpose(1, 2).contiguous(),  # (B, N, L)
            "C": c.transpose(1, 2).contiguous(),
            "D": self.D.float(),
            "delta_bias": self.dt_proj.bias.float(),
            "z": z,
        }

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) -> (B, L, D)."""
        from mmfm.kernels.selective_scan import selective_scan  # lazy: kernels load their backends on use

        s = self.scan_inputs(hidden)
        y = selective_scan(s["u"], s["delta"], s["A"], s["B"], s["C"], D=s["D"], z=None,
                           delta_bias=s["delta_bias"], delta_softplus=True, backend=self.scan_backend)
        y = torch.cat([y.to(s["z"].dtype), s["z"]], dim=1).transpose(1, 2)  # (B, L, d_inner)
        return self.out_proj(y)


class Attention(nn.Module):
    """Multi-head self-attention (B, L, D) -> (B, L, D) through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TokenBlock(nn.Module):
    """Pre-norm residual block (B, L, D) -> (B, L, D): ``x + mixer(LN(x))``, then ``x + MLP(LN(x))``.

    The mixer is a ``MambaVisionMixer`` or an ``Attention``.
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, layer_scale: float | None,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.ls1(self.mixer(self.norm1(x))), self.drop_path, self.training)
        return x + _drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


# ----------------------------------------------------------------------------------------------- model
class MambaVision(nn.Module):
    """Hierarchical MambaVision backbone with the RADIO student interface.

    ``model(images)`` with images (B, 3, H, W) in [0, 1], H and W multiples of 32, returns
    ``RadioOutput(summary (B, 8C), features (B, (H/32)*(W/32), 8C))``; the features are row-major over the
    (H/32, W/32) grid. ``forward_intermediates`` also returns every stage's tokens.
    """

    def __init__(self, cfg: MambaVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [cfg.dim * 2**i for i in range(4)]
        self.dims = dims
        self.register_buffer("input_mean", torch.tensor(cfg.input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(cfg.input_std).view(1, -1, 1, 1), persistent=False)
        self._external_preprocessor = False

        total = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stem = Stem(cfg.in_chans, cfg.stem_dim, dims[0])
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        k = 0
        for i, depth in enumerate(cfg.depths):
            if i > 0:
                self.downsamples.append(Downsample(dims[i - 1], dims[i]))
            if i < 2:
                blocks = [ConvBlock(dims[i], cfg.layer_scale_conv, dpr[k + j]) for j in range(depth)]
            else:
                n_mixer = (depth + 1) // 2  # first half mixers (the larger half when odd), then attention
                blocks = []
                for j in range(depth):
                    if j < n_mixer:
                        mixer: nn.Module = MambaVisionMixer(dims[i], cfg.d_state, cfg.d_conv, cfg.expand,
                                                            cfg.dt_rank)
                    else:
                        mixer = Attention(dims[i], cfg.num_heads[i - 2], cfg.qkv_bias)
                    blocks.append(TokenBlock(dims[i], mixer, cfg.mlp_ratio, cfg.layer_scale, dpr[k + j]))
            self.stages.append(nn.ModuleList(blocks))
            k += depth
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[3])) if cfg.class_token else None
        self.norm = nn.LayerNorm(dims[3])
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            # dt_proj keeps the Mamba initialisation set by the mixer (its bias encodes the step sizes)
            if isinstance(m, nn.Linear) and not name.endswith("dt_proj"):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ---- properties shared with the ViT student
    @property
    def patch_size(self) -> int:
        """Total stride: H and W must be multiples of this."""
        return TOTAL_STRIDE

    @property
    def embed_dim(self) -> int:
        return self.dims[3]

    @property
    def summary_dim(self) -> int:
        return self.dims[3]

    @property
    def num_stages(self) -> int:
        return 4

    def get_nearest_supported_resolution(self, height: int, width: int) -> tuple[int, int]:
        """Nearest (H, W) that are positive multiples of the total stride 32."""
        def near(v: int) -> int:
            return max(TOTAL_STRIDE, int(round(v / TOTAL_STRIDE)) * TOTAL_STRIDE)

        return near(height), near(width)

    def make_preprocessor_external(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Stop normalising inside the model; returns the (mean, std) the caller must now apply."""
        self._external_preprocessor = True
        return tuple(self.cfg.input_mean), tuple(self.cfg.input_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.cfg = replace(self.cfg, grad_checkpointing=enable)

    # ---- forward
    def _check_input(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}; use x.float() / 255")
        if images.shape[1] != self.cfg.in_chans:
            raise ValueError(f"images must have {self.cfg.in_chans} channels, got {images.shape[1]}")
        h, w = images.shape[-2:]
        if h % TOTAL_STRIDE or w % TOTAL_STRIDE:
            nh, nw = self.get_nearest_supported_resolution(h, w)
            raise ValueError(f"image size {h}x{w} is not a multiple of the total stride {TOTAL_STRIDE}; "
                             f"resize or pad to the nearest valid size {nh}x{nw}")

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_intermediates(self, images: torch.Tensor, stages: tuple[int, ...] | None = None,
                              ) -> tuple[RadioOutput, list[torch.Tensor]]:
        """Run the model and also return stage outputs.

        Args:
            images: (B, 3, H, W) in [0, 1] (or already normalised after ``make_preprocessor_external``).
            stages: which of the stages 0..3 (negative: from the end) to return (default all), in that order.

        Returns:
            ``(RadioOutput, intermediates)``; ``intermediates[i]`` is the output of ``stages[i]`` as tokens
            (B, h_s * w_s, C_s), row-major, with ``h_s = H / (4 * 2**s)`` and ``C_s = C * 2**s``. Stage 3's
            entry is before the final norm and without the class token.
        """
        want = tuple(range(4)) if stages is None else tuple(stages)
        if any(not isinstance(s, int) or not -4 <= s <= 3 for s in want):
            raise ValueError(f"stages must be ints within 0..3 (or -4..-1 from the end), got {stages}")
        want = tuple(s % 4 for s in want)
        self._check_input(images)
        x = images
        if not self._external_preprocessor:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        x = self.stem(x)
        inter: dict[int, torch.Tensor] = {}
        for i in range(4):
            if i > 0:
                x = self.downsamples[i - 1](x)
            if i < 2:
                for blk in self.stages[i]:
                    x = self._run(blk, x)
                if i in want:
                    inter[i] = x.flatten(2).transpose(1, 2)
                continue
            b, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)  # (B, h*w, C) row-major
            n_prefix = 0
            if i == 3 and self.cls_token is not None:
                t = torch.cat([self.cls_token.expand(b, -1, -1).to(t.dtype), t], dim=1)
                n_prefix = 1
            for blk in self.stages[i]:
                t = self._run(blk, t)
            if i in want:
                inter[i] = t[:, n_prefix:]
            if i < 3:
                x = t.transpose(1, 2).reshape(b, c, h, w)
        t = self.norm(t)
        if self.cls_token is not None:
            out = RadioOutput(summary=t[:, 0], features=t[:, 1:])
        else:
            out = RadioOutput(summary=t.mean(dim=1), features=t)
        return out, [inter[s] for s in want]

    def forward(self, images: torch.Tensor, return_intermediates: bool = False, feature_fmt: str = "NLC"):
        """images (B, 3, H, W) -> ``RadioOutput(summary (B, 8C), features (B, H/32 * W/32, 8C))``.

        ``feature_fmt="NCHW"`` gives features as (B, 8C, H/32, W/32) instead. With
        ``return_intermediates=True`` returns ``(RadioOutput, intermediates)`` as ``forward_intermediates``.
        """
        if feature_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"feature_fmt must be 'NLC' or 'NCHW', got {feature_fmt!r}")
        out, inter = self.forward_intermediates(images, stages=None if return_intermediates else ())
        if feature_fmt == "NCHW":
            h, w = images.shape[-2] // TOTAL_STRIDE, images.shape[-1] // TOTAL_STRIDE
            out = RadioOutput(out.summary, out.features.transpose(1, 2).reshape(out.features.shape[0], -1, h, w))
        return (out, inter) if return_intermediates else out


def create_mambavision(size: str = "T", **overrides) -> MambaVision:
    """Build a randomly initialised MambaVision student.

    Args:
        size: one of ``MAMBAVISION_SIZES`` ("tiny", "T", "S", "B", "L"; case-insensitive except "tiny").
        **overrides: any ``MambaVisionConfig`` field, e.g. ``class_token=True``, ``drop_path_rate=0.2``.
    """
    key = size if size in MAMBAVISION_SIZES else size.upper() if size.upper() in MAMBAVISION_SIZES else size.lower()
    if key not in MAMBAVISION_SIZES:
        raise ValueError(f"unknown MambaVision size {size!r}; choose one of {sorted(MAMBAVISION_SIZES)}")
    valid = {f.name for f in fields(MambaVisionConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise TypeError(f"unknown MambaVisionConfig fields {bad}; valid fields: {sorted(valid)}")
    for name in ("depths", "num_heads", "input_mean", "input_std"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return MambaVision(replace(MAMBAVISION_SIZES[key], **overrides))


def param_count_table(sizes: tuple[str, ...] = ("T", "S", "B", "L")) -> str:
    """A plain-text table of parameter counts (millions, no classification head) for the given sizes."""
    rows = [f"{'size':<6}{'dim':>6}{'depths':>18}{'params (M)':>12}"]
    for s in sizes:
        with torch.device("meta"):  # counts only: no memory, no init cost
            model = create_mambavision(s)
        n = sum(p.numel() for p in model.parameters())
        cfg = MAMBAVISION_SIZES[s]
        rows.append(f"{s:<6}{cfg.dim:>6}{str(cfg.depths):>18}{n / 1e6:>12.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(param_count_table())
