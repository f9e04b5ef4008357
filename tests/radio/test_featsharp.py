"""FeatSharp upsampler: shapes, JBU / downsampler / tiling properties, training signal, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfm.radio.featsharp import (
    FeatSharpConfig,
    FeatSharpTeacher,
    FeatSharpUpsampler,
    JBULevel,
    LearnedDownsampler,
    LocalFusionBlock,
    train_featsharp,
)
from mmfm.radio.teachers import TeacherSpec, build_teacher

CFG = FeatSharpConfig(heads=2, window=5, guidance_dim=8)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(TeacherSpec("vit", "timm", "vit_tiny_patch16_224", input_size=32,
                                     model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8)))


def _smooth_images(n_batches=4, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
            for _ in range(n_batches)]


@pytest.mark.parametrize("u", [2, 4])
def test_shapes(teacher, u):
    up = FeatSharpUpsampler(teacher, u, CFG)
    up.normalizer.update(torch.randn(100, 16))
    up.normalizer.fit()
    lr, hr = up.apply(torch.rand(2, 3, 40, 48))
    assert lr.shape == (2, 16, 4, 4) and hr.shape == (2, 16, 4 * u, 4 * u)
    assert len(up.jbu) == (1 if u == 2 else 2)
    lr_d, hr_d = up.apply(torch.rand(2, 3, 40, 48), denormalize=True)
    assert torch.isfinite(hr_d).all()


def test_tiles_are_one_batched_pass_reassembled(teacher):
    up = FeatSharpUpsampler(teacher, 2, CFG)
    imgs = torch.rand(2, 3, 32, 32)
    lr, tiles = up.teacher_views(imgs)
    torch.testing.assert_close(lr, teacher(imgs)[1])
    big = F.interpolate(imgs, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    # tile (row 1, col 0) of the enlarged image = the lower-left quarter of the assembled map
    _, ref = teacher(big[:, :, 32:, :32])
    torch.testing.assert_close(tiles[:, :, 4:, :4], ref, rtol=1e-4, atol=1e-5)


def test_jbu_constant_guidance_is_gaussian_blur_of_bilinear():
    torch.manual_seed(0)
    level = JBULevel(2, radius=2, guidance_dim=4)
    with torch.no_grad():
        level.log_sigma.fill_(math.log(0.8))
    x = torch.randn(1, 3, 5, 6)
    guide = torch.full((1, 3, 20, 24), 0.3)  # constant: range kernel is uniform
    out = level(x, guide)
    up = F.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False)
    d = torch.arange(5.0) - 2
    g1 = torch.exp(-d ** 2 / (2 * 0.8 ** 2))
    k2 = torch.outer(g1, g1)
    k2 = (k2 / k2.sum()).expand(3, 1, 5, 5)
    ref = F.conv2d(F.pad(up, [2] * 4, mode="reflect"), k2, groups=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the weights of a non-constant guidance still form a convex combination
    w = level.kernel(torch.rand(2, 3, 10, 12))
    torch.testing.assert_close(w.sum(1), torch.ones(2, 10, 12))
    assert (w >= 0).all()


def test_downsampler_init_is_average_pooling():
    d = LearnedDownsampler(dim=3, factor=2)
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(d(x), F.avg_pool2d(x, 2))


def test_local_attention_is_local():
    torch.manual_seed(0)
    blk = LocalFusionBlock(dim=4, heads=2, window=3, layer_scale=1.0)
    x = torch.randn(1, 36, 8, requires_grad=True)
    out = blk(x, (6, 6))
    assert out.shape == (1, 36, 4)
    out[0, 0].sum().backward()  # token (0, 0) may only see tokens within distance 1 (window 3)
    g = x.grad[0].abs().sum(-1).view(6, 6)
    assert (g[:2, :2] > 0).all() and g[2:].abs().sum() == 0 and g[:, 2:].abs().sum() == 0


def test_loss_decreases_and_save_load(teacher, tmp_path):
    torch.manual_seed(0)
    up = FeatSharpUpsampler(teacher, 2, CFG)
    up, losses = train_featsharp(teacher, _smooth_images(), steps=30, lr=5e-3, upsampler=up, seed=0)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    # teacher stays frozen
    assert all(not p.requires_grad for p in teacher.parameters())
    path = tmp_path / "fs.safetensors"
    up.save(str(path))
    again = FeatSharpUpsampler.load(str(path), teacher)
    imgs = torch.rand(2, 3, 32, 32)
    for a, b in zip(up.apply(imgs), again.apply(imgs)):
        torch.testing.assert_close(a, b)
    assert again.cfg == up.cfg
    # the teacher-interface wrapper gives teacher-space u-times features and the low-res summary
    spec = TeacherSpec("vit", "timm", "vit_tiny_patch16_224", input_size=32, upsample_factor=2,
                       featsharp_checkpoint=str(path))
    ft = FeatSharpTeacher.from_spec(spec, teacher)
    s, f = ft(imgs)
    torch.testing.assert_close(s, teacher(imgs)[0])
    _, hr = again.apply(imgs, denormalize=True)
    torch.testing.assert_close(f, hr)
    assert f.shape == (2, 16, 8, 8) and ft.upsample_factor == 2
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        FeatSharpUpsampler.load(str(tmp_path / "missing.safetensors"), teacher)


def test_bad_factor(teacher):
    with pytest.raises(ValueError, match="factor"):
        FeatSharpUpsampler(teacher, 1, CFG)


def test_train_cycles_reiterables_and_rejects_short_iterators(teacher):
    up, losses = train_featsharp(teacher, _smooth_images(n_batches=2), steps=5, fit_batches=1, seed=0)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        train_featsharp(teacher, iter(_smooth_images(n_batches=3)), steps=5, fit_batches=1)
    with pytest.raises(ValueError, match="yielded no batches"):
        train_featsharp(teacher, [], steps=1)
