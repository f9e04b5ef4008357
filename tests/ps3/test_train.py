"""PS3 pre-training loop: runs on shards, writes a loadable model, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from mmfm.config import load_config
from mmfm.data.synth import write_synthetic
from mmfm.ps3.train import PS3TrainConfig, load_model, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("regions")
    write_synthetic("regions", 12, out, seed=0, samples_per_shard=6, image_size=256)
    return str(out)


def config(shards: str, steps: int) -> PS3TrainConfig:
    return load_config(PS3TrainConfig, None, [
        "model.base_resolution=64", "model.scales=[2,4]", "objective.num_look_close=8", "image_size=256",
        f"train_shards={shards}", "batch_size=2", "shuffle_buffer=4", f"steps={steps}", "ckpt_every=2",
        "engine.optimizer.total_steps=6", "engine.optimizer.warmup_steps=1"])


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_is_exact_and_model_loads(shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(config(shards, 6), full, progress=False)
    train(config(shards, 2), part, progress=False)
    train(config(shards, 6), part, resume=True, progress=False)
    assert losses(part) == pytest.approx(losses(full), rel=0, abs=1e-6)
    encoder, text = load_model(full / "model")
    with torch.no_grad():
        out = encoder(torch.rand(1, 3, 128, 128), num_look_close=4, prompt=text(["a small red star"]))
    assert out.local_features.shape[:2] == (1, 4)


def test_missing_shards_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train_shards is empty"):
        train(PS3TrainConfig(), tmp_path, progress=False)
