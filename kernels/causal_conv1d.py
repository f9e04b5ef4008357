"""Causal depthwise conv1d (as Dao-AILab ``causal-conv1d``): reference, Triton fwd/bwd, decode update.

``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k])`` with positions before 0
taken from ``initial_states`` (B, D, W-1) (zeros if None) and, with ``seq_idx`` (B, L), positions of a
different packed sequence treated as zeros. ``act`` is identity or SiLU.

``causal_conv1d_update`` is one (or a few) decode steps against a rolling ``conv_state`` (B, D, S) with
S >= W - 1, updated in place (the newest input is at the end), as causal-conv1d and transformers use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.kernels._checks import check_dtype, check_rank, check_same_device, check_shape
from mmfm.kernels._dispatch import resolve_backend, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "causal_conv1d_reference",
    "causal_conv1d_update_reference",
]

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation is not None


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """fp32 reference. x (B, D, L), weight (D, W), bias (D,), initial_states (B, D, W-1), seq_idx (B, L).

    Returns out (B, D, L) in x's dtype and, if asked, the final states (B, D, W-1) in x's dtype.
    """
    silu = _check_activation(activation)
    bsz, dim, seqlen = x.shape
    width = weight.shape[1]
    xf = x.float()
    if initial_states is not None:
        prev = initial_states.float()
    else:
        prev = xf.new_zeros(bsz, dim, width - 1)
    xpad = torch.cat([prev, xf], dim=-1)  # (B, D, W - 1 + L)
    out = xf.new_zeros(bsz, dim, seqlen)
    if bias is not None:
        out = out + bias.float()[None, :, None]
    for k in range(width):
        shift = width - 1 - k  # tap k reads position t - shift
        term = weight.float()[None, :, k, None] * xpad[:, :, k : k + seqlen]
        if seq_idx is not None and shift > 0:
            src = torch.arange(seqlen, device=x.device) - shift
            same = torch.zeros(bsz, seqlen, dtype=torch.bool, device=x.device)
            ok = src >= 0
            same[:, ok] = seq_idx[:, src[ok]] == seq_idx[:, ok]
            term = term * same[:, None, :].float()
        out = out + term
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    if return_final_states:
        return out, xpad[:, :, -(width - 1) :].to(x.dtype) if width > 1 else xpad[:, :, :0].to(x.dtype)
    return out


def causal_conv1d_update_reference(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """fp32 reference decode step(s). x (B, D) or (B, D, T), conv_state (B, D, S >= W-1) updated in place."""
    silu = _check_activation(activation)
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    width, state_len, steps = weight.shape[1], conv_state.shape[-1], xs.shape[-1]
    full = torch.cat([conv_state.float(), xs.float()], dim=-1)  # (B, D, S + T)
    out = []
    for t in range(steps):
        window = full[:, :, state_len + t - width + 1 : state_len + t + 1]  # (B, D, W)
        o = (window * weight.float()[None]).sum(-1)
        if bias is not None:
            o = o + bias.float()
        out.append(F.silu(o) if silu else o)
    conv_state.copy_(full[:, :, -state_len:].to(conv_state.dtype))
    y = torch.stack(out, dim=-1).to(x.dtype)
    return y[..., 0] if squeeze else y


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _conv_fwd(x_ptr, w_ptr, b_ptr, init_ptr, sid_ptr, out_ptr, dout_ptr, D, L,
                  sxb, sxd, sxl, sib, sid_, sil, ssb, ssl,
                  W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                  SILU: tl.constexpr, GRAD: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):  # fmt: skip
        # GRAD=False: out = act(conv). GRAD=True: out = dout * act'(conv), the gradient w.r.t. the
        # pre-activation (recomputed, so the forward saves nothing extra). out is contiguous (B, D, L).
        bi = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*D*L can pass 2**31
        od = tl.program_id(1) * BD + tl.arange(0, BD)
        ot = tl.program_id(2) * BL + tl.arange(0, BL)
        md = od < D
        mt = ot < L
        acc = tl.zeros((BD, BL), dtype=tl.float32)
        if HAS_SEQ:
            s_t = tl.load(sid_ptr + bi * ssb + ot * ssl, mask=mt, other=0)
        for k in tl.static_range(W):
            src = ot - (W - 1 - k)
            wk = tl.load(w_ptr + od * W + k, mask=md, other=0.0).to(tl.float32)
            inx = (src >= 0) & mt
            v = tl.load(
                x_ptr + bi * sxb + od[:, None] * sxd + src[None, :] * sxl,
                mask=md[:, None] & inx[None, :], other=0.0,
            ).to(tl.float32)
            if HAS_INIT:
                # src in [-(W-1), -1] reads initial_states[:, :, W - 1 + src]
                ini = (src < 0) & (src >= -(W - 1)) & mt
                v += tl.load(
                    init_ptr + bi * sib + od[:, None] * sid_ + (W - 1 + src)[None, :] * sil,
                    mask=md[:, None] & ini[None, :], other=0.0,
                ).to(tl.float32)
            if HAS_SEQ:
                s_src = tl.load(sid_ptr + bi * ssb + src * ssl, mask=inx, other=-1)
                v = tl.where((s_src == s_t)[None, :], v, 0.0)
            acc += wk[:, None] * v
        if HAS_BIAS:
            acc += tl.load(b_ptr + od, mask=md, other=0.0).to(tl.float32)[:, None]
        m = md[:, None] & mt[None, :]
        off = bi * D * L + od[:, None] * L + ot[None, :]
        if GRAD:
            g = tl.load(dout_ptr + off, mask=m, other=0.0).to(tl.float32)
            if SILU:
                sg = tl.sigmoid(acc)
                g = g * sg * (1.0 + acc * (1.0 - sg))
            tl.store(out_ptr + off, g, mask=m)
        else:
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _conv_bwd(x_ptr, w_ptr, init_ptr, sid_ptr, dpre_ptr, dx_ptr, dw_ptr, D, L, NLB,
                  sxb, sxd, sxl, sib, sid_, sil, ssb, ssl,
                  W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                  BD: tl.constexpr, BL: tl.constexpr):  # fmt: skip
        # dx[j] = sum_k w[k] dpre[j + W-1-k] (same sequence); dw[k] partial = sum_t dpre[t] x[t-(W-1)+k].
        bi = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*D*L can pass 2**31
        pd = tl.program_id(1)
        pl = tl.program_id(2)
        od = pd * BD + tl.arange(0, BD)
        ot = pl * BL + tl.arange(0, BL)
        md = od < D
        mt = ot < L
        dx = tl.zeros((BD, BL), dtype=tl.float32)
        if HAS_SEQ:
            s_j = tl.load(sid_ptr + bi * ssb + ot * ssl, mask=mt, other=0)
        dpre_here = tl.load(dpre_ptr + bi * D * L + od[:, None] * L + ot[None, :],
                            mask=md[:, None] & mt[None, :], other=0.0)  # fmt: skip
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + od * W + k, mask=md, other=0.0).to(tl.float32)
            dst = ot + (W - 1 - k)
            ind = (dst < L) & mt
            g = tl.load(dpre_ptr + bi * D * L + od[:, None] * L + dst[None, :],
                        mask=md[:, None] & ind[None, :], other=0.0)  # fmt: skip
            # tap k of output t reads input t - (W-1-k): the weight gradient pairs dpre[t] with it
            src = ot - (W - 1 - k)
            ins = (src >= 0) & mt
            v = tl.load(x_ptr + bi * sxb + od[:, None] * sxd + src[None, :] * sxl,
                        mask=md[:, None] & ins[None, :], other=0.0).to(tl.float32)  # fmt: skip
            if HAS_INIT:
                ini = (src < 0) & (src >= -(W - 1)) & mt
                v += tl.load(init_ptr + bi * sib + od[:, None] * sid_ + (W - 1 + src)[None, :] * sil,
                             mask=md[:, None] & ini[None, :], other=0.0).to(tl.float32)  # fmt: skip
            if HAS_SEQ:
                s_dst = tl.load(sid_ptr + bi * ssb + dst * ssl, mask=ind, other=-1)
                g = tl.where((s_dst == s_j)[None, :], g, 0.0)
                s_src = tl.load(sid_ptr + bi * ssb + src * ssl, mask=ins, other=-1)
                v = tl.where((s_src == s_j)[None, :], v, 0.0)
            dx += wk[:, None] * g
            tl.store(dw_ptr + ((bi * NLB + pl) * D + od) * W + k, tl.sum(dpre_here * v, axis=1), mask=md)
        tl.store(dx_ptr + bi * D * L + od[:, None] * L + ot[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=md[:, None] & mt[None, :])  # fmt: skip

    @triton.jit
    def _conv_update(x_ptr, st_ptr, w_ptr, b_ptr, out_ptr, D, T, S,
                     sxb, sxd, sxt, ssb, ssd, sss, sob, sod, sot,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr):  # fmt: skip
        # The virtual sequence is cat(state (S), x (T)); output t uses its entries S+t-W+1 .. S+t.
        bi = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*D*L can pass 2**31
        od = tl.program_id(1) * BD + tl.arange(0, BD)
        md = od < D
        ot = tl.arange(0, BT)
        mt = ot < T
        acc = tl.zeros((BD, BT), dtype=tl.float32)
        for k in tl.static_range(W):
            j = S + ot - (W - 1) + k
            from_st = (j < S) & (j >= 0) & mt
            from_x = (j >= S) & mt
            v = tl.load(st_ptr + bi * ssb + od[:, None] * ssd + j[None, :] * sss,
                        mask=md[:, None] & from_st[None, :], other=0.0).to(tl.float32)  # fmt: skip
            v += tl.load(x_ptr + bi * sxb + od[:, None] * sxd + (j - S)[None, :] * sxt,
                         mask=md[:, None] & from_x[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.load(w_ptr + od * W + k, mask=md, other=0.0).to(tl.float32)[:, None] * v
        if HAS_BIAS:
            acc += tl.load(b_ptr + od, mask=md, other=0.0).to(tl.float32)[:, None]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        # New state = last S entries of the virtual sequence; read everything before writing.
        os_ = tl.arange(0, BS)
        j = T + os_
        ms = os_ < S
        ns = tl.load(st_ptr + bi * ssb + od[:, None] * ssd + j[None, :] * sss,
                     mask=md[:, None] & (ms & (j < S))[None, :], other=0.0)  # fmt: skip
        nx = tl.load(x_ptr + bi * sxb + od[:, None] * sxd + (j - S)[None, :] * sxt,
                     mask=md[:, None] & (ms & (j >= S))[None, :], other=0.0)  # fmt: skip
        new = tl.where((j < S)[None, :], ns.to(tl.float32), nx.to(tl.float32))
        tl.debug_barrier()
        tl.store(st_ptr + bi * ssb + od[:, None] * ssd + os_[None, :] * sss,
                 new.to(st_ptr.dtype.element_ty), mask=md[:, None] & ms[None, :])  # fmt: skip
        tl.store(out_ptr + bi * sob + od[:, None] * sod + ot[None, :] * sot,
                 acc.to(out_ptr.dtype.element_ty), mask=md[:, None] & mt[None, :])  # fmt: skip


_BD, _BL = 16, 128


def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, silu):
        bsz, dim, seqlen = x.shape
        width = weight.shape[1]
        out = torch.empty(bsz, dim, seqlen, device=x.device, dtype=x.dtype)
        grid = (bsz, triton.cdiv(dim, _BD), triton.cdiv(seqlen, _BL))
        ssb, ssl = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
        _conv_fwd[grid](
            x, weight, bias if bias is not None else weight, initial_states if initial_states is not None else x,
            seq_idx if seq_idx is not None else x, out, out, dim, seqlen, *_strides3(x),
            *_strides3(initial_states), ssb, ssl, W=width, HAS_BIAS=bias is not None,
            HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, SILU=silu, GRAD=False,
            BD=_BD, BL=_BL,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
        bsz, dim, seqlen = x.shape
        width = weight.shape[1]
        dout = dout.contiguous()
        nlb = triton.cdiv(seqlen, _BL)
        grid = (bsz, triton.cdiv(dim, _BD), nlb)
        ssb, ssl = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
        common = (*_strides3(x), *_strides3(initial_states), ssb, ssl)
        init_arg = initial_states if initial_states is not None else x
        sid_arg = seq_idx if seq_idx is not None else x
        dpre = torch.empty(bsz, dim, seqlen, device=x.device, dtype=torch.float32)
        _conv_fwd[grid](
            x, weight, bias if bias is not None else weight, init_arg, sid_arg, dpre, dout, dim, seqlen,
            *common, W=width, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None,
            HAS_SEQ=seq_idx is not None, SILU=ctx.silu, GRAD=True, BD=_BD, BL=_BL,
        )  # fmt: skip
        dx = torch.empty(bsz, dim, seqlen, device=x.device, dtype=x.dtype)
        dw = torch.empty(bsz, nlb, dim, width, device=x.device, dtype=torch.float32)
        _conv_bwd[grid](
            x, weight, init_arg, sid_arg, dpre, dx, dw, dim, seqlen, nlb, *common,
            W=width, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, BD=_BD, BL=_BL,
        )  # fmt: skip
        dweight = dw.sum((0, 1)).to(weight.dtype)
        dbias = dpre.sum((0, 2)).to(bias.dtype) if bias is not None else None
        dinit = None
        if initial_states is not None and ctx.needs_input_grad[3]:
            # initial_states[:, :, i] is position i - (W-1); output t = i - (W-1) + (W-1-k) = i - k reads it via tap k.
            dinit = torch.zeros(initial_states.shape, device=x.device, dtype=torch.float32)
            for i in range(width - 1):
                for k in range(width):
                    t = i - k
                    if 0 <= t < seqlen:
                        dinit[:, :, i] += weight[:, k].float()[None] * dpre[:, :, t]
            dinit = dinit.to(initial_states.dtype)
        return dx, dweight, dbias, dinit, None, None


def _validate_conv(x, weight, bias, initial_states, seq_idx):
    check_rank("x", x, 3)
    check_dtype("x", x)
    bsz, dim, seqlen = x.shape
    check_rank("weight", weight, 2)
    check_shape("weight", weight, (dim, None), "(D, W) with D = x.shape[1]")
    check_dtype("weight", weight)
    width = weight.shape[1]
    if width < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; the kernel width W must be >= 1")
    if bias is not None:
        check_shape("bias", bias, (dim,), "(D,)")
    if initial_states is not None:
        check_shape("initial_states", initial_states, (bsz, dim, width - 1), "(B, D, W-1)")
    if seq_idx is not None:
        check_shape("seq_idx", seq_idx, (bsz, seqlen), "(B, L)")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
        if initial_states is not None:
            raise ValueError("initial_states and seq_idx cannot be used together (as in causal-conv1d)")
    check_same_device(x=x, weight=weight, bias=bias, initial_states=initial_states, seq_idx=seq_idx)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Causal depthwise conv1d, drop-in for causal-conv1d's ``causal_conv1d_fn``.

    Args:
        x: (B, D, L). weight: (D, W). bias: (D,). activation: None or "silu".
        initial_states: (B, D, W-1) inputs before position 0. seq_idx: (B, L) int packed-sequence ids.
        return_final_states: also return the last W-1 inputs (B, D, W-1) (to continue decoding).
        backend: "auto" | "reference" | "triton".

    Returns:
        out (B, D, L) in x's dtype, and the final states if asked.
    """
    silu = _check_activation(activation)
    _validate_conv(x, weight, bias, initial_states, seq_idx)
    available = ("triton",) if (triton is not None and triton_available()) else ()
    chosen = resolve_backend(backend, x.device, available)
    if chosen == "reference" or x.shape[-1] == 0:
        return causal_conv1d_reference(
            x, weight, bias, activation, initial_states, return_final_states, seq_idx
        )
    width = weight.shape[1]
    xc = x.contiguous() if x.stride(-1) != 1 and x.stride(1) != 1 else x
    out = _CausalConv1dFn.apply(
        xc, weight.contiguous(), bias.contiguous() if bias is not None else None,
        initial_states, seq_idx.to(torch.int32) if seq_idx is not None else None, silu,
    )  # fmt: skip
    if not return_final_states:
        return out
    prev = initial_states if initial_states is not None else x.new_zeros(x.shape[0], x.shape[1], width - 1)
    final = torch.cat([prev.to(x.dtype), x], dim=-1)[:, :, x.shape[-1] :] if width > 1 else x[:, :, :0]
    return out, final


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode step(s) of the causal conv, drop-in for causal-conv1d's ``causal_conv1d_update``.

    Args:
        x: (B, D) one new input per channel, or (B, D, T) a few.
        conv_state: (B, D, S) with S >= W-1, the most recent inputs (newest last); updated in place.
        weight: (D, W). bias: (D,). activation: None or "silu".

    Returns:
        (B, D) or (B, D, T) like x.
    """
    silu = _check_activation(activation)
    check_rank("x", x, (2, 3))
    check_dtype("x", x)
    bsz, dim = x.shape[0], x.shape[1]
    check_rank("weight", weight, 2)
    check_shape("weight", weight, (dim, None), "(D, W) with D = x.shape[1]")
    width = weight.shape[1]
    check_rank("conv_state", conv_state, 3)
    check_shape("conv_state", conv_state, (bsz, dim, None), "(B, D, S)")
    if conv_state.shape[2] < width - 1:
        raise ValueError(
            f"conv_state has shape {tuple(conv_state.shape)}; its last dim must be >= W-1 = {width - 1}"
        )
    if bias is not None:
        check_shape("bias", bias, (dim,), "(D,)")
    check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)
    available = ("triton",) if (triton is not None and triton_available()) else ()
    chosen = resolve_backend(backend, x.device, available)
    if chosen == "reference":
        return causal_conv1d_update_reference(x, conv_state, weight, bias, activation)
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    steps, state_len = xs.shape[-1], conv_state.shape[-1]
    out = torch.empty(xs.shape, device=x.device, dtype=x.dtype)
    w = weight.contiguous()
    _conv_update[(bsz, triton.cdiv(dim, _BD))](
        xs, conv_state, w, bias if bias is not None else w, out, dim, steps, state_len,
        *_strides3(xs), *_strides3(conv_state), *_strides3(out),
        W=width, HAS_BIAS=bias is not None, SILU=silu, BD=_BD,
        BT=max(16, triton.next_power_of_2(steps)), BS=max(16, triton.next_power_of_2(state_len)),
    )  # fmt: skip
    return out[..., 0] if squeeze else out
