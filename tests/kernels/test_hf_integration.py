"""transformers' NemotronH / Mamba2 with mmfm kernels patched in vs the unpatched models (fp32, CPU).

TRITON_INTERPRET=1 makes ``backend="auto"`` pick the Triton kernels on the CPU, so the patched model
really runs them. Logits agree within 1e-4 (absolute, logits are O(1)); greedy generation (prefill
through ``causal_conv1d_fn`` + ``ssd_chunk_scan``, decode through ``causal_conv1d_update`` +
``selective_state_update``) gives identical tokens.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before mmfm's kernels are imported

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from mmfm.kernels import hf_integration  # noqa: E402
from mmfm.kernels.hf_integration import is_patched, mmfm_kernels, use_mmfm_kernels  # noqa: E402


def _nemotron_h():
    cfg = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, layers_block_type=["mamba", "attention", "mamba", "mlp"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=48, ssm_state_size=8,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=2, chunk_size=8, conv_kernel=4,
    )  # fmt: skip
    return transformers.NemotronHForCausalLM(cfg).eval()


def _mamba2():
    cfg = transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=8, head_dim=8,
        n_groups=2, chunk_size=8, expand=2,
    )  # fmt: skip
    return transformers.Mamba2ForCausalLM(cfg).eval()


class _Spy:
    """Counts calls of the mmfm ops behind the patched names."""

    def __init__(self, monkeypatch):
        # The package re-exports functions named like their modules (mmfm.kernels.causal_conv1d is the
        # function), so `import a.b as c` would give the function: take the modules from sys.modules.
        conv, ssu, ssd = (importlib.import_module(f"mmfm.kernels.{m}")
                          for m in ("causal_conv1d", "selective_state_update", "ssd"))

        self.calls = {"ssd": 0, "conv": 0, "conv_update": 0, "state_update": 0}
        for mod, name, key in ((ssd, "ssd_chunk_scan", "ssd"), (conv, "causal_conv1d", "conv"),
                               (conv, "causal_conv1d_update", "conv_update"),
                               (ssu, "selective_state_update", "state_update")):  # fmt: skip
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name), key))

    def _wrap(self, fn, key):
        def inner(*args, **kwargs):
            self.calls[key] += 1
            return fn(*args, **kwargs)

        return inner


@pytest.mark.parametrize("build", [_nemotron_h, _mamba2], ids=["nemotron_h", "mamba2"])
def test_patched_logits_and_generation_match(build, monkeypatch):
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(0, 64, (2, 21))
    prompt = ids[:1, :9]
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        spy = _Spy(monkeypatch)
        with mmfm_kernels():
            assert is_patched()
            logits = model(ids).logits
            tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert not is_patched()
    assert (ref_logits - logits).abs().max().item() < 1e-4
    assert torch.equal(ref_tokens, tokens)
    assert spy.calls["ssd"] > 0 and spy.calls["conv"] > 0
    assert spy.calls["conv_update"] > 0 and spy.calls["state_update"] > 0


def test_training_backward_through_patched_model():
    torch.manual_seed(0)
    model = _nemotron_h().train()
    ids = torch.randint(0, 64, (1, 19))
    ref = model(ids, labels=ids).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with mmfm_kernels():
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for n, p in model.named_parameters():
        if n in ref_grads:
            err = (p.grad - ref_grads[n]).abs().max().item()
            assert err <= 1e-4 * max(ref_grads[n].abs().max().item(), 1.0), n


def test_use_mmfm_kernels_patches_and_unpatch_restores():
    from transformers.models.nemotron_h import modeling_nemotron_h as mod

    original = mod.mamba2_chunk_scan
    model = _mamba2()
    try:
        assert use_mmfm_kernels(model) is model
        assert mod.mamba2_chunk_scan is hf_integration.mmfm_chunk_scan
    finally:
        hf_integration.unpatch_transformers()
    assert mod.mamba2_chunk_scan is original
    with pytest.raises(ValueError, match="model must be"):
        use_mmfm_kernels("not a model")
