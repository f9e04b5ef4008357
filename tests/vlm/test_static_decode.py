"""StaticDecoder (static caches, mmfm decode kernels) against transformers' own eager decode with its dynamic
cache: same prompt, same fed tokens, logits compared at every step (fp32, atol=rtol=1e-4; the two paths differ
only in summation order). Left-padded rows check that padding stays out of Mamba states and attention.
On a GPU the CUDA-graph replay is checked against the eager static step (bf16) and transformers (fp32).
"""

from __future__ import annotations

import pytest
import torch

from mmfm.vlm.decoder import tiny_llama, tiny_nemotron_h
from mmfm.vlm.generation import cache_argument, output_cache
from mmfm.vlm.static_decode import StaticDecoder

TOL = dict(atol=1e-4, rtol=1e-4)
VOCAB = 97


def build(kind: str):
    torch.manual_seed(0)
    if kind == "nemotron_h":
        return tiny_nemotron_h(VOCAB, hidden_size=32, pattern="M*-M-*", num_heads=4, num_kv_heads=2,
                               mamba_heads=4, mamba_head_dim=16, n_groups=2, state_size=8, chunk_size=8).eval()
    if kind == "qwen3":  # per-head q/k RMSNorm before RoPE
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            intermediate_size=64)).eval()
    return tiny_llama(VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2).eval()


@torch.no_grad()
def hf_decode(model, ids, mask, feed):
    """transformers' eager decode: logits (T+1, B, V) for the prompt's last position and each fed token."""
    kw = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    out = model(input_ids=ids, use_cache=True, **kw)
    cache, arg, logits = output_cache(out), cache_argument(model), [out.logits[:, -1].float()]
    for tok in feed:
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = (mask.cumsum(-1) - 1)[:, -1:]
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{arg: cache})
        cache = output_cache(out)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits)


def static_decode(model, ids, mask, feed, **kw):
    dec = StaticDecoder(model, batch_size=ids.shape[0], max_length=ids.shape[1] + len(feed) + 3, **kw)
    logits = [dec.prefill(input_ids=ids, attention_mask=mask)]
    logits += [dec.step(tok).clone() for tok in feed]
    return torch.stack(logits), dec


def prompt(batch=3, length=11, pads=(0, 3, 5), device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads[:batch]):
        mask[b, :p] = 0
        ids[b, :p] = 0
    feed = [t for t in torch.randint(3, VOCAB, (6, batch), generator=g)]
    return ids.to(device), mask.to(device), [t.to(device) for t in feed]


@pytest.mark.parametrize("kind", ["nemotron_h", "llama", "qwen3"])
def test_matches_transformers_decode(kind):
    model = build(kind)
    ids, mask, feed = prompt()
    torch.testing.assert_close(static_decode(model, ids, mask, feed)[0], hf_decode(model, ids, mask, feed), **TOL)


def test_rows_per_pass_and_state_size():
    model = build("nemotron_h")
    ids, mask, feed = prompt()
    whole, dec = static_decode(model, ids, mask, feed)
    dec2 = StaticDecoder(model, batch_size=3, max_length=ids.shape[1] + len(feed) + 3)
    chunked = [dec2.prefill(input_ids=ids, attention_mask=mask, rows_per_pass=1)]
    chunked += [dec2.step(t).clone() for t in feed]
    torch.testing.assert_close(torch.stack(chunked), whole, **TOL)
    # two attention layers: 2 x (K + V) x (B=3, Hkv=2, Lmax, Dh=8) fp32, plus 2 Mamba layers' conv + SSM states
    lmax = ids.shape[1] + len(feed) + 3
    mix = model.model.layers[0].mixer
    mamba = 3 * (mix.conv_dim * mix.conv_kernel_size + mix.num_heads * mix.head_dim * mix.ssm_state_size) * 4
    assert dec.state_bytes() == 2 * 2 * 3 * 2 * lmax * 8 * 4 + 2 * mamba


def test_one_row_prompt_fills_every_row():
    model = build("nemotron_h")
    ids, mask, feed = prompt(batch=1, pads=(0,))
    dec = StaticDecoder(model, batch_size=3, max_length=ids.shape[1] + 4)
    first = dec.prefill(input_ids=ids)
    tok = torch.tensor([5, 5, 5])
    nxt = dec.step(tok)
    want = hf_decode(model, ids, mask, [tok[:1]])
    torch.testing.assert_close(first, want[0].expand(3, -1), **TOL)
    torch.testing.assert_close(nxt, want[1].expand(3, -1), **TOL)


def test_bad_input():
    model = build("llama")
    dec = StaticDecoder(model, batch_size=2, max_length=8)
    with pytest.raises(RuntimeError, match="prefill"):
        dec.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.prefill(input_ids=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        dec.prefill(input_ids=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="left padding"):
        dec.prefill(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0]] * 2))
    dec.prefill(input_ids=torch.ones(2, 6, dtype=torch.long))
    dec.step(torch.ones(2, dtype=torch.long))
    dec.step(torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cache is full"):
        dec.step(torch.ones(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["nemotron_h", "llama"])
def test_cuda_graph_gpu(kind):
    model = build(kind).cuda()
    ids, mask, feed = prompt(device="cuda")
    graphed, dec = static_decode(model, ids, mask, feed)
    assert dec._graph is not None
    torch.testing.assert_close(graphed, hf_decode(model, ids, mask, feed), **TOL)
    model = model.bfloat16()
    eager = static_decode(model, ids, mask, feed, cuda_graph=False)[0]
    torch.testing.assert_close(static_decode(model, ids, mask, feed)[0], eager, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["nemotron_h", "llama"])
def test_generate_static_equals_eager(kind):
    from mmfm.vlm.generation import generate_from_embeds

    model = build(kind)
    ids, mask, _ = prompt()
    embeds = model.get_input_embeddings()(ids)
    kw = dict(max_new_tokens=7, eos_token_id=None)
    eager = generate_from_embeds(model, embeds, mask, static=False, **kw)
    assert eager.shape == (3, 7)
    assert torch.equal(generate_from_embeds(model, embeds, mask, static=True, **kw), eager)
