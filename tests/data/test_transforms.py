"""Transforms: patch-multiple sizes, to_tensor, normalisation constants (vs open_clip / timm),
multi-resolution sampling, mosaic round trip."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.data.transforms import (
    NORMALIZATION,
    MultiResolutionBatchSampler,
    ResolutionSchedule,
    center_crop_to_multiple,
    denormalize,
    mosaic,
    multires_batches,
    normalize,
    resize_to_multiple,
    to_tensor,
    unmosaic,
)


def _pil(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_to_tensor_matches_numpy_reference():
    img = _pil(5, 7)
    x = to_tensor(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    ref = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert 0.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(TypeError, match="image"):
        to_tensor(torch.zeros(3, 4, 4))


def test_resize_to_multiple_sizes_and_errors():
    img = _pil(30, 50)
    assert resize_to_multiple(img, 32, patch_size=16).size == (32, 32)
    assert resize_to_multiple(img, (48, 64), patch_size=16).size == (64, 48)  # PIL size is (W, H)
    assert resize_to_multiple(img, patch_size=16).size == (48, 32)  # nearest multiples of 50 and 30
    x = to_tensor(img)
    assert resize_to_multiple(x, (32, 48), patch_size=16).shape == (3, 32, 48)
    assert resize_to_multiple(x[None].repeat(2, 1, 1, 1), 16, patch_size=16).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"not a multiple of patch_size=16; nearest valid height: 224 or 240"):
        resize_to_multiple(img, 230, patch_size=16)
    with pytest.raises(ValueError, match=r"width 10 .* nearest valid width: 14"):
        resize_to_multiple(img, (28, 10), patch_size=14)
    with pytest.raises(TypeError, match="size"):
        resize_to_multiple(img, "224", patch_size=16)


def test_center_crop_to_multiple():
    img = _pil(37, 53)
    out = center_crop_to_multiple(img, 16)
    assert out.size == (48, 32)
    # No resampling: the crop equals the centered slice of the pixels.
    arr = np.asarray(img)
    assert np.array_equal(np.asarray(out), arr[2:34, 2:50])
    x = to_tensor(img)
    torch.testing.assert_close(center_crop_to_multiple(x, 16), x[:, 2:34, 2:50])
    # With a target size: cover, then crop.
    assert center_crop_to_multiple(img, 14, size=28).size == (28, 28)
    assert center_crop_to_multiple(x, 14, size=(28, 42)).shape == (3, 28, 42)
    with pytest.raises(ValueError, match="nearest valid"):
        center_crop_to_multiple(img, 14, size=30)
    with pytest.raises(ValueError, match="smaller than one patch"):
        center_crop_to_multiple(_pil(8, 8), 16)


def test_normalization_constants_match_libraries():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN

    assert NORMALIZATION["openai_clip"] == (tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD))
    assert NORMALIZATION["imagenet"] == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert NORMALIZATION["dinov2"] == NORMALIZATION["imagenet"]
    assert NORMALIZATION["siglip"][0] == tuple(IMAGENET_INCEPTION_MEAN)  # SigLIP: (0.5, 0.5, 0.5)
    sam_mean = tuple(v / 255 for v in (123.675, 116.28, 103.53))
    np.testing.assert_allclose(NORMALIZATION["sam"][0], sam_mean, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_against_torchvision(dtype):
    from torchvision.transforms.functional import normalize as tv_normalize

    x = torch.rand(2, 3, 4, 5).to(dtype)
    for name, (mean, std) in NORMALIZATION.items():
        ref = tv_normalize(x.float(), mean, std)
        tol = 1e-6 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(normalize(x, name).float(), ref, rtol=tol, atol=tol)
        assert normalize(x, name).dtype == dtype
        torch.testing.assert_close(denormalize(normalize(x[0].float(), name), name), x[0].float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown; use one of"):
        normalize(x, "clip")
    with pytest.raises(ValueError, match="expected"):
        normalize(torch.rand(4, 4), "imagenet")


def test_resolution_schedule_is_deterministic_and_follows_probabilities():
    sched = ResolutionSchedule([224, (256, 384), 448], probabilities=[0.6, 0.1, 0.3], seed=1, patch_size=16)
    draws = [sched.resolution(s) for s in range(6000)]
    again = ResolutionSchedule([224, (256, 384), 448], probabilities=[6, 1, 3], seed=1, patch_size=16)
    assert draws == [again.resolution(s) for s in range(6000)]  # depends only on (seed, step), normalised probs
    assert sched.resolution(4321) == draws[4321]  # random access: resume at any step
    freq = Counter(draws)
    for res, p in [((224, 224), 0.6), ((256, 384), 0.1), ((448, 448), 0.3)]:
        assert abs(freq[res] / 6000 - p) < 0.025  # ~4 sigma for n=6000
    other = ResolutionSchedule([224, (256, 384), 448], probabilities=[0.6, 0.1, 0.3], seed=2, patch_size=16)
    assert [other.resolution(s) for s in range(50)] != draws[:50]
    with pytest.raises(ValueError, match="nearest valid"):
        ResolutionSchedule([224, 300], patch_size=16)
    with pytest.raises(ValueError, match="probabilities"):
        ResolutionSchedule([224, 256], probabilities=[1.0])


def test_multires_batch_sampler():
    sched = ResolutionSchedule([32, 64], seed=0, patch_size=16)
    sampler = MultiResolutionBatchSampler(50, {32: 8, 64: 2}, sched, shuffle=True, seed=3)
    batches = list(sampler)
    indices = [i for b in batches for i, _ in b]
    assert sorted(indices) == list(range(50))  # each index once per epoch
    for step, b in enumerate(batches):
        res = {r for _, r in b}
        assert res == {sched.resolution(step)}  # one resolution per batch, from the schedule
        assert len(b) <= (8 if res == {(32, 32)} else 2)
    assert batches == list(MultiResolutionBatchSampler(50, {32: 8, 64: 2}, sched, shuffle=True, seed=3))
    sampler.set_epoch(1)
    assert [i for b in sampler for i, _ in b] != indices

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, item):
            idx, (h, w) = item
            return torch.full((3, h, w), float(idx))

    dl = torch.utils.data.DataLoader(DS(), batch_sampler=MultiResolutionBatchSampler(50, 4, sched, seed=3))
    shapes = {tuple(b.shape[-2:]) for b in dl}
    assert shapes <= {(32, 32), (64, 64)} and len(shapes) == 2


def test_multires_batches_on_a_stream():
    from mmfm.data.schemas import ImageSample

    samples = [ImageSample(key=str(i), image=_pil(40, 60, i)) for i in range(7)]
    sched = ResolutionSchedule([16, 32], seed=0, patch_size=16)
    out = list(multires_batches(samples, sched, batch_size=3, patch_size=16, normalization="imagenet"))
    assert [len(s) for _, s, _ in out] == [3, 3, 1]
    for step, (x, _, res) in enumerate(out):
        assert res == sched.resolution(step) and x.shape[-2:] == res and x.shape[:2] == (len(out[step][1]), 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mosaic_roundtrip_and_boxes(k):
    tiles = [torch.rand(3, 4, 6) for _ in range(k * k)]
    image, boxes = mosaic(tiles, k)
    assert image.shape == (3, 4 * k, 6 * k) and boxes.shape == (k * k, 4)
    for i, (tile, box) in enumerate(zip(tiles, boxes)):
        x0, y0, x1, y1 = (int(v) for v in box)
        assert (x0, y0) == ((i % k) * 6, (i // k) * 4) and (x1 - x0, y1 - y0) == (6, 4)
        assert torch.equal(image[:, y0:y1, x0:x1], tile)  # the box addresses exactly that tile
    back = unmosaic(image, k)
    assert torch.equal(back, torch.stack(tiles))
    assert torch.equal(unmosaic(image[None].repeat(2, 1, 1, 1), k)[1], torch.stack(tiles))


def test_mosaic_errors():
    with pytest.raises(ValueError, match="needs 4 images, got 3"):
        mosaic([torch.rand(3, 4, 4)] * 3, 2)
    with pytest.raises(ValueError, match="share one shape"):
        mosaic([torch.rand(3, 4, 4)] * 3 + [torch.rand(3, 4, 5)], 2)
    with pytest.raises(ValueError, match="cannot be split"):
        unmosaic(torch.rand(3, 5, 6), 2)
