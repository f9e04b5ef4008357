"""Synthetic shapes world: determinism, ground truth against the drawn pixels, VQA answer logic."""

from __future__ import annotations

import re
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch

from mmfm.data import synth
from mmfm.data.schemas import IMAGE_PLACEHOLDER, ConversationSample, ImageSample, RegionSample
from mmfm.data.synth import (
    COLORS,
    SHAPES,
    VQA_CATEGORIES,
    corpus_texts,
    iter_synthetic,
    iter_vqa_items,
    make_sample,
    sample_scene,
)
from mmfm.vlm.metrics import majority_baseline, normalize_answer, vqa_accuracy


def _pixels(sample) -> np.ndarray:
    image = sample.images[0] if isinstance(sample, ConversationSample) else sample.image
    return np.asarray(image)


@pytest.mark.parametrize("kind, size", [("images", 96), ("vqa", 96), ("regions", 256)])
def test_deterministic_per_seed_and_prefix_stable(kind: str, size: int) -> None:
    a = list(iter_synthetic(kind, 4, seed=3, image_size=size))
    b = list(iter_synthetic(kind, 6, seed=3, image_size=size))[:4]
    c = list(iter_synthetic(kind, 4, seed=4, image_size=size))
    for x, y in zip(a, b):
        assert x.key == y.key
        np.testing.assert_array_equal(_pixels(x), _pixels(y))
        assert x.to_wds()["json"] == y.to_wds()["json"]
    assert any(not np.array_equal(_pixels(x), _pixels(z)) for x, z in zip(a, c))
    assert {type(s) for s in a} == {{"images": ImageSample, "vqa": ConversationSample, "regions": RegionSample}[kind]}


def test_default_sizes() -> None:
    assert make_sample("images", 0).image.size == (224, 224)
    assert make_sample("vqa", 0).images[0].size == (224, 224)
    assert make_sample("regions", 0, image_size=2048).image.size == (2048, 2048)


def _assert_shapes_drawn(scene: synth.Scene, pixels: np.ndarray) -> None:
    # The centre of every shape (inside all six polygons) has exactly the shape's colour, and the
    # box is inside the image: the scene description matches what was drawn.
    h, w = pixels.shape[:2]
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, s
        assert tuple(pixels[int(s.cy), int(s.cx)]) == COLORS[s.color], s


def test_images_ground_truth() -> None:
    for i in range(12):
        sample = make_sample("images", i, seed=1, image_size=128)
        scene = sample_scene("images", i, seed=1, image_size=128)
        _assert_shapes_drawn(scene, np.asarray(sample.image))
        largest = max(scene.shapes, key=lambda s: s.radius)
        assert sample.label == SHAPES.index(largest.kind)
        assert 1 <= len(scene.shapes) <= 6
        # the caption mentions every (colour, kind) group and the background
        for s in scene.shapes:
            assert s.color in sample.caption and s.kind[:4] in sample.caption
        assert f"{scene.background} background" in sample.caption


def test_regions_boxes_and_small_details() -> None:
    size = 512
    for i in range(6):
        sample = make_sample("regions", i, seed=2, image_size=size)
        scene = sample_scene("regions", i, seed=2, image_size=size)
        _assert_shapes_drawn(scene, np.asarray(sample.image))
        assert len(sample.regions) == len(scene.shapes) + len(scene.texts)
        small = [r for r in sample.regions if r.caption.startswith(("a small", "the text"))]
        assert small, "every region scene hides at least one small detail"
        for r in sample.regions:
            x0, y0, x1, y1 = r.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        for r in small:
            x0, y0, x1, y1 = r.box
            if r.caption.startswith("a small"):
                assert max(x1 - x0, y1 - y0) <= 0.05 * size + 1  # 2-5 % of the image side
            else:  # a short code: text height 2-3 % of the side plus its label padding
                assert y1 - y0 <= 0.05 * size and x1 - x0 <= 0.15 * size
                assert re.fullmatch(r"the text '[A-Z2-9]{2,3}'", r.caption)
        for r in sample.regions:
            if r.caption.startswith("a large"):
                assert min(r.box[2] - r.box[0], r.box[3] - r.box[1]) >= 0.09 * size
        # a small detail is unreadable at 224 px: its box shrinks below ~12 px
        assert all(max(r.box[2] - r.box[0], r.box[3] - r.box[1]) * 224 / size < 24 for r in small)


def _check_vqa_truth(item: synth.VQAItem) -> None:
    scene, q, a = item.scene, item.question, item.answer
    cat = item.category
    if cat == "count":
        m = re.match(r"How many (\w+) (shapes|objects) ", q)
        if m and m.group(1) in COLORS:
            assert int(a) == sum(s.color == m.group(1) for s in scene.shapes)
        else:
            kind = next(k for k in SHAPES if synth._plural(k) in q)
            assert int(a) == sum(s.kind == kind for s in scene.shapes)
    elif cat == "color":
        kind = next(k for k in SHAPES if re.search(rf"\bthe {k}\b", q))
        matches = [s for s in scene.shapes if s.kind == kind]
        assert len(matches) == 1 and matches[0].color == a
    elif cat == "shape":
        color = next(c for c in COLORS if f" {c} " in q or f"is {c}?" in q)
        matches = [s for s in scene.shapes if s.color == color]
        assert len(matches) == 1 and matches[0].kind == a
    elif cat == "position":
        s = next(s for s in scene.shapes if f"the {s.color} {s.kind} " in q)
        third = scene.width / 3
        truth = {"left": s.cx < third, "right": s.cx > 2 * third, "top": s.cy < third, "bottom": s.cy > 2 * third}
        assert truth[a]
    elif cat == "relation":
        m = re.match(r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", q)
        sa = [s for s in scene.shapes if (s.color, s.kind) == m.group(1, 2)]
        sb = [s for s in scene.shapes if (s.color, s.kind) == m.group(4, 5)]
        assert len(sa) == len(sb) == 1
        A, B = sa[0], sb[0]
        holds = {"to the left of": A.box[2] < B.box[0], "to the right of": A.box[0] > B.box[2],
                 "above": A.box[3] < B.box[1], "below": A.box[1] > B.box[3]}[m.group(3)]
        assert a == ("yes" if holds else "no")
    elif cat == "existence":
        m = re.match(r"Is there an? (\w+) (\w+)", q)
        present = any((s.color, s.kind) == m.group(1, 2) for s in scene.shapes)
        assert a == ("yes" if present else "no")
    elif cat == "text":
        assert len(scene.texts) == 1 and scene.texts[0].text.lower() == a
    else:
        raise AssertionError(cat)


def test_vqa_ground_truth_and_answers() -> None:
    items = list(iter_vqa_items(140, seed=5))
    assert {it.category for it in items} == set(VQA_CATEGORIES)
    for it in items:
        _check_vqa_truth(it)
        assert len(it.answers) == 10
        assert Counter(it.answers).most_common(1)[0][0] == it.answer  # raw majority is the truth
        assert normalize_answer(it.answer) == it.answer  # stored normalised, like VQAv2
        assert vqa_accuracy(it.answer, it.answers) == 1.0
        assert 1 <= len(it.scene.shapes) <= 6


def test_vqa_samples_render_the_scene() -> None:
    for i in range(14):
        sample = make_sample("vqa", i, seed=6, image_size=160)
        assert sample.messages[0].content.startswith(f"{IMAGE_PLACEHOLDER}\n")
        assert sample.messages[1].content == sample.meta["answer"]
        assert Counter(sample.answers).most_common(1)[0][0] == sample.meta["answer"]
        assert sample.category == VQA_CATEGORIES[i % 7]
        scene = sample_scene("vqa", i, seed=6, image_size=160)
        _assert_shapes_drawn(scene, np.asarray(sample.images[0]))
        back = ConversationSample.from_wds(sample.to_wds())
        assert back.answers == sample.answers and back.meta["scene"]["shapes"] == sample.meta["scene"]["shapes"]


def test_vqa_answers_are_balanced() -> None:
    items = list(iter_vqa_items(700, seed=0))
    res = majority_baseline({"answers": it.answers, "category": it.category} for it in items)
    per = {c: v["score"] for c, v in res["per_category"].items()}
    for cat in ("color", "shape", "count", "text"):
        assert per[cat] < 0.35, (cat, per[cat])
    for cat in ("position",):
        assert per[cat] < 0.4, (cat, per[cat])
    for cat in ("relation", "existence"):  # yes/no: prior ~50 %, plus partial credit from disagreement
        assert per[cat] < 0.65, (cat, per[cat])
    assert res["overall"] < 0.4


def test_corpus_texts_cover_generated_text() -> None:
    corpus = corpus_texts(n=30, seed=0)
    vocab = set(" ".join(corpus).split())
    texts = set(corpus)
    for it in iter_vqa_items(30, seed=0):
        assert it.question in texts
        assert all(a in texts for a in it.answers)
    for i in range(5):
        assert make_sample("images", i, seed=0).caption in texts
    for w in ("user", "assistant", "yes", "no", "left", "purple", "star", "crosses", "two"):
        assert w in vocab


def test_grounded_captions_name_each_item_in_its_drawn_cell() -> None:
    rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
    for i in range(16):
        sample = make_sample("images", i, seed=5, image_size=96, caption_style="grounded")
        plain = make_sample("images", i, seed=5, image_size=96)
        np.testing.assert_array_equal(np.asarray(sample.image), np.asarray(plain.image))  # same scene, new caption
        scene = sample_scene("images", i, seed=5, image_size=96)
        pixels = np.asarray(sample.image)
        _assert_shapes_drawn(scene, pixels)
        *phrases, background = sample.caption.split("; ")
        assert background == f"{scene.background} background"
        # the cell named for each shape is the one its drawn centre pixel lies in (32 px cells at 96 px)
        expected = []
        for s in scene.shapes:
            col, row = int(s.cx // 32), int(s.cy // 32)
            name = "center" if (col, row) == (1, 1) else f"{rows[row]} {cols[col]}"
            expected.append(((row, col), f"{name}: {s.color} {s.kind}"))
        for t in scene.texts:
            col, row = int((t.box[0] + t.box[2]) / 2 // 32), int((t.box[1] + t.box[3]) / 2 // 32)
            name = "center" if (col, row) == (1, 1) else f"{rows[row]} {cols[col]}"
            expected.append(((row, col), f"{name}: text {t.text.lower()}"))
        assert phrases == [phrase for _, phrase in sorted(expected)]  # reading order, one phrase per item


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "video", "n": 1}, "kind='video'"), ({"kind": "vqa", "n": -1}, "n=-1"),
     ({"kind": "vqa", "n": 1, "image_size": 10}, "image_size=10"), ({"kind": "vqa", "n": 1, "seed": -2}, "seed=-2"),
     ({"kind": "images", "n": 1, "caption_style": "dense"}, "caption_style='dense' is not a caption style"),
     ({"kind": "vqa", "n": 1, "caption_style": "grounded"}, "applies to kind 'images' only")],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        list(iter_synthetic(**kwargs))


def test_write_synthetic_shards(tmp_path) -> None:
    pytest.importorskip("mmfm.data.shards")
    wds = pytest.importorskip("webdataset")
    paths = synth.write_synthetic("vqa", 5, tmp_path, seed=0, samples_per_shard=2, image_size=64)
    assert len(paths) >= 3 and all(p.exists() for p in paths)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert len(samples) == 5
    back = ConversationSample.from_wds(samples[0])
    assert back.category == VQA_CATEGORIES[0] and len(back.answers) == 10


def test_write_synthetic_calls_write_shards(tmp_path, monkeypatch) -> None:
    # The contract with the shard layer, independent of its implementation: samples in stream order,
    # the output folder and samples_per_shard are passed through; the returned paths become Paths.
    calls = {}

    def fake_write_shards(samples, out_dir, samples_per_shard=1000):
        calls["keys"] = [s.key for s in samples]
        calls["out_dir"], calls["per_shard"] = out_dir, samples_per_shard
        return [str(tmp_path / "shard-000000.tar")]

    fake = types.ModuleType("mmfm.data.shards")
    fake.write_shards = fake_write_shards
    monkeypatch.setitem(sys.modules, "mmfm.data.shards", fake)
    paths = synth.write_synthetic("images", 3, tmp_path, seed=7, samples_per_shard=2, image_size=64)
    assert paths == [tmp_path / "shard-000000.tar"]
    assert calls == {"keys": [s.key for s in iter_synthetic("images", 3, seed=7, image_size=64)],
                     "out_dir": tmp_path, "per_shard": 2}
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        synth.write_synthetic("images", 3, tmp_path, samples_per_shard=0)


def test_cell_labels_and_tokens_by_cell() -> None:
    from mmfm.data.synth import COLOR_NAMES, SHAPES, cell_labels, sample_scene, tokens_by_cell

    scenes = [sample_scene("images", i, seed=0) for i in range(4)]
    shape, color = cell_labels(scenes)
    for i, scene in enumerate(scenes):
        occupied = {s.cell[1] * 3 + s.cell[0]: s for s in scene.shapes}
        for c in range(9):
            want = (SHAPES.index(occupied[c].kind), COLOR_NAMES.index(occupied[c].color)) if c in occupied else (
                len(SHAPES), len(COLOR_NAMES))
            assert (int(shape[i, c]), int(color[i, c])) == want
    tokens = torch.arange(2 * 36 * 3, dtype=torch.float32).view(2, 36, 3)  # a 6x6 grid, 3 channels
    cells = tokens_by_cell(tokens)
    grid = tokens.view(2, 6, 6, 3)
    for c in range(9):  # cell (row r, column k): grid rows 2r..2r+1, columns 2k..2k+1, row-major
        r, k = divmod(c, 3)
        assert torch.equal(cells[:, c], grid[:, 2 * r:2 * r + 2, 2 * k:2 * k + 2].reshape(2, -1))
    with pytest.raises(ValueError, match="3x3 scene grid"):
        tokens_by_cell(torch.zeros(1, 16, 3))  # 4x4 tokens
