"""VLM glue: placeholder splicing, count errors, and generation against transformers' own generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfm.vlm.decoder import tiny_nemotron_h
from mmfm.vlm.generation import generate_from_embeds
from mmfm.vlm.model import VLM, placeholder_runs, split_images
from mmfm.vlm.projector import Projector

IMG = 5


class PatchEncoder(nn.Module):
    """Stand-in vision encoder: a patch-embedding conv (the real RADIO student is tested in radio/)."""

    patch_size = 8

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 8, 8)

    def forward(self, x):
        class Out:
            features = self.proj(x).flatten(2).transpose(1, 2)

        return Out()


class MeanPool2x2(nn.Module):
    def num_output_tokens(self, h: int, w: int) -> int:
        return (h // 2) * (w // 2)

    def forward(self, x, grid):
        h, w = grid
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2)


def make_vlm(seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    lm = tiny_nemotron_h(vocab_size=40, hidden_size=32, pattern="M*-M", mamba_heads=4, mamba_head_dim=16,
                         n_groups=2, num_heads=2, num_kv_heads=1).eval()
    return VLM(PatchEncoder(), MeanPool2x2(), Projector(16, 32, 32), lm, image_token_id=IMG).eval()


def test_placeholder_runs_and_split_images():
    ids = torch.tensor([[1, 5, 5, 3, 5, 5], [5, 5, 4, 4, 4, 4]])
    assert placeholder_runs(ids, 5) == [(0, 1, 2), (0, 4, 2), (1, 0, 2)]
    groups = split_images([torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), torch.zeros(1, 3, 32, 16)])
    assert [tuple(g.shape) for g in groups] == [(2, 3, 16, 16), (1, 3, 32, 16)]


def test_image_embeddings_replace_placeholders_exactly():
    vlm = make_vlm()
    images = torch.rand(2, 3, 32, 32)  # 4x4 patches -> 2x2 pooled -> 4 tokens each
    assert vlm.tokens_per_image(32, 32) == 4
    ids = torch.tensor([[1] + [IMG] * 4 + [7, 8], [1, 9] + [IMG] * 4 + [3]])
    with torch.no_grad():
        logits = vlm(ids, images).logits
        # Independent construction: embed text, write each image's projected tokens by hand.
        emb = vlm.language_model.get_input_embeddings()(ids).clone()
        feats = vlm.vision_encoder(images).features
        tok = vlm.projector(vlm.compressor(feats, (4, 4)))
        emb[0, 1:5] = tok[0]
        emb[1, 2:6] = tok[1]
        ref = vlm.language_model(inputs_embeds=emb).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_mismatched_images_and_placeholders_name_both_counts():
    vlm = make_vlm()
    ids = torch.tensor([[1] + [IMG] * 4 + [7]])
    with pytest.raises(ValueError, match="2 images but 1 runs"):
        vlm(ids, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="gives 4 tokens but its placeholder run has 3"):
        vlm(torch.tensor([[1] + [IMG] * 3 + [7]]), torch.rand(1, 3, 32, 32))


def test_loss_and_gradients_reach_projector_not_frozen_encoder():
    vlm = make_vlm().train()
    ids = torch.tensor([[1] + [IMG] * 4 + [7, 8, 9]])
    labels = ids.clone()
    labels[:, :5] = -100
    out = vlm(ids, torch.rand(1, 3, 32, 32), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert vlm.projector.linear_1.weight.grad.abs().sum() > 0
    assert vlm.vision_encoder.proj.weight.grad is None


def test_generation_matches_transformers_generate_with_left_padding():
    vlm = make_vlm()
    lm = vlm.language_model
    ids = torch.randint(6, 40, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3] = 0
    mask[0, :3] = 0
    ref = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[:, ids.shape[1]:]
    ours = generate_from_embeds(lm, lm.get_input_embeddings()(ids), mask, max_new_tokens=6)
    assert torch.equal(ours, ref)


def test_left_padding_does_not_change_a_rows_generation():
    vlm = make_vlm()
    lm = vlm.language_model
    row = torch.randint(6, 40, (1, 7))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    emb = lm.get_input_embeddings()
    alone = generate_from_embeds(lm, emb(row), torch.ones_like(row), max_new_tokens=5)
    with_pad = generate_from_embeds(lm, emb(padded), mask, max_new_tokens=5)
    assert torch.equal(alone, with_pad)


def test_frozen_encoder_stays_in_eval_mode_so_training_sees_inference_features():
    """A RADIO student in train mode crops and drops its position embeddings (CPE); frozen inside a VLM it
    must give the same image embeddings during training as at inference."""
    from mmfm.radio import RadioEncoder, create_student

    torch.manual_seed(0)
    lm = tiny_nemotron_h(vocab_size=40, hidden_size=32, pattern="M*-M", mamba_heads=4, mamba_head_dim=16,
                         n_groups=2, num_heads=2, num_kv_heads=1)
    vlm = VLM(RadioEncoder(create_student("tiny")), MeanPool2x2(), Projector(32, 32, 32), lm, image_token_id=IMG)
    images = torch.rand(2, 3, 64, 64)
    vlm.eval()
    with torch.no_grad():
        reference = torch.stack(vlm.embed_images(images))
    vlm.train()
    assert not vlm.vision_encoder.training and vlm.language_model.training
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(vlm.embed_images(images)), reference)
    vlm.freeze_vision = False  # a trainable encoder trains with its own augmentation
    vlm.train()
    assert vlm.vision_encoder.training


def test_trainable_encoder_keeps_position_embeddings_deterministic():
    """A trainable RADIO student trains, but its CPE must not randomly crop / drop position embeddings inside a
    VLM (that scrambles where each visual token is, at train time only); ``cpe_augment=True`` restores it."""
    from mmfm.radio import RadioEncoder, create_student
    from mmfm.radio.cpe import CroppedPositionEmbedding

    torch.manual_seed(0)
    lm = tiny_nemotron_h(vocab_size=40, hidden_size=32, pattern="M*-M", mamba_heads=4, mamba_head_dim=16,
                         n_groups=2, num_heads=2, num_kv_heads=1)
    vlm = VLM(RadioEncoder(create_student("tiny")), MeanPool2x2(), Projector(32, 32, 32), lm, image_token_id=IMG,
              freeze_vision=False)
    images = torch.rand(4, 3, 64, 64)
    vlm.eval()
    with torch.no_grad():
        reference = torch.stack(vlm.embed_images(images))
    vlm.train()
    assert vlm.vision_encoder.training and vlm.vision_encoder.student.blocks[0].training
    cpe = [m for m in vlm.vision_encoder.modules() if isinstance(m, CroppedPositionEmbedding)]
    assert cpe and not any(m.training for m in cpe)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(vlm.embed_images(images)), reference)
    embeds = vlm.embed_images(images)
    embeds[0].sum().backward()
    assert vlm.vision_encoder.student.patch_embed.proj.weight.grad is not None  # it does train
    vlm.cpe_augment = True
    vlm.train()
    assert all(m.training for m in cpe)


def test_mamba_lms_route_to_mmfm_kernels_only_on_cuda():
    """Training on a GPU routes Nemotron-H's Mamba-2 mixers through mmfm.kernels; CPU and attention-only LMs
    keep transformers' own path (the patch is module-level, so it is undone here)."""
    from mmfm.kernels.hf_integration import is_patched, unpatch_transformers
    from mmfm.vlm.decoder import route_mamba_to_mmfm_kernels, tiny_llama

    was = is_patched()
    lm = tiny_nemotron_h(vocab_size=64, hidden_size=64, pattern="M*")
    try:
        assert not route_mamba_to_mmfm_kernels(lm, "cpu")
        assert not route_mamba_to_mmfm_kernels(tiny_llama(vocab_size=64, hidden_size=32), "cuda")
        assert is_patched() == was
        assert route_mamba_to_mmfm_kernels(lm, "cuda")
        import transformers.models.nemotron_h.modeling_nemotron_h as nh

        from mmfm.kernels.hf_integration import mmfm_chunk_scan

        assert nh.mamba2_chunk_scan is mmfm_chunk_scan
    finally:
        if not was:
            unpatch_transformers()
