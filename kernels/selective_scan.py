"""Selective scan (Mamba-1 S6): PyTorch reference, Triton forward/backward, autograd, dispatch.

The recurrence, per batch ``b``, channel ``d`` and state index ``n``::

    dt[t]   = softplus(delta[t] + delta_bias)          (softplus and bias optional)
    h[t]    = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[n, t] * u[t]
    y[t]    = sum_n C[n, t] * h[t, n] + D[d] * u[t]
    out[t]  = y[t] * silu(z[t])                        (gate optional)

Semantics follow mamba-ssm's ``selective_scan_fn``: ``B``/``C`` are either input-dependent,
``(batch, N, L)`` or grouped ``(batch, G, N, L)`` with channel ``d`` reading group
``d // (D / G)``, or constant per channel ``(D, N)``. Math is fp32 whatever the input dtype; the
output has ``u``'s dtype and the last state is fp32.

The Triton kernels keep a ``(BLOCK_D, N)`` state in registers. Two algorithms (see ``_launch_config``):

* ``seq``: step through time one step at a time (each (d, n) chain is thread-local; the next step's
  loads are issued before the current step's arithmetic). Default forward.
* ``scan``: walk the sequence in chunks of ``BLOCK_L`` steps; inside a chunk the linear recurrence is
  an associative scan over pairs ``(a, b)`` meaning ``h -> a * h + b``. Default backward.

The CUDA C++ kernels (``kernels/csrc``, optional, built by ``python -m mmfm.kernels.build``) parallelise over
time as well: one thread block per (batch, channel), NI steps per thread, a block-wide scan of the pairs
per state (see the header of ``csrc/selective_scan.cuh``). ``backend="auto"`` prefers them for
input-dependent B/C once built.

The Triton forward saves the state at every ``BLOCK_L``-step boundary (only when a gradient is needed) so
the backward can recompute each chunk's states and run the adjoint recurrence
``lambda[t] = C[t] dy[t] + exp(dt[t+1] A) lambda[t+1]`` (a reverse scan, or a reverse loop for ``seq``).
Gradients of input-dependent B/C are summed over channel blocks with fp32 atomics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmfm.kernels._checks import check_dtype, check_rank, check_same_device, check_shape, check_tensor
from mmfm.kernels._dispatch import resolve_backend, triton_available

__all__ = ["selective_scan", "selective_scan_ref"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------------
def _expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, G, N, L) -> (batch, D, N, L): channel d reads group d // (D // G)."""
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Readable fp32 selective scan, a plain loop over time. Shapes as :func:`selective_scan`."""
    dtype_in = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    batch, dim, seqlen = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = B.float(), C.float()
    # (batch, N, L) is one group; (D, N) is constant over batch and time
    B = B[:, None] if B.dim() == 3 else B
    C = C[:, None] if C.dim() == 3 else C
    B_var, C_var = B.dim() == 4, C.dim() == 4
    if B_var:
        B = _expand_groups(B, dim)  # (batch, D, N, L)
    if C_var:
        C = _expand_groups(C, dim)
    h = (
        torch.zeros(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
        if initial_state is None
        else initial_state.float().clone()
    )
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]  # (batch, D, 1)
        b_t = B[:, :, :, t] if B_var else B[None]  # (batch|1, D, N)
        c_t = C[:, :, :, t] if C_var else C[None]
        h = torch.exp(dt * A) * h + dt * b_t * u[:, :, t, None]
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1) if seqlen > 0 else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional; the reference always works
    triton = None

if triton is not None:
    # Only builtins and our own jit helpers inside kernels: triton.language's own jit functions (tl.sum,
    # tl.sigmoid, tl.zeros) are compiled or interpreted depending on TRITON_INTERPRET at the time triton
    # was imported, so they break the CPU interpreter when that variable was set later.
    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _linrec_combine(a1, b1, a2, b2):
        # (a, b) is the map h -> a * h + b; element 2 is applied after element 1.
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(x):
        # log1p(exp(x)) without torch's log1p: Goldberg's trick keeps full precision for small exp(x).
        e = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + e
        lp = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
        return tl.where(x > 20.0, x, lp)

    @triton.jit
    def _load_dt(
        dt_base, offs_d, offs_l, mask, s_d, s_l, bias, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr
    ):
        """Load a (BLOCK_D, BLOCK_L) tile of delta -> (raw pre-softplus value, dt); dt is 0 where masked."""
        raw = tl.load(dt_base + offs_d[:, None] * s_d + offs_l[None, :] * s_l, mask=mask, other=0.0).to(
            tl.float32
        )
        if HAS_DBIAS:
            raw = raw + bias[:, None]
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        # masked steps become the identity map (a = exp(0) = 1, b = 0)
        dt = tl.where(mask, dt, 0.0)
        return raw, dt

    @triton.jit
    def _selective_scan_fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr,
        out_ptr, hlast_ptr, hsave_ptr,
        dim, dstate, seqlen, group_size_b, group_size_c, n_chunks,
        s_u_b, s_u_d, s_u_l,
        s_dt_b, s_dt_d, s_dt_l,
        s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_n, s_B_l,
        s_C_b, s_C_g, s_C_n, s_C_l,
        s_z_b, s_z_d, s_z_l,
        s_o_b, s_o_d, s_o_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_L)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        mask_dn = mask_d[:, None] & mask_n[None, :]
        # the whole block reads one group of B/C (the wrapper makes BLOCK_D divide the group size)
        g_b = (pid_d * BLOCK_D) // group_size_b
        g_c = (pid_d * BLOCK_D) // group_size_c

        A2 = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
        A2 = A2.to(tl.float32) * 1.4426950408889634  # exp(dt * A) == exp2(dt * A * log2(e))
        bias = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_DBIAS:
            bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        Dv = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if not B_VAR:
            Bk = tl.load(B_ptr + offs_d[:, None] * s_B_g + offs_n[None, :] * s_B_n, mask=mask_dn, other=0.0)
            Bk = Bk.to(tl.float32)
        if not C_VAR:
            Ck = tl.load(C_ptr + offs_d[:, None] * s_C_g + offs_n[None, :] * s_C_n, mask=mask_dn, other=0.0)
            Ck = Ck.to(tl.float32)
        state_offs = pid_b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
        if HAS_H0:
            h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            h = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)

        u_base = u_ptr + pid_b * s_u_b
        dt_base = dt_ptr + pid_b * s_dt_b
        B_base = B_ptr + pid_b * s_B_b + g_b * s_B_g
        C_base = C_ptr + pid_b * s_C_b + g_c * s_C_g
        for chunk in range(0, n_chunks):
            offs_l = chunk * BLOCK_L + offs_c
            mask_l = offs_l < seqlen
            mask_dl = mask_d[:, None] & mask_l[None, :]
            u = tl.load(u_base + offs_d[:, None] * s_u_d + offs_l[None, :] * s_u_l, mask=mask_dl, other=0.0)
            u = u.to(tl.float32)
            _, dt = _load_dt(dt_base, offs_d, offs_l, mask_dl, s_dt_d, s_dt_l, bias, HAS_DBIAS, SOFTPLUS)
            a = tl.exp2(dt[:, None, :] * A2[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
            dtu = dt * u
            mask_nl = mask_n[:, None] & mask_l[None, :]
            if B_VAR:
                Bt = tl.load(
                    B_base + offs_n[:, None] * s_B_n + offs_l[None, :] * s_B_l, mask=mask_nl, other=0.0
                )
                b = dtu[:, None, :] * Bt.to(tl.float32)[None, :, :]
            else:
                b = dtu[:, None, :] * Bk[:, :, None]
            cum_a, h_loc = tl.associative_scan((a, b), 2, _linrec_combine)
            hs = cum_a * h[:, :, None] + h_loc  # states of every step of the chunk
            if C_VAR:
                Ct = tl.load(
                    C_base + offs_n[:, None] * s_C_n + offs_l[None, :] * s_C_l, mask=mask_nl, other=0.0
                )
                y = _sum(hs * Ct.to(tl.float32)[None, :, :], axis=1)
            else:
                y = _sum(hs * Ck[:, :, None], axis=1)
            # masked tail steps are identity maps, so the last column is the state after the chunk
            h = _sum(tl.where(offs_c[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
            if SAVE_STATES:
                tl.store(
                    hsave_ptr
                    + (pid_b * dim * n_chunks + offs_d[:, None] * n_chunks + chunk) * dstate
                    + offs_n[None, :],
                    h,
                    mask=mask_dn,
                )
            y = y + Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(
                    z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d + offs_l[None, :] * s_z_l,
                    mask=mask_dl,
                    other=0.0,
                ).to(tl.float32)
                y = y * zt * _sigmoid(zt)
            o_ptrs = out_ptr + pid_b * s_o_b + offs_d[:, None] * s_o_d + offs_l[None, :] * s_o_l
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_dl)
        tl.store(hlast_ptr + state_offs, h, mask=mask_dn)

    @triton.jit
    def _selective_scan_bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, hsave_ptr,
        dout_ptr, dhlast_ptr,
        du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr, dh0_ptr,
        dim, dstate, seqlen, group_size_b, group_size_c, n_chunks,
        s_u_b, s_u_d, s_u_l,
        s_dt_b, s_dt_d, s_dt_l,
        s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_n, s_B_l,
        s_C_b, s_C_g, s_C_n, s_C_l,
        s_z_b, s_z_d, s_z_l,
        s_do_b, s_do_d, s_do_l,
        s_g_b, s_g_d, s_g_l,
        s_dB_b, s_dB_g, s_dB_n, s_dB_l,
        s_dC_b, s_dC_g, s_dC_n, s_dC_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHLAST: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_L)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        mask_dn = mask_d[:, None] & mask_n[None, :]
        g_b = (pid_d * BLOCK_D) // group_size_b
        g_c = (pid_d * BLOCK_D) // group_size_c

        A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
        A = A.to(tl.float32)
        A2 = A * 1.4426950408889634
        bias = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_DBIAS:
            bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        Dv = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if not B_VAR:
            Bk = tl.load(B_ptr + offs_d[:, None] * s_B_g + offs_n[None, :] * s_B_n, mask=mask_dn, other=0.0)
            Bk = Bk.to(tl.float32)
        if not C_VAR:
            Ck = tl.load(C_ptr + offs_d[:, None] * s_C_g + offs_n[None, :] * s_C_n, mask=mask_dn, other=0.0)
            Ck = Ck.to(tl.float32)
        state_offs = pid_b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
        # lam: gradient w.r.t. the state after the current position, carried backwards across chunks
        if HAS_DHLAST:
            lam = tl.load(dhlast_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            lam = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dA_acc = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dBk_acc = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dCk_acc = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dD_acc = tl.full([BLOCK_D], 0.0, tl.float32)
        dbias_acc = tl.full([BLOCK_D], 0.0, tl.float32)

        u_base = u_ptr + pid_b * s_u_b
        dt_base = dt_ptr + pid_b * s_dt_b
        B_base = B_ptr + pid_b * s_B_b + g_b * s_B_g
        C_base = C_ptr + pid_b * s_C_b + g_c * s_C_g
        dB_base = dB_ptr + pid_b * s_dB_b + g_b * s_dB_g
        dC_base = dC_ptr + pid_b * s_dC_b + g_c * s_dC_g
        for rev in range(0, n_chunks):
            chunk = n_chunks - 1 - rev
            offs_l = chunk * BLOCK_L + offs_c
            mask_l = offs_l < seqlen
            mask_dl = mask_d[:, None] & mask_l[None, :]
            mask_nl = mask_n[:, None] & mask_l[None, :]
            u = tl.load(u_base + offs_d[:, None] * s_u_d + offs_l[None, :] * s_u_l, mask=mask_dl, other=0.0)
            u = u.to(tl.float32)
            g_offs = offs_d[:, None] * s_g_d + offs_l[None, :] * s_g_l  # du, ddelta, dz are contiguous
            raw, dt = _load_dt(dt_base, offs_d, offs_l, mask_dl, s_dt_d, s_dt_l, bias, HAS_DBIAS, SOFTPLUS)
            # dt of the next step drives lam[t] = C[t] dy[t] + exp(dt[t+1] A) lam[t+1]; past the end it is 0,
            # so the last step receives the gradient of the returned last state unchanged.
            mask_next = mask_d[:, None] & (offs_l[None, :] + 1 < seqlen)
            _, dt_next = _load_dt(
                dt_base, offs_d, offs_l + 1, mask_next, s_dt_d, s_dt_l, bias, HAS_DBIAS, SOFTPLUS
            )
            if chunk > 0:
                h = tl.load(
                    hsave_ptr
                    + (pid_b * dim * n_chunks + offs_d[:, None] * n_chunks + chunk - 1) * dstate
                    + offs_n[None, :],
                    mask=mask_dn,
                    other=0.0,
                )
            elif HAS_H0:
                h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
            else:
                h = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)

            # recompute the chunk's states
            a = tl.exp2(dt[:, None, :] * A2[:, :, None])
            dtu = dt * u
            if B_VAR:
                Bt = tl.load(
                    B_base + offs_n[:, None] * s_B_n + offs_l[None, :] * s_B_l, mask=mask_nl, other=0.0
                )
                Bt = Bt.to(tl.float32)[None, :, :]
            else:
                Bt = Bk[:, :, None]
            b = dtu[:, None, :] * Bt
            cum_a, h_loc = tl.associative_scan((a, b), 2, _linrec_combine)
            hs = cum_a * h[:, :, None] + h_loc
            if C_VAR:
                Ct = tl.load(
                    C_base + offs_n[:, None] * s_C_n + offs_l[None, :] * s_C_l, mask=mask_nl, other=0.0
                )
                Ct = Ct.to(tl.float32)[None, :, :]
            else:
                Ct = Ck[:, :, None]

            dout = tl.load(
                dout_ptr + pid_b * s_do_b + offs_d[:, None] * s_do_d + offs_l[None, :] * s_do_l,
                mask=mask_dl,
                other=0.0,
            ).to(tl.float32)
            if HAS_Z:
                z_offs = pid_b * s_z_b + offs_d[:, None] * s_z_d + offs_l[None, :] * s_z_l
                zt = tl.load(z_ptr + z_offs, mask=mask_dl, other=0.0).to(tl.float32)
                sig = _sigmoid(zt)
                y = _sum(hs * Ct, axis=1) + Dv[:, None] * u
                dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
                tl.store(dz_ptr + pid_b * s_g_b + g_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask_dl)
                dy = dout * zt * sig
            else:
                dy = dout

            # adjoint recurrence as a reverse scan, then add the carry from the later chunks
            a_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
            p, s = tl.associative_scan((a_next, Ct * dy[:, None, :]), 2, _linrec_combine, reverse=True)
            lam_all = s + p * lam[:, :, None]
            lam = _sum(tl.where(offs_c[None, None, :] == 0, lam_all, 0.0), axis=2)

            # a[t] * h[t-1] == h[t] - b[t]: avoids shifting the states by one step
            lam_ah = lam_all * (hs - b)
            ddt = _sum(lam_ah * A[:, :, None] + lam_all * Bt * u[:, None, :], axis=1)
            du = dt * _sum(lam_all * Bt, axis=1) + Dv[:, None] * dy
            dA_acc += _sum(lam_ah * dt[:, None, :], axis=2)
            dD_acc += _sum(dy * u, axis=1)
            if B_VAR:
                dBt = _sum(lam_all * dtu[:, None, :], axis=0)
                tl.atomic_add(
                    dB_base + offs_n[:, None] * s_dB_n + offs_l[None, :] * s_dB_l, dBt, mask=mask_nl
                )
            else:
                dBk_acc += _sum(lam_all * dtu[:, None, :], axis=2)
            if C_VAR:
                dCt = _sum(hs * dy[:, None, :], axis=0)
                tl.atomic_add(
                    dC_base + offs_n[:, None] * s_dC_n + offs_l[None, :] * s_dC_l, dCt, mask=mask_nl
                )
            else:
                dCk_acc += _sum(hs * dy[:, None, :], axis=2)
            if SOFTPLUS:
                ddt = ddt * _sigmoid(raw)
            ddt = tl.where(mask_dl, ddt, 0.0)
            dbias_acc += _sum(ddt, axis=1)
            tl.store(ddt_ptr + pid_b * s_g_b + g_offs, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_dl)
            tl.store(du_ptr + pid_b * s_g_b + g_offs, du.to(du_ptr.dtype.element_ty), mask=mask_dl)

        # per-batch partial sums of the parameter gradients (reduced over batch by the caller)
        tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
        if not B_VAR:
            tl.store(dB_ptr + state_offs, dBk_acc, mask=mask_dn)
        if not C_VAR:
            tl.store(dC_ptr + state_offs, dCk_acc, mask=mask_dn)
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
        tl.store(ddbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)
        # gradient of the initial state: d h[-1] = exp(dt[0] A) lam[0]
        mask_first = mask_d[:, None] & (offs_c[None, :] == 0) & (seqlen > 0)
        _, dt0 = _load_dt(dt_base, offs_d, offs_c, mask_first, s_dt_d, s_dt_l, bias, HAS_DBIAS, SOFTPLUS)
        dt0 = _sum(dt0, axis=1)
        tl.store(dh0_ptr + state_offs, tl.exp2(dt0[:, None] * A2) * lam, mask=mask_dn)


if triton is not None:

    @triton.jit
    def _load_dt_step(
        dt_base, offs_d, t, mask_d, s_d, s_l, bias, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr
    ):
        """delta at one time step for a block of channels -> (raw pre-softplus value, dt)."""
        raw = tl.load(dt_base + offs_d * s_d + t * s_l, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_DBIAS:
            raw = raw + bias
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        return raw, dt

    @triton.jit
    def _selective_scan_fwd_seq_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr,
        out_ptr, hlast_ptr, hsave_ptr,
        dim, dstate, seqlen, group_size_b, group_size_c, n_chunks,
        s_u_b, s_u_d, s_u_l,
        s_dt_b, s_dt_d, s_dt_l,
        s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_n, s_B_l,
        s_C_b, s_C_g, s_C_n, s_C_l,
        s_z_b, s_z_d, s_z_l,
        s_o_b, s_o_d, s_o_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        """One step at a time: each (channel, state) chain is a thread-local recurrence, so there is no
        cross-thread scan; the many independent chains of a program hide the latency of the loads."""
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        mask_dn = mask_d[:, None] & mask_n[None, :]
        g_b = (pid_d * BLOCK_D) // group_size_b
        g_c = (pid_d * BLOCK_D) // group_size_c
        A2 = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
        A2 = A2.to(tl.float32) * 1.4426950408889634
        bias = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_DBIAS:
            bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        Dv = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if not B_VAR:
            Bk = tl.load(B_ptr + offs_d[:, None] * s_B_g + offs_n[None, :] * s_B_n, mask=mask_dn, other=0.0)
            Bk = Bk.to(tl.float32)
        if not C_VAR:
            Ck = tl.load(C_ptr + offs_d[:, None] * s_C_g + offs_n[None, :] * s_C_n, mask=mask_dn, other=0.0)
            Ck = Ck.to(tl.float32)
        state_offs = pid_b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
        if HAS_H0:
            h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            h = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        u_base = u_ptr + pid_b * s_u_b + offs_d * s_u_d
        dt_base = dt_ptr + pid_b * s_dt_b
        B_base = B_ptr + pid_b * s_B_b + g_b * s_B_g + offs_n * s_B_n
        C_base = C_ptr + pid_b * s_C_b + g_c * s_C_g + offs_n * s_C_n
        z_base = z_ptr + pid_b * s_z_b + offs_d * s_z_d
        o_base = out_ptr + pid_b * s_o_b + offs_d * s_o_d
        save_base = (
            hsave_ptr + (pid_b * dim * n_chunks + offs_d[:, None] * n_chunks) * dstate + offs_n[None, :]
        )
        dt_ptrs = dt_base + offs_d * s_dt_d
        if PREFETCH:  # loads of step t+1 are issued before step t's arithmetic
            nu = tl.load(u_base, mask=mask_d, other=0.0)
            ndt = tl.load(dt_ptrs, mask=mask_d, other=0.0)
            if B_VAR:
                nB = tl.load(B_base, mask=mask_n, other=0.0)
            if C_VAR:
                nC = tl.load(C_base, mask=mask_n, other=0.0)
            if HAS_Z:
                nz = tl.load(z_base, mask=mask_d, other=0.0)
        for t in range(0, seqlen):
            if PREFETCH:
                u_raw, dt_raw = nu, ndt
                if B_VAR:
                    B_raw = nB
                if C_VAR:
                    C_raw = nC
                if HAS_Z:
                    z_raw = nz
                nxt = t + 1 < seqlen
                nu = tl.load(u_base + (t + 1) * s_u_l, mask=mask_d & nxt, other=0.0)
                ndt = tl.load(dt_ptrs + (t + 1) * s_dt_l, mask=mask_d & nxt, other=0.0)
                if B_VAR:
                    nB = tl.load(B_base + (t + 1) * s_B_l, mask=mask_n & nxt, other=0.0)
                if C_VAR:
                    nC = tl.load(C_base + (t + 1) * s_C_l, mask=mask_n & nxt, other=0.0)
                if HAS_Z:
                    nz = tl.load(z_base + (t + 1) * s_z_l, mask=mask_d & nxt, other=0.0)
            else:
                u_raw = tl.load(u_base + t * s_u_l, mask=mask_d, other=0.0)
                dt_raw = tl.load(dt_ptrs + t * s_dt_l, mask=mask_d, other=0.0)
                if B_VAR:
                    B_raw = tl.load(B_base + t * s_B_l, mask=mask_n, other=0.0)
                if C_VAR:
                    C_raw = tl.load(C_base + t * s_C_l, mask=mask_n, other=0.0)
                if HAS_Z:
                    z_raw = tl.load(z_base + t * s_z_l, mask=mask_d, other=0.0)
            u = u_raw.to(tl.float32)
            dt = dt_raw.to(tl.float32)
            if HAS_DBIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            a = tl.exp2(dt[:, None] * A2)
            if B_VAR:
                Bt = B_raw.to(tl.float32)[None, :]
            else:
                Bt = Bk
            h = a * h + (dt * u)[:, None] * Bt
            if C_VAR:
                Ct = C_raw.to(tl.float32)[None, :]
            else:
                Ct = Ck
            y = _sum(h * Ct, 1) + Dv * u
            if HAS_Z:
                zt = z_raw.to(tl.float32)
                y = y * zt * _sigmoid(zt)
            tl.store(o_base + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)
            if SAVE_STATES:
                if t % BLOCK_L == BLOCK_L - 1:
                    tl.store(save_base + (t // BLOCK_L) * dstate, h, mask=mask_dn)
        tl.store(hlast_ptr + state_offs, h, mask=mask_dn)

    @triton.jit
    def _selective_scan_bwd_seq_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, hsave_ptr,
        dout_ptr, dhlast_ptr, scratch_ptr,
        du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr, dh0_ptr,
        dim, dstate, seqlen, group_size_b, group_size_c, n_chunks,
        s_u_b, s_u_d, s_u_l,
        s_dt_b, s_dt_d, s_dt_l,
        s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_n, s_B_l,
        s_C_b, s_C_g, s_C_n, s_C_l,
        s_z_b, s_z_d, s_z_l,
        s_do_b, s_do_d, s_do_l,
        s_g_b, s_g_d, s_g_l,
        s_dB_b, s_dB_g, s_dB_n, s_dB_l,
        s_dC_b, s_dC_g, s_dC_n, s_dC_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHLAST: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Chunks in reverse; each chunk recomputes its states step by step into a per-program scratch
        (from the state saved by the forward), then walks back through it with the adjoint recurrence."""
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        mask_dn = mask_d[:, None] & mask_n[None, :]
        g_b = (pid_d * BLOCK_D) // group_size_b
        g_c = (pid_d * BLOCK_D) // group_size_c
        A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
        A = A.to(tl.float32)
        A2 = A * 1.4426950408889634
        bias = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_DBIAS:
            bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        Dv = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if not B_VAR:
            Bk = tl.load(B_ptr + offs_d[:, None] * s_B_g + offs_n[None, :] * s_B_n, mask=mask_dn, other=0.0)
            Bk = Bk.to(tl.float32)
        if not C_VAR:
            Ck = tl.load(C_ptr + offs_d[:, None] * s_C_g + offs_n[None, :] * s_C_n, mask=mask_dn, other=0.0)
            Ck = Ck.to(tl.float32)
        state_offs = pid_b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
        if HAS_DHLAST:
            lam = tl.load(dhlast_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            lam = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        if HAS_H0:
            h_init = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            h_init = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        a_next = tl.full([BLOCK_D, BLOCK_N], 1.0, tl.float32)  # exp(dt[t+1] A); 1 past the end
        dA_acc = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dBk_acc = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dCk_acc = tl.full([BLOCK_D, BLOCK_N], 0.0, tl.float32)
        dD_acc = tl.full([BLOCK_D], 0.0, tl.float32)
        dbias_acc = tl.full([BLOCK_D], 0.0, tl.float32)

        u_base = u_ptr + pid_b * s_u_b + offs_d * s_u_d
        dt_base = dt_ptr + pid_b * s_dt_b
        B_base = B_ptr + pid_b * s_B_b + g_b * s_B_g + offs_n * s_B_n
        C_base = C_ptr + pid_b * s_C_b + g_c * s_C_g + offs_n * s_C_n
        z_base = z_ptr + pid_b * s_z_b + offs_d * s_z_d
        do_base = dout_ptr + pid_b * s_do_b + offs_d * s_do_d
        g_base = pid_b * s_g_b + offs_d * s_g_d
        dB_base = dB_ptr + pid_b * s_dB_b + g_b * s_dB_g + offs_n * s_dB_n
        dC_base = dC_ptr + pid_b * s_dC_b + g_c * s_dC_g + offs_n * s_dC_n
        save_base = (
            hsave_ptr + (pid_b * dim * n_chunks + offs_d[:, None] * n_chunks) * dstate + offs_n[None, :]
        )
        # per-program scratch of BLOCK_L states, laid out (BLOCK_L, BLOCK_D, BLOCK_N)
        prog = pid_b * tl.num_programs(0) + pid_d
        sc_tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
        sc_base = scratch_ptr + prog * (BLOCK_L * BLOCK_D * BLOCK_N) + sc_tile
        for rev in range(0, n_chunks):
            chunk = n_chunks - 1 - rev
            l0 = chunk * BLOCK_L
            l1 = tl.minimum(l0 + BLOCK_L, seqlen)
            if chunk > 0:
                h_start = tl.load(save_base + (chunk - 1) * dstate, mask=mask_dn, other=0.0)
            else:
                h_start = h_init
            h = h_start
            for t in range(l0, l1):  # recompute the chunk's states
                u = tl.load(u_base + t * s_u_l, mask=mask_d, other=0.0).to(tl.float32)
                _, dt = _load_dt_step(dt_base, offs_d, t, mask_d, s_dt_d, s_dt_l, bias, HAS_DBIAS, SOFTPLUS)
                if B_VAR:
                    Bt = tl.load(B_base + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Bt = Bk
                h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt
                tl.store(sc_base + (t - l0) * (BLOCK_D * BLOCK_N), h)
            tl.debug_barrier()
            for i in range(0, l1 - l0):
                t = l1 - 1 - i
                h_t = tl.load(sc_base + (t - l0) * (BLOCK_D * BLOCK_N))
                h_prev = tl.load(sc_base + tl.maximum(t - l0 - 1, 0) * (BLOCK_D * BLOCK_N))
                h_prev = tl.where(t > l0, h_prev, h_start)
                u = tl.load(u_base + t * s_u_l, mask=mask_d, other=0.0).to(tl.float32)
                raw, dt = _load_dt_step(dt_base, offs_d, t, mask_d, s_dt_d, s_dt_l, bias, HAS_DBIAS, SOFTPLUS)
                if B_VAR:
                    Bt = tl.load(B_base + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Bt = Bk
                if C_VAR:
                    Ct = tl.load(C_base + t * s_C_l, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Ct = Ck
                dout = tl.load(do_base + t * s_do_l, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_base + t * s_z_l, mask=mask_d, other=0.0).to(tl.float32)
                    sig = _sigmoid(zt)
                    y = _sum(h_t * Ct, 1) + Dv * u
                    dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
                    tl.store(dz_ptr + g_base + t * s_g_l, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                    dy = dout * zt * sig
                else:
                    dy = dout
                a = tl.exp2(dt[:, None] * A2)
                lam = a_next * lam + Ct * dy[:, None]
                a_next = a
                lam_ah = lam * a * h_prev
                dtu = dt * u
                ddt = _sum(lam_ah * A + lam * Bt * u[:, None], 1)
                du = dt * _sum(lam * Bt, 1) + Dv * dy
                dA_acc += lam_ah * dt[:, None]
                dD_acc += dy * u
                if B_VAR:
                    tl.atomic_add(dB_base + t * s_dB_l, _sum(lam * dtu[:, None], 0), mask=mask_n)
                else:
                    dBk_acc += lam * dtu[:, None]
                if C_VAR:
                    tl.atomic_add(dC_base + t * s_dC_l, _sum(h_t * dy[:, None], 0), mask=mask_n)
                else:
                    dCk_acc += h_t * dy[:, None]
                if SOFTPLUS:
                    ddt = ddt * _sigmoid(raw)
                ddt = tl.where(mask_d, ddt, 0.0)
                dbias_acc += ddt
                tl.store(ddt_ptr + g_base + t * s_g_l, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
                tl.store(du_ptr + g_base + t * s_g_l, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.debug_barrier()  # the next chunk overwrites the scratch

        tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
        if not B_VAR:
            tl.store(dB_ptr + state_offs, dBk_acc, mask=mask_dn)
        if not C_VAR:
            tl.store(dC_ptr + state_offs, dCk_acc, mask=mask_dn)
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
        tl.store(ddbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)
        tl.store(dh0_ptr + state_offs, a_next * lam, mask=mask_dn)


# --------------------------------------------------------------------------------------------------
# Launch helpers and autograd
# --------------------------------------------------------------------------------------------------
def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _largest_pow2_divisor(x: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and x % (p * 2) == 0:
        p *= 2
    return p


def _scan_blocks(dstate: int, seqlen: int, dim: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps) for the chunked-scan kernels: a (BLOCK_D, N, BLOCK_L) fp32 tile of
    about 4096 elements (1024 under the interpreter, with short chunks so tests cross chunk borders)."""
    block_n = _next_pow2(dstate)
    budget, max_l, max_d, num_warps = (1024, 16, 4, 1) if interpret else (4096, 32, 32, 4)
    block_l = max(2, min(max_l, _next_pow2(seqlen), max(_pow2_floor(budget // block_n), 8)))
    block_d = max(1, min(max_d, budget // (block_n * block_l), _next_pow2(dim)))
    return block_d, block_l, num_warps


def _seq_blocks(dstate: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for the step-by-step kernels: ~128-256 independent chains per program."""
    if interpret:
        return 4, 1
    block_n = _next_pow2(dstate)
    block_d = max(1, min(8, 256 // block_n))
    return block_d, max(1, min(4, block_d * block_n // 256))


def _launch_config(
    batch: int,
    dim: int,
    dstate: int,
    seqlen: int,
    group_size: int,
    interpret: bool,
    override: dict | None = None,
) -> dict:
    """Pick the algorithms and block sizes of the forward and backward kernels.

    ``"seq"``: each program owns a (BLOCK_D, N) block of independent recurrences and steps through
    time. ``"scan"``: each program loads (BLOCK_D, N, BLOCK_L) tiles and runs an associative scan over
    L inside the tile. Defaults (fastest on an H100, see BENCHMARKS.md): forward "seq" with prefetch,
    backward "scan". Both save/read the state at the end of every BLOCK_L steps, so they mix freely.
    BLOCK_D must divide the group size so that one program reads a single group of B/C.
    ``override`` keys: algo (both passes), bwd_algo, prefetch, block_d, block_l, num_warps,
    bwd_block_d, bwd_num_warps.
    """
    override = override or {}
    fwd_algo = override.get("algo", "seq")
    bwd_algo = override.get("bwd_algo", override.get("algo", "scan"))
    for key, algo in (("algo", fwd_algo), ("bwd_algo", bwd_algo)):
        if algo not in ("seq", "scan"):
            raise ValueError(f"_config[{key!r}] must be 'seq' or 'scan', got {algo!r}")
    scan_d, scan_l, scan_w = _scan_blocks(dstate, seqlen, dim, interpret)
    seq_d, seq_w = _seq_blocks(dstate, interpret)
    if "scan" in (fwd_algo, bwd_algo):
        block_l = scan_l
    else:
        block_l = max(2, min(8 if interpret else 64, _next_pow2(seqlen)))
    block_l = override.get("block_l") or block_l
    fwd_d, fwd_w = (seq_d, seq_w) if fwd_algo == "seq" else (scan_d, scan_w)
    bwd_d, bwd_w = (seq_d, seq_w) if bwd_algo == "seq" else (scan_d, scan_w)
    block_d = _largest_pow2_divisor(group_size, override.get("block_d") or fwd_d)
    # the backward may use other channel blocks / warps, but chunks L like the forward (saved states)
    bwd_block_d = _largest_pow2_divisor(group_size, override.get("bwd_block_d") or bwd_d)
    return dict(
        ALGO=fwd_algo,
        BWD_ALGO=bwd_algo,
        PREFETCH=bool(override.get("prefetch", True)),
        BLOCK_N=_next_pow2(dstate),
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=override.get("num_warps", fwd_w),
        BWD_BLOCK_D=bwd_block_d,
        BWD_num_warps=override.get("bwd_num_warps", override.get("num_warps", bwd_w)),
    )


def _var_strides(t: torch.Tensor, var: bool) -> tuple[int, int, int, int]:
    """Strides as (batch, group, n, l) for input-dependent B/C; (0, d, n, 0) for constant ones."""
    return tuple(t.stride()) if var else (0, t.stride(0), t.stride(1), 0)


def _as_grouped(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t  # (batch, N, L) -> (batch, 1, N, L)


def _lastdim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    # the kernels handle any strides, but coalesced loads need unit stride along L
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _group_size(t: torch.Tensor, dim: int) -> int:
    return dim // t.shape[1] if t.dim() == 4 else dim


def _check_kernel_mode(kernel, device: torch.device) -> None:
    """Triton decides at import time whether kernels are compiled or interpreted: say so clearly."""
    if device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "the Triton kernels were built for the GPU; set TRITON_INTERPRET=1 before importing "
            "mmfm.kernels to run them on the CPU, or use backend='reference'"
        )


def _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, h0, softplus, save_states, override=None):
    from mmfm.kernels._dispatch import triton_interpret

    _check_kernel_mode(_selective_scan_fwd_kernel, u.device)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    Bg, Cg = _as_grouped(B), _as_grouped(C)
    b_var, c_var = Bg.dim() == 4, Cg.dim() == 4
    gs_b, gs_c = _group_size(Bg, dim), _group_size(Cg, dim)
    cfg = _launch_config(batch, dim, dstate, seqlen, math.gcd(gs_b, gs_c), triton_interpret(), override)
    n_chunks = triton.cdiv(seqlen, cfg["BLOCK_L"])
    out = torch.empty(batch, dim, seqlen, device=u.device, dtype=u.dtype)
    hlast = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
    hsave = (
        torch.empty(batch, dim, n_chunks, dstate, device=u.device, dtype=torch.float32)
        if save_states
        else hlast
    )
    zz = z if z is not None else u
    grid = (triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    if cfg["ALGO"] == "seq":
        kernel, extra = _selective_scan_fwd_seq_kernel, dict(PREFETCH=cfg["PREFETCH"])
    else:
        kernel, extra = _selective_scan_fwd_kernel, {}
    kernel[grid](
        u, delta, A, Bg, Cg,
        D if D is not None else u, zz, delta_bias if delta_bias is not None else u, h0 if h0 is not None else u,
        out, hlast, hsave,
        dim, dstate, seqlen, gs_b, gs_c, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *_var_strides(Bg, b_var), *_var_strides(Cg, c_var),
        *zz.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DBIAS=delta_bias is not None, SOFTPLUS=softplus,
        B_VAR=b_var, C_VAR=c_var, HAS_H0=h0 is not None, SAVE_STATES=save_states,
        BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_L=cfg["BLOCK_L"], num_warps=cfg["num_warps"],
        **extra,
    )  # fmt: skip
    return out, hlast, (hsave if save_states else None), cfg


def _scan_bwd_triton(u, delta, A, B, C, D, z, delta_bias, h0, hsave, dout, dhlast, softplus, cfg):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    Bg, Cg = _as_grouped(B), _as_grouped(C)
    b_var, c_var = Bg.dim() == 4, Cg.dim() == 4
    gs_b, gs_c = _group_size(Bg, dim), _group_size(Cg, dim)
    n_chunks = triton.cdiv(seqlen, cfg["BLOCK_L"])
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    du = torch.empty(batch, dim, seqlen, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, seqlen, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, dim, seqlen, device=dev, dtype=z.dtype) if z is not None else None
    dA = torch.empty(batch, dim, dstate, **f32)
    # input-dependent B/C gradients are summed over channels with fp32 atomics
    dB = torch.zeros(Bg.shape, **f32) if b_var else torch.empty(batch, dim, dstate, **f32)
    dC = torch.zeros(Cg.shape, **f32) if c_var else torch.empty(batch, dim, dstate, **f32)
    dD = torch.empty(batch, dim, **f32)
    ddbias = torch.empty(batch, dim, **f32)
    dh0 = torch.empty(batch, dim, dstate, **f32)
    zz = z if z is not None else u
    dzz = dz if dz is not None else du
    grid = (triton.cdiv(dim, cfg["BWD_BLOCK_D"]), batch)
    if cfg["BWD_ALGO"] == "seq":
        kernel = _selective_scan_bwd_seq_kernel
        scratch = torch.empty(grid[0] * grid[1] * cfg["BLOCK_L"] * cfg["BWD_BLOCK_D"] * cfg["BLOCK_N"], **f32)
        extra = (scratch,)
    else:
        kernel, extra = _selective_scan_bwd_kernel, ()
    kernel[grid](
        u, delta, A, Bg, Cg,
        D if D is not None else u, zz, delta_bias if delta_bias is not None else u, h0 if h0 is not None else u,
        hsave, dout, dhlast if dhlast is not None else u, *extra,
        du, ddelta, dzz, dA, dB, dC, dD, ddbias, dh0,
        dim, dstate, seqlen, gs_b, gs_c, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *_var_strides(Bg, b_var), *_var_strides(Cg, c_var),
        *zz.stride(), *dout.stride(), *du.stride(), *_var_strides(dB, b_var), *_var_strides(dC, c_var),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DBIAS=delta_bias is not None, SOFTPLUS=softplus,
        B_VAR=b_var, C_VAR=c_var, HAS_H0=h0 is not None, HAS_DHLAST=dhlast is not None,
        BLOCK_D=cfg["BWD_BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_L=cfg["BLOCK_L"], num_warps=cfg["BWD_num_warps"],
    )  # fmt: skip
    dB = dB.view(B.shape) if b_var else dB.sum(0)
    dC = dC.view(C.shape) if c_var else dC.sum(0)
    return du, ddelta, dz, dA.sum(0), dB, dC, dD.sum(0), ddbias.sum(0), dh0


def _dtypes(*tensors) -> list:
    return [t.dtype if t is not None else None for t in tensors]


def _as_dtypes(dtypes, *grads) -> list:
    """fp32 gradients back to their inputs' dtypes; None where the input was None."""
    return [(g if g.dtype == t else g.to(t)) if t is not None else None for g, t in zip(grads, dtypes)]


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, override, grad_enabled
    ):
        # grad mode is off inside forward(): the caller tells whether a graph is being recorded
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:9])
        u, delta, z = _lastdim_contiguous(u), _lastdim_contiguous(delta), _lastdim_contiguous(z)
        B = _lastdim_contiguous(B) if B.dim() >= 3 else B
        C = _lastdim_contiguous(C) if C.dim() >= 3 else C
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        out, hlast, hsave, cfg = _scan_fwd_triton(
            u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, needs_grad, override
        )
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, hsave)
            ctx.softplus, ctx.cfg = delta_softplus, cfg
            ctx.in_dtypes = _dtypes(A, B, C, D, delta_bias, initial_state)
        return out, hlast

    @staticmethod
    def backward(ctx, dout, dhlast):
        u, delta, A, B, C, D, z, delta_bias, h0, hsave = ctx.saved_tensors
        dhlast = dhlast.float().contiguous() if dhlast is not None else None
        du, ddelta, dz, dA, dB, dC, dD, ddbias, dh0 = _scan_bwd_triton(
            u, delta, A, B, C, D, z, delta_bias, h0, hsave, dout, dhlast, ctx.softplus, ctx.cfg
        )
        dA, dB, dC, dD, ddbias, dh0 = _as_dtypes(ctx.in_dtypes, dA, dB, dC, dD, ddbias, dh0)
        return du, ddelta, dA, dB, dC, dD, dz, ddbias, dh0, None, None, None


# --------------------------------------------------------------------------------------------------
# CUDA C++ path (kernels/csrc/selective_scan*.{h,cuh,cu,cpp}, built by ``python -m mmfm.kernels.build``)
# --------------------------------------------------------------------------------------------------
def _cuda_ext():
    from mmfm.kernels import _cuda_ext

    return _cuda_ext.get("selective_scan")


def _cuda_unsupported(u, delta, A, B, C, z) -> str | None:
    """Why the CUDA kernels cannot run these inputs (None when they can)."""
    if B.dim() == 2 or C.dim() == 2:
        return "constant (D, N) B or C (the CUDA kernels take input-dependent B and C only)"
    if A.shape[1] > 256:
        return f"N={A.shape[1]} > 256 states"
    others = {"delta": delta, "B": B, "C": C, "z": z}
    mismatched = [k for k, t in others.items() if t is not None and t.dtype != u.dtype]
    if mismatched:
        return f"{', '.join(mismatched)} not in u's dtype {u.dtype}"
    return None


# benchmark variants of the CUDA kernels (bf16 only; MMFM_VARIANTS in csrc/selective_scan.cuh)
# -> (forward chunk length, backward chunk length)
VARIANT_CHUNKS = {
    1: (2048, 256), 2: (512, 256), 3: (256, 256), 4: (512, 512), 5: (512, 512), 6: (2048, 256), 7: (2048, 512),
    8: (2048, 256), 9: (2048, 256), 10: (2048, 256), 11: (512, 256),
    12: (2048, 256), 13: (2048, 256), 14: (512, 256),  # forward rows sharing staged B / C (R = 2, 4, 4)
    15: (512, 256),  # the 512-step forward with one row per block (default: 4 rows), the default backward
}  # variant k + 100 (100: the defaults) runs variant k's backward on a (D, batch) grid instead of (batch, D)


def _cuda_chunks(seqlen: int) -> tuple[int, int]:
    """(forward, backward) steps per block pass: the fastest on the H200 (bf16) by sequence length."""
    if seqlen <= 256:
        return 256, 256
    # one 2048-step pass of 128 threads is the fastest forward near 2k; single-warp 512-step passes are
    # faster at short and long L. The backward is fastest with 256-step passes throughout.
    return (2048 if 1024 < seqlen <= 4096 else 512), 256


class _SelectiveScanCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk, grad_enabled):
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:9])
        ext = _cuda_ext()
        u, delta, z = u.contiguous(), delta.contiguous(), z.contiguous() if z is not None else None
        Bg, Cg = _lastdim_contiguous(_as_grouped(B)), _lastdim_contiguous(_as_grouped(C))
        Af = A.float().contiguous()
        Df = D.float().contiguous() if D is not None else None
        bias = delta_bias.float().contiguous() if delta_bias is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        (fwd_chunk, bwd_chunk), variant = chunk
        out, hlast, hsave = ext.fwd(
            u, delta, Af, Bg, Cg, Df, z, bias, h0, delta_softplus, needs_grad, fwd_chunk, bwd_chunk, variant
        )
        # an unused last state gets no zero-filled gradient (the kernel reads none): one launch less per
        # backward, which counts at MambaVision sizes, where the host's launches take longer than the kernels
        ctx.set_materialize_grads(False)
        if needs_grad:
            ctx.save_for_backward(u, delta, Af, Bg, Cg, Df, z, bias, h0, hsave)
            ctx.softplus, ctx.chunk, ctx.b_shape, ctx.c_shape = delta_softplus, (bwd_chunk, variant), B.shape, C.shape
            ctx.in_dtypes = _dtypes(A, B, C, D, delta_bias, initial_state)
        return out, hlast

    @staticmethod
    def backward(ctx, dout, dhlast):
        u, delta, A, Bg, Cg, D, z, bias, h0, hsave = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()  # only the last state was used
        dhlast = dhlast.float().contiguous() if dhlast is not None else None
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = _cuda_ext().bwd(
            u, delta, A, Bg, Cg, D, z, bias, h0, hsave, dout, dhlast, ctx.softplus, *ctx.chunk
        )
        dA, dB, dC, dD, dbias, dh0 = _as_dtypes(
            ctx.in_dtypes, dA, dB.view(ctx.b_shape), dC.view(ctx.c_shape), dD, dbias, dh0
        )
        return du, ddelta, dA, dB, dC, dD, dz if z is not None else None, dbias, dh0, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    check_rank("u", u, 3)
    batch, dim, seqlen = u.shape
    check_dtype("u", u)
    check_shape("delta", delta, (batch, dim, seqlen), "(batch, D, L) like u")
    check_dtype("delta", delta)
    check_rank("A", A, 2)
    check_shape("A", A, (dim, None), "(D, N)")
    check_dtype("A", A, (torch.float32, torch.float16, torch.bfloat16))
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        check_rank(name, t, (2, 3, 4))
        check_dtype(name, t)
        if t.dim() == 2:
            check_shape(name, t, (dim, dstate), "(D, N): constant over batch and time")
        elif t.dim() == 3:
            check_shape(name, t, (batch, dstate, seqlen), "(batch, N, L)")
        else:
            check_shape(name, t, (batch, None, dstate, seqlen), "(batch, G, N, L)")
            groups = t.shape[1]
            if groups == 0 or dim % groups != 0:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}: its G={groups} groups must divide D={dim}"
                )
    if D is not None:
        check_shape("D", check_tensor("D", D), (dim,), "(D,)")
        check_dtype("D", D)
    if z is not None:
        check_shape("z", check_tensor("z", z), (batch, dim, seqlen), "(batch, D, L) like u")
        check_dtype("z", z)
    if delta_bias is not None:
        check_shape("delta_bias", check_tensor("delta_bias", delta_bias), (dim,), "(D,)")
        check_dtype("delta_bias", delta_bias)
    if initial_state is not None:
        check_shape("initial_state", check_tensor("initial_state", initial_state), (batch, dim, dstate))
        check_dtype("initial_state", initial_state)
    check_same_device(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state
    )


def _available(cuda_ok: bool = True) -> tuple[str, ...]:
    cuda = ("cuda",) if cuda_ok and _cuda_ext() is not None else ()
    return cuda + (("triton",) if triton is not None and triton_available() else ())


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    *,
    initial_state: torch.Tensor | None = None,
    _config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan, drop-in for mamba-ssm's ``selective_scan_fn``.

    Args:
        u: input ``(batch, D, L)``; fp32, fp16 or bf16, any strides.
        delta: step sizes ``(batch, D, L)`` (before ``delta_bias``/softplus).
        A: state matrix ``(D, N)``, real (typically negative).
        B: input projection: ``(batch, N, L)``, grouped ``(batch, G, N, L)`` (G divides D) or constant ``(D, N)``.
        C: output projection, same layouts as ``B``.
        D: skip connection ``(D,)``.
        z: gate ``(batch, D, L)``; the output is multiplied by ``silu(z)``.
        delta_bias: ``(D,)``, added to ``delta`` before the softplus.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state ``(batch, D, N)`` (fp32).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"`` (``MMFM_KERNEL_BACKEND`` overrides
            ``auto``). ``"cuda"`` needs the extension built (``python -m mmfm.kernels.build``) and
            input-dependent B/C in ``u``'s dtype; ``auto`` uses it for such inputs when built, else Triton.
        initial_state: state before the first step ``(batch, D, N)`` (zeros when omitted); with the last
            state this lets a long sequence be scanned in pieces.

    Returns:
        ``out`` ``(batch, D, L)`` in ``u``'s dtype, and the last state when ``return_last_state``.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    unsupported = _cuda_unsupported(u, delta, A, B, C, z)
    if backend == "cuda" and unsupported:
        raise ValueError(f"backend='cuda' cannot run these inputs: {unsupported}; use backend='triton' or 'auto'")
    # auto: the CUDA kernels where they apply, else Triton
    chosen = resolve_backend(backend, u.device, _available(cuda_ok=unsupported is None))
    if chosen == "reference" or u.shape[-1] == 0:
        return selective_scan_ref(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            return_last_state,
            initial_state=initial_state,
        )
    if chosen == "cuda":
        cfg = _config or {}
        variant = cfg.get("variant", 0)
        if variant % 100:  # variant + 100: the same kernels, the backward on a (D, batch) grid
            chunks = VARIANT_CHUNKS[variant % 100]
        elif "chunk" in cfg:
            chunks = (cfg["chunk"], cfg["chunk"])
        else:
            chunks = cfg.get("chunks", _cuda_chunks(u.shape[-1]))
        chunk = (chunks, variant)
        out, last = _SelectiveScanCuda.apply(
            u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), chunk, torch.is_grad_enabled()
        )  # fmt: skip
        return (out, last) if return_last_state else out
    out, last = _SelectiveScanTriton.apply(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        initial_state,
        bool(delta_softplus),
        _config,
        torch.is_grad_enabled(),
    )
    return (out, last) if return_last_state else out
