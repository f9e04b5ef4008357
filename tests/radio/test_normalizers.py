"""PHI-S and baseline normalisers vs numpy math; Hadamard constructions."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmfm.radio.hadamard import hadamard, hadamard_exists
from mmfm.radio.normalizers import NORMALIZERS, PHIS, RefitSchedule, build_normalizer, tf32_matmuls


def _data(n=4000, c=12, seed=0, rank=None):
    g = np.random.default_rng(seed)
    a = g.normal(size=(c, c)) * g.uniform(0.1, 3.0, size=(1, c))
    if rank is not None:
        a[rank:] = 0.0  # low-rank features (e.g. SAM-like)
    x = g.normal(size=(n, c)) @ a + g.normal(size=c) * 5.0
    return x


def _fit(kind, x, chunks=1):
    norm = build_normalizer(kind, x.shape[1])
    for part in np.array_split(x, chunks):
        norm.update(torch.from_numpy(part).float())
    norm.fit()
    return norm


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 40, 60, 76, 108, 256, 384, 768, 1152, 1280, 1536])
def test_hadamard_orthogonal_equal_magnitude(n):
    h = hadamard(n).numpy()
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), n ** -0.5, rtol=1e-12)


@pytest.mark.parametrize("n", [0, 3, 6, 10, 14, 18])
def test_hadamard_impossible_raises(n):
    assert not hadamard_exists(n)
    with pytest.raises(ValueError, match=f"n={n}" if n > 0 else "positive"):
        hadamard(n)


def test_phis_rejects_width_without_hadamard():
    with pytest.raises(ValueError, match="n=6"):
        PHIS(6)


def test_streaming_fit_equals_batch_fit():
    x = _data()
    ref_mean, ref_cov = x.mean(0), np.cov(x, rowvar=False)
    for chunks in (1, 7):
        norm = _fit("phi_s", x, chunks)
        np.testing.assert_allclose(norm.running_mean.numpy(), ref_mean, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(norm.covariance().numpy(), ref_cov, rtol=1e-4, atol=1e-4)
    a, b = _fit("phi_s", x, 1), _fit("phi_s", x, 9)
    torch.testing.assert_close(a.transform, b.transform, rtol=1e-5, atol=1e-6)


def test_update_with_no_rows_changes_nothing_and_reads_nothing_on_the_host(no_host_reads):
    """An empty batch (a rank with no features this step) is a no-op, fresh or not; and update never reads a
    value on the host, which would wait for the GPU every training step."""
    x = torch.from_numpy(_data(n=200)).float()
    fresh, seen = build_normalizer("phi_s", 12), build_normalizer("phi_s", 12)
    seen.update(x)
    with no_host_reads():
        for norm in (fresh, seen):
            norm.update(torch.zeros(0, 12))
        seen.update(x[:50])
    assert fresh.count == 0 and torch.equal(fresh.running_mean, torch.zeros(12))
    assert torch.equal(fresh.running_m2, torch.zeros(12, 12))
    ref = build_normalizer("phi_s", 12)
    ref.update(x)
    ref.update(x[:50])
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(seen.state_dict()[k], v)


def test_phis_math_matches_numpy():
    x = _data()
    norm = _fit("phi_s", x)
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    lam, u = np.linalg.eigh(cov)
    alpha = 1.0 / np.sqrt(lam.mean())
    h = hadamard(12).numpy()
    y_ref = alpha * (x - mu) @ (h @ u.T).T
    y = norm(torch.from_numpy(x)).numpy()  # float64 input -> float64 compute
    # eigenvector signs may differ; compare the covariance-level invariants and the alpha exactly
    assert float(norm.alpha) == pytest.approx(alpha, rel=1e-6)
    np.testing.assert_allclose(np.cov(y, rowvar=False).diagonal(), np.ones(12), rtol=1e-6)
    np.testing.assert_allclose(np.cov(y_ref, rowvar=False).diagonal(), np.ones(12), rtol=1e-6)
    # isotropy: distances scale by exactly alpha
    d_x = np.linalg.norm(x[:50] - x[50:100], axis=1)
    d_y = np.linalg.norm(y[:50] - y[50:100], axis=1)
    np.testing.assert_allclose(d_y, alpha * d_x, rtol=1e-6)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-8)
    # PHI-S is not a whitening: the covariance keeps its eigenvalues (times alpha^2)
    np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(y, rowvar=False)), alpha ** 2 * lam, rtol=1e-5, atol=1e-8)


def test_phis_low_rank_still_unit_channel_variance():
    x = _data(rank=4)
    y = _fit("phi_s", x)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y.var(0, ddof=1), 1.0, rtol=1e-6)
    assert np.isfinite(y).all()


def test_baselines_match_definitions():
    x = _data()
    xt = torch.from_numpy(x)
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    sd = np.sqrt(cov.diagonal())
    # global: one scalar, mean channel variance 1
    y = _fit("global", x)(xt).numpy()
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(cov.diagonal().mean()), rtol=1e-6, atol=1e-8)
    # per channel
    y = _fit("channel", x)(xt).numpy()
    np.testing.assert_allclose(y, (x - mu) / sd, rtol=1e-6, atol=1e-8)
    # whitening variants: identity covariance; ZCA is symmetric Sigma^-1/2 (unique)
    lam, u = np.linalg.eigh(cov)
    eps = 1e-6 * lam.mean()
    zca = u @ np.diag((lam + eps) ** -0.5) @ u.T
    np.testing.assert_allclose(_fit("zca", x)(xt).numpy(), (x - mu) @ zca.T, rtol=1e-5, atol=1e-6)
    for kind in ("pca", "zca", "hadamard"):
        y = _fit(kind, x)(xt).numpy()
        cy = np.cov(y, rowvar=False)
        # whitened up to the eps floor: eigenvalues lam / (lam + eps), i.e. identity for non-tiny lam
        np.testing.assert_allclose(np.linalg.eigvalsh(cy), np.sort(lam / (lam + eps)), atol=1e-5)
        if kind == "pca":  # diagonal in the (ascending) eigenbasis
            np.testing.assert_allclose(cy, np.diag(lam / (lam + eps)), atol=1e-5)
    # PCA output is the PCA projection up to per-component sign
    y = _fit("pca", x)(xt).numpy()
    ref = (x - mu) @ u / np.sqrt(lam + eps)
    np.testing.assert_allclose(np.abs(y), np.abs(ref), rtol=1e-5, atol=1e-6)
    # identity
    np.testing.assert_array_equal(_fit("identity", x)(xt).numpy(), x)


@pytest.mark.parametrize("kind", sorted({c.name for c in NORMALIZERS.values()}))
def test_inverse_and_fold(kind):
    x = _data(n=600)
    norm = _fit(kind, x)
    xt = torch.from_numpy(x).float()
    torch.testing.assert_close(norm.inverse(norm(xt)), xt, rtol=1e-4, atol=2e-3)
    torch.manual_seed(0)
    lin = nn.Linear(7, 12)
    h = torch.randn(5, 7)
    expected = norm.inverse(lin(h))
    norm.fold_inverse_into_linear(lin)
    torch.testing.assert_close(lin(h), expected, rtol=1e-5, atol=1e-4)
    # pixel-shuffle head: 4 groups of C outputs folded the same way
    lin4 = nn.Linear(7, 48)
    exp4 = norm.inverse(lin4(h).reshape(5, 4, 12)).reshape(5, 48)
    norm.fold_inverse_into_linear(lin4, blocks=4)
    torch.testing.assert_close(lin4(h), exp4, rtol=1e-5, atol=1e-4)


def test_bf16_forward_close_to_fp32():
    x = _data(n=500)
    norm = _fit("phi_s", x)
    xt = torch.from_numpy(x).float()
    y32 = norm(xt)
    y16 = norm(xt.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=5e-2)


def test_state_dict_roundtrip_and_nchw_use():
    x = _data(n=300)
    norm = _fit("phi_s", x)
    other = build_normalizer("phi_s", 12)
    other.load_state_dict(norm.state_dict())
    feats = torch.randn(2, 12, 3, 4)
    a = norm(feats.permute(0, 2, 3, 1))
    torch.testing.assert_close(other(feats.permute(0, 2, 3, 1)), a)
    assert float(other.alpha) == float(norm.alpha)
    assert int(other.count) == 300


def test_errors():
    norm = build_normalizer("phi_s", 12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        norm.fit()
    with pytest.raises(ValueError, match="channels"):
        norm.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="unknown kind"):
        build_normalizer("bogus", 12)


def test_refit_schedule():
    s = RefitSchedule()
    refits = [t for t in range(5000) if s.refit_at(t)]
    assert refits[0] == 99 and refits[-1] == 2999 and len(refits) == 30
    assert s.update_at(2999) and not s.update_at(3000) and s.frozen_at(3000)
    with pytest.raises(ValueError, match="refit_every"):
        RefitSchedule(refit_every=0)


_DIST_SCRIPT = """
import sys
import numpy as np
import torch
import torch.distributed as dist
from mmfm.radio.normalizers import build_normalizer

rank, world, port, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=world)
x = np.load(data)
norm = build_normalizer("phi_s", x.shape[1])
for part in np.array_split(np.array_split(x, world)[rank], 3):  # unequal batches per rank
    norm.update(torch.from_numpy(part).float())
norm.fit()
torch.save({k: v for k, v in norm.state_dict().items()}, out)
dist.destroy_process_group()
"""


def test_moments_all_reduced_across_ranks(tmp_path):
    import subprocess
    import sys

    from mmfm.distributed import find_free_port

    x = _data(n=1001)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "worker.py"
    script.write_text(_DIST_SCRIPT)
    port = str(find_free_port())
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, str(tmp_path / "x.npy"),
                               str(tmp_path / f"out{r}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), logs
    ref = _fit("phi_s", x)
    outs = [torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in range(2)]
    for out in outs:
        assert int(out["count"]) == 1001  # every rank holds the global statistics
        torch.testing.assert_close(out["running_mean"], ref.running_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out["running_m2"], ref.running_m2, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(outs[0]["transform"], outs[1]["transform"], rtol=0, atol=0)


def test_tf32_matmuls_restores_the_setting():
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, attr)
    with tf32_matmuls():
        assert getattr(matmul, attr) in ("tf32", True)
    assert getattr(matmul, attr) == before
    with pytest.raises(RuntimeError), tf32_matmuls():
        raise RuntimeError("restored on errors too")
    assert getattr(matmul, attr) == before
    with tf32_matmuls(enabled=False):
        assert getattr(matmul, attr) == before


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["phi_s", "channel"])
def test_tf32_transform_of_bf16_features_close_to_float64(kind):
    # the trainer's targets: bf16-valued teacher features (PHI-S width 1024) through the fitted transform.
    # float64 math is the reference; TF32 rounds the centred inputs and T to 10 mantissa bits (rel. ~2^-11
    # each), so its error must stay below the bf16 rounding of the features themselves (2^-9 = 2e-3)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.from_numpy(_data(n=20000, c=1024)).float().cuda()
    norm = build_normalizer(kind, 1024).cuda()
    norm.update(x)
    norm.fit()
    feats = x[:4096].bfloat16().float()  # values a bf16 teacher returns
    want = (feats.double() - norm.mean.double()) @ norm.transform.double().T
    fp32 = norm(feats).double()
    with tf32_matmuls():
        tf32 = norm(feats).double()
    rel = lambda y: ((y - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(fp32) < 1e-6
    assert rel(tf32) < 2e-3 / 4
    assert rel(tf32) > rel(fp32)  # the TF32 path did run (a silent fp32 fallback would hide a broken switch)
