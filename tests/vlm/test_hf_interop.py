"""HF ``nemotron_h_omni`` interop: export an mmfm VLM, run transformers' omni model on it, load it back.

Reference: transformers' own ``NemotronH_Omni_Reasoning_V3`` (its RADIO tower, pixel shuffle, projector and
NemotronH) on pixel values built as its image processor builds them. Random-init tiny models, fp32.
"""

from __future__ import annotations

import pytest
import torch

from mmfm.data.schemas import IMAGE_PLACEHOLDER
from mmfm.data.tokenizer import synthetic_tokenizer
from mmfm.radio import RadioEncoder, create_student
from mmfm.radio.compression import AvgPoolCompressor, PixelUnshuffleCompressor
from mmfm.vlm.build import VLMConfig, load, save_vlm
from mmfm.vlm.decoder import tiny_llama, tiny_nemotron_h
from mmfm.vlm.hf_interop import (
    export_hf_omni,
    load_hf_omni,
    omni_image_inputs,
    pixel_shuffle_permutation,
)
from mmfm.vlm.model import VLM
from mmfm.vlm.projector import Projector

ATOL = 1e-4
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.2)  # not CLIP's: checks the statistics travel to the processor


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer()


def make_vlm(tokenizer, compressor=None, seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    encoder = RadioEncoder(create_student("tiny", patch_size=16), input_mean=MEAN, input_std=STD)
    lm = tiny_nemotron_h(len(tokenizer), hidden_size=32, pattern="M-M*-", mamba_heads=4, mamba_head_dim=16,
                         n_groups=2, num_heads=2, num_kv_heads=1, state_size=16, intermediate_size=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    compressor = compressor or PixelUnshuffleCompressor(2)
    projector = Projector(compressor.output_dim(encoder.embed_dim), 48, 32)
    with torch.no_grad():  # non-trivial norm weights so a wrong channel permutation would show
        projector.layer_norm.weight.uniform_(0.5, 1.5)
    vlm = VLM(encoder, compressor, projector, lm, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    vlm.config = VLMConfig(image_size=64, projector_hidden=48)
    return vlm.eval()


def batch(tokenizer, vlm: VLM):
    """Two sequences with one image each, of different sizes (64x64 -> 4 tokens, 64x96 -> 6 tokens)."""
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 96)]
    img = vlm.image_token_id
    text = tokenizer("a red circle above a blue square", add_special_tokens=False)["input_ids"][:7]
    rows = [[tokenizer.bos_token_id, *text[:3], *[img] * 4, *text[3:7], 11],
            [tokenizer.bos_token_id, *text[:2], *[img] * 6, *text[2:6]]]
    assert len(rows[0]) == len(rows[1])
    return torch.tensor(rows), images


def processor_reference(images, mean, std, patch):
    """What the omni image processor does to [0, 1] images already at a multiple-of-32 size (no resize):
    normalise, then row-major patches laid out channel-major (``convert_image_to_patches``)."""
    pv, grids = [], []
    for im in images:
        x = (im[None] - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        _, c, h, w = x.shape
        gh, gw = h // patch, w // patch
        pv.append(x.reshape(1, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(gh * gw, c * patch**2))
        grids.append([gh, gw])
    return torch.cat(pv), torch.tensor(grids)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    vlm = make_vlm(tokenizer)
    out = export_hf_omni(vlm, tokenizer, tmp_path_factory.mktemp("omni"))
    return vlm, out


def test_transformers_omni_matches_mmfm(tokenizer, exported):
    from transformers import NemotronH_Omni_Reasoning_V3

    vlm, out = exported
    ids, images = batch(tokenizer, vlm)
    hf = NemotronH_Omni_Reasoning_V3.from_pretrained(out, local_files_only=True).eval()
    import json

    pre = json.loads((out / "preprocessor_config.json").read_text())
    pixel_values, grid_hw = processor_reference(images, pre["image_mean"], pre["image_std"], pre["patch_size"])
    mine_pv, mine_grid = omni_image_inputs(images, MEAN, STD, 16)
    torch.testing.assert_close(mine_pv, pixel_values, rtol=0, atol=1e-6)
    assert torch.equal(mine_grid, grid_hw)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixel_values, image_grid_hw=grid_hw,
                 attention_mask=torch.ones_like(ids)).logits
        got = vlm(ids, images, attention_mask=torch.ones_like(ids)).logits
    assert ref.shape == got.shape == (2, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    # the image embeddings matter: other images change the logits (the comparison above is not vacuous)
    with torch.no_grad():
        other = vlm(ids, [im.flip(-1) for im in images]).logits
    assert (other - got).abs().max() > 1e-3


def test_load_hf_omni_round_trip(tokenizer, exported, tmp_path):
    vlm, out = exported
    ids, images = batch(tokenizer, vlm)
    loaded, tok = load_hf_omni(out)
    assert tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == loaded.image_token_id == vlm.image_token_id
    assert loaded.vision_encoder.input_mean == pytest.approx(MEAN)
    assert loaded.config.decoder.pattern == "M-M*-" and loaded.config.projector_hidden == 48
    with torch.no_grad():
        ref = vlm(ids, images).logits
        got = loaded(ids, images).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    # mmfm.vlm.load dispatches HF dirs here, and the result saves as an mmfm VLM directory
    again, _ = load(out)
    saved = save_vlm(again, tok, tmp_path / "mmfm")
    reloaded, _ = load(saved)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, images).logits, ref, rtol=0, atol=ATOL)


def test_pixel_shuffle_permutation_is_a_permutation():
    perm = pixel_shuffle_permutation(5)
    assert sorted(perm.tolist()) == list(range(20))
    # ours[..., perm] reproduces transformers' pixel_shuffle on random features of an even grid
    from transformers import NemotronH_Omni_Reasoning_V3

    x = torch.randn(2, 6 * 4, 5)
    ours = PixelUnshuffleCompressor(2)(x, (6, 4))
    theirs = NemotronH_Omni_Reasoning_V3.pixel_shuffle(None, x.view(2, 6, 4, 5), 0.5).reshape(2, 6, 20)
    torch.testing.assert_close(ours[..., perm], theirs, rtol=0, atol=0)


def _channel_major_shuffle(x: torch.Tensor) -> torch.Tensor:
    """A 2x2 shuffle with another channel order (torch's pixel_unshuffle: d-major), (B, h, w, D) -> (B, h/2, w/2, 4D)."""
    y = torch.nn.functional.pixel_unshuffle(x.permute(0, 3, 1, 2), 2)
    return y.permute(0, 2, 3, 1)


def test_projector_permutation_for_a_different_channel_order(monkeypatch):
    """If omni ordered channels differently, the permuted projector must still give the same embeddings, and the
    loader's inverse must give back the original projector."""
    import mmfm.vlm.hf_interop as hi

    monkeypatch.setattr(hi, "_omni_pixel_shuffle", _channel_major_shuffle)
    d = 6
    perm = hi.pixel_shuffle_permutation(d)
    assert not torch.equal(perm, torch.arange(4 * d))
    torch.manual_seed(0)
    proj = Projector(4 * d, 16, 8)
    with torch.no_grad():
        proj.layer_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4 * 2, d)
    ours = PixelUnshuffleCompressor(2)(x, (4, 2))
    theirs = _channel_major_shuffle(x.view(3, 4, 2, d)).reshape(3, 2, 4 * d)
    omni_w = hi._projector_to_omni(proj, perm)
    omni_proj = Projector(4 * d, 16, 8)
    omni_proj.layer_norm.weight.data.copy_(omni_w["mlp1.0.weight"])
    omni_proj.linear_1.weight.data.copy_(omni_w["mlp1.1.weight"])
    omni_proj.linear_2.weight.data.copy_(omni_w["mlp1.3.weight"])
    with torch.no_grad():
        torch.testing.assert_close(omni_proj(theirs), proj(ours), rtol=0, atol=1e-6)
    back = hi._projector_from_omni(omni_w, perm)
    for name, p in proj.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_non_fitting_architecture_raises(tokenizer, tmp_path):
    vlm = make_vlm(tokenizer, compressor=AvgPoolCompressor(2))
    with pytest.raises(ValueError, match="compressor must be a 2x2 PixelUnshuffleCompressor"):
        export_hf_omni(vlm, tokenizer, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    vlm = make_vlm(tokenizer, compressor=PixelUnshuffleCompressor(3))
    with pytest.raises(ValueError, match="factor=3"):
        export_hf_omni(vlm, tokenizer, tmp_path / "bad3")
    vlm = make_vlm(tokenizer)
    vlm.projector = Projector(4 * 32, 48, 32, activation="gelu", bias=True)
    vlm.language_model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError) as err:
        export_hf_omni(vlm, tokenizer, tmp_path / "bad4")
    assert "activation=GELU" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_bf16_export_and_load(tokenizer, tmp_path):
    """bf16 weights stay bf16 through export and load; transformers' bf16 logits agree with mmfm's."""
    from transformers import NemotronH_Omni_Reasoning_V3

    vlm = make_vlm(tokenizer).to(torch.bfloat16)
    ids, images = batch(tokenizer, vlm)
    out = export_hf_omni(vlm, tokenizer, tmp_path / "bf16")
    hf = NemotronH_Omni_Reasoning_V3.from_pretrained(out, local_files_only=True, dtype="auto").eval()
    assert hf.language_model.lm_head.weight.dtype == torch.bfloat16
    pixel_values, grid_hw = omni_image_inputs(images, MEAN, STD, 16)
    loaded, _ = load_hf_omni(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixel_values, image_grid_hw=grid_hw).logits.float()
        got = vlm(ids, images).logits.float()
        again = loaded(ids, images).logits.float()
    # same weights and op order (bit-identical on CPU here); the margin is one bf16 step of these logits (<1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-2)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_load_transformers_written_dir_with_mtp_vision_norm(tokenizer, tmp_path):
    """A directory written by transformers itself (random omni model whose LM config has MTP layers, so omni
    normalises the vision features with ``vision_final_layernorm``): load, compare, save as mmfm, export again."""
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

    torch.manual_seed(0)
    text = tiny_nemotron_h(len(tokenizer), hidden_size=32, pattern="M*-", mamba_heads=4, mamba_head_dim=16,
                           n_groups=2, num_heads=2, num_kv_heads=1).config.to_dict()
    text["num_nextn_predict_layers"] = 1
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16, image_size=64,
                  max_img_size=256, num_cls_tokens=2, num_registers=1, summary_idxs=[0, 1],
                  norm_mean=list(MEAN), norm_std=list(STD), video_temporal_patch_size=2)
    img = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    cfg = NemotronH_Omni_Reasoning_V3_Config(vision_config=vision, text_config=text, projector_hidden_size=48,
                                             vision_hidden_size=32, image_token_id=img)
    hf = NemotronH_Omni_Reasoning_V3(cfg).eval()
    with torch.no_grad():  # away from the identity init, so a dropped norm would show
        hf.vision_final_layernorm.weight.uniform_(0.5, 1.5)
        hf.vision_final_layernorm.bias.normal_()
        hf.multi_modal_projector.layer_norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    vlm, _ = load_hf_omni(tmp_path / "hf")
    assert vlm.vision_encoder.student.cfg.final_norm
    ids, images = batch(tokenizer, vlm)
    pixel_values, grid_hw = processor_reference(images, MEAN, STD, 16)  # no preprocessor_config: vision stats
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixel_values, image_grid_hw=grid_hw).logits
        torch.testing.assert_close(vlm(ids, images).logits, ref, rtol=0, atol=ATOL)

    out = export_hf_omni(vlm, tokenizer, tmp_path / "again")
    hf2, info = NemotronH_Omni_Reasoning_V3.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref2 = hf2.eval()(input_ids=ids, pixel_values=pixel_values, image_grid_hw=grid_hw).logits
    torch.testing.assert_close(ref2, ref, rtol=0, atol=ATOL)
