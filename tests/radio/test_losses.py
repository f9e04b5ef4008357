"""Distillation losses, resolution matching, fidelity and loss balancing vs hand math."""

import math

import pytest
import torch

from mmfm.radio.adaptors import pixel_shuffle_tokens
from mmfm.radio.balancing import AdaLossBalancer, FixedBalancer, UncertaintyBalancer, build_balancer
from mmfm.radio.losses import (
    cos_smoothl1_loss,
    feature_loss,
    fidelity,
    match_resolution,
    pixel_shuffle_target,
    pixel_unshuffle_prediction,
    summary_loss,
)


def test_summary_cosine_distance_hand_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    # distances: 1 (orthogonal), 0 (parallel), 2 (opposite)
    assert summary_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        summary_loss(a, b[:, :1])


def test_feature_losses_hand_math():
    torch.manual_seed(0)
    p, t = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    assert feature_loss(p, t, "mse").item() == pytest.approx(((p - t) ** 2).mean().item(), rel=1e-6)
    # cos + smooth-L1 by hand, per token along channels
    dot = (p * t).sum(1)
    cos = dot / (p.norm(dim=1) * t.norm(dim=1))
    d = (p - t).abs()
    sl1 = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    ref = 0.9 * (1 - cos).mean() + 0.1 * sl1
    assert cos_smoothl1_loss(p, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert feature_loss(p, t, "cos_smoothl1").item() == pytest.approx(ref.item(), rel=1e-5)
    # (B, N, C) layout with dim=-1
    pn, tn = p.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
    assert feature_loss(pn, tn, "cos_smoothl1", dim=-1).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown kind"):
        feature_loss(p, t, "l3")


def test_feature_loss_bf16_close_to_fp32():
    torch.manual_seed(1)
    p, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    for kind in ("mse", "cos_smoothl1"):
        a = feature_loss(p, t, kind)
        b = feature_loss(p.bfloat16(), t.bfloat16(), kind)
        assert b.dtype == torch.float32
        assert b.item() == pytest.approx(a.item(), rel=2e-2)


def test_match_resolution():
    s, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
    s2, t2 = match_resolution(s, t, "teacher_to_student")
    assert s2 is s and t2.shape == (1, 3, 4, 4)
    # bilinear 2x downsampling without antialias (align_corners=False) = mean of each 2x2 block
    torch.testing.assert_close(t2, torch.nn.functional.avg_pool2d(t, 2))
    s3, t3 = match_resolution(s, t, "student_to_teacher")
    assert s3.shape == (1, 3, 8, 8) and t3 is t
    c = torch.full((1, 3, 4, 4), 2.5)
    torch.testing.assert_close(match_resolution(c, t, "student_to_teacher")[0], torch.full((1, 3, 8, 8), 2.5))
    with pytest.raises(ValueError, match="mode"):
        match_resolution(s, t, "sideways")


def test_pixel_shuffle_matches_adaptor_layout():
    torch.manual_seed(0)
    b, c, h, w, u = 2, 3, 2, 4, 2
    fine = torch.randn(b, c, h * u, w * u)
    packed = pixel_shuffle_target(fine, u)  # (B, u*u*C, h, w)
    assert packed.shape == (b, u * u * c, h, w)
    torch.testing.assert_close(pixel_unshuffle_prediction(packed, u), fine)
    # the adaptor's pixel-shuffle head maps tokens with these channels back onto the fine grid
    tokens = packed.flatten(2).transpose(1, 2)  # (B, h*w, u*u*C)
    fine_tokens = pixel_shuffle_tokens(tokens, (h, w), u)  # (B, (h u)(w u), C)
    torch.testing.assert_close(fine_tokens, fine.flatten(2).transpose(1, 2))
    # element-level check: token (i, j) channel block (u1, u2) = fine position (i u + u1, j u + u2)
    assert packed[1, (1 * u + 0) * c + 2, 1, 3] == fine[1, 2, 1 * u + 1, 3 * u + 0]
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle_target(torch.randn(1, 3, 5, 4), 2)


def test_fidelity_hand_math():
    t = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 6.0]]]])  # (2, 1, 1, 2): var (biased) = 5
    p = t + 1.0  # mse 1
    assert fidelity(p, t).item() == pytest.approx(5.0)
    mean_pred = torch.full_like(t, 3.0)
    assert fidelity(mean_pred, t).item() == pytest.approx(1.0)


def test_fixed_balancer():
    bal = FixedBalancer(["a", "b"], {"a": 2.0})
    total, w = bal({"a": torch.tensor(1.5), "b": torch.tensor(3.0)})
    assert total.item() == pytest.approx(6.0) and w["b"].item() == 1.0
    with pytest.raises(ValueError, match="unknown"):
        bal({"c": torch.tensor(1.0)})


def test_adaloss_inverse_running_magnitude():
    bal = AdaLossBalancer(["a", "b"], momentum=0.5, eps=0.0)
    total, w = bal({"a": torch.tensor(4.0), "b": torch.tensor(0.5)})
    assert w["a"].item() == pytest.approx(0.25) and w["b"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(2.0)  # each term contributes 1 on the first step
    # second step: running a = 0.5*4 + 0.5*2 = 3 ; b absent -> unchanged 0.5
    total, w = bal({"a": torch.tensor(2.0), "b": torch.tensor(0.0)}, {"a": True, "b": False})
    assert w["a"].item() == pytest.approx(1 / 3) and w["b"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(2 / 3)
    state = bal.state_dict()
    other = AdaLossBalancer(["a", "b"], momentum=0.5, eps=0.0)
    other.load_state_dict(state)
    other.eval()  # eval: no running update
    _, w2 = other({"a": torch.tensor(100.0)})
    assert w2["a"].item() == pytest.approx(1 / 3)
    # gradient flows through the loss, not the (detached) weight
    x = torch.tensor(3.0, requires_grad=True)
    tot, w3 = AdaLossBalancer(["a"])({"a": x * x})
    tot.backward()
    assert x.grad.item() == pytest.approx(w3["a"].item() * 6.0, rel=1e-6)


def test_adaloss_update_reads_nothing_on_the_host(no_host_reads):
    """The running magnitudes update on the device: a host read there would wait for the GPU every step."""
    bal = AdaLossBalancer(["a", "b"], momentum=0.5, eps=0.0)
    with no_host_reads():
        bal({"a": torch.tensor(4.0), "b": torch.tensor(0.5)})
        bal({"a": torch.tensor(2.0), "b": torch.tensor(1.5)})
    torch.testing.assert_close(bal.running, torch.tensor([3.0, 1.0], dtype=torch.float64))


def test_uncertainty_weighting_kendall():
    bal = UncertaintyBalancer(["a", "b"])
    with torch.no_grad():
        bal.log_var.copy_(torch.tensor([math.log(2.0), 0.0]))
    la, lb = torch.tensor(3.0), torch.tensor(1.0)
    total, w = bal({"a": la, "b": lb})
    ref = 0.5 * 3.0 / 2.0 + 0.5 * math.log(2.0) + 0.5 * 1.0 + 0.0
    assert total.item() == pytest.approx(ref, rel=1e-6)
    assert w["a"].item() == pytest.approx(0.25)
    # learning s on a constant loss converges to log(L)
    bal = build_balancer("uncertainty", ["a"])
    opt = torch.optim.SGD(bal.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        bal({"a": torch.tensor(4.0)})[0].backward()
        opt.step()
    assert bal.log_var.item() == pytest.approx(math.log(4.0), abs=1e-3)
    # absent terms: no log-variance penalty, but the parameter still gets a (zero) gradient
    bal.zero_grad()
    bal({"a": torch.tensor(0.0)}, {"a": False})[0].backward()
    assert bal.log_var.grad is not None and bal.log_var.grad.abs().item() < 1e-6
    with pytest.raises(ValueError, match="unknown kind"):
        build_balancer("magic", ["a"])
