"""The ELBO's decomposition (metrics.elbo_decomposition) on cases with known answers, and the β-TCVAE loss
(vae.tc_terms, objective "tc") against a direct computation."""

import math

import pytest
import torch

import metrics
import vae


def gaussian_case(n, mu, sigma, seed):
    """Posteriors N(mu_n, sigma² I) and the closed forms of their aggregate, for mu_n spread like N(0, s²)."""
    logvar = torch.full(mu.shape, math.log(sigma**2))
    return mu, logvar, torch.Generator().manual_seed(seed)


def direct_terms(mu, logvar, z):
    """log q(z_n|x_n), log q(z_n), Σ_d log q(z_nd), log p(z_n) straight from the definitions, float64."""
    mu, logvar, z = mu.double(), logvar.double(), z.double()
    pair = vae.log_normal(z[:, None, :], mu[None], logvar[None])  # (N, N, D)
    log_n = math.log(len(mu))
    return (
        vae.log_normal(z, mu, logvar).sum(1),
        torch.logsumexp(pair.sum(2), 1) - log_n,
        (torch.logsumexp(pair, 1) - log_n).sum(1),
        (-0.5 * (z.pow(2) + vae.LOG_2PI)).sum(1),
    )


def test_terms_match_their_definitions_and_sum_to_the_kl():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 4
    mu = torch.randn(n, d, generator=g) * torch.tensor([2.0, 1.0, 0.3, 0.05])
    logvar = torch.randn(n, d, generator=g) * 0.4 + torch.tensor([-5.0, -2.0, -1.0, 0.0])
    logvar[:5, 3] = -200.0  # widths spanning e^100 in one dimension: float32 weights would underflow there
    z = mu + torch.randn(n, d, generator=g) * torch.exp(0.5 * logvar)
    mi, tc, dw = metrics.decomposition_terms(mu, logvar, z)
    log_qzx, log_qz, log_qz_dims, log_pz = direct_terms(mu, logvar, z)
    assert torch.allclose(mi, log_qzx - log_qz, atol=1e-4)
    assert torch.allclose(tc, log_qz - log_qz_dims, atol=1e-4)
    assert torch.allclose(dw, log_qz_dims - log_pz, atol=1e-4)
    assert torch.isfinite(torch.stack([mi, tc, dw])).all()
    # per image the three parts are exactly the sampled KL; on average, the closed form within sampling error
    sampled = mi + tc + dw
    assert torch.allclose(sampled, log_qzx - log_pz, atol=1e-6)
    closed = (0.5 * (mu.double().pow(2) + logvar.double().exp() - 1 - logvar.double())).sum(1)
    stderr = (sampled - closed).std().item() / math.sqrt(n)
    assert abs(sampled.mean().item() - closed.mean().item()) < 4 * stderr
    assert mi.mean() <= math.log(n) + 1e-9  # q(z_n) >= q(z_n|x_n) / N


@pytest.mark.parametrize("seed", [0, 1])
def test_independent_means_give_no_total_correlation_and_gaussian_closed_forms(seed):
    # mu_n ~ N(0, I), posteriors N(mu_n, σ² I): the aggregate is N(0, (1 + σ²) I) up to sampling, which factorises.
    n, sigma = 2000, 0.5
    mu = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    parts = metrics.elbo_decomposition(
        mu, torch.full((n, 3), math.log(sigma**2)), torch.Generator().manual_seed(seed + 10)
    )
    var = mu.double().var(0) + sigma**2
    assert abs(parts["total_correlation"]) < 0.03
    assert parts["mutual_info"] == pytest.approx(0.5 * torch.log(var / sigma**2).sum().item(), abs=0.1)
    expected_dw = (0.5 * (var + mu.double().mean(0).pow(2) - 1 - torch.log(var))).sum().item()
    assert parts["dimwise_kl"] == pytest.approx(expected_dw, abs=0.015)
    assert parts["n_images"] == n and parts["mutual_info_bound"] == pytest.approx(math.log(n))


@pytest.mark.parametrize("seed", [0, 1])
def test_duplicated_dimension_gives_the_gaussian_total_correlation(seed):
    # z_0 and z_1 share their means: jointly Gaussian with correlation ρ = s² / (s² + σ²), TC = −½ log(1 − ρ²);
    # z_2 is independent of both and adds nothing.
    n, sigma = 2000, 0.5
    m = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    mu = torch.stack([m[:, 0], m[:, 0], m[:, 1]], 1)
    parts = metrics.elbo_decomposition(
        mu, torch.full((n, 3), math.log(sigma**2)), torch.Generator().manual_seed(seed + 10)
    )
    s2 = m[:, 0].double().var().item()
    rho = s2 / (s2 + sigma**2)
    expected = -0.5 * math.log(1 - rho**2)
    assert expected > 0.45
    assert parts["total_correlation"] == pytest.approx(expected, abs=0.04)


def test_decomposition_is_reproducible_from_its_generator():
    mu, logvar = torch.randn(300, 2), torch.full((300, 2), -1.0)
    one = metrics.elbo_decomposition(mu, logvar, torch.Generator().manual_seed(3))
    two = metrics.elbo_decomposition(mu, logvar, torch.Generator().manual_seed(3))
    other = metrics.elbo_decomposition(mu, logvar, torch.Generator().manual_seed(4))
    assert one == two and one["mutual_info"] != other["mutual_info"]


# ------------------------------------------------------------------------------------------ the tc objective


def log_density(x, m, lv):
    return -0.5 * ((x - m) ** 2 / math.exp(lv) + lv + math.log(2 * math.pi))


def tc_by_hand(z, mu, logvar, n_data):
    """The stratified estimator written out with Python floats: image i's own posterior weighs 1/N, each of the
    other M − 1 in the batch (N − 1) / (N (M − 1))."""
    m, d = len(z), len(z[0])
    out = []
    for i in range(m):

        def weight(j):
            return 1 / n_data if j == i else (n_data - 1) / (n_data * (m - 1))

        joint = math.log(
            sum(
                weight(j) * math.exp(sum(log_density(z[i][k], mu[j][k], logvar[j][k]) for k in range(d)))
                for j in range(m)
            )
        )
        dims = sum(
            math.log(sum(weight(j) * math.exp(log_density(z[i][k], mu[j][k], logvar[j][k])) for j in range(m)))
            for k in range(d)
        )
        own = sum(log_density(z[i][k], mu[i][k], logvar[i][k]) for k in range(d))
        prior = sum(log_density(z[i][k], 0.0, 0.0) for k in range(d))
        out.append((own - joint, joint - dims, dims - prior))
    return out


def test_tc_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    m, d, n_data = 5, 3, 50
    mu, logvar = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g) * 0.5 - 1.0
    z = mu + torch.randn(m, d, generator=g) * torch.exp(0.5 * logvar)
    logits, target = torch.randn(m, 1, 2, 2, generator=g), torch.rand(m, 1, 2, 2, generator=g)
    config = vae.VAEConfig(latent_dim=d, objective="tc", beta=3.0, alpha=0.5, gamma=2.0, dataset_size=n_data)
    terms = vae.vae_loss(logits, target, mu, logvar, config, z=z)
    expected = tc_by_hand(z.tolist(), mu.tolist(), logvar.tolist(), n_data)
    plain = vae.vae_loss(logits, target, mu, logvar, vae.VAEConfig(latent_dim=d, beta=1.0))
    for i, (mi, tc, dw) in enumerate(expected):
        want = plain.recon[i].item() + 0.5 * mi + 3.0 * tc + 2.0 * dw
        assert terms.total[i].item() == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert torch.equal(terms.kl, plain.kl) and torch.equal(terms.recon, plain.recon)  # KL stays the closed form
    with pytest.raises(ValueError, match="needs the sampled z"):
        vae.vae_loss(logits, target, mu, logvar, config)


def test_tc_terms_over_the_whole_data_set_are_the_exact_decomposition():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g) * 0.3 - 1.5
    z = mu + torch.randn(60, 3, generator=g) * torch.exp(0.5 * logvar)
    batch = vae.tc_terms(z.double(), mu.double(), logvar.double(), dataset_size=60)
    exact = metrics.decomposition_terms(mu, logvar, z)
    for a, b in zip(batch, exact):
        assert torch.allclose(a, b, atol=1e-4)


def test_tc_defaults_and_weights_one_give_the_sampled_elbo():
    config = vae.VAEConfig(objective="tc", latent_dim=2)
    assert (config.alpha, config.gamma, config.beta) == (1.0, 1.0, 4.0)
    assert vae.VAEConfig(objective="capacity", capacity_steps=10).gamma == 1000.0 and vae.VAEConfig().gamma == 1000.0
    assert vae.VAEConfig(objective="tc", gamma=3.0).gamma == 3.0
    g = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g) * 0.2
    z = mu + torch.randn(8, 2, generator=g) * torch.exp(0.5 * logvar)
    mi, tc, dw = vae.tc_terms(z, mu, logvar, dataset_size=1000)
    sampled_kl = (vae.log_normal(z, mu, logvar) - vae.log_normal(z, torch.zeros(1), torch.zeros(1))).sum(1)
    assert torch.allclose(mi + tc + dw, sampled_kl, atol=1e-5)
    for bad in (dict(alpha=-1.0), dict(gamma=-0.5), dict(dataset_size=0)):
        with pytest.raises(ValueError):
            vae.VAEConfig(objective="tc", **bad)


def test_tc_step_trains_through_every_term():
    torch.manual_seed(0)
    config = vae.VAEConfig(latent_dim=3, objective="tc", dataset_size=100)
    model = vae.BetaVAE(config)
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    logits, mu, logvar, z = model.forward_with_z(x)
    assert torch.allclose(model.decoder.logits(z), logits)
    vae.vae_loss(logits, (x + 1) / 2, mu, logvar, config, z=z).total.mean().backward()
    assert model.encoder.fc_logvar.weight.grad.abs().sum() > 0 and model.encoder.fc_mu.weight.grad.abs().sum() > 0
