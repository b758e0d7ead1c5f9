"""fid.py: the Fréchet distance in float64 without complex square roots, and the classifier whose features it is
measured in: trained once, cached under a key of the data, reproducible, rebuilt when damaged."""

import glob
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import write_dataset

import data
import fid


def random_cov(d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2 * d, d))
    return scale * a.T @ a / (2 * d) + 0.05 * np.eye(d)


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_is_zero_for_identical_statistics():
    for d in (1, 16, 128):
        mu, sigma = np.random.default_rng(d).standard_normal(d), random_cov(d, seed=d, scale=3.0)
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    var1, var2 = rng.uniform(0.1, 4.0, 20), rng.uniform(0.1, 4.0, 20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_agrees_with_sqrtm_on_well_conditioned_non_commuting_covariances():
    s1, s2 = random_cov(12, seed=1), random_cov(12, seed=2)
    mu1, mu2 = np.zeros(12), np.full(12, 0.5)
    reference = 12 * 0.25 + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_is_symmetric_and_takes_tensors():
    s1, s2 = random_cov(30, seed=3), random_cov(30, seed=4, scale=2.0)
    mu1, mu2 = np.ones(30), np.zeros(30)
    forward = fid.frechet_distance(mu1, s1, mu2, s2)
    backward = fid.frechet_distance(torch.tensor(mu2), torch.tensor(s2), torch.tensor(mu1), torch.tensor(s1))
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-10)


def test_frechet_distance_is_finite_and_non_negative_on_rank_deficient_covariances():
    rng = np.random.default_rng(5)
    for n in (2, 5, 13, 31):  # far fewer samples than 50 dimensions: both covariances singular
        d = 50
        f1, f2 = rng.standard_normal((n, d)), rng.standard_normal((n, d)) * 1e-3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats1, stats2 = fid.feature_stats(f1), fid.feature_stats(f2)
        for a, b in ((stats1, stats2), (stats1, stats1), (stats2, stats2)):
            value = fid.frechet_distance(*a, *b)
            assert np.isfinite(value) and value >= 0.0
        assert fid.frechet_distance(*stats1, *stats1) < 1e-8
    zero = np.zeros((4, 4))  # degenerate Gaussians: only the means are left
    assert fid.frechet_distance(np.zeros(4), zero, np.full(4, 2.0), zero) == pytest.approx(16.0)


def test_frechet_distance_rejects_non_finite_and_mismatched_statistics():
    s = np.eye(3)
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.array([0.0, np.nan, 0.0]), s, np.zeros(3), s)
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), s, np.zeros(4), np.eye(4))


def test_fid_from_features_warns_when_samples_are_fewer_than_dimensions():
    with pytest.warns(UserWarning, match="10 samples of 20-dimensional"):
        fid.fid_from_features(torch.randn(10, 20), torch.randn(30, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        fid.fid_from_features(torch.randn(40, 20), torch.randn(30, 20))


def test_fid_from_features_sees_a_mean_shift():
    f = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert fid.fid_from_features(f, f) < 1e-8
    assert fid.fid_from_features(f, f + 0.5) == pytest.approx(8 * 0.25, rel=1e-9)  # same covariance


def test_pixel_features_are_flattened_images():
    images = torch.rand(7, 1, 28, 28)
    f = fid.pixel_features(images)
    assert f.shape == (7, 784) and torch.equal(f[3], images[3].flatten())


# ------------------------------------------------------------------------------------------ classifier features


def test_classifier_is_cached_deterministic_and_retrained_when_the_data_changes(tiny_data):
    net, info = fid.load_classifier(tiny_data, "cpu", epochs=2)
    assert not info["from_cache"] and os.path.isfile(info["path"])
    assert os.path.dirname(info["path"]) == os.path.join(tiny_data, "FashionMNIST")  # beside the data: writable
    assert 0.0 <= info["test_acc"] <= 1.0
    images = data.load(tiny_data, "test", "cpu").images.float() / 255.0
    features = fid.classifier_features(net, images)
    assert features.shape == (len(images), fid.FEATURE_DIM)

    again, info_again = fid.load_classifier(tiny_data, "cpu", epochs=2)
    assert info_again["from_cache"] and info_again["path"] == info["path"]
    assert info_again["test_acc"] == info["test_acc"]
    assert torch.equal(fid.classifier_features(again, images), features)
    assert torch.equal(fid.classifier_features(again, images), fid.classifier_features(again, images))

    write_dataset(tiny_data, n_train=200, seed=7)  # other training data (and test data) in the same folder
    changed, info_changed = fid.load_classifier(tiny_data, "cpu", epochs=2)
    assert not info_changed["from_cache"] and info_changed["path"] != info["path"]
    assert not torch.equal(fid.classifier_features(changed, images), features)
    assert len(glob.glob(os.path.join(tiny_data, "FashionMNIST", "classifier-*.pt"))) == 2


def test_classifier_training_is_reproducible_from_its_seed(tiny_data):
    train, test = data.load(tiny_data, "train", "cpu"), data.load(tiny_data, "test", "cpu")
    a, acc_a = fid.train_classifier(train, test, "cpu", epochs=1)
    b, acc_b = fid.train_classifier(train, test, "cpu", epochs=1)
    c, _ = fid.train_classifier(train, test, "cpu", epochs=1, seed=1)
    images = test.images.float() / 255.0
    assert acc_a == acc_b
    assert torch.allclose(fid.classifier_features(a, images), fid.classifier_features(b, images), atol=1e-5)
    assert not torch.allclose(fid.classifier_features(a, images), fid.classifier_features(c, images))


def test_damaged_classifier_cache_is_rebuilt(tiny_data):
    path = fid.classifier_cache_path(tiny_data, epochs=1)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    net, info = fid.load_classifier(tiny_data, "cpu", epochs=1)
    assert not info["from_cache"] and info["path"] == path
    assert fid.load_classifier(tiny_data, "cpu", epochs=1)[1]["from_cache"]


def test_classifier_cache_falls_back_to_the_user_cache_when_the_data_folder_is_read_only(
    tiny_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = os.path.join(tiny_data, "FashionMNIST")
    os.chmod(folder, 0o555)  # a shared, read-only data set (root would pass os.access: the mode bits decide)
    try:
        path = fid.classifier_cache_path(tiny_data, epochs=1)
        assert path.startswith(str(tmp_path / "cache" / fid.PROJECT) + os.sep)
        _, info = fid.load_classifier(tiny_data, "cpu", epochs=1)
        assert os.path.isfile(path) and info["path"] == path
        assert not glob.glob(os.path.join(folder, "classifier-*.pt"))
    finally:
        os.chmod(folder, 0o755)
