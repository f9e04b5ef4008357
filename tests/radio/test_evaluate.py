"""Evaluation (mmfm.radio.evaluate): weighted kNN against a brute-force reference, fidelity metrics against
their definitions on an oracle / noisy predictor, mode switching, and `mmfm radio eval` on a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfm.radio.distill import TeacherInfo
from mmfm.radio.evaluate import evaluate_fidelity, knn_predict, load_samples, mode_switching


def _knn_reference(bank, labels, queries, k, t, n_cls):
    out = []
    for q in queries:
        sims = [float(torch.dot(q, b) / (q.norm() * b.norm())) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_cls
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / t)
        out.append(max(range(n_cls), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


def test_knn_matches_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(40, 6, generator=g), torch.randn(15, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    for k in (1, 5, 20):
        got = knn_predict(bank, labels, queries, k=k, temperature=0.07, num_classes=4)
        assert torch.equal(got, _knn_reference(bank, labels, queries, k, 0.07, 4))


def test_knn_separable_clusters_and_errors():
    centers = torch.eye(3) * 10
    bank = torch.cat([centers[i] + 0.1 * torch.randn(10, 3) for i in range(3)])
    labels = torch.arange(3).repeat_interleave(10)
    queries = centers + 0.1 * torch.randn(3, 3)
    assert torch.equal(knn_predict(bank, labels, queries, k=5), torch.arange(3))
    with pytest.raises(ValueError, match="share D"):
        knn_predict(bank, labels, torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(bank, labels, queries, temperature=0.0)


class _LocalTeacher(nn.Module):
    """Test double: features = fixed mix of per-patch mean colours; summary = fixed mix of the image mean."""

    def __init__(self, patch: int, c: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(patch)
        self.patch = patch
        self.w = nn.Parameter(torch.randn(c, 3, generator=g), requires_grad=False)
        self.b = nn.Parameter(torch.randn(c, generator=g), requires_grad=False)

    def forward(self, x):
        f = F.avg_pool2d(x, self.patch)
        return x.mean((2, 3)) @ self.w.T + self.b, torch.einsum("oc,bchw->bohw", self.w, f) + self.b[:, None, None]


class _Spec:
    def __init__(self, name, input_size=0):
        self.name, self.input_size = name, input_size


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from mmfm.data.synth import write_synthetic

    d = tmp_path_factory.mktemp("eval")
    write_synthetic("images", 12, d, seed=3, image_size=64)
    return load_samples(str(d), 12)


def test_fidelity_oracle_and_noise(samples):
    teacher = _LocalTeacher(16)
    info = TeacherInfo(5, 5, 16)
    specs = [_Spec("t")]

    def oracle(x):
        return {"t": teacher(x)}

    table = evaluate_fidelity(oracle, {"t": teacher}, specs, {"t": info}, samples, [32, 64], patch=16,
                              batch_size=5)
    for res in ("32", "64"):
        r = table[res]["t"]
        assert r["summary_cos"] == pytest.approx(1.0, abs=1e-6)
        assert r["feature_cos"] == pytest.approx(1.0, abs=1e-6)
        assert r["fidelity"] > 1e6

    g = torch.Generator().manual_seed(0)

    def noisy(x):
        s, f = teacher(x)
        return {"t": (-s, f + 0.5 * torch.randn(f.shape, generator=g))}

    r = evaluate_fidelity(noisy, {"t": teacher}, specs, {"t": info}, samples, [64], 16)["64"]["t"]
    assert r["summary_cos"] == pytest.approx(-1.0, abs=1e-6)
    assert r["mse"] == pytest.approx(0.25, rel=0.15)  # noise variance
    assert r["fidelity"] == pytest.approx(r["teacher_var"] / r["mse"], rel=1e-9)


def test_fidelity_interpolates_teacher_to_student_grid(samples):
    # teacher at patch 8 on a fixed 32 px input -> 4x4 map, student grid 64/16 = 4x4: same grid, exact match
    teacher = _LocalTeacher(8)
    info = TeacherInfo(5, 5, 8)
    seen = []

    def predict(x):
        seen.append(x.shape[-1])
        s, f = teacher(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False))
        return {"t": (s, f)}

    r = evaluate_fidelity(predict, {"t": teacher}, [_Spec("t", 32)], {"t": info}, samples, [64], 16)["64"]["t"]
    assert seen == [64]
    assert r["feature_cos"] == pytest.approx(1.0, abs=1e-6)


def test_mode_switching_reference_is_one(samples):
    from mmfm.radio import RadioEncoder, create_student

    torch.manual_seed(0)
    enc = RadioEncoder(create_student("tiny", max_resolution=128)).eval()
    table = mode_switching(enc, samples[:4], [32, 64])
    assert table["64"]["backbone"] == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= table["32"]["backbone"] <= 1.0


def test_cli_eval_on_a_tiny_run(tmp_path):
    from mmfm.config import save_config
    from mmfm.data.synth import write_synthetic
    from mmfm.radio.distill import DataConfig, PartitionConfig, RadioTrainConfig, StudentConfig
    from mmfm.radio.teachers import TeacherSpec

    write_synthetic("images", 16, tmp_path / "tr", seed=0, image_size=64)
    write_synthetic("images", 8, tmp_path / "ev", seed=1, image_size=64)
    cfg = RadioTrainConfig(
        teachers=[TeacherSpec(name="a", family="timm", model_name="vit_tiny_patch16_224", input_size=32,
                              model_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2})],
        student=StudentConfig(adaptor_hidden=16, overrides={"max_resolution": 128}),
        data=DataConfig(train_shards=str(tmp_path / "tr"), eval_shards=str(tmp_path / "ev"), eval_images=4,
                        shuffle_buffer=0),
        partitions=[PartitionConfig("low", [32], 1.0, 2)], steps=3, ckpt_every=1)
    # train through `mmfm radio train` from a saved recipe (config -> YAML -> config round trip)
    save_config(cfg, tmp_path / "recipe.yaml")
    assert _cli(["train", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"),
                 "--no-progress", "steps=1"]) == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(res["eval_after"]) == {"32"}
    rc = _cli(["eval", "--run", str(tmp_path / "run"), "--images", "4", "--bank", "8", "--k", "3",
               "--json", str(tmp_path / "e.json")])
    assert rc == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert set(out) == {"fidelity", "knn", "mode_switching"}
    assert 0.0 <= out["knn"]["32"] <= 1.0
    assert out["mode_switching"]["32"]["backbone"] == pytest.approx(1.0, abs=1e-5)
    # the CLI re-evaluates the exported model: same numbers as the trainer's end-of-run evaluation
    assert out["fidelity"]["32"]["a"]["fidelity"] == pytest.approx(res["eval_after"]["32"]["a"]["fidelity"],
                                                                    rel=1e-4)


def _cli(argv: list[str]) -> int:
    """`mmfm radio <argv>` through the sub-command hook (mmfm.radio.train_cli.register_subcommands)."""
    import argparse

    from mmfm.radio.train_cli import register_subcommands

    p = argparse.ArgumentParser()
    register_subcommands(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)
