"""``mmfm demo --fast`` end to end (data -> radio -> ps3 -> vlm, about 1-2 minutes on 2 CPU cores), run once
for the module: every stage's figures in report.json, the pictures, the distilled RADIO student and its use
as the VLM's vision encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.demo import CONFIGS, STAGES, format_report, run_demo

PICTURES = ["radio_pca.png", "loss_radio.png", "ps3_selection.png", "loss_ps3.png", "vqa_examples.png",
            "loss_vlm.png"]
FIGURES = {
    "data": {"images", "regions", "vqa"},
    "radio": {"steps", "teachers", "held_out_cos", "student_dir"},
    "ps3": {"steps", "top_down_hit_rate@8", "random", "bottom_up_hit_rate@8", "bottom_up_random",
            "local_retrieval_top1", "global_only_retrieval_top1"},
    "vlm": {"steps", "encoder", "vqa_accuracy", "majority_baseline", "per_category"},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out=out, fast=True)


def test_report_has_every_stage_with_its_figures(demo):
    out, results = demo
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(results))
    assert list(report) == [name for name, _ in STAGES] == ["data", "radio", "ps3", "vlm"]
    for name, keys in FIGURES.items():
        assert keys <= set(report[name]), (name, sorted(report[name]))
        assert report[name]["seconds"] > 0
    for kind in ("images", "regions", "vqa"):
        assert report["data"][kind]["samples"] > 0
    text = format_report(report, out)
    for name in report:
        assert f"[{name}]" in text
    assert "summary_cos" in text and " -> " in text


def test_radio_figures_are_per_teacher_before_and_after(demo):
    _, results = demo
    radio = results["radio"]
    assert radio["teachers"] == ["clip", "dino", "sam"]
    cos = radio["held_out_cos"]
    assert set(cos) == {"clip", "dino", "sam"}
    for name, row in cos.items():
        assert row["at"], name
        summary = {"summary_cos", "summary_cos_centered"} if name != "sam" else set()
        metrics = {"feature_cos", "feature_cos_centered"} | summary
        assert metrics <= set(row), (name, row)
        for m in metrics:
            assert -1.0 <= row[m]["before"] <= 1.0 and -1.0 <= row[m]["after"] <= 1.0
    assert "summary_cos" not in cos["sam"]  # SAM has no summary in the recipe (use_summary: false)
    assert cos["sam"]["at"] == [128]  # SAM only trains in the high partition
    # even the 12-step smoke run moves the dense features (mean removed) and summaries towards the teachers
    for name, row in cos.items():
        assert row["feature_cos_centered"]["after"] > row["feature_cos_centered"]["before"] + 0.2, (name, row)
    for name in ("clip", "dino"):
        assert cos[name]["summary_cos"]["after"] > cos[name]["summary_cos"]["before"] + 0.2


def test_pictures_are_valid_non_trivial_pngs(demo):
    out, _ = demo
    for name in PICTURES:
        path = out / "pictures" / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, (name, pixels.shape)
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 16, (name, len(colours))
        # not a blank canvas: a fair share of the pixels differ from the most common (background) colour
        _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        assert counts.max() / counts.sum() < 0.95, name


def test_radio_student_loads_and_gives_features_of_the_expected_shape(demo):
    from mmfm.config import load_config
    from mmfm.radio import load
    from mmfm.radio.distill import RadioTrainConfig

    out, results = demo
    student_dir = Path(results["radio"]["student_dir"])
    assert student_dir == out / "radio" / "model"
    cfg = load_config(RadioTrainConfig, out / "radio" / "config.yaml")
    dim, patch = cfg.student.overrides["embed_dim"], cfg.student.patch_size
    x = torch.rand(2, 3, 128, 96)
    grid = (128 // patch, 96 // patch)

    enc = load(student_dir)
    with torch.no_grad():
        backbone = enc(x)
    assert enc.embed_dim == dim
    assert backbone.features.shape == (2, grid[0] * grid[1], dim)
    assert backbone.summary.shape[0] == 2 and backbone.summary.shape[1] % dim == 0
    assert torch.isfinite(backbone.features).all()

    enc = load(student_dir, adaptors="all")
    assert sorted(enc.adaptor_names) == ["clip", "dino", "sam"]
    with torch.no_grad():
        outs = enc(x, feature_fmt="NCHW")
    widths = {"clip": 64, "dino": 48, "sam": 32}  # the teachers' feature widths in the recipe
    for name, c in widths.items():
        assert outs[name].features.shape == (2, c, *grid), name
    assert outs["clip"].summary.shape == (2, 48) and outs["dino"].summary.shape == (2, 48)
    assert outs["sam"].summary is None


def test_vlm_used_the_distilled_student(demo):
    out, results = demo
    student_dir = results["radio"]["student_dir"]
    assert results["vlm"]["encoder"] == student_dir
    record = json.loads((out / "vlm" / "model" / "vlm_config.json").read_text())
    assert record["encoder"]["path"] == student_dir
    student = json.loads((Path(student_dir) / "config.json").read_text())["student"]
    assert record["vision_encoder_config"]["student"] == student
    assert 0.0 <= results["vlm"]["vqa_accuracy"] <= 1.0


def test_stage_recipe_and_settings_replace_the_tiny_ones(tmp_path):
    """``--recipe STAGE=PATH`` swaps a stage's tiny recipe, ``--set STAGE.key=value`` wins over the demo's own
    overrides (here through the command line, on the data + PS3 stages only)."""
    import yaml

    from mmfm.cli import main

    recipe = yaml.safe_load((CONFIGS / "ps3" / "tiny-cpu.yaml").read_text())
    recipe["model"]["embed_dim"] = recipe["model"]["prompt_dim"] = 32
    path = tmp_path / "ps3-narrow.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "demo"
    rc = main(["demo", "--fast", "--out", str(out), "--stages", "data", "ps3", "--recipe", f"ps3={path}",
               "--set", "ps3.steps=3", "--set", "ps3.ckpt_every=3"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"data", "ps3"} and report["ps3"]["steps"] == 3
    run_cfg = yaml.safe_load((out / "ps3" / "config.yaml").read_text())
    assert run_cfg["model"]["embed_dim"] == 32 and run_cfg["steps"] == 3
    assert len((out / "ps3" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_stage_subset_without_data_generates_the_data_first(tmp_path):
    from mmfm.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), "--stages", "ps3", "--set", "ps3.steps=2",
                 "--set", "ps3.ckpt_every=2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["data", "ps3"] and report["data"]["regions"]["samples"] > 0


@pytest.mark.parametrize("args, message", [
    (["--recipe", "vision=x.yaml"], "expected STAGE=PATH"),
    (["--recipe", "ps3=/no/such.yaml"], "no such file"),
    (["--set", "ps3steps=3"], "expected STAGE.key=value"),
    (["--device", "tpu"], "expected cpu or cuda"),
    (["--stages", "data", "vlmm"], "unknown stage(s) ['vlmm']"),
])
def test_bad_demo_options_are_clear_errors(tmp_path, capsys, args, message):
    from mmfm.cli import main

    assert main(["demo", "--fast", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
