"""Token compressors against manual references, F.pixel_unshuffle / F.avg_pool2d, and ToMe invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfm.radio.compression import (
    AvgPoolCompressor,
    IdentityCompressor,
    PixelUnshuffleCompressor,
    ToMeCompressor,
    build_compressor,
)


def _manual_unshuffle(x: torch.Tensor, h: int, w: int, f: int, pad_mode: str) -> torch.Tensor:
    """Loop reference: output token (i, j) = concat over (di, dj) row-major of input token (f*i+di, f*j+dj)."""
    b, _, d = x.shape
    g = x.view(b, h, w, d)
    h2, w2 = -(-h // f), -(-w // f)
    out = torch.zeros(b, h2 * w2, f * f * d, dtype=x.dtype)
    for i in range(h2):
        for j in range(w2):
            parts = []
            for di in range(f):
                for dj in range(f):
                    r, c = f * i + di, f * j + dj
                    if r < h and c < w:
                        parts.append(g[:, r, c])
                    elif pad_mode == "replicate":
                        parts.append(g[:, min(r, h - 1), min(c, w - 1)])
                    else:
                        parts.append(torch.zeros(b, d, dtype=x.dtype))
            out[:, i * w2 + j] = torch.cat(parts, dim=-1)
    return out


@pytest.mark.parametrize("f,h,w", [(2, 4, 6), (3, 6, 9), (2, 5, 7), (3, 4, 8)])
@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
def test_pixel_unshuffle_manual(f: int, h: int, w: int, pad_mode: str) -> None:
    x = torch.randn(2, h * w, 5)
    comp = PixelUnshuffleCompressor(f, pad_mode=pad_mode)
    y = comp(x, (h, w))
    assert y.shape == (2, comp.num_output_tokens(h, w), comp.output_dim(5))
    torch.testing.assert_close(y, _manual_unshuffle(x, h, w, f, pad_mode), rtol=0, atol=0)


@pytest.mark.parametrize("f,h,w", [(2, 4, 6), (3, 6, 9)])
def test_pixel_unshuffle_matches_torch_up_to_channel_order(f: int, h: int, w: int) -> None:
    b, d = 2, 7
    x = torch.randn(b, h * w, d)
    y = PixelUnshuffleCompressor(f)(x, (h, w))
    nchw = x.transpose(1, 2).reshape(b, d, h, w)
    ref = F.pixel_unshuffle(nchw, f)  # (B, d*f*f, h/f, w/f), channel = d*f*f + di*f + dj
    ref = ref.reshape(b, d, f * f, h // f, w // f).permute(0, 3, 4, 2, 1).reshape(b, -1, f * f * d)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("f,h,w", [(2, 4, 6), (3, 6, 9), (2, 5, 7), (3, 7, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avgpool_matches_torch(f: int, h: int, w: int, dtype: torch.dtype) -> None:
    b, d = 2, 6
    x = torch.randn(b, h * w, d).to(dtype)
    comp = AvgPoolCompressor(f)
    y = comp(x, (h, w))
    assert y.dtype == dtype and y.shape == (b, comp.num_output_tokens(h, w), d)
    ref = F.avg_pool2d(x.float().transpose(1, 2).reshape(b, d, h, w), f, f, ceil_mode=True)
    ref = ref.flatten(2).transpose(1, 2)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}  # bf16 eps 7.8e-3
    torch.testing.assert_close(y.float(), ref, **tol)


def _naive_tome(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop reference (one sample, fp64): groups of input indices merged by repeated bipartite matching."""
    groups = [[i] for i in range(x.shape[0])]
    xd = x.double()
    while len(groups) > k:
        n = len(groups)
        means = [xd[g].mean(0) for g in groups]
        a, b = list(range(0, n, 2)), list(range(1, n, 2))
        r = min(n - k, len(a))
        best = []
        for ia in a:
            sims = [F.cosine_similarity(means[ia], means[ib], dim=0).item() for ib in b]
            j = max(range(len(b)), key=lambda t: (sims[t], -t))
            best.append((sims[j], ia, b[j]))
        best.sort(key=lambda t: -t[0])
        merged = {ia: ib for _, ia, ib in best[:r]}
        new = {i: list(groups[i]) for i in range(n) if i not in merged}
        for ia, ib in merged.items():
            new[ib] += groups[ia]
        groups = sorted(new.values(), key=min)
    tokens = torch.stack([xd[g].mean(0) for g in groups])
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    return tokens, sizes


@pytest.mark.parametrize("n,k", [(16, 5), (36, 9), (23, 11), (64, 1)])
def test_tome_matches_loop_reference(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    x = torch.randn(3, n, 8)
    out = ToMeCompressor(k, return_source=True)(x)
    assert out.tokens.shape == (3, k, 8) and out.sizes.shape == (3, k) and out.source.shape == (3, n)
    for i in range(3):
        tok, size = _naive_tome(x[i], k)
        torch.testing.assert_close(out.tokens[i].double(), tok, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.sizes[i].double(), size)
        # the assignment reproduces the tokens as means of their members
        for j in range(k):
            torch.testing.assert_close(out.tokens[i, j], x[i, out.source[i] == j].mean(0), rtol=1e-5, atol=1e-5)


def test_tome_invariants() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16)
    out = ToMeCompressor(10)(x, (8, 8))
    assert out.tokens.shape == (2, 10, 16) and out.source is None and out.attn_bias is None
    torch.testing.assert_close(out.sizes.sum(1), torch.full((2,), 64.0))
    # size-weighted sums are preserved: sum_k s_k t_k == sum_n x_n
    torch.testing.assert_close((out.sizes[..., None] * out.tokens).sum(1), x.sum(1), rtol=1e-5, atol=1e-4)
    again = ToMeCompressor(10)(x, (8, 8))  # deterministic
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.sizes, out.sizes)


def test_tome_input_sizes_and_proportional_attention() -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 12, 4)
    sizes = torch.rand(1, 12) + 0.5
    out = ToMeCompressor(4, proportional_attention=True)(x, sizes=sizes)
    torch.testing.assert_close(out.sizes.sum(1), sizes.sum(1))
    torch.testing.assert_close((out.sizes[..., None] * out.tokens).sum(1), (sizes[..., None] * x).sum(1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attn_bias, out.sizes.log())


def test_tome_identical_tokens_merge_first() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 10, 6)
    x[:, 5] = x[:, 4]  # positions 4 (set A) and 5 (set B) are identical: cosine 1, the best match
    out = ToMeCompressor(9, return_source=True)(x)
    assert out.source[0, 4] == out.source[0, 5]
    j = out.source[0, 4]
    torch.testing.assert_close(out.tokens[0, j], x[0, 4])
    assert out.sizes[0, j] == 2 and (out.sizes[0].sum() == 10)
    # every other token is untouched and in reading order
    others = [i for i in range(10) if i != 5]
    torch.testing.assert_close(out.tokens[0], x[0, others])


def test_tome_metric_and_bf16() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 32, 8)
    keys = torch.randn(2, 32, 4)
    a = ToMeCompressor(8, return_source=True)(x, metric=keys)
    b = ToMeCompressor(8, return_source=True)(keys, metric=keys)
    assert torch.equal(a.source, b.source)  # matching depends on the metric only
    low = ToMeCompressor(8)(x.bfloat16(), metric=keys)
    assert low.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(low.tokens.float(), a.tokens, rtol=2e-2, atol=2e-2)  # bf16 input rounding


def test_tome_k_geq_n_is_identity_and_bad_k() -> None:
    x = torch.randn(2, 9, 4)
    out = ToMeCompressor(9, return_source=True)(x)
    assert torch.equal(out.tokens, x) and torch.equal(out.sizes, torch.ones(2, 9))
    assert torch.equal(out.source, torch.arange(9).expand(2, -1))
    assert torch.equal(ToMeCompressor(100)(x).tokens, x)
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match="num_tokens"):
            ToMeCompressor(bad)
    assert ToMeCompressor(50).num_output_tokens(4, 4) == 16


def test_factory_and_bad_input() -> None:
    assert isinstance(build_compressor("none"), IdentityCompressor)
    assert build_compressor("pixel_unshuffle", factor=3).factor == 3
    assert build_compressor("avgpool").factor == 2
    assert build_compressor("tome", num_tokens=7).num_tokens == 7
    with pytest.raises(ValueError, match="unknown compressor"):
        build_compressor("perceiver")
    with pytest.raises(TypeError, match="tome"):
        build_compressor("tome", k=3)
    with pytest.raises(ValueError, match="not a square"):
        AvgPoolCompressor(2)(torch.randn(1, 12, 3))
    with pytest.raises(ValueError, match="does not match"):
        PixelUnshuffleCompressor(2)(torch.randn(1, 12, 3), (3, 5))
    with pytest.raises(ValueError, match="factor"):
        PixelUnshuffleCompressor(0)
    with pytest.raises(ValueError, match="pad_mode"):
        PixelUnshuffleCompressor(2, pad_mode="reflect")
    x = torch.randn(1, 16, 3)
    assert torch.equal(build_compressor("none")(x, (4, 4)), x)
    torch.testing.assert_close(AvgPoolCompressor(2)(x), AvgPoolCompressor(2)(x, (4, 4)))
