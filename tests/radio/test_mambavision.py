"""MambaVision student: shapes, gradients, the mixer against a naive loop, bf16 autocast, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfm.radio.mambavision import (
    MambaVision,
    MambaVisionMixer,
    create_mambavision,
    param_count_table,
)


def _naive_mixer(m: MambaVisionMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The mixer written from its definition with explicit loops (fp64): conv as a sum of shifted copies,
    the SSM as the per-step recurrence h_t = exp(dt_t A) h_t-1 + dt_t B_t u_t, y_t = C_t h_t + D u_t."""
    h = hidden.double()
    bsz, length, _ = h.shape
    half = m.d_inner // 2
    xz = h @ m.in_proj.weight.double().T  # (B, L, d_inner)
    x, z = xz[..., :half], xz[..., half:]

    def dwconv_same(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # v (B, L, d), weight (d, 1, k)
        k = weight.shape[-1]
        left = (k - 1) // 2  # PyTorch "same": the extra pad of an even kernel goes to the right
        out = torch.zeros_like(v)
        for j in range(k):
            shift = j - left
            for t in range(length):
                s = t + shift
                if 0 <= s < length:
                    out[:, t] += v[:, s] * weight[:, 0, j].double()
        return out

    x = F.silu(dwconv_same(x, m.conv_x.weight))
    z = F.silu(dwconv_same(z, m.conv_z.weight))
    dbc = x @ m.x_proj.weight.double().T
    dt, b, c = dbc.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dt @ m.dt_proj.weight.double().T + m.dt_proj.bias.double())  # (B, L, d)
    a = -torch.exp(m.A_log.double())  # (d, N)
    state = torch.zeros(bsz, half, m.d_state, dtype=torch.float64)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, t, :, None] * a) * state + delta[:, t, :, None] * b[:, t, None, :] * x[:, t, :, None]
        ys.append((state * c[:, t, None, :]).sum(-1) + m.D.double() * x[:, t])
    y = torch.stack(ys, dim=1)
    return torch.cat([y, z], dim=-1) @ m.out_proj.weight.double().T


@pytest.fixture(scope="module")
def tiny() -> MambaVision:
    torch.manual_seed(0)
    return create_mambavision("tiny").eval()


@pytest.mark.parametrize("hw", [(64, 96), (96, 32), (128, 64)])
def test_shapes_non_square(tiny: MambaVision, hw: tuple[int, int]) -> None:
    h, w = hw
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():
        out = tiny(x)
        out2, inter = tiny(x, return_intermediates=True)
    d = tiny.embed_dim
    assert d == 16 * 8
    assert out.summary.shape == (2, d)
    assert out.features.shape == (2, (h // 32) * (w // 32), d)
    torch.testing.assert_close(out.summary, out.features.mean(1))  # mean-pooled summary
    torch.testing.assert_close(out2.features, out.features)
    assert [t.shape for t in inter] == [
        (2, (h // 4) * (w // 4), 16), (2, (h // 8) * (w // 8), 32),
        (2, (h // 16) * (w // 16), 64), (2, (h // 32) * (w // 32), 128),
    ]
    # stage 3 intermediate is the final features before LayerNorm
    torch.testing.assert_close(tiny.norm(inter[3]), out.features)
    with torch.no_grad():
        nchw = tiny(x, feature_fmt="NCHW").features
    assert nchw.shape == (2, d, h // 32, w // 32)
    torch.testing.assert_close(nchw.flatten(2).transpose(1, 2), out.features)


def test_class_token_and_stage_selection() -> None:
    torch.manual_seed(0)
    m = create_mambavision("tiny", class_token=True).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out, inter = m.forward_intermediates(x, stages=(1, -1))
    assert out.summary.shape == (1, 128) and out.features.shape == (1, 4, 128)
    assert [t.shape for t in inter] == [(1, 64, 32), (1, 4, 128)]
    assert not torch.allclose(out.summary, out.features.mean(1))


def test_gradients_flow(tiny: MambaVision) -> None:
    torch.manual_seed(1)
    m = create_mambavision("tiny", drop_path_rate=0.1, grad_checkpointing=True).train()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = m(x)
    (out.summary.square().mean() + out.features.square().mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    mixer = m.stages[2][0].mixer
    assert isinstance(mixer, MambaVisionMixer)
    for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias, mixer.x_proj.weight):
        assert p.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("d_conv", [3, 4])
def test_mixer_matches_naive_loop(d_conv: int) -> None:
    torch.manual_seed(2)
    m = MambaVisionMixer(dim=12, d_state=4, d_conv=d_conv, expand=2)
    with torch.no_grad():  # non-trivial parameters so every term matters
        m.D.uniform_(-1, 1)
        m.A_log.add_(torch.randn_like(m.A_log) * 0.3)
    hidden = torch.randn(2, 9, 12)
    with torch.no_grad():
        got = m(hidden)
    want = _naive_mixer(m, hidden)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_fp32(tiny: MambaVision) -> None:
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
    assert low.features.dtype in (torch.bfloat16, torch.float32)
    # bf16 has an 8-bit mantissa (rel. eps 7.8e-3); over the ~10 blocks of `tiny` the LayerNorm-ed outputs
    # (unit scale) drift by ~1e-2 (measured: max 0.035, mean 0.007). Tolerance: max 0.1, mean 0.015.
    err = (low.features.float() - ref.features).abs()
    assert err.max() < 0.1 and err.mean() < 0.015, (err.max(), err.mean())
    cos = F.cosine_similarity(low.features.float().flatten(1), ref.features.flatten(1))
    assert (cos > 0.999).all()


def test_bad_input(tiny: MambaVision) -> None:
    with pytest.raises(ValueError, match="nearest valid size 64x96"):
        tiny(torch.rand(1, 3, 70, 100))
    with pytest.raises(ValueError, match="channels"):
        tiny(torch.rand(1, 1, 64, 64))
    with pytest.raises(TypeError, match="floating point"):
        tiny(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown MambaVision size"):
        create_mambavision("XXL")
    with pytest.raises(TypeError, match="unknown MambaVisionConfig fields"):
        create_mambavision("tiny", widht=3)
    with pytest.raises(ValueError, match="feature_fmt"):
        tiny(torch.rand(1, 3, 64, 64), feature_fmt="NHWC")
    assert tiny.get_nearest_supported_resolution(70, 100) == (64, 96)
    assert tiny.get_nearest_supported_resolution(5, 5) == (32, 32)


def test_external_preprocessor() -> None:
    torch.manual_seed(0)
    m = create_mambavision("tiny").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = m(x)
        mean, std = m.make_preprocessor_external()
        b = m((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(a.features, b.features)


def test_param_count_table_matches_paper_sizes() -> None:
    table = param_count_table()
    counts = {line.split()[0]: float(line.split()[-1]) for line in table.splitlines()[1:]}
    # Paper (with a 1000-class head of 8C*1000 + 1000 params): T 31.8M, S 50.1M, B 97.7M, L 227.9M.
    paper = {"T": 31.8, "S": 50.1, "B": 97.7, "L": 227.9}
    for size, total in paper.items():
        head = (8 * {"T": 80, "S": 96, "B": 128, "L": 196}[size] * 1000 + 1000) / 1e6
        assert abs(counts[size] + head - total) < 0.2, (size, counts[size], total)


def test_radio_encoder_wraps_mambavision(tmp_path) -> None:
    """RadioEncoder conditions the input once (the student's own conditioning is made external) and its
    checkpoint round-trips a MambaVision student exactly."""
    from mmfm.radio.encoder import RadioEncoder, load, save

    torch.manual_seed(0)
    m = create_mambavision("tiny").eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = m(x)
        enc = RadioEncoder(m).eval()
        out = enc(x)
        torch.testing.assert_close(out.features, ref.features, rtol=0, atol=0)
        torch.testing.assert_close(out.summary, ref.summary, rtol=0, atol=0)
        save(enc, tmp_path)
        again = load(tmp_path).eval()(x)
    torch.testing.assert_close(again.features, out.features, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixer_gpu_matches_naive_loop() -> None:
    torch.manual_seed(4)
    m = MambaVisionMixer(dim=32, d_state=8, d_conv=3, expand=1)
    with torch.no_grad():
        m.D.uniform_(-1, 1)
    hidden = torch.randn(2, 40, 32)
    want = _naive_mixer(m, hidden)
    with torch.no_grad():
        got = m.cuda()(hidden.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m(hidden.cuda()).float().cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(low.double(), want, rtol=5e-2, atol=5e-2)  # bf16 projections, fp32 scan state
