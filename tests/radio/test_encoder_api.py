"""RadioEncoder API: outputs, resolution handling, conditioning, intermediates, save/load and bad inputs."""

import json

import pytest
import torch

from mmfm.radio import RadioEncoder, RadioOutput, create_student, load, save
from mmfm.radio.adaptors import AdaptorSpec, MLPSpec, TeacherAdaptor
from mmfm.radio.encoder import CLIP_MEAN, CLIP_STD


def _enc(**over):
    torch.manual_seed(0)
    kw = dict(num_cls_tokens=3, num_registers=2)
    kw.update(over)
    enc = RadioEncoder(create_student("tiny", **kw), summary_idxs=[0, 2], adaptors={
        "clip": TeacherAdaptor(AdaptorSpec(head_idx=0), MLPSpec(32, 24, 16), MLPSpec(32, 24, 12, 2)),
        "sam": TeacherAdaptor(AdaptorSpec(head_idx=2, upsample_factor=2, feature_head="attn", attn_heads=2),
                              None, MLPSpec(32, 16, 8)),
    })
    return enc.eval()


def test_outputs_and_properties():
    enc = _enc()
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        out = enc(x, adaptors=[])
        nchw = enc(x, feature_fmt="NCHW", adaptors=[])
    assert isinstance(out, RadioOutput)
    assert out.summary.shape == (2, enc.summary_dim) == (2, 64)
    assert out.features.shape == (2, 12, 32)
    assert torch.allclose(nchw.features, out.features.transpose(1, 2).reshape(2, 32, 3, 4))
    # summary = class tokens 0 and 2, straight from the student on conditioned input
    xn = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    f = enc.student.forward_features(xn)
    assert torch.allclose(out.summary, f.cls_tokens[:, [0, 2]].flatten(1), atol=1e-5)
    assert enc.patch_size == 16 and enc.embed_dim == 32 and enc.max_resolution == 512
    assert enc.preferred_resolution == (64, 64)
    assert enc.get_nearest_supported_resolution(50, 70) == (48, 64)
    assert enc.get_nearest_supported_resolution(3, 9000) == (16, 512)


def test_bf16_keeps_fp32_conditioning_and_windowed_sizes():
    enc = _enc().to(torch.bfloat16)
    assert enc.input_conditioner.norm_mean.dtype == torch.float32
    assert enc.student.prefix_tokens.dtype == torch.bfloat16
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        out = enc(x, adaptors=[])
        ref = _enc()(x, adaptors=[])
    assert out.features.dtype == torch.bfloat16
    assert (out.features.float() - ref.features).abs().max().item() < 0.1 * ref.features.abs().max().item()
    win = RadioEncoder(create_student("tiny", depth=2, window_size=2, global_blocks=(1,)))
    assert win.min_resolution_step == 32
    with pytest.raises(ValueError, match="not a multiple of 32; resize to the nearest supported size 64x64"):
        win(torch.rand(1, 3, 48, 64))


def test_make_preprocessor_external():
    enc = _enc()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = enc(x, adaptors=[]).features
        cond = enc.make_preprocessor_external()
        out = enc(cond(x), adaptors=[]).features
    assert torch.allclose(out, ref, atol=1e-6)


def test_forward_intermediates():
    enc = _enc()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        final, inter = enc.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt="NLC")
        plain = enc(x, adaptors=[])
        only = enc.forward_intermediates(x, indices=1, intermediates_only=True)
    assert torch.allclose(final.features, plain.features) and torch.allclose(inter[1].features, plain.features)
    assert torch.allclose(inter[1].summary, plain.summary)
    assert len(only) == 1 and only[0].shape == (1, 32, 2, 3)


def test_save_load_roundtrip(tmp_path):
    enc = _enc()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save(enc, tmp_path / "ckpt")
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        ref = enc(x)
        back = load(tmp_path / "ckpt", adaptors="all")
        out = back(x)
        plain = load(tmp_path / "ckpt")(x)
    assert set(out) == {"backbone", "clip", "sam"}
    for k in out:
        for a, b in zip(ref[k], out[k]):
            assert (a is None and b is None) or torch.equal(a, b)
    assert isinstance(plain, RadioOutput) and torch.equal(plain.features, ref["backbone"].features)
    sub = load(tmp_path / "ckpt", adaptors=["sam"])
    assert sub.adaptor_names == ["sam"]
    # YAML config is accepted too
    import yaml

    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").unlink()
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ckpt")(x).features, ref["backbone"].features)


def test_mambavision_student_roundtrip(tmp_path):
    mv = pytest.importorskip("mmfm.radio.mambavision")
    try:  # MambaVision's scan lives in mmfm.kernels
        from mmfm.kernels.selective_scan import selective_scan  # noqa: F401
    except ImportError:
        pytest.skip("mmfm.kernels.selective_scan.selective_scan is not available")
    torch.manual_seed(0)
    enc = RadioEncoder(mv.create_mambavision("tiny")).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = enc(x)
    assert out.summary.shape == (1, enc.embed_dim) and out.features.shape == (1, 6, enc.embed_dim)
    save(enc, tmp_path)
    with torch.no_grad():
        assert torch.allclose(load(tmp_path)(x).features, out.features, atol=1e-6)


def test_bad_images():
    enc = _enc()
    with pytest.raises(TypeError, match="torch.Tensor"):
        enc([1, 2, 3])
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        enc(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        enc(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="nearest supported size 48x64"):
        enc(torch.rand(1, 3, 50, 70))
    with pytest.raises(ValueError, match="larger than max_resolution"):
        enc(torch.rand(1, 3, 16, 528))
    with pytest.raises(ValueError, match="feature_fmt"):
        enc(torch.rand(1, 3, 32, 32), feature_fmt="NHWC")
    with pytest.raises(ValueError, match=r"available adaptors: \['clip', 'sam'\]"):
        enc(torch.rand(1, 3, 32, 32), adaptors=["dino"])


def test_bad_checkpoints(tmp_path):
    enc = _enc()
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path / "empty")
    ck = save(enc, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"unknown adaptor name\(s\) \['dino'\]; available adaptors: \['clip', 'sam'\]"):
        load(ck, adaptors=["dino"])
    weights = ck / "model.safetensors"
    good = weights.read_bytes()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(ck)
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors file .*model.safetensors"):
        load(ck)
    # state-dict mismatch: the config says 3 blocks, the weights hold 2
    weights.write_bytes(good)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["student"]["config"]["depth"] = 3
    cfg["student"]["config"]["num_registers"] = 1
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing keys \[.*blocks\.2\..*shape mismatches \['student.prefix_tokens"):
        load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt config file"):
        load(ck)
    (ck / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither an mmfm radio checkpoint"):
        load(ck)
    with pytest.raises(ValueError, match="checkpoint directory"):
        load(weights)
