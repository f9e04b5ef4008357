"""`mmfm radio featsharp train|apply` on tiny synthetic shards and the random-init teachers of the tiny recipe;
apply's output against `FeatSharpUpsampler.apply` on a teacher built by `build_teachers` from the recipe."""

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from mmfm.cli import main
from mmfm.config import config_to_dict, load_config
from mmfm.data.shards import read_shards
from mmfm.data.synth import write_synthetic
from mmfm.data.transforms import center_crop_to_multiple, to_tensor
from mmfm.radio.distill import RadioTrainConfig, build_teachers
from mmfm.radio.featsharp import FeatSharpUpsampler

RECIPE = str(Path(__file__).resolve().parents[2] / "configs" / "radio" / "tiny-cpu.yaml")
TEACHER = ["--recipe", RECIPE, "--teacher", "dino"]  # 48-d features on an 8x8 grid at its 64 px input


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic("images", 6, out, seed=0, image_size=64)
    return out


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A x2 upsampler of the recipe's dino teacher after 3 steps, and what `train` printed."""
    ckpt = tmp_path_factory.mktemp("fs") / "dino.safetensors"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["radio", "featsharp", "train", *TEACHER, "--shards", str(shards), "--steps", "3",
                   "--batch-size", "2", "--factor", "2", "--fit-batches", "1", "--lr", "5e-3", "--no-progress",
                   "--out", str(ckpt)])
    assert rc == 0
    return ckpt, buf.getvalue()


@pytest.fixture(scope="module")
def reference(trained):
    """The library's upsampler loaded from the checkpoint around an independently built teacher."""
    teacher = build_teachers(load_config(RadioTrainConfig, RECIPE))["dino"]
    return FeatSharpUpsampler.load(str(trained[0]), teacher)


def test_train_writes_checkpoint(trained):
    ckpt, out = trained
    assert ckpt.is_file()
    m = re.search(r"loss: first (\S+) -> last (\S+)", out)
    assert m and all(math.isfinite(float(v)) for v in m.groups()), out
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert json.loads(meta["featsharp_config"])["factor"] == 2
    teacher = json.loads(meta["mmfm_teacher"])
    assert teacher["name"] == "dino" and teacher["features"] == "48x8x8"
    assert json.loads(meta["mmfm_train"])["image_size"] == 128  # default: factor x the teacher's input size
    assert not any(n.startswith("teacher.") for n in names)  # the teacher's weights are not saved


def test_apply_matches_library(trained, reference, shards, tmp_path):
    samples = list(read_shards(str(shards), schema="image", rank=0, world_size=1))
    paths = []
    for i, s in enumerate(samples[:2]):
        paths.append(tmp_path / f"im{i}.png")
        s.image.save(paths[-1])
    out, pca = tmp_path / "feats.safetensors", tmp_path / "pca.png"
    assert main(["radio", "featsharp", "apply", "--checkpoint", str(trained[0]), *TEACHER,
                 "--image", *map(str, paths), "--out", str(out), "--pca", str(pca)]) == 0
    with safe_open(str(out), "pt") as f:
        lr, hr, meta = f.get_tensor("lr"), f.get_tensor("hr"), f.metadata()
    assert lr.shape == (2, 48, 8, 8) and hr.shape == (2, 48, 16, 16)  # (factor*h, factor*w) of the 8x8 grid
    assert json.loads(meta["keys"]) == ["im0", "im1"] and meta["space"] == "teacher"
    x = torch.stack([to_tensor(center_crop_to_multiple(Image.open(p).convert("RGB"), 1, (128, 128)))
                     for p in paths])
    ref_lr, ref_hr = reference.apply(x, denormalize=True)
    torch.testing.assert_close(hr, ref_hr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lr, ref_lr, atol=1e-5, rtol=1e-4)
    assert np.asarray(Image.open(pca)).shape == (2 * 128, 3 * 128, 3)  # a row per image: image | lr | hr

    # shards, limited, in the normalised space
    out2 = tmp_path / "shard-feats.safetensors"
    assert main(["radio", "featsharp", "apply", "--checkpoint", str(trained[0]), *TEACHER, "--shards",
                 str(shards), "--max-images", "3", "--normalized", "--out", str(out2)]) == 0
    with safe_open(str(out2), "pt") as f:
        hr2, meta2 = f.get_tensor("hr"), f.metadata()
    assert hr2.shape == (3, 48, 16, 16) and json.loads(meta2["keys"]) == [s.key for s in samples[:3]]
    _, ref_norm = reference.apply(x[:1], denormalize=False)
    torch.testing.assert_close(hr2[:1], ref_norm, atol=1e-5, rtol=1e-4)


def test_bad_input(trained, shards, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(img)
    apply = ["radio", "featsharp", "apply", "--image", str(img), "--out", str(tmp_path / "o.safetensors")]

    assert main([*apply, "--checkpoint", str(tmp_path / "missing.safetensors"), *TEACHER]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfm radio featsharp apply: error:") and "missing.safetensors" in err

    assert main([*apply, "--checkpoint", str(trained[0]), "--recipe", RECIPE, "--teacher", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "['clip', 'dino', 'sam']" in err
    assert main(["radio", "featsharp", "train", "--recipe", RECIPE, "--teacher", "nope", "--shards", str(shards),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "mmfm radio featsharp train: error:" in capsys.readouterr().err

    # another teacher of the recipe (other width and grid)
    assert main([*apply, "--checkpoint", str(trained[0]), "--recipe", RECIPE, "--teacher", "clip"]) == 2
    err = capsys.readouterr().err
    assert "trained for teacher 'dino'" in err and "'clip'" in err

    # the same architecture from a spec file: seeded as a first teacher, so other random weights
    cfg = load_config(RadioTrainConfig, RECIPE)
    spec_file = tmp_path / "dino.yaml"
    spec_file.write_text(yaml.safe_dump(config_to_dict(cfg.teachers[1])))
    assert main([*apply, "--checkpoint", str(trained[0]), "--teacher", str(spec_file)]) == 2
    assert "trained for teacher 'dino'" in capsys.readouterr().err

    # a checkpoint saved by the library (no teacher metadata) for a teacher of another shape
    clip_ckpt = tmp_path / "clip.safetensors"
    FeatSharpUpsampler(build_teachers(cfg)["clip"], 2).save(str(clip_ckpt))
    assert main([*apply, "--checkpoint", str(clip_ckpt), *TEACHER]) == 2
    assert "does not fit teacher 'dino'" in capsys.readouterr().err
