"""decode_attention: split-KV Triton kernel (CPU interpreter / GPU) vs the fp32 reference, and the reference
vs PyTorch's scaled_dot_product_attention over the valid keys (an independent definition).

Tolerances: fp32 atol=rtol=1e-5 (same math, the split changes the summation order); bf16 caches: the kernel
rounds the softmax weights to bf16 before the value product (as flash attention does), atol=rtol=2e-2.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from mmfm.kernels._dispatch import triton_mode

da = importlib.import_module("mmfm.kernels.decode_attention")

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def interpreter():
    with triton_mode(True, (da, "_decode_attn_split")):
        yield


def make(batch, hq, hkv, lmax, dh, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, dh, generator=g).to(device, dtype)
    k = torch.randn(batch, hkv, lmax, dh, generator=g).to(device, dtype)
    v = torch.randn(batch, hkv, lmax, dh, generator=g).to(device, dtype)
    return q, k, v


def sdpa_rows(q, k, v, length, start):
    """Each row on its own valid keys through F.scaled_dot_product_attention with repeated KV heads."""
    g = q.shape[1] // k.shape[1]
    out = []
    for b in range(q.shape[0]):
        lo, hi = int(start[b]), int(length[b])
        kk = k[b, :, lo:hi].float().repeat_interleave(g, 0)
        vv = v[b, :, lo:hi].float().repeat_interleave(g, 0)
        out.append(F.scaled_dot_product_attention(q[b, :, None].float(), kk, vv)[:, 0])
    return torch.stack(out)


def test_reference_matches_sdpa():
    q, k, v = make(3, 8, 2, 37, 16)
    length, start = torch.tensor([37, 20, 5]), torch.tensor([0, 3, 4])
    torch.testing.assert_close(da.decode_attention_reference(q, k, v, length, start), sdpa_rows(q, k, v, length, start),
                               **FP32_TOL)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("batch,hq,hkv,lmax,dh", [(2, 4, 4, 50, 16), (3, 8, 2, 77, 32), (1, 6, 1, 33, 24)])
def test_triton_matches_reference_interpreter(batch, hq, hkv, lmax, dh):
    q, k, v = make(batch, hq, hkv, lmax, dh)
    length = torch.randint(1, lmax + 1, (batch,), generator=torch.Generator().manual_seed(1))
    start = torch.minimum(torch.randint(0, 6, (batch,)), length - 1)
    for st in (None, start):
        got = da.decode_attention(q, k, v, length, st, backend="triton")
        want = da.decode_attention_reference(q, k, v, length, st)
        torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.usefixtures("interpreter")
def test_triton_broadcast_length_interpreter():
    """A stride-0 ``length`` (one shared fill level expanded over the batch, as a decode step builds it)."""
    q, k, v = make(3, 4, 2, 30, 16)
    shared = torch.tensor([21], dtype=torch.int32).expand(3)
    got = da.decode_attention(q, k, v, shared, backend="triton")
    torch.testing.assert_close(got, da.decode_attention_reference(q, k, v, shared.contiguous()), **FP32_TOL)


@pytest.mark.usefixtures("interpreter")
def test_triton_bf16_interpreter():
    q, k, v = make(2, 4, 2, 40, 16, dtype=torch.bfloat16)
    length = torch.tensor([40, 17])
    got = da.decode_attention(q, k, v, length, backend="triton")
    torch.testing.assert_close(got.float(), da.decode_attention_reference(q, k, v, length).float(), **BF16_TOL)


def test_bad_input_names_argument():
    q, k, v = make(2, 4, 2, 10, 8)
    with pytest.raises(ValueError, match="k_cache"):
        da.decode_attention(q, k[:, :, :, :4], v, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="multiple"):
        da.decode_attention(q[:, :3], k, v, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="length"):
        da.decode_attention(q, k, v, torch.tensor([3.0, 3.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,hq,hkv,lmax,dh", [(1, 16, 4, 65536, 128), (8, 32, 8, 4099, 128), (4, 8, 8, 1000, 64)])
def test_triton_matches_reference_gpu(batch, hq, hkv, lmax, dh, dtype):
    q, k, v = make(batch, hq, hkv, lmax, dh, dtype=dtype, device="cuda")
    length = torch.randint(1, lmax + 1, (batch,), generator=torch.Generator().manual_seed(1)).cuda()
    start = torch.minimum(torch.randint(0, 9, (batch,)).cuda(), length - 1)
    got = da.decode_attention(q, k, v, length, start, backend="triton")
    want = da.decode_attention_reference(q, k, v, length, start)
    torch.testing.assert_close(got.float(), want.float(), **(FP32_TOL if dtype == torch.float32 else BF16_TOL))
