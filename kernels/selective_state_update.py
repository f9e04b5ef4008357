"""One decoding step of a selective SSM (Mamba-1 and Mamba-2): reference, Triton kernel, dispatch.

Drop-in for mamba-ssm's ``selective_state_update``. Per batch ``b``, head ``h``, channel ``p`` and
state index ``n``::

    dt          = softplus(dt + dt_bias)                       (bias and softplus optional)
    state[n]    = exp(dt * A[n]) * state[n] + dt * B[g, n] * x
    out         = sum_n C[g, n] * state[n] + D * x
    out         = out * silu(z)                                (gate optional)

where ``g`` is the head's group. ``state`` is updated in place. Two layouts:

* no heads (Mamba-1): state ``(batch, D, N)``, x/dt/z ``(batch, D)``, A ``(D, N)``, D/dt_bias ``(D,)``,
  B/C ``(batch, N)``; as an extension B/C may be grouped ``(batch, G, N)`` with channel ``d`` reading
  group ``d // (D / G)``, the same convention as :func:`mmfm.kernels.selective_scan`.
* heads (Mamba-2): state ``(batch, H, P, N)``, x/dt/z ``(batch, H, P)``, A ``(H, P, N)`` (usually ``(H,)``
  expanded with zero strides), D/dt_bias ``(H, P)``, B/C ``(batch, G, N)`` with G dividing H.

The math is fp32; the state keeps its dtype and the output has ``x``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.kernels._checks import check_dtype, check_rank, check_same_device, check_shape, check_tensor
from mmfm.kernels._dispatch import resolve_backend, triton_available

__all__ = ["selective_state_update", "selective_state_update_ref"]


def _to_heads(state, x, dt, A, B, C, D, z, dt_bias):
    """Return every argument in the heads layout (views, so in-place writes reach ``state``)."""
    if state.dim() == 4:
        return state, x, dt, A, B, C, D, z, dt_bias
    # no heads: G groups of D/G channels become G heads of P = D/G channels
    groups = B.shape[1] if B.dim() == 3 else 1
    B = B if B.dim() == 3 else B.unsqueeze(1)
    C = C if C.dim() == 3 else C.unsqueeze(1)
    chan = state.shape[1]
    p = chan // groups

    def split(t, axis):
        return None if t is None else t.unflatten(axis, (groups, p))

    return (
        split(state, 1), split(x, 1), split(dt, 1), split(A, 0), B, C, split(D, 0), split(z, 1), split(dt_bias, 0)
    )  # fmt: skip


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """Readable fp32 decode step; updates ``state`` in place. Shapes as :func:`selective_state_update`."""
    out_shape, out_dtype = x.shape, x.dtype
    st, x, dt, A, B, C, D, z, dt_bias = _to_heads(state, x, dt, A, B, C, D, z, dt_bias)
    heads, groups = st.shape[1], B.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.float().repeat_interleave(heads // groups, dim=1)[:, :, None, :]  # (batch, H, 1, N)
    Ch = C.float().repeat_interleave(heads // groups, dim=1)[:, :, None, :]
    new = torch.exp(dt[..., None] * A.float()) * st.float() + (dt * x.float())[..., None] * Bh
    st.copy_(new)
    out = (new * Ch).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(out_dtype).reshape(out_shape)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
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
    def _state_update_kernel(
        state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr,
        heads, dim, dstate, heads_per_group,
        s_st_b, s_st_h, s_st_p, s_st_n,
        s_x_b, s_x_h, s_x_p,
        s_dt_b, s_dt_h, s_dt_p,
        s_A_h, s_A_p, s_A_n,
        s_B_b, s_B_g, s_B_n,
        s_C_b, s_C_g, s_C_n,
        s_D_h, s_D_p,
        s_z_b, s_z_h, s_z_p,
        s_dtb_h, s_dtb_p,
        s_o_b, s_o_h, s_o_p,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        pid_h = tl.program_id(2).to(tl.int64)
        g = pid_h // heads_per_group
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p = offs_p < dim
        mask_n = offs_n < dstate
        mask = mask_p[:, None] & mask_n[None, :]

        st_ptrs = (
            state_ptr + pid_b * s_st_b + pid_h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n
        )
        st = tl.load(st_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + offs_p * s_x_p, mask=mask_p, other=0.0).to(
            tl.float32
        )
        dt = tl.load(dt_ptr + pid_b * s_dt_b + pid_h * s_dt_h + offs_p * s_dt_p, mask=mask_p, other=0.0)
        dt = dt.to(tl.float32)
        if HAS_DTB:
            dt += tl.load(dtb_ptr + pid_h * s_dtb_h + offs_p * s_dtb_p, mask=mask_p, other=0.0).to(tl.float32)
        if SOFTPLUS:
            e = tl.exp(tl.minimum(dt, 20.0))
            w = 1.0 + e
            dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0)))
        A = tl.load(
            A_ptr + pid_h * s_A_h + offs_p[:, None] * s_A_p + offs_n[None, :] * s_A_n, mask=mask, other=0.0
        )
        Bv = tl.load(B_ptr + pid_b * s_B_b + g * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0).to(
            tl.float32
        )
        Cv = tl.load(C_ptr + pid_b * s_C_b + g * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0).to(
            tl.float32
        )

        st = tl.exp(dt[:, None] * A.to(tl.float32)) * st + (dt * x)[:, None] * Bv[None, :]
        tl.store(st_ptrs, st.to(state_ptr.dtype.element_ty), mask=mask)
        out = _sum(st * Cv[None, :], axis=1)
        if HAS_D:
            out += x * tl.load(D_ptr + pid_h * s_D_h + offs_p * s_D_p, mask=mask_p, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + pid_b * s_z_b + pid_h * s_z_h + offs_p * s_z_p, mask=mask_p, other=0.0)
            zv = zv.to(tl.float32)
            out = out * zv * _sigmoid(zv)
        o_ptrs = out_ptr + pid_b * s_o_b + pid_h * s_o_h + offs_p * s_o_p
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_p)


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus) -> torch.Tensor:
    from mmfm.kernels._dispatch import triton_interpret

    if state.device.type != "cuda" and type(_state_update_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "the Triton kernel was built for the GPU; set TRITON_INTERPRET=1 before importing "
            "mmfm.kernels to run it on the CPU, or use backend='reference'"
        )
    out_shape = x.shape
    st, x, dt, A, B, C, D, z, dt_bias = _to_heads(state, x, dt, A, B, C, D, z, dt_bias)
    batch, heads, dim, dstate = st.shape
    out = torch.empty(batch, heads, dim, device=x.device, dtype=x.dtype)
    block_n = triton.next_power_of_2(dstate)
    cap = 4 if triton_interpret() else max(1, min(64, 4096 // block_n))
    block_p = max(1, min(cap, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(dim, block_p), batch, heads)
    _state_update_kernel[grid](
        st, x, dt, A, B, C,
        D if D is not None else x, z if z is not None else x, dt_bias if dt_bias is not None else x, out,
        heads, dim, dstate, heads // B.shape[1],
        *st.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(dt_bias, 2), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=1 if triton_interpret() else 4,
    )  # fmt: skip
    return out.reshape(out_shape)


def _validate(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    check_rank("state", state, (3, 4))
    check_dtype("state", state)
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_tensor(name, t)
        check_dtype(name, t)
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t)
            check_dtype(name, t)
    if state.dim() == 3:
        batch, chan, dstate = state.shape
        check_shape("x", x, (batch, chan), "(batch, D) for state (batch, D, N)")
        check_shape("dt", dt, (batch, chan), "(batch, D) like x")
        check_shape("A", A, (chan, dstate), "(D, N)")
        for name, t in (("B", B), ("C", C)):
            check_rank(name, t, (2, 3))
            if t.dim() == 2:
                check_shape(name, t, (batch, dstate), "(batch, N)")
            else:
                check_shape(name, t, (batch, None, dstate), "(batch, G, N)")
        if B.dim() != C.dim() or (B.dim() == 3 and B.shape[1] != C.shape[1]):
            raise ValueError(
                f"B {tuple(B.shape)} and C {tuple(C.shape)} must have the same layout and groups"
            )
        groups = B.shape[1] if B.dim() == 3 else 1
        if groups == 0 or chan % groups != 0:
            raise ValueError(f"B has shape {tuple(B.shape)}: its G={groups} groups must divide D={chan}")
        if D is not None:
            check_shape("D", D, (chan,), "(D,)")
        if z is not None:
            check_shape("z", z, (batch, chan), "(batch, D) like x")
        if dt_bias is not None:
            check_shape("dt_bias", dt_bias, (chan,), "(D,)")
    else:
        batch, heads, dim, dstate = state.shape
        check_shape("x", x, (batch, heads, dim), "(batch, H, P) for state (batch, H, P, N)")
        check_shape("dt", dt, (batch, heads, dim), "(batch, H, P) like x")
        check_shape("A", A, (heads, dim, dstate), "(H, P, N)")
        check_shape("B", B, (batch, None, dstate), "(batch, G, N)")
        if B.shape[1] == 0 or heads % B.shape[1] != 0:
            raise ValueError(f"B has shape {tuple(B.shape)}: its G={B.shape[1]} groups must divide H={heads}")
        check_shape("C", C, B.shape, "(batch, G, N) like B")
        if D is not None:
            check_shape("D", D, (heads, dim), "(H, P)")
        if z is not None:
            check_shape("z", z, (batch, heads, dim), "(batch, H, P) like x")
        if dt_bias is not None:
            check_shape("dt_bias", dt_bias, (heads, dim), "(H, P)")
    check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Advance ``state`` by one step in place and return the step's output (like ``x``).

    Args:
        state: ``(batch, D, N)`` or ``(batch, H, P, N)``; any float dtype, any strides; updated in place.
        x: ``(batch, D)`` or ``(batch, H, P)``.
        dt: like ``x`` (before ``dt_bias``/softplus).
        A: ``(D, N)`` or ``(H, P, N)`` (broadcast strides welcome).
        B, C: ``(batch, N)`` or ``(batch, G, N)``.
        D: ``(D,)`` or ``(H, P)``; z: like ``x``; dt_bias: ``(D,)`` or ``(H, P)``.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(batch, D)`` or ``(batch, H, P)`` in ``x``'s dtype.
    """
    _validate(state, x, dt, A, B, C, D, z, dt_bias)
    avail = ("triton",) if triton is not None and triton_available() else ()
    chosen = resolve_backend(backend, state.device, avail)
    if chosen == "reference":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
