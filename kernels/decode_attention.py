"""Single-query attention over a preallocated KV cache (decoding): reference, split-KV Triton kernel, dispatch.

One decode step of a GQA attention layer, for static caches (the cache is a fixed ``(B, Hkv, Lmax, Dh)``
buffer, so the op can be captured in a CUDA graph)::

    out[b, h] = softmax(scale * q[b, h] . k[b, h // g, start[b]:length[b]]) @ v[b, h // g, start[b]:length[b]]

with ``g = Hq / Hkv`` query heads per KV head (transformers' ``repeat_kv`` convention). ``start`` skips a row's
left padding; keys at or after ``length`` are never read, so a step costs what the filled part of the cache
costs, not ``Lmax``. The Triton kernel is flash-decoding: the key range is split across programs (decode
has one query per head, so without the split a 64k context runs on B * Hkv programs and most SMs idle), each
program keeps an online softmax over its slice for the ``g`` query heads of one KV head, and a second kernel
merges the slices. Math is fp32; the output has ``q``'s dtype.
"""

from __future__ import annotations

import functools
import math

import torch

from mmfm.kernels._checks import check_dtype, check_rank, check_same_device, check_shape
from mmfm.kernels._dispatch import resolve_backend, triton_available, triton_interpret

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux, optional elsewhere
    triton = None

__all__ = ["decode_attention", "decode_attention_reference"]


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               length: torch.Tensor, start: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """fp32 reference. q ``(B, Hq, Dh)``; caches ``(B, Hkv, Lmax, Dh)``; length/start ``(B,)``; -> ``(B, Hq, Dh)``."""
    batch, hq, dh = q.shape
    hkv, lmax = k_cache.shape[1], k_cache.shape[2]
    scale = dh ** -0.5 if scale is None else scale
    pos = torch.arange(lmax, device=q.device)
    valid = pos[None] < length.to(q.device).long()[:, None]  # (B, Lmax)
    if start is not None:
        valid &= pos[None] >= start.to(q.device).long()[:, None]
    qg = q.float().view(batch, hkv, hq // hkv, dh)
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k_cache.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    out = torch.einsum("bhgl,bhld->bhgd", torch.softmax(scores, dim=-1), v_cache.float())
    return out.reshape(batch, hq, dh).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_attn_split(q_ptr, k_ptr, v_ptr, len_ptr, start_ptr, part_ptr, lse_ptr,
                           HKV, G, DH, SPLIT_LEN, scale,
                           sqb, sqh, skb, skh, skl, svb, svh, svl,
                           BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_START: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        # program (b * HKV + kv head, split): online softmax over keys [split*SPLIT_LEN, +SPLIT_LEN) ∩ [start, length)
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        length = tl.load(len_ptr + b)
        lo = pid_s * SPLIT_LEN
        if HAS_START:
            lo = tl.maximum(lo, tl.load(start_ptr + b))
        hi = tl.minimum((pid_s + 1) * SPLIT_LEN, length)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < G
        mask_d = offs_d < DH
        q = tl.load(q_ptr + b.to(tl.int64) * sqb + (hk * G + offs_g)[:, None] * sqh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DOT)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(DOT)
            # cache dtype operands, fp32 accumulation (fp32 caches: exact fp32 products, not tf32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_N)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
            den = den * alpha + tl.sum(p, axis=1)
            m = m_new
        # empty slices store lse = -inf and a zero partial; the merge gives them weight 0
        has = den > 0
        out = acc / tl.where(has, den, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("-inf"))
        n_split = tl.num_programs(1)
        row = (pid_bh * n_split + pid_s) * BLOCK_G + offs_g
        tl.store(part_ptr + row[:, None] * BLOCK_D + offs_d[None, :], out)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _decode_attn_merge(part_ptr, lse_ptr, out_ptr, HKV, G, DH, N_SPLIT,
                           sob, soh, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        # program (b * HKV + kv head, query head in group): weight every slice by exp(lse - max lse)
        pid_bh = tl.program_id(0)
        g = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < N_SPLIT
        rows = (pid_bh * N_SPLIT + offs_s) * BLOCK_G + g
        lse = tl.load(lse_ptr + rows, mask=mask_s, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        w = tl.where(mask_s & (lse > float("-inf")), tl.exp(lse - mx), 0.0)
        part = tl.load(part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
        out = tl.sum(part * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
        tl.store(out_ptr + b.to(tl.int64) * sob + (hk * G + g) * soh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < DH)


def _dot_cfg(dtype: torch.dtype) -> dict:
    """tl.dot operands: the cache dtype with fp32 accumulation; fp32 caches use exact fp32 products (not tf32),
    and so does the interpreter, whose tl.dot mis-reads bf16 operands (triton 3.x)."""
    if dtype == torch.float32 or triton_interpret():
        return {"DOT": tl.float32, "PRECISION": "ieee"}
    return {"DOT": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PRECISION": "tf32"}


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch_kv: int, lmax: int, block_n: int) -> int:
    """Enough programs to fill the GPU (~4 per SM) without slices shorter than a few key blocks."""
    if triton_interpret():
        return max(1, min(4, math.ceil(lmax / block_n)))
    sms = _sm_count(torch.cuda.current_device())
    want = max(1, math.ceil(4 * sms / batch_kv))
    return max(1, min(want, math.ceil(lmax / (4 * block_n)), 256))


def _decode_attention_triton(q, k_cache, v_cache, length, start, scale) -> torch.Tensor:
    if q.device.type != "cuda" and type(_decode_attn_split).__name__ != "InterpretedFunction":
        raise RuntimeError("the Triton kernel was built for the GPU; set TRITON_INTERPRET=1 before importing "
                           "mmfm.kernels to run it on the CPU, or use backend='reference'")
    batch, hq, dh = q.shape
    hkv, lmax = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    block_d = max(16, triton.next_power_of_2(dh))
    block_n = 16 if triton_interpret() else (64 if block_d <= 128 else 32)
    n_split = _num_splits(batch * hkv, lmax, block_n)
    split_len = triton.cdiv(triton.cdiv(lmax, n_split), block_n) * block_n
    n_split = triton.cdiv(lmax, split_len)
    part = torch.empty(batch * hkv * n_split * block_g, block_d, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch * hkv * n_split * block_g, device=q.device, dtype=torch.float32)
    # the kernel reads one entry per row at offset b: contiguous int32 (a no-op for such inputs)
    length = length.to(device=q.device, dtype=torch.int32).contiguous()
    start_t = start.to(device=q.device, dtype=torch.int32).contiguous() if start is not None else length
    _decode_attn_split[(batch * hkv, n_split)](
        q, k_cache, v_cache, length, start_t, part, lse, hkv, group, dh, split_len, scale,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, HAS_START=start is not None,
        **_dot_cfg(k_cache.dtype),
        num_warps=1 if triton_interpret() else 4, num_stages=1 if triton_interpret() else 2,
    )  # fmt: skip
    out = torch.empty(batch, hq, dh, device=q.device, dtype=q.dtype)
    _decode_attn_merge[(batch * hkv, group)](
        part, lse, out, hkv, group, dh, n_split, out.stride(0), out.stride(1),
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_split)),
        num_warps=1 if triton_interpret() else 4,
    )  # fmt: skip
    return out


def _validate(q, k_cache, v_cache, length, start) -> None:
    check_rank("q", q, 3)
    check_dtype("q", q)
    batch, hq, dh = q.shape
    check_rank("k_cache", k_cache, 4)
    check_shape("k_cache", k_cache, (batch, None, None, dh), "(B, Hkv, Lmax, Dh)")
    check_shape("v_cache", v_cache, tuple(k_cache.shape), "(B, Hkv, Lmax, Dh) like k_cache")
    check_dtype("k_cache", k_cache)
    check_dtype("v_cache", v_cache)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must have the same dtype")
    if hq % k_cache.shape[1] != 0:
        raise ValueError(f"q has {hq} heads, which is not a multiple of k_cache's {k_cache.shape[1]} KV heads")
    check_shape("length", length, (batch,), "(B,) number of filled cache positions per row")
    if length.dtype.is_floating_point or start is not None and start.dtype.is_floating_point:
        raise ValueError(f"length and start must be integer tensors, got {length.dtype}"
                         + (f" and {start.dtype}" if start is not None else ""))
    if start is not None:
        check_shape("start", start, (batch,), "(B,) first valid cache position per row")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, length=length, start=start)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     start: torch.Tensor | None = None, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Attention of one query per head over the filled part of a static KV cache.

    Args:
        q: ``(B, Hq, Dh)`` the step's queries.
        k_cache, v_cache: ``(B, Hkv, Lmax, Dh)``; ``Hkv`` divides ``Hq`` (GQA, head ``h`` reads KV head
            ``h // (Hq / Hkv)``). Any strides with a contiguous last dim work.
        length: ``(B,)`` integer; keys ``[start, length)`` of each row are attended (device tensor, so a CUDA
            graph can advance it without a host sync).
        start: optional ``(B,)`` first valid key (left padding); default 0.
        scale: softmax scale, default ``Dh ** -0.5``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(B, Hq, Dh)`` in ``q``'s dtype. A row with no valid key gives zeros (Triton) / NaN (reference).
    """
    _validate(q, k_cache, v_cache, length, start)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    available = ("triton",) if (triton is not None and triton_available()) else ()
    if resolve_backend(backend, q.device, available) == "reference":
        return decode_attention_reference(q, k_cache, v_cache, length, start, scale)
    return _decode_attention_triton(q, k_cache, v_cache, length, start, scale)
