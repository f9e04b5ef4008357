"""Static-cache decoding with CUDA graphs for transformers' Nemotron-H and Llama-family causal LMs.

Eager transformers decode spends ~30 ms of CPU per step launching ~800 small kernels, so on a GPU a step costs
the same whatever the model reads, and a hybrid's smaller cache cannot show. :class:`StaticDecoder` keeps every
piece of decode state in buffers allocated once, ``(B, Hkv, Lmax, Dh)`` K/V for attention layers and
constant-size conv ``(B, conv_dim, K)`` + SSM ``(B, H, P, N)`` states for Mamba-2 layers, runs one decode step
with mmfm's kernels (:func:`~mmfm.kernels.causal_conv1d_update`, :func:`~mmfm.kernels.selective_state_update`,
:func:`~mmfm.kernels.decode_attention`), and on CUDA records that step once as a CUDA graph, so each further
token is one graph replay. Norms, projections and MLPs are the model's own modules, so the math is
transformers'; prefill is the model's own forward (row groups at a time, to bound its activation memory), whose
cache is copied into the buffers.

Layout: rows are left-padded to one length ``L``, so every row writes cache slot ``L + t`` at step ``t``;
``start[b]`` (the row's padding) keeps attention off pad slots and sets Llama's RoPE positions.

    dec = StaticDecoder(model, batch_size=8, max_length=4096 + 256)      # captures the graph on CUDA
    logits = dec.prefill(input_ids=ids, attention_mask=mask)            # (B, V) logits of the last position
    for _ in range(256):
        logits = dec.step(logits.argmax(-1))                            # (B,) tokens -> (B, V) logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.kernels import causal_conv1d_update, selective_state_update
from mmfm.kernels.decode_attention import decode_attention
from mmfm.vlm.generation import output_cache


def _norm_nemotron(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Nemotron-H RMSNorm: fp32 statistics, weight multiplied in fp32, then cast."""
    x = h.float()
    return (weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))).to(h.dtype)


def _norm_llama(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: fp32 statistics, cast, then the weight."""
    x = h.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _add_norm_nemotron(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then the norm of the sum (one fused kernel when compiled)."""
    h = h + delta
    return h, _norm_nemotron(h, weight, eps)


def _add_norm_llama(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + delta
    return h, _norm_llama(h, weight, eps)


def _gated_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    """Nemotron-H's gated RMSNorm over groups of ``group`` channels: norm(y * silu(gate)) * weight."""
    dtype = y.dtype
    x = y.float() * F.silu(gate.float())
    xg = x.view(*x.shape[:-1], -1, group)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xg.view(x.shape).to(dtype)


LLAMA_FAMILY = ("llama", "qwen2", "qwen3")
SUPPORTED = ("nemotron_h",) + LLAMA_FAMILY


@dataclass
class _AttnState:
    k: torch.Tensor  # (B, Hkv, Lmax, Dh)
    v: torch.Tensor


@dataclass
class _MambaState:
    A: torch.Tensor  # (H, P, N) -exp(A_log), computed once (decoding does not change weights)
    conv: torch.Tensor  # (B, conv_dim, K)
    ssm: torch.Tensor  # (B, H, P, N) fp32


def _cache_layer(cache, idx: int):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: needs transformers >= 5.2 (cache.layers)")
    return layers[idx]


class StaticDecoder:
    """Decode ``batch_size`` rows of a causal LM with preallocated caches (and a CUDA graph on CUDA).

    Args:
        model: a ``NemotronHForCausalLM`` (Mamba-2 / attention / MLP layers; MoE layers run through their own
            module and are not tested here) or a Llama / Qwen2 / Qwen3 causal LM, in eval mode, on its device
            and dtype.
        batch_size: rows decoded together.
        max_length: prompt length + new tokens; the K/V buffers hold this many positions.
        cuda_graph: record the step as a CUDA graph (default: when the model is on CUDA).
        compile: fuse the residual adds, norms and RoPE with ``torch.compile`` (default: on CUDA). Inside a
            graph every launch still costs ~3 us of GPU time, and an eager RMSNorm is 7 kernels.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, cuda_graph: bool | None = None,
                 compile: bool | None = None) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"StaticDecoder supports model types {SUPPORTED}, got {cfg.model_type!r}; "
                             "use mmfm.vlm.generation.generate_from_embeds (eager) for other models")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.model, self.config = model, cfg
        self.batch_size, self.max_length = batch_size, max_length
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.is_hybrid = cfg.model_type == "nemotron_h"
        body = model.model
        self.layers = list(body.layers)
        self.embed = model.get_input_embeddings()
        self.final_norm = body.norm_f if self.is_hybrid else body.norm
        self.rotary = None if self.is_hybrid else body.rotary_emb
        if compile is None:
            compile = self.device.type == "cuda"
        # one function per variant: each compiled function has its own dynamo cache (and recompile limit)
        fns = {"norm": _norm_nemotron if self.is_hybrid else _norm_llama,
               "add_norm": _add_norm_nemotron if self.is_hybrid else _add_norm_llama, "gated_norm": _gated_norm}
        if not self.is_hybrid:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            fns["rope"] = apply_rotary_pos_emb
        if compile:  # default dynamic: a second batch size compiles one shape-generic version
            fns = {k: torch.compile(f) for k, f in fns.items()}
        self._fns = fns
        self.states: list[_AttnState | _MambaState | None] = [self._alloc(layer) for layer in self.layers]
        B, dev = batch_size, self.device
        self._tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self._index = torch.zeros(1, dtype=torch.long, device=dev)  # next cache slot (shared by all rows)
        self._start = torch.zeros(B, dtype=torch.int32, device=dev)  # first real slot per row (the kernel's dtype)
        self._logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=dev)
        self._filled = 0  # host copy of _index, for bounds checks without a device sync
        self._graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda"
        if cuda_graph:
            if dev.type != "cuda":
                raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {dev}")
            self._capture()

    # -- buffers ---------------------------------------------------------------------------------------------
    def _alloc(self, layer: nn.Module) -> _AttnState | _MambaState | None:
        B, dev, cfg = self.batch_size, self.device, self.config
        if self.is_hybrid:
            kind, mixer = layer.block_type, layer.mixer
            if kind == "linear_attention":
                if mixer.activation != "silu":
                    raise ValueError(f"Mamba layer {layer.layer_idx} uses activation {mixer.activation!r}; "
                                     "the conv1d kernels support 'silu'")
                return _MambaState(
                    A=-torch.exp(mixer.A_log.detach().float())[:, None, None].expand(
                        mixer.num_heads, mixer.head_dim, mixer.ssm_state_size),
                    conv=torch.zeros(B, mixer.conv_dim, mixer.conv_kernel_size, device=dev, dtype=self.dtype),
                    ssm=torch.zeros(B, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, device=dev,
                                    dtype=torch.float32))
            if kind != "full_attention":
                return None  # MLP / MoE: stateless
            attn = mixer
        else:
            attn = layer.self_attn
        hkv, dh = cfg.num_key_value_heads, attn.head_dim
        shape = (B, hkv, self.max_length, dh)
        return _AttnState(torch.zeros(shape, device=dev, dtype=self.dtype),
                          torch.zeros(shape, device=dev, dtype=self.dtype))

    def state_bytes(self) -> int:
        """Bytes of decode state (K/V buffers + Mamba conv/SSM states)."""
        return sum(t.numel() * t.element_size() for t in self._state_tensors())

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every decode-state buffer: K/V of attention layers, conv + SSM states of Mamba layers."""
        out: list[torch.Tensor] = []
        for st in self.states:
            if isinstance(st, _AttnState):
                out += [st.k, st.v]
            elif isinstance(st, _MambaState):
                out += [st.conv, st.ssm]
        return out

    # -- prefill ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, rows_per_pass: int | None = None) -> torch.Tensor:
        """Run the prompt through the model and fill the buffers; returns last-position logits ``(B, V)`` fp32.

        Args:
            input_ids: ``(B, L)`` or inputs_embeds ``(B, L, D)``, left-padded. One row with ``batch_size > 1``
                is prefilled once and copied to every row (several samples from one prompt).
            attention_mask: ``(B, L)`` 1 for real tokens (left padding only); default all ones.
            rows_per_pass: rows per model forward (bounds prefill activation memory); default all.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        B, L = x.shape[:2]
        if B not in (1, self.batch_size):
            raise ValueError(f"prompt batch is {B} rows; this decoder was built for batch_size={self.batch_size} "
                             "(or give one row to copy to all)")
        if L >= self.max_length:
            raise ValueError(f"prompt length {L} leaves no room: max_length is {self.max_length}")
        mask = torch.ones(B, L, dtype=torch.long, device=x.device) if attention_mask is None else attention_mask
        if mask[:, -1].eq(0).any():
            raise ValueError("prefill needs left padding: the last position of every row must be a real token")
        self._reset()
        step = rows_per_pass or B
        for r0 in range(0, B, step):
            rows = slice(r0, min(r0 + step, B))
            m = mask[rows]
            kw = {"input_ids": x[rows]} if input_ids is not None else {"inputs_embeds": x[rows]}
            if not bool(m.all()):
                kw["attention_mask"] = m
                kw["position_ids"] = (m.long().cumsum(-1) - 1).clamp(min=0)
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
            self._copy_cache(output_cache(out), rows, L)
            self._logits[rows] = out.logits[:, -1].float()
            del out
        if B == 1 and self.batch_size > 1:
            self._broadcast_first_row()
        self._start.copy_((mask == 0).sum(-1).to(self._start.device).expand(self.batch_size))
        self._index.fill_(L)
        self._filled = L
        return self._logits.clone()

    def _broadcast_first_row(self) -> None:
        for t in self._state_tensors():
            t[1:] = t[:1]
        self._logits[1:] = self._logits[:1]

    def _copy_cache(self, cache, rows: slice, length: int) -> None:
        for idx, st in enumerate(self.states):
            if st is None:
                continue
            layer = _cache_layer(cache, idx)
            if isinstance(st, _AttnState):
                st.k[rows, :, :length] = layer.keys
                st.v[rows, :, :length] = layer.values
            else:
                conv = layer.conv_states[0]
                st.conv[rows] = conv[..., -st.conv.shape[-1]:]
                st.ssm[rows] = layer.recurrent_states[0].float()

    def _reset(self) -> None:
        for st in self.states:
            if isinstance(st, _MambaState):
                st.conv.zero_()
                st.ssm.zero_()
        self._index.zero_()
        self._start.zero_()
        self._filled = 0

    # -- decode step -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(B,)``; returns the next-token logits ``(B, V)`` fp32 (a view of a buffer
        that the next step overwrites: clone to keep it)."""
        if self._filled == 0:
            raise RuntimeError("call prefill() before step()")
        if self._filled >= self.max_length:
            raise ValueError(f"the cache is full: max_length={self.max_length} positions are used; build the "
                             "decoder with a larger max_length")
        if tokens.shape != (self.batch_size,):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected ({self.batch_size},)")
        self._tokens.copy_(tokens)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step_impl()
        self._filled += 1
        return self._logits

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is None:
            return h, self._fns["norm"](h, norm.weight, norm.variance_epsilon)
        return self._fns["add_norm"](h, delta, norm.weight, norm.variance_epsilon)

    def _step_impl(self) -> None:
        B = self.batch_size
        h = self.embed(self._tokens[:, None])  # (B, 1, D)
        length = (self._index + 1).to(torch.int32).repeat(B)  # contiguous int32 once per step, not per layer
        rope = None
        if self.rotary is not None:
            rope = self.rotary(h, (self._index - self._start)[:, None])
        delta = None
        for layer, st in zip(self.layers, self.states):
            if self.is_hybrid:
                h, x = self._add_norm(h, delta, layer.norm)
                if isinstance(st, _MambaState):
                    delta = self._mamba_step(layer.mixer, x, st)
                elif isinstance(st, _AttnState):
                    delta = self._attn_step(layer.mixer, x, st, length, None)
                else:
                    delta = layer.mixer(x)
            else:
                h, x = self._add_norm(h, delta, layer.input_layernorm)
                delta = self._attn_step(layer.self_attn, x, st, length, rope)
                h, x = self._add_norm(h, delta, layer.post_attention_layernorm)
                delta = layer.mlp(x)
        _, x = self._add_norm(h, delta, self.final_norm)
        self._logits.copy_(self.model.lm_head(x)[:, 0].float())
        self._index.add_(1)

    def _attn_step(self, attn: nn.Module, x: torch.Tensor, st: _AttnState, length: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, dh = x.shape[0], attn.head_dim
        q = attn.q_proj(x).view(B, 1, -1, dh)
        k = attn.k_proj(x).view(B, 1, -1, dh)
        v = attn.v_proj(x).view(B, 1, -1, dh)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, 1, Dh)
        if rope is not None:
            q, k = self._fns["rope"](q, k, *rope)
        st.k.index_copy_(2, self._index, k.to(st.k.dtype))
        st.v.index_copy_(2, self._index, v.to(st.v.dtype))
        out = decode_attention(q[:, :, 0], st.k, st.v, length, self._start, scale=attn.scaling)  # (B, Hq, Dh)
        return attn.o_proj(out.reshape(B, 1, -1).to(x.dtype))

    def _mamba_step(self, mixer: nn.Module, x: torch.Tensor, st: _MambaState) -> torch.Tensor:
        B, heads, dim, n = x.shape[0], mixer.num_heads, mixer.head_dim, mixer.ssm_state_size
        gn = mixer.n_groups * n
        gate, xbc, dt = mixer.in_proj(x)[:, 0].split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
        xbc = causal_conv1d_update(xbc, st.conv, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, activation="silu")
        xs, b, c = xbc.split([mixer.intermediate_size, gn, gn], dim=-1)
        y = selective_state_update(
            st.ssm, xs.reshape(B, heads, dim), dt[:, :, None].expand(B, heads, dim), st.A,
            b.reshape(B, mixer.n_groups, n), c.reshape(B, mixer.n_groups, n),
            D=mixer.D[:, None].expand(heads, dim), dt_bias=mixer.dt_bias[:, None].expand(heads, dim),
            dt_softplus=True)
        norm = mixer.norm
        y = self._fns["gated_norm"](y.reshape(B, 1, -1), gate[:, None], norm.weight, norm.group_size, norm.variance_epsilon)
        return mixer.out_proj(y.to(x.dtype))

    # -- CUDA graph ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm up (compiles the Triton kernels) on a side stream, then record one step. Warm-up steps write
        the buffers, so they are reset after; prefill fills them again."""
        self._index.fill_(1)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_impl()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._index.fill_(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_impl()
        self._graph = graph
        self._reset()
