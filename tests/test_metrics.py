"""metrics.py: the likelihood bounds (the seed's BCE and the continuous Bernoulli), latent diagnostics, and the
disentanglement metrics, each on constructed cases whose answer is known."""

import functools
import math

import numpy as np
import pytest
import scipy.integrate
import torch
from sklearn.metrics import mutual_info_score

import data
import metrics
import vae

# ------------------------------------------------------------------------------------------ likelihood bounds


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    model, _ = vae.load_checkpoint(tiny_checkpoint["path"])
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


# ----------------------------------------------------------------------------------- the continuous Bernoulli


def integral_norm(lam):
    """log C(λ) by numerical integration: 1 / C = ∫₀¹ λ^x (1 − λ)^(1 − x) dx."""
    value, _ = scipy.integrate.quad(lambda x: math.exp(x * math.log(lam) + (1 - x) * math.log1p(-lam)), 0, 1,
                                    epsabs=0, epsrel=1e-13)  # fmt: skip
    return -math.log(value)


@pytest.mark.parametrize("lam", [0.5, 0.5 + 1e-7, 0.5 - 1e-7, 0.5 + 1e-4, 0.5 - 1e-2, 0.5 + 1e-2, 0.1, 0.9, 1e-3,
                                 1 - 1e-3, 1e-8])  # fmt: skip
def test_the_continuous_bernoulli_normaliser_is_the_integral_also_near_one_half(lam):
    logit = torch.tensor([math.log(lam) - math.log1p(-lam)], dtype=torch.float64)
    assert metrics.cb_log_norm(logit).item() == pytest.approx(integral_norm(lam), rel=1e-9, abs=1e-12)
    got32 = metrics.cb_log_norm(logit.float()).item()
    assert got32 == pytest.approx(integral_norm(lam), rel=1e-5)  # float32 too: no 0/0 at λ = 1/2


def test_the_continuous_bernoulli_is_a_density_with_finite_gradients():
    logits = torch.tensor([-80.0, -5.0, -1e-3, 0.0, 2e-3, 1.0, 30.0, 1e4], dtype=torch.float64, requires_grad=True)
    metrics.cb_log_norm(logits).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[3] == 0  # even in l: flat at 0
    for lam in (0.02, 0.5, 0.7):
        logit = math.log(lam / (1 - lam))

        def density(x):
            t = torch.tensor([x], dtype=torch.float64)
            nll = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([logit], dtype=torch.float64), t)
            return math.exp(-(nll - metrics.cb_log_norm(torch.tensor([logit], dtype=torch.float64))).item())

        assert scipy.integrate.quad(density, 0, 1)[0] == pytest.approx(1.0, rel=1e-9)


def test_the_bounds_under_the_continuous_bernoulli_add_the_normaliser(tiny_model):
    model, test = tiny_model
    r = bounds(model, test, 1)
    cb = r["continuous_bernoulli"]
    x, target, _ = next(test.batches(len(test)))
    with torch.no_grad():  # k = 1 with the same noise: recon_cb = recon − Σ log C at the same logits
        mu, logvar = model.encode(x)
        eps = torch.randn(1, len(x), 4, generator=torch.Generator().manual_seed(0))
        logits = model.decoder.logits(vae.reparameterize(mu, logvar, eps)[0])
    log_c = metrics.cb_log_norm(logits).flatten(1).sum(1).double().mean().item()
    assert cb["recon"] == pytest.approx(r["recon"] - log_c, rel=1e-5)
    assert cb["neg_elbo"] == pytest.approx(cb["recon"] + r["kl"], rel=1e-9)
    assert cb["neg_elbo_bits_per_dim"] == pytest.approx(cb["neg_elbo"] / (784 * math.log(2)), rel=1e-9)
    assert cb["neg_elbo"] < r["neg_elbo"]  # log C ≥ log 2 > 0 at every pixel


# ------------------------------------------------------------------------------------------ disentanglement

LEVELS = (3, 4, 5, 6, 8)
FACTORS = np.stack(np.meshgrid(*map(np.arange, LEVELS), indexing="ij"), -1).reshape(-1, len(LEVELS))  # 2,880 rows
CHANCE = float(np.mean([1 / n for n in LEVELS]))  # guessing a uniform factor


def _rotate(codes, angle=np.pi / 4):
    """Mix latents 0 and 1, so factors 0 and 1."""
    out, c, s = codes.copy(), np.cos(angle), np.sin(angle)
    out[:, 0], out[:, 1] = c * codes[:, 0] - s * codes[:, 1], s * codes[:, 0] + c * codes[:, 1]
    return out


def _representations():
    rng, n = np.random.default_rng(0), len(FACTORS)
    z = (FACTORS - FACTORS.mean(0)) / FACTORS.std(0)
    perfect = np.c_[z, rng.normal(size=(n, 2)), np.zeros((n, 1))]  # the factors, two noise latents, a constant one
    d = perfect.shape[1]
    scale = rng.uniform(0.5, 3.0, d) * np.array([-1, 1, -1, 1, 1, -1, 1, -1])
    return {"perfect": perfect, "transformed": (perfect * scale + rng.normal(size=d))[:, rng.permutation(d)],
            "rotated": _rotate(perfect), "noise": rng.normal(size=(n, d))}  # fmt: skip


REPS = _representations()
HEADLINES = {"mig": "mig", "sap": "sap", "dci_disentanglement": "disentanglement", "dci_completeness": "completeness",
             "dci_informativeness": "informativeness", "factorvae_score": "factorvae_score"}  # fmt: skip


@functools.cache
def score(rep):
    """Every supervised metric of a representation, as evaluate.py computes them."""
    return metrics.disentanglement(REPS[rep], FACTORS, [f"f{k}" for k in range(len(LEVELS))])


def test_mig_is_disentanglement_libs_and_numpy_alone_recomputes_it():
    codes = REPS["rotated"]
    binned = [np.digitize(c, np.histogram(c, 20)[1][:-1]) for c in codes.T]
    mi = np.array([[mutual_info_score(f, b) for f in FACTORS.T] for b in binned])  # their MI: sklearn's, nats
    top = np.sort(mi / [mutual_info_score(f, f) for f in FACTORS.T], axis=0)
    assert metrics.mig(codes, FACTORS)["mig"] == pytest.approx(np.mean(top[-1] - top[-2]), abs=1e-12)


def test_the_factors_themselves_score_at_or_near_one():
    s = score("perfect")
    assert s["mig"] > 0.98 and s["factorvae_score"] > 0.99
    assert min(s["dci_disentanglement"], s["dci_completeness"], s["dci_informativeness"]) > 0.98
    # SAP's ceiling: a 1-D linear classifier's best accuracy on a factor of L levels is about 1/L+ (one threshold),
    # and the runner-up latent is at chance, so the gap stays well below 1 even for perfect codes
    assert s["sap"] > 0.3
    assert [s["latents"][d]["factor"] for d in range(5)] == ["f0", "f1", "f2", "f3", "f4"]


@pytest.mark.parametrize("metric", list(HEADLINES))
def test_a_permuted_rescaled_and_sign_flipped_copy_scores_the_same(metric):
    assert score("transformed")[metric] == pytest.approx(score("perfect")[metric], abs=0.02)


@pytest.mark.parametrize("metric", list(HEADLINES))
def test_a_rotation_that_mixes_two_factors_scores_lower(metric):
    if metric == "dci_informativeness":  # the information is all still there, only mixed: it stays
        assert score("rotated")[metric] > 0.95
    else:
        assert score("rotated")[metric] < score("perfect")[metric] - 0.05


@pytest.mark.parametrize("metric, chance", [("mig", 0.0), ("sap", 0.0), ("dci_disentanglement", 0.0),
                                            ("dci_completeness", 0.0), ("dci_informativeness", CHANCE),
                                            ("factorvae_score", 1 / len(LEVELS))])  # fmt: skip
def test_independent_noise_scores_near_chance(metric, chance):
    assert score("noise")[metric] == pytest.approx(chance, abs=0.05)


def test_udr_is_one_for_permuted_copies_and_near_zero_for_unrelated_runs():
    rng = np.random.default_rng(1)
    base = np.c_[FACTORS[:, 1:] * 1.0, np.zeros((len(FACTORS), 2))]  # a factor grid: uncorrelated latents, exactly
    kl = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    copy = base[:, [2, 0, 3, 1, 4, 5]] * [-2.0, 1.0, 3.0, -0.5, 1.0, 1.0] + 7.0
    copy_kl = [kl[i] for i in [2, 0, 3, 1, 4, 5]]
    assert metrics.udr([base, copy], [kl, copy_kl]) == pytest.approx([1.0, 1.0], abs=1e-9)
    unrelated = rng.normal(size=(len(FACTORS), 6))
    assert max(metrics.udr([base, unrelated], [kl, [1.0] * 6])) < 0.1
    # the median over a run's pairs: three copies and an unrelated run keep the copies at 1
    scores = metrics.udr([base, copy, -base, unrelated], [kl, copy_kl, kl, [1.0] * 6])
    assert scores[:3] == pytest.approx([1.0] * 3, abs=1e-9) and scores[3] < 0.1
    # a latent switched off (KL at most 0.01 nats) is not counted, however it correlates
    assert metrics.udr([base, copy], [kl, copy_kl]) == metrics.udr([base, copy], [[1.0] * 4 + [0.01, 0.0], copy_kl])


def test_one_latent_is_scored_not_a_crash():
    s = metrics.disentanglement(REPS["perfect"][:, :1], FACTORS, [f"f{k}" for k in range(len(LEVELS))])
    for key in metrics.DISENTANGLEMENT:  # a gap to no second latent; one latent is all of each factor's importance
        assert 0.0 <= s[key] <= 1.0, (key, s[key])
    assert s["mig"] > 0.1 and s["dci_completeness"] == 1.0
    noise = metrics.disentanglement(REPS["noise"][:, :1], FACTORS, [f"f{k}" for k in range(len(LEVELS))])
    assert noise["sap"] < 0.05 and noise["mig"] < 0.05  # one latent of noise is not a gap above chance
