"""Student ViT: patch layout, attention, CPE, ViTDet windows, checkpointing, sizes (refs: unfold, naive attention,
per-window loop, timm block shapes)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfm.radio.cpe import CroppedPositionEmbedding
from mmfm.radio.vit import VIT_SIZES, Attention, ViT, create_student, patchify


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_patchify_matches_unfold():
    x = torch.randn(2, 3, 32, 48)
    ref = F.unfold(x, kernel_size=16, stride=16).transpose(1, 2)  # (B, L, C*p*p), channel-major
    assert torch.equal(patchify(x, 16), ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_matches_naive(dtype, tol):
    torch.manual_seed(0)
    attn = Attention(32, 4)
    _perturb(attn)
    x = torch.randn(2, 7, 32)
    b, n, d = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(b, n, d))
    out = attn.to(dtype)(x.to(dtype)).float()
    assert (out - ref).abs().max().item() < tol


def test_cpe_eval_window_geometry():
    torch.manual_seed(0)
    cpe = CroppedPositionEmbedding(8, max_grid=8).eval()
    full = cpe.grid().flatten(2).transpose(1, 2)
    assert torch.equal(cpe(1, 8, 8), full)  # at the maximum grid the embedding is the grid itself
    # non-square = top-left window of the square one with side max(h, w)
    sq = cpe.window(6, 6).reshape(1, 6, 6, 8)
    assert torch.allclose(cpe.window(4, 6).reshape(1, 4, 6, 8), sq[:, :4])
    assert torch.allclose(cpe.window(6, 3).reshape(1, 6, 3, 8), sq[:, :, :3])
    ref = F.interpolate(cpe.grid(), size=(6, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(sq, ref.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="exceeds the position grid"):
        cpe.window(9, 2)


def test_cpe_training_crops():
    torch.manual_seed(0)
    # full-area, square, no dropout: the crop is the whole grid, resampled exactly
    cpe = CroppedPositionEmbedding(4, max_grid=6, pos_dropout=0.0, min_area=1.0, aspect_range=(1.0, 1.0)).train()
    full = cpe.grid().flatten(2).transpose(1, 2)
    assert torch.allclose(cpe(3, 6, 6), full.expand(3, -1, -1), atol=1e-6)
    # random crops: per sample different, values are convex combinations of grid values
    cpe = CroppedPositionEmbedding(4, max_grid=16, pos_dropout=0.0).train()
    pos = cpe(8, 5, 7)
    assert pos.shape == (8, 35, 4)
    assert not torch.allclose(pos[0], pos[1])
    lo, hi = cpe.weight.amin(dim=1), cpe.weight.amax(dim=1)
    assert bool(((pos >= lo - 1e-6) & (pos <= hi + 1e-6)).all())
    # gradients flow into the grid
    pos.sum().backward()
    assert cpe.weight.grad is not None and cpe.weight.grad.abs().sum() > 0
    # whole-embedding dropout
    cpe = CroppedPositionEmbedding(4, max_grid=16, pos_dropout=0.5).train()
    pos = cpe(400, 2, 2)
    zero = (pos.abs().sum(dim=(1, 2)) == 0).float().mean().item()
    assert 0.38 < zero < 0.62
    # video mode: consecutive frames share a crop
    cpe = CroppedPositionEmbedding(4, max_grid=16, pos_dropout=0.0).train()
    with cpe.video_frames(2):
        pos = cpe(4, 3, 3)
    assert torch.equal(pos[0], pos[1]) and not torch.equal(pos[1], pos[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpe_crops_match_per_sample_grid_sample(dtype):
    """The n crops sampled as one stacked grid == each crop sampled on its own (``F.grid_sample`` per sample,
    the definition), in value and in the gradient reaching the grid; fp32 exact to 1e-6, a bf16 grid to bf16."""
    torch.manual_seed(0)
    cpe = CroppedPositionEmbedding(8, max_grid=16, pos_dropout=0.0).train().to(dtype)
    gen = torch.Generator().manual_seed(3)
    pos = cpe.random_crops(5, 6, 9, generator=gen)
    # the same crops, by the definition: replay the generator, sample each crop on its own
    gen = torch.Generator().manual_seed(3)
    rand = torch.rand(5, 5, generator=gen)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    area, aspect = 0.1 + 0.9 * rand[:, 0], torch.exp(lo + (hi - lo) * rand[:, 1])
    sx = (9 / 9 * torch.sqrt(area * aspect)).clamp(max=1.0)
    sy = (6 / 9 * torch.sqrt(area / aspect)).clamp(max=1.0)
    ox, oy = (1 - sx) * rand[:, 2], (1 - sy) * rand[:, 3]
    ref = []
    for i in range(5):
        gx = ox[i] + sx[i] * torch.linspace(0, 1, 9)
        gy = oy[i] + sy[i] * torch.linspace(0, 1, 6)
        xy = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None] * 2 - 1  # (1, 6, 9, 2)
        one = F.grid_sample(cpe.grid().float(), xy, mode="bilinear", align_corners=True)  # (1, D, 6, 9)
        ref.append(one.flatten(2).transpose(1, 2)[0])
    ref = torch.stack(ref).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(pos, ref, **tol)
    w = torch.randn(pos.shape)
    (g,) = torch.autograd.grad((pos.float() * w).sum(), cpe.weight)
    (g_ref,) = torch.autograd.grad((ref.float() * w).sum(), cpe.weight)
    torch.testing.assert_close(g.float(), g_ref.float(), **tol)


def test_vitdet_windows_match_per_window_reference():
    torch.manual_seed(0)
    m = create_student("tiny", depth=4, num_cls_tokens=2, num_registers=1, window_size=2, global_blocks=(1, 3)).eval()
    _perturb(m)
    x = torch.randn(2, 3, 64, 96)  # 4 x 6 tokens, 2 x 3 windows of 2 x 2
    tokens, (h, w) = m.embed(x)
    s = m.num_prefix_tokens
    ref = tokens
    for i, blk in enumerate(m.blocks):
        if i in (1, 3):
            ref = blk(ref)
            continue
        pre, pat = ref[:, :s], ref[:, s:].reshape(2, h, w, -1).clone()
        for r in range(0, h, 2):
            for c in range(0, w, 2):
                win = pat[:, r:r + 2, c:c + 2].reshape(2, 4, -1)
                pat[:, r:r + 2, c:c + 2] = blk(win).reshape(2, 2, 2, -1)
        ref = torch.cat([pre, pat.reshape(2, h * w, -1)], dim=1)
    with torch.no_grad():
        out = m.forward_tokens(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert m.min_resolution_step == 32
    # windowed blocks change the result vs. all-global attention
    glob = create_student("tiny", depth=4, num_cls_tokens=2, num_registers=1).eval()
    glob.load_state_dict(m.state_dict())
    assert not torch.allclose(glob.forward_tokens(x), out, atol=1e-4)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = create_student("tiny", num_cls_tokens=2, pos_dropout=0.0, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    m.train()  # checkpointing only acts in training; the same seed gives the same random CPE crops
    torch.manual_seed(3)
    m.forward_tokens(x).square().mean().backward()
    g_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    torch.manual_seed(3)
    m.forward_tokens(x).square().mean().backward()
    for p, g in zip(m.parameters(), g_ref):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_forward_sequence_and_intermediates():
    torch.manual_seed(0)
    m = create_student("tiny", depth=3, num_cls_tokens=2, num_registers=2).eval()
    _perturb(m)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        full = m.forward_tokens(x)
        seq = m.forward_sequence(m.patch_embed.proj(patchify(x, 16)), m.pos_embed.window(2, 3))
        final, inter = m.forward_intermediates(x, [0, -1], stop_early=False)
    assert torch.allclose(seq, full, atol=1e-6)
    assert torch.allclose(final, full) and torch.allclose(inter[1], full)
    f = m.split(full)
    assert f.cls_tokens.shape == (1, 2, 32) and f.registers.shape == (1, 2, 32) and f.patches.shape == (1, 6, 32)
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [5])


@pytest.mark.parametrize("size", ["B", "L", "H", "g", "SO400M"])
def test_sizes_match_timm_block_shapes(size):
    import timm

    ref_name = {"B": "vit_base_patch16_224", "L": "vit_large_patch16_224", "H": "vit_huge_patch14_224",
                "g": None, "SO400M": "vit_so400m_patch14_siglip_224"}[size]
    with torch.device("meta"):
        m = create_student(f"{size}/16")
    cfg = VIT_SIZES[size]
    assert m.pos_embed.weight.shape == (1, 128 * 128, cfg.embed_dim)  # 2048 px grid at patch 16
    ours = sum(p.numel() for p in m.blocks.parameters())
    if ref_name is None:  # ViT-g/16 (RADIO): 1536 wide, 40 blocks, MLP 4x
        d = 1536
        assert ours == 40 * (4 * d * d + 4 * d + 2 * 4 * d * d + 5 * d + 4 * d)
        return
    with torch.device("meta"):
        ref = timm.create_model(ref_name, pretrained=False)
    assert ours == sum(p.numel() for p in ref.blocks.parameters())
    with torch.device("meta"):
        m14 = create_student(f"{size}/14")
    assert m14.patch_size == 14 and m14.max_resolution == 1792


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    m = create_student("tiny", num_cls_tokens=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_tokens(x)
        out = m.to(torch.bfloat16).forward_tokens(x.bfloat16()).float()
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_bad_config():
    with pytest.raises(ValueError, match="unknown ViT size"):
        create_student("Q")
    with pytest.raises(ValueError, match="not divisible"):
        create_student("tiny", num_heads=3)
    with pytest.raises(TypeError, match="unknown ViTConfig fields"):
        create_student("tiny", bogus=1)
    assert isinstance(create_student("tiny"), ViT)
