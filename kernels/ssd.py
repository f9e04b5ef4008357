"""Mamba-2 chunked SSD scan: PyTorch reference, Triton forward/backward kernels, autograd, dispatch.

The op (same semantics as mamba-ssm's ``mamba_chunk_scan_combined``), per batch ``b``, head ``h``
(in group ``g = h // (H // G)``), position ``t``::

    dt_t   = clamp(softplus?(dt[b, t, h] + dt_bias[h]), *dt_limit)
    S_t    = exp(dt_t * A[h]) * S_{t-1} + dt_t * x[b, t, h, :, None] * B[b, t, g, None, :]   # (P, N)
    y_t    = S_t @ C[b, t, g] + D[h] * x[b, t, h]
    out_t  = y_t * silu(z[b, t, h])              (if z is given)

``S_{-1}`` is ``initial_states`` (zeros if None) and the state is reset to zero wherever
``seq_idx[b, t] != seq_idx[b, t - 1]`` (packed sequences).

The Triton path splits the sequence into chunks of ``chunk_size`` (the SSD algorithm):

1. ``dt`` pre-processing and the per-chunk cumulative sum of ``dt * A`` (cheap, in PyTorch so that
   autograd handles ``dt``, ``A`` and ``dt_bias``).
2. ``_state_scan_fwd``: one pass over the chunks in order gives the state entering every chunk,
   ``(B, nchunks, H, P, N)``, adding each chunk's contribution as it goes (no per-chunk state buffer).
3. ``_chunk_cb_fwd``: ``C B^T`` of every chunk, once per group (its heads share it).
4. ``_chunk_scan_fwd``: output = intra-chunk (masked, decayed ``C B^T`` "attention") + entering state
   read out through ``C`` + ``D`` skip.

The backward mirrors this: a reverse pass over chunks (``_dstate_scan_bwd``) gives the gradient of the
state leaving every chunk (adding each chunk's direct share from its outputs as it goes), ``C B^T`` again, then
``_chunk_dx_bwd`` (per head: ``dx``, ``ddt``, ``dD`` and the leaving-state part of the cumulative-sum
gradient), ``_chunk_dcb_bwd`` (per group: the gradient of ``C B^T``, summed over the group's heads, and
the intra-chunk part of the cumulative-sum gradient) and ``_chunk_dbc_bwd`` (per group: ``dB`` and
``dC``, every head's share summed in the program, no atomics on them; and each head's entering-state part
of the cumulative-sum gradient, which needs ``C``). Every kernel works on blocks of a chunk
(sizes in ``FWD_BLOCKS`` / ``BWD_BLOCKS``) and accumulates in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmfm.kernels._checks import (
    check_dtype,
    check_number,
    check_rank,
    check_same_device,
    check_shape,
    check_tensor,
)
from mmfm.kernels._dispatch import resolve_backend, triton_available, triton_interpret

try:  # Triton is optional: the reference path needs only PyTorch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["ssd_chunk_scan", "ssd_reference", "ssd_chunked_reference"]


# ----------------------------------------------------------------------------------------------
# Validation and shared pre-processing
# ----------------------------------------------------------------------------------------------


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit):
    check_rank("x", x, 4)
    check_dtype("x", x)
    b, seqlen, h, p = x.shape
    check_shape("dt", dt, (b, seqlen, h), "(B, L, H) like x")
    check_dtype("dt", dt)
    check_shape("A", A, (h,), "(H,)")
    check_rank("B", B, 4)
    g, n = B.shape[2], B.shape[3]
    check_shape("B", B, (b, seqlen, None, None), "(B, L, G, N)")
    check_shape("C", C, (b, seqlen, g, n), "(B, L, G, N) like B")
    check_dtype("B", B)
    check_dtype("C", C)
    if g == 0 or h % g != 0:
        raise ValueError(
            f"B has {g} groups (shape {tuple(B.shape)}); the number of heads H={h} must be divisible by it"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None:
        check_rank("D", D, (1, 2))
        check_shape("D", D, (h,) if D.dim() == 1 else (h, p), "(H,) or (H, P)")
    if z is not None:
        check_shape("z", z, (b, seqlen, h, p), "(B, L, H, P) like x")
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (h,), "(H,)")
    if initial_states is not None:
        check_shape("initial_states", initial_states, (b, h, p, n), "(B, H, P, N)")
    if seq_idx is not None:
        check_shape("seq_idx", seq_idx, (b, seqlen), "(B, L)")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2):
        raise ValueError(f"dt_limit must be a (min, max) pair, got {dt_limit!r}")
    check_number("dt_limit[0]", dt_limit[0])
    check_number("dt_limit[1]", dt_limit[1])
    check_same_device(
        x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx
    )


def _process_dt(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_limit) -> torch.Tensor:
    """(B, L, H) -> fp32 time steps after bias, softplus and clamping (as mamba-ssm)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    # mamba-ssm clamps only when a limit is set; clamping with (0, inf) would change negative dt.
    if not (dt_limit[0] == 0.0 and dt_limit[1] == float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _gate(y: torch.Tensor, z) -> torch.Tensor:
    if z is None:
        return y
    return y * F.silu(z.float())


# ----------------------------------------------------------------------------------------------
# PyTorch references (the specification)
# ----------------------------------------------------------------------------------------------


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
):
    """Sequential fp32 recurrence, one position at a time (the specification; ``chunk_size`` unused).

    Shapes: x (B, L, H, P), dt (B, L, H), A (H,), B/C (B, L, G, N), D (H,) or (H, P), z like x,
    initial_states (B, H, P, N), seq_idx (B, L). Returns y (B, L, H, P) in x's dtype and, if asked,
    the final state (B, H, P, N) in fp32.
    """
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, L, H)
    xf = x.float()
    Bh = B.float().repeat_interleave(rep, dim=2)  # (B, L, H, N)
    Ch = C.float().repeat_interleave(rep, dim=2)
    Af = A.float()
    if initial_states is not None:
        state = initial_states.float().clone()
    else:
        state = x.new_zeros(bsz, nheads, headdim, dstate, dtype=torch.float32)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
            state = state * keep
        decay = torch.exp(dtp[:, t] * Af)[:, :, None, None]  # (B, H, 1, 1)
        state = state * decay + (dtp[:, t, :, None, None] * xf[:, t, :, :, None]) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(xf.shape)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    y = _gate(y, z).to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_chunked_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
):
    """The chunked SSD algorithm in plain PyTorch (fp32; same signature as :func:`ssd_reference`).

    Loops over chunks (not positions), so it is much faster than the sequential reference on long
    sequences; it is the algorithm the Triton kernels implement, written with einsums.
    """
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf, Af = x.float(), A.float()
    Bh = B.float().repeat_interleave(rep, dim=2)
    Ch = C.float().repeat_interleave(rep, dim=2)
    sid = seq_idx if seq_idx is not None else torch.zeros(bsz, seqlen, dtype=torch.long, device=x.device)
    state = (
        initial_states.float().clone()
        if initial_states is not None
        else x.new_zeros(bsz, nheads, headdim, dstate, dtype=torch.float32)
    )
    ys = []
    for start in range(0, seqlen, chunk_size):
        end = min(start + chunk_size, seqlen)
        a = dtp[:, start:end] * Af  # (B, Q, H)
        cs = torch.cumsum(a, dim=1)
        s_chunk = sid[:, start:end]
        s_prev = sid[:, start - 1] if start > 0 else sid[:, 0]
        same = s_chunk[:, :, None] == s_chunk[:, None, :]  # (B, Q, Q)
        causal = torch.tril(torch.ones(end - start, end - start, dtype=torch.bool, device=x.device))
        mask = (same & causal)[:, :, :, None]  # (B, l, s, 1)
        diff = cs[:, :, None, :] - cs[:, None, :, :]  # (B, l, s, H)
        decay = torch.where(mask, torch.exp(torch.where(mask, diff, torch.zeros_like(diff))), 0.0)
        cb = torch.einsum("blhn,bshn->blsh", Ch[:, start:end], Bh[:, start:end])
        xdt = xf[:, start:end] * dtp[:, start:end, :, None]
        y = torch.einsum("blsh,bshp->blhp", cb * decay, xdt)
        q = torch.exp(cs) * (s_chunk == s_prev[:, None]).float()[:, :, None]  # (B, Q, H)
        y = y + torch.einsum("blhn,bhpn->blhp", Ch[:, start:end], state) * q[..., None]
        ys.append(y)
        s_end = s_chunk[:, -1]
        r = torch.exp(cs[:, -1:, :] - cs) * (s_chunk == s_end[:, None]).float()[:, :, None]  # (B, Q, H)
        new = torch.einsum("bshn,bshp->bhpn", Bh[:, start:end], xdt * r[..., None])
        g = torch.exp(cs[:, -1]) * (s_end == s_prev).float()[:, None]  # (B, H)
        state = state * g[:, :, None, None] + new
    y = torch.cat(ys, dim=1) if ys else xf.new_zeros(xf.shape)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    y = _gate(y, z).to(x.dtype)
    return (y, state) if return_final_states else y


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile_ids(NC, HPG, NBLK):
        # Program ids of a launch over (NBLK * HPG * batch * NC, G): the NBLK tiles of one chunk of every
        # head of a group are adjacent in launch order, so the group's B, C and C B^T of that chunk are
        # read from L2 by all of them (with the chunk fastest they were fetched again per head and
        # tile). Per-group kernels pass HPG = 1, the kernels that walk all chunks NC = 1. One flat
        # first axis: the 2nd/3rd are capped at 65535.
        pid = tl.program_id(0)
        g = tl.program_id(1)
        blk = pid % NBLK
        hh = (pid // NBLK) % HPG
        pid_bc = pid // (NBLK * HPG)
        bi = (pid_bc // NC).to(tl.int64)  # 64-bit offsets: B*L*H*P can pass 2**31
        return pid_bc, bi, pid_bc % NC, g, g * HPG + hh, blk

    @triton.jit
    def _state_block_start(start_ptr, H, P, N, HPG, HAS_START: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # Common start of the kernels that walk all chunks (launched over (nblk * HPG * batch, G)): the
        # (BP, BN) block of one head's state this program owns, and its running value at the start of the
        # walk, read from start_ptr (batch, H, P, N) or zeros.
        npb = tl.cdiv(P, BP)
        nblk = npb * tl.cdiv(N, BN)
        _, bi, _, g, h, blk = _tile_ids(1, HPG, nblk)
        op = (blk % npb) * BP + tl.arange(0, BP)
        on = (blk // npb) * BN + tl.arange(0, BN)
        mpn = (op[:, None] < P) & (on[None, :] < N)
        soff = op[:, None] * N + on[None, :]
        if HAS_START:
            s = tl.load(start_ptr + (bi * H + h) * P * N + soff, mask=mpn, other=0.0).to(tl.float32)
        else:
            s = tl.zeros((BP, BN), dtype=tl.float32)
        return bi, g, h, blk, nblk, op, on, mpn, soff, s

    @triton.jit
    def _chunk_outer(a_ptr, b_ptr, w, bi, h, g, pos, valid, op, on, P, N,
                     sxb, sxl, sxh, sbb, sbl, sbg, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        # sum_k w[k] a[k, op]^T b[k, on] over one chunk's positions pos, a (BP block) in x's layout
        # (batch, L, H, P) and b (BN block) in B's (batch, L, G, N): a (BP, BN) fp32 block of a state.
        av = tl.load(a_ptr + bi * sxb + pos[:, None] * sxl + h * sxh + op[None, :],
                     mask=valid[:, None] & (op[None, :] < P), other=0.0)
        bv = tl.load(b_ptr + bi * sbb + pos[:, None] * sbl + g * sbg + on[None, :],
                     mask=valid[:, None] & (on[None, :] < N), other=0.0)
        aw = (av.to(tl.float32) * w[:, None]).to(bv.dtype)
        return tl.dot(tl.trans(aw).to(DOT), bv.to(DOT), input_precision=PREC)

    @triton.jit
    def _state_scan_fwd(
        x_ptr, b_ptr, dt_ptr, cs_ptr, sid_ptr, init_ptr, out_ptr, final_ptr,
        L, H, NC, Q, P, N, HPG,
        sxb, sxl, sxh, sbb, sbl, sbg, ssb, ssl,
        HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        # One (BP, BN) block of the state ENTERING every chunk, walking the chunks in order:
        #   S_in[c+1] = exp(cs[c, last]) S_in[c] + sum_k (x[k] r[k])^T B[k],  r = decay to the chunk end * dt.
        # One pass instead of "every chunk's state from zero" then "pass them along": the per-chunk
        # fp32 states never go to memory. out holds S_in[c] in x's dtype (half the later reads); the
        # running state stays fp32. Each loop step loads one whole chunk of x and B, so the software
        # pipeline overlaps the next chunk's loads with this chunk's product.
        bi, g, h, _, _, op, on, mpn, soff, s = _state_block_start(init_ptr, H, P, N, HPG, HAS_INIT, BP, BN)
        ok = tl.arange(0, BQ)
        s_prev = 0
        if HAS_SEQ:
            s_prev = tl.load(sid_ptr + bi * ssb)
        for c in range(NC):
            tl.store(out_ptr + (((bi * NC + c) * H + h) * P) * N + soff, s.to(out_ptr.dtype.element_ty), mask=mpn)
            base = ((bi * H + h) * NC + c) * Q
            pos = c * Q + ok
            valid = (ok < Q) & (pos < L)
            cs_last = tl.load(cs_ptr + base + Q - 1)
            dt = tl.load(dt_ptr + base + ok, mask=ok < Q, other=0.0)
            cs = tl.load(cs_ptr + base + ok, mask=ok < Q, other=0.0)
            r = tl.where(valid, tl.exp(cs_last - cs) * dt, 0.0)
            gdec = tl.exp(cs_last)
            if HAS_SEQ:
                # only the chunk's last sequence reaches its end; a new sequence drops the carried state
                s_end = tl.load(sid_ptr + bi * ssb + tl.minimum(c * Q + Q - 1, L - 1) * ssl)
                sid = tl.load(sid_ptr + bi * ssb + pos * ssl, mask=valid, other=-1)
                r = tl.where(sid == s_end, r, 0.0)
                gdec = tl.where(s_end == s_prev, gdec, 0.0)
                s_prev = s_end
            s = gdec * s + _chunk_outer(x_ptr, b_ptr, r, bi, h, g, pos, valid, op, on, P, N,
                                        sxb, sxl, sxh, sbb, sbl, sbg, DOT, PREC)
        tl.store(final_ptr + (bi * H + h) * P * N + soff, s, mask=mpn)

    @triton.jit
    def _chunk_cb_fwd(
        c_ptr, b_ptr, sid_ptr, cb_ptr, L, G, NC, Q, N, sbb, sbl, sbg, ssb, ssl,
        HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BS: tl.constexpr, BKN: tl.constexpr,
    ):  # fmt: skip
        # C B^T of every chunk, once per GROUP (shared by its heads), (BM, BS) blocks on or below the
        # diagonal only: the scan never uses the strictly upper (anti-causal) part, left unwritten.
        # Pairs from different packed sequences are stored as 0, so readers need no seq_idx test.
        nsb = tl.cdiv(Q, BS)
        pid_bc, bi, c, g, _, pid_ms = _tile_ids(NC, 1, tl.cdiv(Q, BM) * nsb)
        m0 = (pid_ms // nsb) * BM
        s0 = (pid_ms % nsb) * BS
        if s0 >= m0 + BM:
            return
        om = m0 + tl.arange(0, BM)
        os = s0 + tl.arange(0, BS)
        vm = (om < Q) & (c * Q + om < L)
        vs = (os < Q) & (c * Q + os < L)
        acc = tl.zeros((BM, BS), dtype=tl.float32)
        for k0 in range(0, N, BKN):
            ok = k0 + tl.arange(0, BKN)
            cv = tl.load(c_ptr + bi * sbb + (c * Q + om)[:, None] * sbl + g * sbg + ok[None, :],
                         mask=vm[:, None] & (ok[None, :] < N), other=0.0)
            bv = tl.load(b_ptr + bi * sbb + (c * Q + os)[:, None] * sbl + g * sbg + ok[None, :],
                         mask=vs[:, None] & (ok[None, :] < N), other=0.0)
            acc += tl.dot(cv.to(DOT), tl.trans(bv).to(DOT), input_precision=PREC)
        if HAS_SEQ:
            sid_m = tl.load(sid_ptr + bi * ssb + (c * Q + om) * ssl, mask=vm, other=-1)
            sid_s = tl.load(sid_ptr + bi * ssb + (c * Q + os) * ssl, mask=vs, other=-2)
            acc = tl.where(sid_m[:, None] == sid_s[None, :], acc, 0.0)
        out = cb_ptr + ((bi * NC + c) * G + g) * Q * Q
        tl.store(out + om[:, None] * Q + os[None, :], acc, mask=(om[:, None] < Q) & (os[None, :] < Q))

    @triton.jit
    def _chunk_scan_fwd(
        x_ptr, c_ptr, cb_ptr, dt_ptr, cs_ptr, sid_ptr, st_ptr, d_ptr, y_ptr,
        L, H, G, NC, Q, P, N, HPG,
        sxb, sxl, sxh, sbb, sbl, sbg, ssb, ssl,
        HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, BKN: tl.constexpr,
    ):  # fmt: skip
        # One (BM positions, BP channels) block of a chunk's output:
        #   y[m] = exp(cs[m]) C[m] . S_in  +  sum_{s <= m} CB[m, s] exp(cs[m] - cs[s]) dt[s] x[s]  (+ D x[m])
        # the state read-out walks N in BKN slices, the causal sum walks positions in BK slices and stops
        # at the block's last row (the blocks above the diagonal are all zero).
        npb = tl.cdiv(P, BP)
        pid_bc, bi, c, g, h, pid_mp = _tile_ids(NC, HPG, tl.cdiv(Q, BM) * npb)
        m0 = (pid_mp // npb) * BM
        om = m0 + tl.arange(0, BM)
        op = (pid_mp % npb) * BP + tl.arange(0, BP)
        pos_m = c * Q + om
        vm = (om < Q) & (pos_m < L)
        base = ((bi * H + h) * NC + c) * Q
        cs_m = tl.load(cs_ptr + base + om, mask=om < Q, other=0.0)
        q = tl.where(vm, tl.exp(cs_m), 0.0)
        if HAS_SEQ:
            sid_m = tl.load(sid_ptr + bi * ssb + pos_m * ssl, mask=vm, other=-1)
            s_prev = tl.load(sid_ptr + bi * ssb + tl.maximum(c * Q - 1, 0) * ssl)
            q = tl.where(sid_m == s_prev, q, 0.0)
        acc = tl.zeros((BM, BP), dtype=tl.float32)
        st = st_ptr + (((bi * NC + c) * H + h) * P) * N
        for k0 in range(0, N, BKN):
            on = k0 + tl.arange(0, BKN)
            cv = tl.load(c_ptr + bi * sbb + pos_m[:, None] * sbl + g * sbg + on[None, :],
                         mask=vm[:, None] & (on[None, :] < N), other=0.0)
            sv = tl.load(st + op[None, :] * N + on[:, None], mask=(op[None, :] < P) & (on[:, None] < N),
                         other=0.0)  # (BKN, BP): the entering state, transposed
            acc += tl.dot(cv.to(DOT), sv.to(cv.dtype).to(DOT), input_precision=PREC)
        acc = acc * q[:, None]
        cbp = cb_ptr + ((bi * NC + c) * G + g) * Q * Q
        hi = tl.minimum(m0 + BM, Q)
        mq = om[:, None] < Q
        for k0 in range(0, hi, BK):
            os = k0 + tl.arange(0, BK)
            cs_s = tl.load(cs_ptr + base + os, mask=os < Q, other=0.0)
            dt_s = tl.load(dt_ptr + base + os, mask=os < Q, other=0.0)
            # Light masks in this inner loop (they cost registers): C B^T is 0 past L and across packed
            # sequences, x is 0 past L; only causality is applied, last, which also drops whatever the
            # unwritten anti-causal blocks hold. exp(min(., 0)): no overflow on anti-causal pairs.
            cbv = tl.load(cbp + om[:, None] * Q + os[None, :], mask=mq & (os[None, :] < Q), other=0.0)
            w = cbv * tl.exp(tl.minimum(cs_m[:, None] - cs_s[None, :], 0.0)) * dt_s[None, :]
            w = tl.where(om[:, None] >= os[None, :], w, 0.0)
            xv = tl.load(x_ptr + bi * sxb + (c * Q + os)[:, None] * sxl + h * sxh + op[None, :],
                         mask=((os < Q) & (c * Q + os < L))[:, None] & (op[None, :] < P), other=0.0)
            acc += tl.dot(w.to(xv.dtype).to(DOT), xv.to(DOT), input_precision=PREC)
        if HAS_D:
            xm = tl.load(x_ptr + bi * sxb + pos_m[:, None] * sxl + h * sxh + op[None, :],
                         mask=vm[:, None] & (op[None, :] < P), other=0.0)
            dv = tl.load(d_ptr + h * P + op, mask=op < P, other=0.0).to(tl.float32)
            acc += xm.to(tl.float32) * dv[None, :]
        tl.store(
            y_ptr + bi * sxb + pos_m[:, None] * sxl + h * sxh + op[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=vm[:, None] & (op[None, :] < P),
        )

    @triton.jit
    def _dstate_scan_bwd(
        dy_ptr, c_ptr, cs_ptr, sid_ptr, st_ptr, dfinal_ptr, out_ptr, dinit_ptr, dg_ptr,
        L, H, NC, Q, P, N, HPG,
        sxb, sxl, sxh, sbb, sbl, sbg, ssb, ssl,
        HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        # The forward state pass in reverse, one (BP, BN) block: out[c] = the gradient of the state LEAVING
        # chunk c (stored in the states' dtype), walking the chunks backwards:
        #   d_leave[c-1] = dS_direct[c] + exp(cs[c, last]) d_leave[c],  dS_direct[c] = sum_l q[l] dy[l]^T C[l]
        # (q = decay from the chunk start), and dg[c, block] = exp(cs[c, last]) <d_leave[c], S_in[c]>, this
        # block's share of d(loss)/d(cs[c, last]). The direct gradients never go to memory.
        bi, g, h, blk, nblk, op, on, mpn, soff, d = _state_block_start(dfinal_ptr, H, P, N, HPG, HAS_DFINAL, BP, BN)
        oq = tl.arange(0, BQ)
        for i in range(NC):
            c = NC - 1 - i
            off = (((bi * NC + c) * H + h) * P) * N + soff
            tl.store(out_ptr + off, d.to(out_ptr.dtype.element_ty), mask=mpn)
            s_in = tl.load(st_ptr + off, mask=mpn, other=0.0).to(tl.float32)
            base = ((bi * H + h) * NC + c) * Q
            pos = c * Q + oq
            valid = (oq < Q) & (pos < L)
            cs = tl.load(cs_ptr + base + oq, mask=oq < Q, other=0.0)
            q = tl.where(valid, tl.exp(cs), 0.0)
            gdec = tl.exp(tl.load(cs_ptr + base + Q - 1))
            if HAS_SEQ:
                # positions after the chunk's first sequence start see no entering state
                sid = tl.load(sid_ptr + bi * ssb + pos * ssl, mask=valid, other=-1)
                s_prev = tl.load(sid_ptr + bi * ssb + tl.maximum(c * Q - 1, 0) * ssl)
                s_end = tl.load(sid_ptr + bi * ssb + tl.minimum(c * Q + Q - 1, L - 1) * ssl)
                q = tl.where(sid == s_prev, q, 0.0)
                gdec = tl.where(s_end == s_prev, gdec, 0.0)
            tl.store(dg_ptr + ((bi * H + h) * NC + c) * nblk + blk, gdec * tl.sum(tl.sum(d * s_in, axis=1), axis=0))
            d = gdec * d + _chunk_outer(dy_ptr, c_ptr, q, bi, h, g, pos, valid, op, on, P, N,
                                        sxb, sxl, sxh, sbb, sbl, sbg, DOT, PREC)
        tl.store(dinit_ptr + (bi * H + h) * P * N + soff, d, mask=mpn)

    @triton.jit
    def _chunk_dx_bwd(
        x_ptr, b_ptr, cb_ptr, dt_ptr, cs_ptr, sid_ptr, ds_ptr, d_ptr, dg_ptr, dy_ptr,
        dx_ptr, ddt_ptr, dcs_ptr, dd_ptr,
        L, H, G, NC, Q, P, N, HPG,
        sxb, sxl, sxh, sbb, sbl, sbg, ssb, ssl,
        HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BS: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        # Per head, one (BS source positions, BP channels) block:
        #   u[s]  = sum_{l >= s} CB[l, s] exp(cs[l] - cs[s]) dy[l]      (intra-chunk)
        #   v[s]  = B[s] . dS_out                                        (the state the chunk leaves)
        #   dx[s] = dt[s] (u + rr[s] v) + D dy[s],  ddt[s] = x[s] . (u + rr[s] v)
        # and the parts of d(cumsum) that need neither the C B^T gradient nor C (added with atomics: P is
        # blocked; the entering state's share q[l] C[l] . (dy[l] S_in) is added by _chunk_dbc_bwd, which
        # has both at hand). dD: one partial sum per (chunk, source block), summed by the caller, as
        # every program of a head adding into the same P addresses serialises on them.
        npb = tl.cdiv(P, BP)
        pid_bc, bi, c, g, h, pid_sp = _tile_ids(NC, HPG, tl.cdiv(Q, BS) * npb)
        s0 = (pid_sp // npb) * BS
        op = (pid_sp % npb) * BP + tl.arange(0, BP)
        os = s0 + tl.arange(0, BS)
        pos_s = c * Q + os
        vs = (os < Q) & (pos_s < L)
        base = ((bi * H + h) * NC + c) * Q
        cs_s = tl.load(cs_ptr + base + os, mask=os < Q, other=0.0)
        dt_s = tl.load(dt_ptr + base + os, mask=os < Q, other=0.0)
        cs_last = tl.load(cs_ptr + base + Q - 1)
        ok_end = vs
        if HAS_SEQ:
            sid_s = tl.load(sid_ptr + bi * ssb + pos_s * ssl, mask=vs, other=-1)
            s_end = tl.load(sid_ptr + bi * ssb + tl.minimum(c * Q + Q - 1, L - 1) * ssl)
            ok_end = ok_end & (sid_s == s_end)
        rr = tl.where(ok_end, tl.exp(cs_last - cs_s), 0.0)
        mp = op[None, :] < P
        xoff = bi * sxb + pos_s[:, None] * sxl + h * sxh + op[None, :]
        mxp = vs[:, None] & mp
        # v first, then the intra-chunk sum accumulates onto rr v: one (BS, BP) fp32 accumulator live
        # through the loops instead of two (the second one spilled).
        v = tl.zeros((BS, BP), dtype=tl.float32)
        sbase = (((bi * NC + c) * H + h) * P) * N
        for n0 in range(0, N, BN):
            on = n0 + tl.arange(0, BN)
            mn = vs[:, None] & (on[None, :] < N)
            bv = tl.load(b_ptr + bi * sbb + pos_s[:, None] * sbl + g * sbg + on[None, :], mask=mn, other=0.0)
            mnp = (on[:, None] < N) & mp
            dsv = tl.load(ds_ptr + sbase + op[None, :] * N + on[:, None], mask=mnp, other=0.0)  # (BN, BP)
            v += tl.dot(bv.to(DOT), dsv.to(bv.dtype).to(DOT), input_precision=PREC)
        xv = tl.load(x_ptr + xoff, mask=mxp, other=0.0)  # loaded again after the loop: fewer live registers
        wst = rr * dt_s * tl.sum(xv.to(tl.float32) * v, axis=1)
        grad_pre = rr[:, None] * v
        cbp = cb_ptr + ((bi * NC + c) * G + g) * Q * Q
        ms = os[:, None] < Q
        for l0 in range(s0, Q, BL):
            ol = l0 + tl.arange(0, BL)
            pos_l = c * Q + ol
            cs_l = tl.load(cs_ptr + base + ol, mask=ol < Q, other=0.0)
            # C B^T read transposed, (BS, BL) = CB[l, s]; light masks as in _chunk_scan_fwd (C B^T is 0
            # past L and across packed sequences, dy is 0 past L), causality last.
            cbt = tl.load(cbp + ol[None, :] * Q + os[:, None], mask=ms & (ol[None, :] < Q), other=0.0)
            mt = cbt * tl.exp(tl.minimum(cs_l[None, :] - cs_s[:, None], 0.0))
            mt = tl.where(ol[None, :] >= os[:, None], mt, 0.0)
            dyl = tl.load(dy_ptr + bi * sxb + pos_l[:, None] * sxl + h * sxh + op[None, :],
                          mask=((ol < Q) & (pos_l < L))[:, None] & mp, other=0.0)
            grad_pre += tl.dot(mt.to(dyl.dtype).to(DOT), dyl.to(DOT), input_precision=PREC)
        xf = tl.load(x_ptr + xoff, mask=mxp, other=0.0).to(tl.float32)
        dyf = tl.load(dy_ptr + xoff, mask=mxp, other=0.0).to(tl.float32)
        dxv = dt_s[:, None] * grad_pre
        if HAS_D:
            dv = tl.load(d_ptr + h * P + op, mask=op < P, other=0.0).to(tl.float32)
            dxv += dv[None, :] * dyf
            tl.store(dd_ptr + ((pid_bc * tl.cdiv(Q, BS) + pid_sp // npb) * H + h) * P + op,
                     tl.sum(dyf * xf, axis=0), mask=op < P)
        tl.store(dx_ptr + xoff, dxv.to(dx_ptr.dtype.element_ty), mask=mxp)
        tl.atomic_add(ddt_ptr + base + os, tl.sum(xf * grad_pre, axis=1), mask=os < Q)
        dcs = -wst
        # the chunk's last position carries the decay to the chunk end of every position and dg
        last = tl.sum(wst, axis=0)
        if pid_sp == 0:
            last += tl.load(dg_ptr + (bi * H + h) * NC + c)
        tl.atomic_add(dcs_ptr + base + os, dcs, mask=os < Q)
        tl.atomic_add(dcs_ptr + base + Q - 1, last)

    @triton.jit
    def _chunk_dcb_bwd(
        x_ptr, cb_ptr, dt_ptr, cs_ptr, sid_ptr, dy_ptr, dcb_ptr, dcs_ptr,
        L, H, G, NC, Q, P, HPG,
        sxb, sxl, sxh, ssb, ssl,
        HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr,
    ):  # fmt: skip
        # Per GROUP, one (BM, BS) block on or below the diagonal of the C B^T gradient, summed over
        # the group's heads:  W_h[l, s] = exp(cs[l] - cs[s]) dt[s] (dy[l] . x[s]),  dCB = sum_h W_h.
        # Each head's d(cumsum) share through exp(cs[l] - cs[s]) (t = CB * W: +row sums, -column sums)
        # is added with atomics.
        nsb = tl.cdiv(Q, BS)
        pid_bc, bi, c, g, _, pid_ms = _tile_ids(NC, 1, tl.cdiv(Q, BM) * nsb)
        m0 = (pid_ms // nsb) * BM
        s0 = (pid_ms % nsb) * BS
        if s0 >= m0 + BM:
            return
        om = m0 + tl.arange(0, BM)
        os = s0 + tl.arange(0, BS)
        pos_m = c * Q + om
        pos_s = c * Q + os
        vm = (om < Q) & (pos_m < L)
        vs = (os < Q) & (pos_s < L)
        causal = (om[:, None] >= os[None, :]) & vm[:, None] & vs[None, :]
        if HAS_SEQ:
            sid_m = tl.load(sid_ptr + bi * ssb + pos_m * ssl, mask=vm, other=-1)
            sid_s = tl.load(sid_ptr + bi * ssb + pos_s * ssl, mask=vs, other=-2)
            causal = causal & (sid_m[:, None] == sid_s[None, :])
        cbp = cb_ptr + ((bi * NC + c) * G + g) * Q * Q
        cbv = tl.load(cbp + om[:, None] * Q + os[None, :], mask=causal, other=0.0)
        acc = tl.zeros((BM, BS), dtype=tl.float32)
        for hh in range(HPG):
            h = g * HPG + hh
            base = ((bi * H + h) * NC + c) * Q
            cs_m = tl.load(cs_ptr + base + om, mask=om < Q, other=0.0)
            cs_s = tl.load(cs_ptr + base + os, mask=os < Q, other=0.0)
            dt_s = tl.load(dt_ptr + base + os, mask=os < Q, other=0.0)
            dyx = tl.zeros((BM, BS), dtype=tl.float32)
            for p0 in range(0, P, BP):
                op = p0 + tl.arange(0, BP)
                dym = tl.load(dy_ptr + bi * sxb + pos_m[:, None] * sxl + h * sxh + op[None, :],
                              mask=vm[:, None] & (op[None, :] < P), other=0.0)
                xs_ = tl.load(x_ptr + bi * sxb + pos_s[:, None] * sxl + h * sxh + op[None, :],
                              mask=vs[:, None] & (op[None, :] < P), other=0.0)
                dyx += tl.dot(dym.to(DOT), tl.trans(xs_).to(DOT), input_precision=PREC)
            # No mask in the head loop (registers): t is causal through cbv (masked at its load), the
            # sum is masked once below; exp(min(., 0)) keeps the anti-causal entries finite.
            w = tl.exp(tl.minimum(cs_m[:, None] - cs_s[None, :], 0.0)) * dt_s[None, :] * dyx
            acc += w
            t = cbv * w
            tl.atomic_add(dcs_ptr + base + om, tl.sum(t, axis=1), mask=om < Q)
            tl.atomic_add(dcs_ptr + base + os, -tl.sum(t, axis=0), mask=os < Q)
        acc = tl.where(causal, acc, 0.0)
        out = dcb_ptr + ((bi * NC + c) * G + g) * Q * Q
        tl.store(out + om[:, None] * Q + os[None, :], acc, mask=(om[:, None] < Q) & (os[None, :] < Q))

    @triton.jit
    def _chunk_dbc_bwd(
        x_ptr, b_ptr, c_ptr, dcb_ptr, dt_ptr, cs_ptr, sid_ptr, st_ptr, ds_ptr, dy_ptr, db_ptr, dc_ptr, dcs_ptr,
        L, H, G, NC, Q, P, N, HPG,
        sxb, sxl, sxh, sbb, sbl, sbg, ssb, ssl,
        HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        # Per GROUP, one (BM positions, BN state channels) block of dB and dC, every head's share summed
        # here (no atomics on dB / dC):
        #   dC[l] = sum_h q_h[l] dy_h[l] S_in_h  +  sum_{s <= l} dCB[l, s] B[s]
        #   dB[s] = sum_h rr_h[s] dt_h[s] x_h[s] dS_out_h  +  sum_{l >= s} dCB[l, s] C[l]
        # and each head's d(cumsum) share through its entering state, C[l] . (q_h[l] dy_h[l] S_in_h),
        # added with atomics (N is blocked).
        nnb = tl.cdiv(N, BN)
        pid_bc, bi, c, g, _, pid_mn = _tile_ids(NC, 1, tl.cdiv(Q, BM) * nnb)
        m0 = (pid_mn // nnb) * BM
        om = m0 + tl.arange(0, BM)
        on = (pid_mn % nnb) * BN + tl.arange(0, BN)
        pos_m = c * Q + om
        vm = (om < Q) & (pos_m < L)
        ok_prev = vm
        ok_end = vm
        if HAS_SEQ:
            sid_m = tl.load(sid_ptr + bi * ssb + pos_m * ssl, mask=vm, other=-1)
            s_prev = tl.load(sid_ptr + bi * ssb + tl.maximum(c * Q - 1, 0) * ssl)
            s_end = tl.load(sid_ptr + bi * ssb + tl.minimum(c * Q + Q - 1, L - 1) * ssl)
            ok_prev = ok_prev & (sid_m == s_prev)
            ok_end = ok_end & (sid_m == s_end)
        acc_c = tl.zeros((BM, BN), dtype=tl.float32)
        acc_b = tl.zeros((BM, BN), dtype=tl.float32)
        gb = bi * sbb + g * sbg
        mqn = vm[:, None] & (on[None, :] < N)
        cm = tl.load(c_ptr + gb + pos_m[:, None] * sbl + on[None, :], mask=mqn, other=0.0).to(tl.float32)
        for hh in range(HPG):
            h = g * HPG + hh
            base = ((bi * H + h) * NC + c) * Q
            cs_m = tl.load(cs_ptr + base + om, mask=om < Q, other=0.0)
            dt_m = tl.load(dt_ptr + base + om, mask=om < Q, other=0.0)
            cs_last = tl.load(cs_ptr + base + Q - 1)
            q = tl.where(ok_prev, tl.exp(cs_m), 0.0)
            rrdt = tl.where(ok_end, tl.exp(cs_last - cs_m), 0.0) * dt_m
            sbase = (((bi * NC + c) * H + h) * P) * N
            t_c = tl.zeros((BM, BN), dtype=tl.float32)
            for p0 in range(0, P, BP):
                op = p0 + tl.arange(0, BP)
                mxp = vm[:, None] & (op[None, :] < P)
                xoff = bi * sxb + pos_m[:, None] * sxl + h * sxh + op[None, :]
                dym = tl.load(dy_ptr + xoff, mask=mxp, other=0.0)
                xm = tl.load(x_ptr + xoff, mask=mxp, other=0.0)
                mpn = (op[:, None] < P) & (on[None, :] < N)
                sin = tl.load(st_ptr + sbase + op[:, None] * N + on[None, :], mask=mpn, other=0.0)
                dsv = tl.load(ds_ptr + sbase + op[:, None] * N + on[None, :], mask=mpn, other=0.0)
                dyq = (dym.to(tl.float32) * q[:, None]).to(dym.dtype)
                xr = (xm.to(tl.float32) * rrdt[:, None]).to(xm.dtype)
                t_c += tl.dot(dyq.to(DOT), sin.to(dym.dtype).to(DOT), input_precision=PREC)
                acc_b += tl.dot(xr.to(DOT), dsv.to(xm.dtype).to(DOT), input_precision=PREC)
            acc_c += t_c
            tl.atomic_add(dcs_ptr + base + om, tl.sum(cm * t_c, axis=1), mask=om < Q)
        dcbp = dcb_ptr + ((bi * NC + c) * G + g) * Q * Q
        for k0 in range(0, tl.minimum(m0 + BM, Q), BK):  # dC: s <= l
            ok = k0 + tl.arange(0, BK)
            vk = (ok < Q) & (c * Q + ok < L)
            low = (om[:, None] >= ok[None, :]) & vm[:, None] & vk[None, :]
            dcbv = tl.load(dcbp + om[:, None] * Q + ok[None, :], mask=low, other=0.0)  # (BM, BK): [l, s]
            bv = tl.load(b_ptr + gb + (c * Q + ok)[:, None] * sbl + on[None, :],
                         mask=vk[:, None] & (on[None, :] < N), other=0.0)
            acc_c += tl.dot(dcbv.to(bv.dtype).to(DOT), bv.to(DOT), input_precision=PREC)
        for k0 in range(m0, Q, BK):  # dB: l >= s
            ok = k0 + tl.arange(0, BK)
            vk = (ok < Q) & (c * Q + ok < L)
            up = (ok[:, None] >= om[None, :]) & vk[:, None] & vm[None, :]
            dcbv = tl.load(dcbp + ok[:, None] * Q + om[None, :], mask=up, other=0.0)  # (BK, BM): [l, s]
            cv = tl.load(c_ptr + gb + (c * Q + ok)[:, None] * sbl + on[None, :],
                         mask=vk[:, None] & (on[None, :] < N), other=0.0)
            acc_b += tl.dot(tl.trans(dcbv.to(cv.dtype)).to(DOT), cv.to(DOT), input_precision=PREC)
        goff = gb + pos_m[:, None] * sbl + on[None, :]
        tl.store(db_ptr + goff, acc_b.to(db_ptr.dtype.element_ty), mask=mqn)
        tl.store(dc_ptr + goff, acc_c.to(dc_ptr.dtype.element_ty), mask=mqn)


def _dot_cfg(dtype: torch.dtype, dstate: int) -> dict:
    """Operand dtype / precision of the kernels' tl.dot.

    fp32 inputs use exact fp32 products (no tf32) so fp32 results match the reference tightly; the
    interpreter also gets fp32 operands because its tl.dot mis-reads bf16 ones (triton 3.x). States
    smaller than 32 also take the fp32 path: on an H100 (triton 3.6) the bf16 backward gave wrong dx
    for N = 16 while fp32 operands were correct (tests/kernels/test_ssd.py::test_gpu_grid).
    """
    if dtype == torch.float32 or triton_interpret() or dstate < 32:
        return {"DOT": tl.float32, "PREC": "ieee"}
    return {"DOT": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PREC": "tf32"}


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Forward tile sizes (upper bounds: each is clipped to the padded dimension it blocks) and launch
# settings; module-level so that scripts/bench_kernels.py --sweep can try others on a GPU.
FWD_BLOCKS: dict[str, dict[str, int]] = {
    "state": {"BP": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    "cb": {"BM": 64, "BS": 64, "BKN": 64, "num_warps": 4, "num_stages": 2},
    "scan": {"BM": 64, "BP": 64, "BK": 32, "BKN": 32, "num_warps": 4, "num_stages": 3},
}
BWD_BLOCKS: dict[str, dict[str, int]] = {
    "dstate": {"BP": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    "dx": {"BS": 128, "BP": 64, "BL": 32, "BN": 32, "num_warps": 4, "num_stages": 4},
    "dcb": {"BM": 64, "BS": 64, "BP": 64, "num_warps": 4, "num_stages": 2},
    "dbc": {"BM": 32, "BN": 128, "BP": 64, "BK": 32, "num_warps": 4, "num_stages": 2},
}
_BLOCK_DIM = {"BP": "p", "BN": "n", "BK": "q", "BM": "q", "BS": "q", "BKN": "n", "BL": "q"}


def _clip_blocks(table: dict[str, dict[str, int]], q: int, p: int, n: int) -> dict[str, dict[str, int]]:
    dims = {"q": _pow2(q), "p": _pow2(p), "n": _pow2(n)}
    return {kernel: {k: (min(v, dims[_BLOCK_DIM[k]]) if k in _BLOCK_DIM else v) for k, v in cfg.items()}
            for kernel, cfg in table.items()}


def _chunk_cb(B: torch.Tensor, C: torch.Tensor, seq_idx: torch.Tensor | None, nchunks: int, chunk_size: int,
              dot: dict, cfg: dict[str, int]) -> torch.Tensor:
    """C B^T of every chunk and group, (batch, nchunks, G, Q, Q) fp32, 0 between packed sequences; only
    blocks on or below the diagonal are written (the readers mask the rest). B, C: (batch, L, G, N) with the
    same strides."""
    bsz, seqlen, ngroups, dstate = B.shape
    cb = torch.empty(bsz, nchunks, ngroups, chunk_size, chunk_size, device=B.device, dtype=torch.float32)
    nblk = triton.cdiv(chunk_size, cfg["BM"]) * triton.cdiv(chunk_size, cfg["BS"])
    has_seq = seq_idx is not None
    ssb, ssl = (seq_idx.stride(0), seq_idx.stride(1)) if has_seq else (0, 0)
    _chunk_cb_fwd[(nblk * bsz * nchunks, ngroups)](
        C, B, seq_idx if has_seq else cb, cb, seqlen, ngroups, nchunks, chunk_size, dstate,
        B.stride(0), B.stride(1), B.stride(2), ssb, ssl, HAS_SEQ=has_seq, **dot, **cfg,
    )  # fmt: skip
    return cb


class _SSDChunkScanFn(torch.autograd.Function):
    """Core chunked scan on pre-processed inputs.

    Inputs: x (B, L, H, P), dtc (B, H, NC, Q) fp32 time steps padded to whole chunks, cs (B, H, NC, Q)
    fp32 per-chunk cumulative sum of ``dtc * A``, B/C (B, L, G, N), D (H, P) fp32 or None,
    initial_states (B, H, P, N) or None, seq_idx (B, L) int32 or None.
    Returns y (B, L, H, P) in x's dtype (with the D skip, without the z gate) and the final state fp32.
    """

    @staticmethod
    def forward(ctx, x, dtc, cs, B, C, D, initial_states, seq_idx, chunk_size):
        bsz, seqlen, nheads, headdim = x.shape
        ngroups, dstate = B.shape[2], B.shape[3]
        nchunks = dtc.shape[2]
        hpg = nheads // ngroups
        dot = _dot_cfg(x.dtype, dstate)
        has_seq = seq_idx is not None
        sid = seq_idx if has_seq else dtc  # dummy pointer when unused
        ssb, ssl = (seq_idx.stride(0), seq_idx.stride(1)) if has_seq else (0, 0)
        xs = (x.stride(0), x.stride(1), x.stride(2))
        bs = (B.stride(0), B.stride(1), B.stride(2))
        fb = _clip_blocks(FWD_BLOCKS, chunk_size, headdim, dstate)
        st_cfg, cb_cfg, sc_cfg = fb["state"], fb["cb"], fb["scan"]
        npn = triton.cdiv(headdim, st_cfg["BP"]) * triton.cdiv(dstate, st_cfg["BN"])
        final = torch.empty(bsz, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
        has_init = initial_states is not None
        # the entering states in x's dtype: in bf16/fp16 half the traffic of their three later reads
        states = torch.empty(bsz, nchunks, nheads, headdim, dstate, device=x.device, dtype=x.dtype)
        _state_scan_fwd[(npn * hpg * bsz, ngroups)](
            x, B, dtc, cs, sid, initial_states if has_init else final, states, final,
            seqlen, nheads, nchunks, chunk_size, headdim, dstate, hpg, *xs, *bs, ssb, ssl,
            HAS_INIT=has_init, HAS_SEQ=has_seq, **dot, BQ=_pow2(chunk_size), **st_cfg,
        )  # fmt: skip
        cb = _chunk_cb(B, C, seq_idx, nchunks, chunk_size, dot, cb_cfg)
        y = torch.empty_like(x)
        has_d = D is not None
        nmb = triton.cdiv(chunk_size, sc_cfg["BM"]) * triton.cdiv(headdim, sc_cfg["BP"])
        _chunk_scan_fwd[(nmb * hpg * bsz * nchunks, ngroups)](
            x, C, cb, dtc, cs, sid, states, D if has_d else dtc, y,
            seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate, hpg, *xs, *bs, ssb, ssl,
            HAS_SEQ=has_seq, HAS_D=has_d, **dot, **sc_cfg,
        )  # fmt: skip
        ctx.save_for_backward(x, dtc, cs, B, C, D, seq_idx, states)
        ctx.chunk_size = chunk_size
        ctx.has_init = has_init
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dtc, cs, B, C, D, seq_idx, states = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        bsz, seqlen, nheads, headdim = x.shape
        ngroups, dstate = B.shape[2], B.shape[3]
        nchunks = dtc.shape[2]
        hpg = nheads // ngroups
        dot = _dot_cfg(x.dtype, dstate)
        has_seq = seq_idx is not None
        sid = seq_idx if has_seq else dtc
        ssb, ssl = (seq_idx.stride(0), seq_idx.stride(1)) if has_seq else (0, 0)
        if dy is None:
            dy = torch.zeros_like(x)
        dy = dy.to(x.dtype).contiguous()
        xs = (x.stride(0), x.stride(1), x.stride(2))
        bs = (B.stride(0), B.stride(1), B.stride(2))
        bb = _clip_blocks(BWD_BLOCKS, chunk_size, headdim, dstate)
        k = bb["dstate"]
        nblk = triton.cdiv(headdim, k["BP"]) * triton.cdiv(dstate, k["BN"])
        dinit = torch.empty(bsz, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
        dg = torch.empty(bsz, nheads, nchunks, nblk, device=x.device, dtype=torch.float32)
        has_dfinal = dfinal is not None
        # bf16/fp16 inputs: the leaving-state gradients are stored in that dtype, like the states
        dstates = torch.empty_like(states)
        _dstate_scan_bwd[(nblk * hpg * bsz, ngroups)](
            dy, C, cs, sid, states, dfinal.float().contiguous() if has_dfinal else dinit, dstates, dinit, dg,
            seqlen, nheads, nchunks, chunk_size, headdim, dstate, hpg, *xs, *bs, ssb, ssl,
            HAS_DFINAL=has_dfinal, HAS_SEQ=has_seq, **dot, BQ=_pow2(chunk_size), **k,
        )  # fmt: skip
        dg = dg.sum(-1).contiguous()
        # recomputed rather than saved: ~3% of the backward, and no (B, NC, G, Q, Q) buffer kept alive
        cb = _chunk_cb(B, C, seq_idx, nchunks, chunk_size, dot,
                       _clip_blocks(FWD_BLOCKS, chunk_size, headdim, dstate)["cb"])
        dx = torch.empty_like(x)
        ddt = torch.zeros_like(dtc)
        dcs = torch.zeros_like(cs)
        has_d = D is not None
        k = bb["dx"]
        nsb = triton.cdiv(chunk_size, k["BS"])
        dd = torch.empty(bsz * nchunks, nsb, nheads, headdim, device=x.device, dtype=torch.float32) if has_d else None
        _chunk_dx_bwd[(nsb * triton.cdiv(headdim, k["BP"]) * hpg * bsz * nchunks, ngroups)](
            x, B, cb, dtc, cs, sid, dstates, D if has_d else dtc, dg, dy,
            dx, ddt, dcs, dd if has_d else dtc,
            seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate, hpg, *xs, *bs, ssb, ssl,
            HAS_SEQ=has_seq, HAS_D=has_d, **dot, **k,
        )  # fmt: skip
        k = bb["dcb"]
        dcb = torch.empty_like(cb)
        nblk = triton.cdiv(chunk_size, k["BM"]) * triton.cdiv(chunk_size, k["BS"])
        _chunk_dcb_bwd[(nblk * bsz * nchunks, ngroups)](
            x, cb, dtc, cs, sid, dy, dcb, dcs,
            seqlen, nheads, ngroups, nchunks, chunk_size, headdim, hpg, *xs, ssb, ssl,
            HAS_SEQ=has_seq, **dot, **k,
        )  # fmt: skip
        k = bb["dbc"]
        dB = torch.empty(B.shape, device=x.device, dtype=B.dtype)
        dC = torch.empty(C.shape, device=x.device, dtype=C.dtype)
        nblk = triton.cdiv(chunk_size, k["BM"]) * triton.cdiv(dstate, k["BN"])
        _chunk_dbc_bwd[(nblk * bsz * nchunks, ngroups)](
            x, B, C, dcb, dtc, cs, sid, states, dstates, dy, dB, dC, dcs,
            seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate, hpg, *xs, *bs, ssb, ssl,
            HAS_SEQ=has_seq, **dot, **k,
        )  # fmt: skip
        dD = dd.sum((0, 1)) if has_d else None
        return (
            dx, ddt, dcs, dB, dC, dD,
            dinit if ctx.has_init else None, None, None,
        )  # fmt: skip


def _ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit):
    bsz, seqlen, nheads, headdim = x.shape
    nchunks = max(1, math.ceil(seqlen / chunk_size))
    pad = nchunks * chunk_size - seqlen
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, L, H) fp32
    # Padded positions get dt = 0: no decay and no input, so chunk sums are unaffected.
    dtc = F.pad(dtp, (0, 0, 0, pad)).view(bsz, nchunks, chunk_size, nheads).permute(0, 3, 1, 2)
    dtc = dtc.contiguous()
    cs = torch.cumsum(dtc * A.float()[None, :, None, None], dim=-1)
    x_c = x.contiguous()
    if D is not None:
        D_hp = D.float()[:, None].expand(nheads, headdim) if D.dim() == 1 else D.float()
        D_hp = D_hp.contiguous()
    else:
        D_hp = None
    init = initial_states.float().contiguous() if initial_states is not None else None
    sid = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    y, final = _SSDChunkScanFn.apply(
        x_c, dtc, cs, B.contiguous(), C.contiguous().to(B.dtype), D_hp, init, sid, chunk_size
    )
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(x.dtype)
    return y, final


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    backend: str = "auto",
):
    """Mamba-2 SSD scan, drop-in for mamba-ssm's ``mamba_chunk_scan_combined``.

    Args:
        x: (B, L, H, P) inputs. dt: (B, L, H) time steps (before ``dt_bias``/softplus/clamp).
        A: (H,) decay rates (negative). B, C: (B, L, G, N) input/output projections, H % G == 0.
        chunk_size: chunk length of the SSD algorithm (any L is accepted).
        D: (H,) or (H, P) skip. z: (B, L, H, P) gate, out = y * silu(z). dt_bias: (H,).
        initial_states: (B, H, P, N) state before position 0. seq_idx: (B, L) int, non-decreasing
            along L; the state resets wherever it changes (packed sequences).
        dt_softplus, dt_limit: as mamba-ssm. return_final_states: also return the state (B, H, P, N).
        backend: "auto" | "reference" | "triton" (see ``mmfm.kernels._dispatch``).

    Returns:
        y (B, L, H, P) in x's dtype, and the final state (B, H, P, N) fp32 if ``return_final_states``.
    """
    check_tensor("x", x)
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
    available = ("triton",) if (triton is not None and triton_available()) else ()
    chosen = resolve_backend(backend, x.device, available)
    if chosen == "reference" or x.shape[1] == 0:
        return ssd_chunked_reference(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states,
        )  # fmt: skip
    y, final = _ssd_triton(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit
    )
    return (y, final) if return_final_states else y
