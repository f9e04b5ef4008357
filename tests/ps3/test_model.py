"""PS3 encoder: context attention equals the ViT block, patch sampling equals direct crops, selection rules."""

from __future__ import annotations

import pytest
import torch

from mmfm.ps3.context_attention import block_forward
from mmfm.ps3.model import PS3Config, PS3Encoder, load


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return PS3Encoder(PS3Config(base_resolution=64, scales=(2, 4), num_look_close=16)).eval()


def test_block_forward_without_context_equals_the_vit_block(encoder):
    block = encoder.vit.blocks[0]
    x = torch.randn(2, 10, encoder.vit.embed_dim)
    out, (k, v) = block_forward(block, x)
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    assert k.shape == (2, block.attn.num_heads, 10, block.attn.head_dim)


def test_context_attention_equals_joint_attention_restricted_to_queries(encoder):
    """Local tokens attending to [local; global] equals running the block on the concatenation, for the
    local rows, when the global rows' own keys are those of the global tokens (one joint sequence)."""
    block = encoder.vit.blocks[0]
    local, glob = torch.randn(1, 5, encoder.vit.embed_dim), torch.randn(1, 7, encoder.vit.embed_dim)
    _, kv = block_forward(block, glob)
    out, _ = block_forward(block, local, context=kv)
    joint = block(torch.cat([local, glob], dim=1))[:, :5]
    torch.testing.assert_close(out, joint, atol=1e-5, rtol=1e-5)


def test_sampled_patches_equal_direct_crops_at_native_resolution(encoder):
    p = encoder.patch_size
    size = encoder.cfg.max_resolution  # 256: the largest scale's grid is exactly the pixel grid / p
    images = torch.rand(2, 3, size, size)
    positions = torch.tensor([[[1, 0, 0], [1, 3, 7], [0, 2, 5]]] * 2)
    got = encoder.sample_patches(images, positions)  # (2, 3, 3*p*p)
    torch.testing.assert_close(got[:, 0], images[:, :, :p, :p].reshape(2, -1))
    torch.testing.assert_close(got[:, 1], images[:, :, 3 * p:4 * p, 7 * p:8 * p].reshape(2, -1))
    # scale index 0 (x2): the patch covers 2p x 2p pixels here; bilinear sampling at the 2x2 block centres
    block = images[:, :, 2 * 2 * p:3 * 2 * p, 5 * 2 * p:6 * 2 * p]
    pooled = torch.nn.functional.avg_pool2d(block, 2)
    torch.testing.assert_close(got[:, 2], pooled.reshape(2, -1), atol=1e-6, rtol=1e-5)


def test_selection_budget_forcing_and_positions(encoder):
    sides = encoder.grid_sizes()
    assert sides == [8, 16] and encoder.num_patches() == 64 + 256
    maps = [torch.zeros(1, s, s) for s in sides]
    maps[1][0, 3, 4] = 5.0
    maps[0][0, 1, 1] = 4.0
    pos = encoder.select(maps, 2)
    assert pos[0].tolist() == [[0, 1, 1], [1, 3, 4]]
    force = [torch.zeros(1, s, s, dtype=torch.bool) for s in sides]
    force[1][0, 10:13, 10:13] = True  # 9 forced patches > budget 2
    pos = encoder.select(maps, 2, force)
    assert pos.shape == (1, 9, 3) and all(s == 1 for s in pos[0, :, 0].tolist())
    assert encoder.select(maps, "all").shape == (1, 320, 3)
    with pytest.raises(ValueError, match="num_look_close=999 must be in"):
        encoder.select(maps, 999)


def test_forward_cost_follows_the_budget_not_the_image(encoder):
    out_small = encoder(torch.rand(1, 3, 64, 64), num_look_close=12)
    out_big = encoder(torch.rand(1, 3, 512, 384), num_look_close=12, prompt=torch.randn(1, 64))
    assert out_small.local_features.shape == out_big.local_features.shape == (1, 12, encoder.vit.embed_dim)
    assert out_big.top_down.shape == (1, 2, 4, 4) and out_small.top_down is None
    assert [m.shape for m in out_big.saliency] == [(1, 8, 8), (1, 16, 16)]


def test_bad_inputs(encoder):
    with pytest.raises(ValueError, match="smaller than the base resolution 64"):
        encoder(torch.rand(1, 3, 32, 96))
    with pytest.raises(ValueError, match="prompt must be"):
        encoder(torch.rand(1, 3, 64, 64), prompt=torch.randn(1, 3))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        PS3Config(base_resolution=100)


def test_save_load_round_trip(encoder, tmp_path):
    encoder.save(tmp_path)
    again = load(tmp_path)
    x = torch.rand(1, 3, 128, 128)
    a, b = encoder(x, num_look_close=8), again(x, num_look_close=8)
    torch.testing.assert_close(a.local_features, b.local_features)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path)


def test_boxes_are_clamped_to_the_image_and_outside_boxes_are_errors():
    from PIL import Image

    from mmfm.data.schemas import Region, RegionSample
    from mmfm.ps3.objective import batch_from_samples

    image = Image.new("RGB", (100, 50))
    inside = RegionSample(key="k0", image=image, regions=[Region(box=(-10, 10, 60, 80), caption="a star")])
    batch = batch_from_samples([inside], image_size=200)
    # clamped to (0, 10, 60, 50) in the 100x50 image, then scaled by (2, 4)
    assert batch.boxes == [[(0.0, 40.0, 120.0, 200.0)]]
    outside = RegionSample(key="k1", image=image, regions=[Region(box=(120, 0, 150, 20), caption="a dot")])
    with pytest.raises(ValueError, match="'k1'.*lies outside the 100x50 image"):
        batch_from_samples([outside], image_size=200)
