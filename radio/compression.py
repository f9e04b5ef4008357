"""Visual-token compression for VLMs: ``(B, N, D) -> (B, K, D')``.

Every compressor is an ``nn.Module`` called as ``compressor(x, grid)`` with ``x`` (B, N, D) the tokens of a
row-major ``grid = (h, w)`` (``N = h * w``; ``grid=None`` means a square grid). They also answer
``num_output_tokens(h, w)`` and ``output_dim(D)`` so a projector and the placeholder count can be sized
before any image is seen.

- ``IdentityCompressor`` ("none"): the tokens unchanged.
- ``PixelUnshuffleCompressor`` ("pixel_unshuffle"): f x f neighbours concatenated along channels
  (space-to-depth, NVILA's spatial compression): (B, h*w, D) -> (B, ceil(h/f)*ceil(w/f), f*f*D), layout kept.
- ``AvgPoolCompressor`` ("avgpool"): f x f average pooling: (B, h*w, D) -> (B, ceil(h/f)*ceil(w/f), D).
- ``ToMeCompressor`` ("tome"): ToMe bipartite soft matching repeated until exactly K tokens remain, with
  size-weighted merging (Bolya et al., "Token Merging", 2023; RADIOv2.5 uses it to keep high-resolution
  detail within a fixed token budget). The grid layout is not kept; see its docstring for the order.

``build_compressor(name, **kw)`` builds one by name.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AvgPoolCompressor",
    "COMPRESSORS",
    "IdentityCompressor",
    "PixelUnshuffleCompressor",
    "ToMeCompressor",
    "ToMeOutput",
    "TokenCompressor",
    "build_compressor",
]


def _check_tokens(x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Validate ``x`` (B, N, D) and return the grid (h, w); ``None`` -> square grid."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"tokens must be a (B, N, D) tensor, got {got}")
    n = x.shape[1]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"grid=None assumes a square token grid, but N={n} is not a square; pass grid=(h, w)")
        return side, side
    if len(grid) != 2:
        raise ValueError(f"grid must be (h, w), got {grid}")
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"grid {tuple(grid)} does not match the token count N={n} (need h * w == N)")
    return h, w


def _check_factor(factor: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int (e.g. 2 or 3), got {factor!r}")
    return factor


class TokenCompressor(nn.Module, metaclass=abc.ABCMeta):
    """Abstract base: ``forward(x (B, N, D), grid (h, w) | None)``; output sizes known ahead of time."""

    @abc.abstractmethod
    def num_output_tokens(self, h: int, w: int) -> int:
        """K for an input grid of h x w tokens."""

    def output_dim(self, dim: int) -> int:
        """D' for input width D."""
        return dim


class IdentityCompressor(TokenCompressor):
    """No compression: (B, N, D) -> (B, N, D), same (row-major) layout."""

    def num_output_tokens(self, h: int, w: int) -> int:
        return h * w

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        _check_tokens(x, grid)
        return x


class PixelUnshuffleCompressor(TokenCompressor):
    """Space-to-depth: concatenate each f x f cell of tokens along channels.

    (B, h*w, D) on a row-major (h, w) grid -> (B, h2*w2, f*f*D) on a row-major (h2, w2) grid with
    ``h2 = ceil(h / f)``, ``w2 = ceil(w / f)``. Output token ``(i, j)`` (index ``i * w2 + j``) holds input
    tokens ``(f*i + di, f*j + dj)``; its channels are ordered ``(di, dj, d)``, i.e. channel
    ``(di * f + dj) * D + d`` — the f*f neighbours in row-major order, each a full D-vector. This is a
    fixed permutation of ``torch.nn.functional.pixel_unshuffle``'s NCHW channel order ``d * f*f + di * f + dj``.

    If f does not divide h (or w) the grid is padded at the bottom (right) before grouping, with zeros
    (``pad_mode="zeros"``, the default, as NVILA does) or by repeating the last row/column
    (``pad_mode="replicate"``).
    """

    def __init__(self, factor: int = 2, pad_mode: str = "zeros") -> None:
        super().__init__()
        self.factor = _check_factor(factor)
        if pad_mode not in ("zeros", "replicate"):
            raise ValueError(f"pad_mode must be 'zeros' or 'replicate', got {pad_mode!r}")
        self.pad_mode = pad_mode

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return -(-h // self.factor), -(-w // self.factor)

    def num_output_tokens(self, h: int, w: int) -> int:
        h2, w2 = self.output_grid(h, w)
        return h2 * w2

    def output_dim(self, dim: int) -> int:
        return self.factor * self.factor * dim

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, h*w, D) -> (B, ceil(h/f)*ceil(w/f), f*f*D)."""
        h, w = _check_tokens(x, grid)
        b, _, d = x.shape
        f = self.factor
        g = x.reshape(b, h, w, d)
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            if self.pad_mode == "zeros":
                g = F.pad(g, (0, 0, 0, pw, 0, ph))
            else:
                g = torch.cat([g, g[:, -1:].expand(b, ph, w, d)], dim=1)
                g = torch.cat([g, g[:, :, -1:].expand(b, h + ph, pw, d)], dim=2)
        h2, w2 = (h + ph) // f, (w + pw) // f
        g = g.reshape(b, h2, f, w2, f, d).permute(0, 1, 3, 2, 4, 5)  # (B, h2, w2, di, dj, D)
        return g.reshape(b, h2 * w2, f * f * d)


class AvgPoolCompressor(TokenCompressor):
    """f x f average pooling of the token grid.

    (B, h*w, D) on a row-major (h, w) grid -> (B, h2*w2, D) on a row-major (h2, w2) grid,
    ``h2 = ceil(h / f)``, ``w2 = ceil(w / f)``. Output token ``(i, j)`` is the mean of input tokens
    ``(f*i + di, f*j + dj)``; cells cut by the bottom/right border average only the tokens that exist
    (the same as ``F.avg_pool2d(kernel=f, stride=f, ceil_mode=True)`` on NCHW).
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = _check_factor(factor)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return -(-h // self.factor), -(-w // self.factor)

    def num_output_tokens(self, h: int, w: int) -> int:
        h2, w2 = self.output_grid(h, w)
        return h2 * w2

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, h*w, D) -> (B, ceil(h/f)*ceil(w/f), D)."""
        h, w = _check_tokens(x, grid)
        b, _, d = x.shape
        f = self.factor
        ph, pw = (-h) % f, (-w) % f
        h2, w2 = (h + ph) // f, (w + pw) // f
        g = F.pad(x.reshape(b, h, w, d), (0, 0, 0, pw, 0, ph))
        g = g.reshape(b, h2, f, w2, f, d)
        # f*f strided slices added in fp32: much faster on CPU than a reduction over two strided dims
        sums = g[:, :, 0, :, 0].float()
        for i in range(f):
            for j in range(f):
                if i or j:
                    sums = sums + g[:, :, i, :, j]
        # number of real (unpadded) tokens in each cell: full cells f*f, border cells fewer
        rows = torch.full((h2,), f, device=x.device)
        cols = torch.full((w2,), f, device=x.device)
        rows[-1] = f - ph
        cols[-1] = f - pw
        counts = (rows[:, None] * cols[None, :]).to(torch.float32)[None, :, :, None]
        return (sums / counts).to(x.dtype).reshape(b, h2 * w2, d)


class ToMeOutput(NamedTuple):
    """Result of ``ToMeCompressor``.

    tokens: (B, K, D) merged tokens (size-weighted means of their members), in ``x``'s dtype.
    sizes: (B, K) float32, how many input tokens (or input size units) each merged token holds.
    source: (B, N) int64, index in ``tokens`` of the merged token each input token went to
        (``None`` unless ``return_source=True``); ``source.view(B, h, w)`` is a segmentation map.
    attn_bias: (B, K) ``log(sizes)`` for ToMe's proportional attention, ``softmax(q k^T / sqrt(d) + log s)``,
        to add to the key axis of a downstream attention (``None`` unless ``proportional_attention=True``).
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor | None
    attn_bias: torch.Tensor | None


class ToMeCompressor(TokenCompressor):
    """ToMe bipartite soft matching to a fixed token count K, with size-weighted merging.

    Each pass splits the current tokens alternately into sets A (even positions) and B (odd positions),
    matches every A token to its most similar B token (cosine similarity of the metric: the features by
    default, or e.g. attention keys passed as ``metric``), and merges the ``r = min(n - K, |A|)`` best-matched
    A tokens into their B partners. Tokens carry sizes; a merged token is the size-weighted mean of its
    members (features and metric alike), so ``sum_k sizes_k * tokens_k == sum_n x_n`` exactly in exact
    arithmetic. Passes repeat until K tokens remain (about ``log2(N / K)`` passes).

    Layout of the output: a set, not a grid. Tokens are ordered by the smallest row-major input index they
    contain (so unmerged regions stay in reading order); after every pass the sequence is re-sorted this
    way, which also makes the next A/B split spatially interleaved. The result is deterministic (stable
    sorts; ties broken by position).

    ``K >= N`` returns the input unchanged (sizes all one), not an error, so one compressor serves every
    resolution. ``K < 1`` or a non-integer K raises ``ValueError``.

    Args:
        num_tokens: K, the number of output tokens.
        proportional_attention: also return ``attn_bias = log(sizes)`` (ToMe's proportional attention).
        return_source: also return the input -> output assignment ``source`` (B, N).
    """

    def __init__(self, num_tokens: int, proportional_attention: bool = False, return_source: bool = False) -> None:
        super().__init__()
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens (K) must be a positive int, got {num_tokens!r}")
        self.num_tokens = num_tokens
        self.proportional_attention = proportional_attention
        self.return_source = return_source

    def num_output_tokens(self, h: int, w: int) -> int:
        return min(self.num_tokens, h * w)

    @staticmethod
    def _merge_pass(xs: torch.Tensor, ms: torch.Tensor, size: torch.Tensor, first: torch.Tensor,
                    source: torch.Tensor, r: int) -> tuple[torch.Tensor, ...]:
        """One bipartite matching pass removing r tokens. ``xs``/``ms`` are size-weighted *sums* (B, n, *),
        ``size`` (B, n), ``first`` (B, n) smallest input index per token, ``source`` (B, N) -> current index."""
        bsz, n, d = xs.shape
        na = (n + 1) // 2
        # cosine of the sums equals cosine of the means: sizes are positive per-token scales
        mn = F.normalize(ms, dim=-1)
        scores = mn[:, 0::2] @ mn[:, 1::2].transpose(1, 2)  # (B, na, nb)
        node_max, node_idx = scores.max(dim=-1)
        order = torch.argsort(node_max, dim=-1, descending=True, stable=True)
        src, keep = order[:, :r], order[:, r:]  # indices into A
        dst = node_idx.gather(1, src)  # (B, r) indices into B

        def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return t[:, 0::2], t[:, 1::2]

        def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return t.gather(1, idx if t.ndim == 2 else idx[..., None].expand(-1, -1, t.shape[-1]))

        def add_into(dst_t: torch.Tensor, src_t: torch.Tensor) -> torch.Tensor:
            index = dst if dst_t.ndim == 2 else dst[..., None].expand(-1, -1, dst_t.shape[-1])
            return dst_t.scatter_add(1, index, take(src_t, src))

        (xa, xb), (ma, mb), (sa, sb), (fa, fb) = split(xs), split(ms), split(size), split(first)
        xb, mb, sb = add_into(xb, xa), add_into(mb, ma), add_into(sb, sa)
        fb = fb.scatter_reduce(1, dst, take(fa, src), reduce="amin")
        n_keep = na - r
        xs = torch.cat([take(xa, keep), xb], dim=1)
        ms = torch.cat([take(ma, keep), mb], dim=1)
        size = torch.cat([take(sa, keep), sb], dim=1)
        first = torch.cat([take(fa, keep), fb], dim=1)

        # where each current token went: kept A -> its slot, merged A -> its partner's slot, B -> n_keep + j
        dev = xs.device
        old2new = torch.empty(bsz, n, dtype=torch.long, device=dev)
        new_a = torch.empty(bsz, na, dtype=torch.long, device=dev)
        new_a.scatter_(1, keep, torch.arange(n_keep, device=dev).expand(bsz, -1))
        new_a.scatter_(1, src, n_keep + dst)
        old2new[:, 0::2] = new_a
        old2new[:, 1::2] = n_keep + torch.arange(n - na, device=dev).expand(bsz, -1)

        perm = torch.argsort(first, dim=-1)  # reading order of each token's first member
        inv = torch.argsort(perm, dim=-1)
        source = inv.gather(1, old2new.gather(1, source))
        return take(xs, perm), take(ms, perm), take(size, perm), take(first, perm), source

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, metric: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None) -> ToMeOutput:
        """Merge x (B, N, D) down to K tokens.

        Args:
            x: tokens (B, N, D).
            grid: optional (h, w), only checked against N (matching does not use the layout).
            metric: (B, N, Dm) similarity features (e.g. attention keys); default ``x``.
            sizes: (B, N) positive sizes the input tokens already carry (default all one).
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"tokens must be a (B, N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if grid is not None:
            _check_tokens(x, grid)
        bsz, n, _ = x.shape
        if metric is None:
            metric = x
        elif metric.ndim != 3 or metric.shape[:2] != x.shape[:2]:
            raise ValueError(f"metric must be (B, N, Dm) = ({bsz}, {n}, Dm), got {tuple(metric.shape)}")
        if sizes is None:
            size = torch.ones(bsz, n, dtype=torch.float32, device=x.device)
        else:
            if sizes.shape != (bsz, n) or not bool((sizes > 0).all()):
                raise ValueError(f"sizes must be positive with shape ({bsz}, {n}), got {tuple(sizes.shape)}")
            size = sizes.to(torch.float32)
        source = torch.arange(n, device=x.device).expand(bsz, -1).contiguous()
        if self.num_tokens >= n:
            return ToMeOutput(x, size, source if self.return_source else None,
                              size.log() if self.proportional_attention else None)

        # accumulate in fp32: merged tokens are sums of many members
        xs = x.float() * size[..., None]
        ms = metric.float() * size[..., None]
        first = source.clone()
        while xs.shape[1] > self.num_tokens:
            cur = xs.shape[1]
            r = min(cur - self.num_tokens, (cur + 1) // 2)
            xs, ms, size, first, source = self._merge_pass(xs, ms, size, first, source, r)
        tokens = (xs / size[..., None]).to(x.dtype)
        return ToMeOutput(tokens, size, source if self.return_source else None,
                          size.log() if self.proportional_attention else None)


COMPRESSORS: dict[str, type[TokenCompressor]] = {
    "none": IdentityCompressor,
    "pixel_unshuffle": PixelUnshuffleCompressor,
    "avgpool": AvgPoolCompressor,
    "tome": ToMeCompressor,
}


def build_compressor(name: str, **kw) -> TokenCompressor:
    """Build a compressor by name.

    ``"none"``; ``"pixel_unshuffle"`` (factor=2, pad_mode="zeros"); ``"avgpool"`` (factor=2);
    ``"tome"`` (num_tokens=K required, proportional_attention=False, return_source=False).
    """
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {sorted(COMPRESSORS)}")
    cls = COMPRESSORS[name]
    try:
        return cls(**kw)
    except TypeError as e:
        raise TypeError(f"bad arguments for compressor {name!r} ({cls.__name__}): {e}") from e
