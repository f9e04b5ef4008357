"""scripts/vlm_shape_probe.py: per-cell grouping of tokens and the linear probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("compressor, per_cell", [("pixel_unshuffle", 1), ("none", 4)])
def test_cell_features_group_the_tokens_of_each_cell(compressor, per_cell, load_script):
    from mmfm.config import load_config
    from mmfm.vlm.build import build_vlm
    from mmfm.vlm.train import VLMTrainConfig

    cfg = load_config(VLMTrainConfig, Path(__file__).resolve().parents[2] / "configs/vlm/tiny-cpu-vqa.yaml",
                      [f"model.compressor={compressor}", "model.encoder.vit={embed_dim: 64}"])
    model = build_vlm(cfg.model)[0].eval()
    images = torch.rand(3, 3, 96, 96)
    feats = load_script("vlm_shape_probe").cell_features(model, images, batch=2)
    assert feats["encoder"].shape == (3, 9, 4 * 64)  # 6x6 patches: 2x2 per cell
    assert feats["projector"].shape == (3, 9, per_cell * cfg.model.decoder.hidden_size)
    enc = model.vision_encoder(images).features.view(3, 6, 6, 64)
    # cell (row 1, column 2) holds patches rows 2-3, columns 4-5, in row-major order
    assert torch.allclose(feats["encoder"][:, 5], enc[:, 2:4, 4:6].reshape(3, -1), atol=1e-6)


def test_probe_reads_a_linear_label_and_not_noise(load_script):
    torch.manual_seed(0)
    x = torch.randn(400, 9, 16)
    y = (x[..., 0] > 0).long() + 2 * (x[..., 1] > 0).long()  # 4 classes, the last one = "empty"
    probe = load_script("vlm_shape_probe").probe_accuracy
    assert probe(x, y, 300, classes=4) > 0.95
    assert probe(x, torch.randint(0, 4, (400, 9)), 300, classes=4) < 0.5
