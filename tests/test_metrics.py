"""metrics.py: the Fréchet distance, the likelihood bounds, latent diagnostics and the classifier feature extractor."""
import glob
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import checkpoint
import data
import fast_decoder
import fid_classifier
import metrics
import vae
from conftest import write_dataset


def random_cov(d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2 * d, d))
    return scale * a.T @ a / (2 * d) + 0.05 * np.eye(d)


# ------------------------------------------------------------------------------------------ Fréchet distance

def test_frechet_distance_is_zero_for_identical_statistics():
    for d in (1, 16, 128):
        mu, sigma = np.random.default_rng(d).standard_normal(d), random_cov(d, seed=d, scale=3.0)
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    var1, var2 = rng.uniform(0.1, 4.0, 20), rng.uniform(0.1, 4.0, 20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_agrees_with_sqrtm_on_well_conditioned_non_commuting_covariances():
    s1, s2 = random_cov(12, seed=1), random_cov(12, seed=2)
    mu1, mu2 = np.zeros(12), np.full(12, 0.5)
    reference = 12 * 0.25 + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_is_symmetric_and_takes_tensors():
    s1, s2 = random_cov(30, seed=3), random_cov(30, seed=4, scale=2.0)
    mu1, mu2 = np.ones(30), np.zeros(30)
    forward = metrics.frechet_distance(mu1, s1, mu2, s2)
    backward = metrics.frechet_distance(torch.tensor(mu2), torch.tensor(s2), torch.tensor(mu1), torch.tensor(s1))
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-10)


def test_frechet_distance_is_finite_and_non_negative_on_rank_deficient_covariances():
    rng = np.random.default_rng(5)
    for n in (2, 5, 13, 31):  # far fewer samples than 50 dimensions: both covariances singular
        d = 50
        f1, f2 = rng.standard_normal((n, d)), rng.standard_normal((n, d)) * 1e-3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats1, stats2 = metrics.feature_stats(f1), metrics.feature_stats(f2)
        for a, b in ((stats1, stats2), (stats1, stats1), (stats2, stats2)):
            value = metrics.frechet_distance(*a, *b)
            assert np.isfinite(value) and value >= 0.0
        assert metrics.frechet_distance(*stats1, *stats1) < 1e-8
    zero = np.zeros((4, 4))  # degenerate Gaussians: only the means are left
    assert metrics.frechet_distance(np.zeros(4), zero, np.full(4, 2.0), zero) == pytest.approx(16.0)


def test_frechet_distance_rejects_non_finite_and_mismatched_statistics():
    s = np.eye(3)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.frechet_distance(np.array([0.0, np.nan, 0.0]), s, np.zeros(3), s)
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(np.zeros(3), s, np.zeros(4), np.eye(4))


def test_fid_from_features_warns_when_samples_are_fewer_than_dimensions():
    with pytest.warns(UserWarning, match="10 samples of 20-dimensional"):
        metrics.fid_from_features(torch.randn(10, 20), torch.randn(30, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        metrics.fid_from_features(torch.randn(40, 20), torch.randn(30, 20))


def test_fid_from_features_sees_a_mean_shift():
    f = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.fid_from_features(f, f) < 1e-8
    assert metrics.fid_from_features(f, f + 0.5) == pytest.approx(8 * 0.25, rel=1e-9)  # same covariance


def test_pixel_features_are_flattened_images():
    images = torch.rand(7, 1, 28, 28)
    f = metrics.pixel_features(images)
    assert f.shape == (7, 784) and torch.equal(f[3], images[3].flatten())


# ------------------------------------------------------------------------------------------ likelihood bounds

@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    model, _ = checkpoint.load_checkpoint(tiny_checkpoint["path"])
    return model, data.load(tiny_checkpoint["data_dir"], "test", "cpu")


def bounds(model, split, k, seed=0):
    return metrics.likelihood_bounds(model, split, k=k, generator=torch.Generator().manual_seed(seed))


def test_iwae_is_at_or_below_the_negative_elbo_and_tightens_with_k(tiny_model):
    model, test = tiny_model
    results = {k: bounds(model, test, k) for k in (1, 8, 64)}
    for k, r in results.items():
        assert r["neg_elbo"] == pytest.approx(r["recon"] + r["kl"])
        assert r["n_images"] == len(test) and r["iwae_k"] == k
    # k = 1 is a one-sample estimate of the ELBO itself (equal in expectation, so either side by noise); more
    # samples give a strictly tighter bound: here by about 9 and 14 nats, far beyond the noise of either estimate.
    assert results[1]["iwae_nll"] == pytest.approx(results[1]["neg_elbo"], rel=0.005)
    assert results[8]["iwae_nll"] < results[8]["neg_elbo"] - 2.0
    assert results[64]["iwae_nll"] < results[64]["neg_elbo"] - 2.0
    assert results[1]["iwae_nll"] > results[8]["iwae_nll"] > results[64]["iwae_nll"]


def test_likelihood_bounds_are_reproducible_and_match_the_training_loss(tiny_model):
    model, test = tiny_model
    a, b = bounds(model, test, 16, seed=3), bounds(model, test, 16, seed=3)
    assert a == b
    assert bounds(model, test, 16, seed=4)["iwae_nll"] != a["iwae_nll"]
    # The closed-form KL does not depend on the samples and equals vae.vae_loss's on the posterior means.
    x, target, _ = next(test.batches(len(test)))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        terms = vae.vae_loss(model.decoder.logits(mu), target, mu, logvar, vae.VAEConfig(latent_dim=4, beta=1.0))
    assert a["kl"] == pytest.approx(terms.kl.mean().item(), rel=1e-5)
    assert a["kl_per_dim"] == pytest.approx(terms.kl_per_dim.mean(0).tolist(), rel=1e-5)
    assert len(a["kl_per_dim"]) == 4 and sum(a["kl_per_dim"]) == pytest.approx(a["kl"], rel=1e-6)


def test_likelihood_bounds_reject_k_below_one(tiny_model):
    with pytest.raises(ValueError, match="k >= 1"):
        bounds(*tiny_model, k=0)


def test_bernoulli_nll_equals_the_training_reconstruction_term():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 28, 28, generator=g) * 8  # saturated pixels included
    target = torch.rand(6, 1, 28, 28, generator=g)
    target[0] = (target[0] > 0.5).float()
    mu = torch.zeros(6, 3)
    expected = vae.vae_loss(logits, target, mu, mu, vae.VAEConfig(latent_dim=3, beta=1.0)).recon
    assert torch.allclose(metrics.bernoulli_nll(logits, target), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("c_in,c_out,size,padding,output_padding", [
    (32, 16, 3, 0, 0), (16, 8, 7, 1, 1), (8, 1, 14, 1, 1), (3, 5, 6, 1, 0), (4, 2, 5, 0, 1)])
def test_sub_pixel_convolution_equals_the_transposed_convolution(c_in, c_out, size, padding, output_padding):
    torch.manual_seed(0)
    convt = torch.nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=padding, output_padding=output_padding)
    x = torch.randn(5, c_in, size, size)
    with torch.no_grad():
        expected, got = convt(x), fast_decoder.SubPixelConvTranspose(convt)(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_fast_copy_reproduces_the_decoder_and_leaves_the_model_alone(tiny_model):
    model, _ = tiny_model
    fast = fast_decoder.fast_copy(model)
    assert fast is not model and not fast.training
    assert sum(isinstance(m, fast_decoder.SubPixelConvTranspose) for m in fast.modules()) == 3
    assert not any(isinstance(m, fast_decoder.SubPixelConvTranspose) for m in model.modules())
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        assert torch.allclose(fast.decoder.logits(z), model.decoder.logits(z), atol=1e-4)
    training = vae.BetaVAE(vae.VAEConfig(latent_dim=3))  # train mode: batch norm must not see the check's latents
    before = {k: v.clone() for k, v in training.state_dict().items()}
    assert not fast_decoder.fast_copy(training).training and training.training
    assert all(torch.equal(v, before[k]) for k, v in training.state_dict().items())


# ------------------------------------------------------------------------------------------ latent diagnostics

def test_active_units_counts_dimensions_whose_posterior_mean_varies():
    g = torch.Generator().manual_seed(0)
    n = 2000
    mu = torch.stack([
        torch.randn(n, generator=g),              # variance 1: active
        torch.full((n,), 3.0),                    # constant, however far from 0: inactive
        0.05 * torch.randn(n, generator=g),       # variance 0.0025: inactive
        0.2 * torch.randn(n, generator=g),        # variance 0.04: active
        torch.arange(n).remainder(2) * 2.0 - 1,   # ±1: active
    ], dim=1)
    count, variances = metrics.active_units(mu)
    assert count == 3
    assert [v > 0.01 for v in variances] == [True, False, False, True, True]
    assert metrics.active_units(mu, threshold=2.0)[0] == 0


def test_linear_probe_scores_100_percent_on_separable_latents_and_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 6, generator=g) * 5

    def sample(n):
        y = torch.arange(n) % 10
        return centres[y] + 0.1 * torch.randn(n, 6, generator=g), y

    (z_train, y_train), (z_test, y_test) = sample(500), sample(300)
    assert metrics.linear_probe_accuracy(z_train, y_train, z_test, y_test) == 1.0
    noise = torch.randn(300, 6, generator=g)
    assert metrics.linear_probe_accuracy(torch.randn(500, 6, generator=g), y_train, noise, y_test) < 0.3


# ------------------------------------------------------------------------------------------ classifier features

def test_classifier_is_cached_deterministic_and_retrained_when_the_data_changes(tiny_data):
    net, info = fid_classifier.load_classifier(tiny_data, "cpu", epochs=2)
    assert not info["from_cache"] and os.path.isfile(info["path"])
    assert os.path.dirname(info["path"]) == os.path.join(tiny_data, "FashionMNIST")  # beside the data: writable
    assert 0.0 <= info["test_acc"] <= 1.0
    images = data.load(tiny_data, "test", "cpu").images.float() / 255.0
    features = fid_classifier.classifier_features(net, images)
    assert features.shape == (len(images), fid_classifier.FEATURE_DIM)

    again, info_again = fid_classifier.load_classifier(tiny_data, "cpu", epochs=2)
    assert info_again["from_cache"] and info_again["path"] == info["path"]
    assert info_again["test_acc"] == info["test_acc"]
    assert torch.equal(fid_classifier.classifier_features(again, images), features)
    assert torch.equal(fid_classifier.classifier_features(again, images), fid_classifier.classifier_features(again, images))

    write_dataset(tiny_data, n_train=200, seed=7)  # other training data (and test data) in the same folder
    changed, info_changed = fid_classifier.load_classifier(tiny_data, "cpu", epochs=2)
    assert not info_changed["from_cache"] and info_changed["path"] != info["path"]
    assert not torch.equal(fid_classifier.classifier_features(changed, images), features)
    assert len(glob.glob(os.path.join(tiny_data, "FashionMNIST", "classifier-*.pt"))) == 2


def test_classifier_training_is_reproducible_from_its_seed(tiny_data):
    train, test = data.load(tiny_data, "train", "cpu"), data.load(tiny_data, "test", "cpu")
    a, acc_a = fid_classifier.train_classifier(train, test, "cpu", epochs=1)
    b, acc_b = fid_classifier.train_classifier(train, test, "cpu", epochs=1)
    c, _ = fid_classifier.train_classifier(train, test, "cpu", epochs=1, seed=1)
    images = test.images.float() / 255.0
    assert acc_a == acc_b
    assert torch.allclose(fid_classifier.classifier_features(a, images), fid_classifier.classifier_features(b, images), atol=1e-5)
    assert not torch.allclose(fid_classifier.classifier_features(a, images), fid_classifier.classifier_features(c, images))


def test_damaged_classifier_cache_is_rebuilt(tiny_data):
    path = fid_classifier.classifier_cache_path(tiny_data, epochs=1)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    net, info = fid_classifier.load_classifier(tiny_data, "cpu", epochs=1)
    assert not info["from_cache"] and info["path"] == path
    assert fid_classifier.load_classifier(tiny_data, "cpu", epochs=1)[1]["from_cache"]


def test_classifier_cache_falls_back_to_the_user_cache_when_the_data_folder_is_read_only(tiny_data, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = os.path.join(tiny_data, "FashionMNIST")
    os.chmod(folder, 0o555)  # a shared, read-only data set (root would pass os.access: the mode bits decide)
    try:
        path = fid_classifier.classifier_cache_path(tiny_data, epochs=1)
        assert path.startswith(str(tmp_path / "cache" / fid_classifier.PROJECT) + os.sep)
        _, info = fid_classifier.load_classifier(tiny_data, "cpu", epochs=1)
        assert os.path.isfile(path) and info["path"] == path
        assert not glob.glob(os.path.join(folder, "classifier-*.pt"))
    finally:
        os.chmod(folder, 0o755)
