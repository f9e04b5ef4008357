"""Adaptor heads: residual MLP v2 math, pixel-shuffle layout (ref: F.pixel_shuffle), shapes from state dicts."""

import pytest
import torch
import torch.nn.functional as F

from mmfm.radio import RadioEncoder, create_student
from mmfm.radio.adaptors import (
    AdaptorSpec,
    MLPSpec,
    ResidualMLP,
    TeacherAdaptor,
    adaptor_from_state,
    mlp_spec_from_state,
    pixel_shuffle_tokens,
)


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_residual_mlp_formula():
    torch.manual_seed(0)
    m = ResidualMLP(MLPSpec(8, 16, 5, num_inner=2))
    _perturb(m)
    x = torch.randn(3, 8)

    def ln(t, mod):
        return F.layer_norm(t, (t.shape[-1],), mod.weight, mod.bias, mod.eps)

    h = m.fc1(x)
    for blk in m.blocks:
        h = h + blk[2](F.gelu(ln(h, blk[0])))
    ref = m.final[2](F.gelu(ln(h, m.final[0])))
    assert torch.allclose(m(x), ref, atol=1e-6)


@pytest.mark.parametrize("u", [1, 2, 3])
def test_pixel_shuffle_tokens_matches_torch(u):
    b, h, w, c = 2, 3, 4, 5
    x = torch.randn(b, h * w, u * u * c)  # channels (u1, u2, c)
    # torch's pixel_shuffle wants channels (c, u1, u2)
    img = x.reshape(b, h, w, u * u, c).transpose(-1, -2).reshape(b, h, w, c * u * u).permute(0, 3, 1, 2)
    ref = F.pixel_shuffle(img, u).flatten(2).transpose(1, 2)
    assert torch.equal(pixel_shuffle_tokens(x, (h, w), u), ref)


@pytest.mark.parametrize("spec,summary,feature", [
    (AdaptorSpec(head_idx=0), MLPSpec(32, 24, 16, 1), MLPSpec(32, 24, 12, 2)),
    (AdaptorSpec(head_idx=1, upsample_factor=2), MLPSpec(32, 40, 8, 0, pre_norm=True), MLPSpec(32, 20, 6, 1)),
    (AdaptorSpec(head_idx=0, feature_head="attn", attn_heads=4), None, MLPSpec(32, 24, 10, 1)),
    (AdaptorSpec(head_idx=1), MLPSpec(32, 16, 7, 3), None),
])
def test_shapes_inferred_from_state(spec, summary, feature):
    torch.manual_seed(0)
    ad = TeacherAdaptor(spec, summary, feature)
    _perturb(ad)
    back = adaptor_from_state(ad.state_dict(), spec)
    cls = torch.randn(2, 2, 32)
    feats = torch.randn(2, 6, 32)
    for a, b in [(ad.forward_summary(cls), back.forward_summary(cls)),
                 (ad.forward_features(feats, (2, 3)), back.forward_features(feats, (2, 3)))]:
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    if feature is not None:
        u = spec.upsample_factor
        assert ad.forward_features(feats, (2, 3)).shape == (2, 6 * u * u, feature.out_dim)


def test_mlp_spec_errors():
    with pytest.raises(ValueError, match="no residual MLP"):
        mlp_spec_from_state({}, "summary.")
    m = ResidualMLP(MLPSpec(4, 4, 3))
    with pytest.raises(ValueError, match="not a multiple"):
        mlp_spec_from_state(m.state_dict(), "", upsample_factor=2)
    with pytest.raises(ValueError, match="needs a summary head"):
        TeacherAdaptor(AdaptorSpec(), None, None)


def test_encoder_runs_adaptors():
    torch.manual_seed(0)
    enc = RadioEncoder(create_student("tiny", num_cls_tokens=2), adaptors={
        "clip": TeacherAdaptor(AdaptorSpec(head_idx=0), MLPSpec(32, 24, 16), MLPSpec(32, 24, 12)),
        "sam": TeacherAdaptor(AdaptorSpec(head_idx=1, upsample_factor=2), None, MLPSpec(32, 24, 8)),
    }).eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        out = enc(x)
        nchw = enc(x, feature_fmt="NCHW", adaptors=["sam"])
    assert set(out) == {"backbone", "clip", "sam"}
    assert out["backbone"].summary.shape == (2, 64) and out["backbone"].features.shape == (2, 6, 32)
    assert out["clip"].summary.shape == (2, 16) and out["clip"].features.shape == (2, 6, 12)
    assert out["sam"].summary is None and out["sam"].features.shape == (2, 24, 8)
    assert set(nchw) == {"backbone", "sam"} and nchw["sam"].features.shape == (2, 8, 4, 6)
    ref = out["sam"].features.transpose(1, 2).reshape(2, 8, 4, 6)
    assert torch.allclose(nchw["sam"].features, ref)
    # the clip summary reads class token 0
    cls = enc.student.forward_features(enc.input_conditioner(x)).cls_tokens
    assert torch.allclose(out["clip"].summary, enc.adaptors["clip"].summary(cls[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match=r"available adaptors: \['clip', 'sam'\]"):
        enc(x, adaptors=["dino"])
