"""Evaluation metrics for the β-VAE: Fréchet distance (features: pixels here, the classifier's in fid_classifier.py),
likelihood bounds, the ELBO's decomposition, latent diagnostics.

Every function takes what it needs and returns numbers or tensors: nothing here reads flags, prints or draws.
The random parts draw from a torch.Generator on the CPU (or a seed), so a report can be reproduced exactly and does
not depend on the device it was computed on.
"""
import math
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vae
from fast_decoder import fast_copy

# Importance samples per image for −log p(x). On the subset, k = 64 already closes 85-95% of the gap between the
# ELBO and the k = 1024 bound (β = 1 and β = 4 models, 300 test images), and it keeps a full 10,000-image evaluation
# well under 30 s on a 2-core CPU: the IWAE pass is 6.5 s of 10.1 s (docs/speed.md).
IWAE_K = 64
SAMPLES_PER_PASS = 2048    # decoded images per IWAE pass (k × images): the fastest size on a 2-core CPU
DECOMPOSITION_BATCH = 64   # images whose z meet all N posteriors per pass: (64, N) blocks stay in the CPU's cache


# ------------------------------------------------------------------------------------- Fréchet distance

def _float64(a):
    return torch.as_tensor(a).detach().to("cpu", torch.float64)


def _psd_sqrt(sigma):
    """Symmetric square root of a covariance and its (clipped) eigenvalues."""
    # A covariance estimated in floating point is symmetric and PSD only up to rounding: symmetrise, and treat
    # negative eigenvalues (rounding noise of a rank-deficient matrix) as the zeros they are.
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2.0)
    w = w.clamp_min(0.0)
    return (v * w.sqrt()) @ v.T, w


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), in float64.

    d² = |mu1 − mu2|² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1 Σ2)^½.

    (Σ1 Σ2)^½ is never formed: with R = Σ^½ symmetric, Σ1 Σ2 = R1 (R1 R2) R2 has the eigenvalues of
    (R1 R2)(R1 R2)ᵀ, so Tr (Σ1 Σ2)^½ is the sum of the singular values of R1 R2. That is real and non-negative by
    construction, where scipy's sqrtm on a nearly singular product returns complex values that other code silently
    truncates. By von Neumann's trace inequality the result can only be negative by rounding; it is clamped at 0.
    Takes numpy arrays or tensors; torch's LAPACK, because numpy's OpenBLAS threads stalled for seconds on a shared
    CPU (measured).
    """
    mu1, mu2 = (_float64(m).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(_float64(s)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Fréchet distance needs means of one length d and d×d covariances (got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)})")
    if not all(torch.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("Fréchet distance got non-finite statistics: the features contain NaN or inf "
                         "(a diverged model decodes to NaN; check the checkpoint)")
    root1, w1 = _psd_sqrt(sigma1)
    root2, w2 = _psd_sqrt(sigma2)
    cross = torch.linalg.svdvals(root1 @ root2).sum()
    # Traces from the clipped eigenvalues, so identical statistics cancel to rounding error.
    dist = ((mu1 - mu2).pow(2).sum() + w1.sum() + w2.sum() - 2.0 * cross).item()
    return max(dist, 0.0)


def feature_stats(features):
    """(mean, covariance) of an (N, d) feature matrix, float64 tensors; warns when N < d (rank-deficient covariance)."""
    f = _float64(features).reshape(len(features), -1)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples (got {n})")
    if n < d:
        warnings.warn(f"Fréchet distance from {n} samples of {d}-dimensional features: the covariance is "
                      "rank-deficient and the distance is biased; use at least as many samples as dimensions",
                      stacklevel=2)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (n - 1)


def fid_from_features(real, fake):
    """Fréchet distance between two (N, d) feature matrices (the sample counts may differ)."""
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


# ------------------------------------------------------------------------------------- pixel features

def pixel_features(images):
    """images in [0, 1], (N, 1, 28, 28) -> (N, 784): the course project's "FID", kept to compare with it."""
    return images.reshape(len(images), -1).float()


# ------------------------------------------------------------------------------------- model outputs

@torch.no_grad()
def encode_split(model, split, batch_size=1000):
    """Posterior means and log-variances of a whole split, (N, latent_dim) each, and its labels, all on the CPU."""
    mus, logvars, labels = [], [], []
    for x, _, y in split.batches(batch_size):
        mu, logvar = model.encode(x)
        mus.append(mu.cpu())
        logvars.append(logvar.cpu())
        labels.append(y.cpu())
    return torch.cat(mus), torch.cat(logvars), torch.cat(labels)


@torch.no_grad()
def decode_batched(model, z, batch_size=1000):
    """z (N, latent_dim) -> decoder means in [0, 1], (N, 1, 28, 28), on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.decode(z[i:i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)])


def prior_samples(model, n, generator, batch_size=1000):
    """n images decoded from z ~ N(0, I) (the decoder's means, as the course project shows them)."""
    return decode_batched(model, torch.randn(n, model.config.latent_dim, generator=generator), batch_size)


# ------------------------------------------------------------------------------------- likelihood bounds

def bernoulli_nll(logits, target):
    """−log p(x|z) per image, summed over pixels: the reconstruction term of vae.vae_loss, computed cheaper.

    BCE-with-logits = softplus(l) − x·l, and softplus(l) = max(l, 0) + log(1 + exp(−|l|)). On this CPU torch's
    BCE and log1p kernels cost 3x more than exp + log, and the IWAE pass spends a fifth of its time here; log(1 + u)
    for u = exp(−|l|) in (0, 1] loses at most float32 rounding (tested against vae.vae_loss).
    logits (..., 1, 28, 28) with target broadcastable to it -> (...,).
    """
    softplus = logits.abs().neg_().exp_().add_(1.0).log_().add_(logits.clamp_min(0.0))
    return (softplus - target * logits).flatten(-3).sum(-1)


@torch.no_grad()
def likelihood_bounds(model, split, k=IWAE_K, generator=None, samples_per_pass=SAMPLES_PER_PASS, progress=False):
    """ELBO terms at β = 1 and the importance-weighted bound on −log p(x) (Burda et al. 2016), nats per image.

    With z_j ~ q(z|x), j = 1..k, and w_j = p(x|z_j) p(z_j) / q(z_j|x):
        −log p(x) ≈ −log (1/k Σ_j w_j)   (logsumexp, so no weight underflows)
    whose expectation can only fall as k grows, towards −log p(x), and equals the negative ELBO at k = 1.
    recon is averaged over the same k samples; KL is the closed form of vae.vae_loss. Both are the training loss's
    terms at β = 1, whatever β trained the model. Under the Bernoulli decoder on grayscale targets these
    are not normalised densities of the images: compare them between models of this project, not with papers.
    Returns a dict: recon, kl, neg_elbo, iwae_nll, kl_per_dim (list), n_images, iwae_k.
    """
    if k < 1:
        raise ValueError(f"the IWAE bound needs k >= 1 importance samples (got {k})")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    model = fast_copy(model)
    config = vae.VAEConfig(latent_dim=model.config.latent_dim, beta=1.0)  # the true ELBO, whatever β trained it
    dim = model.config.latent_dim
    sums = {"recon": 0.0, "kl": 0.0, "iwae_nll": 0.0}
    kl_per_dim = torch.zeros(dim, dtype=torch.float64)
    bar = tqdm(total=len(split), desc=f"ELBO and IWAE (k={k})", unit="img", leave=False,
               disable=None if progress else True)
    for x, target, _ in split.batches(max(1, samples_per_pass // k)):
        b = len(x)
        mu, logvar = model.encode(x)
        eps = torch.randn(k, b, dim, generator=generator).to(mu.device)
        z = vae.reparameterize(mu, logvar, eps)                                        # (k, B, D)
        logits = model.decoder.logits(z.reshape(k * b, dim))                           # (k·B, 1, 28, 28)
        recon = bernoulli_nll(logits.view(k, b, *target.shape[1:]), target)             # (k, B)
        # log p(z) − log q(z|x): the 2π constants cancel, and (z − μ)/σ is eps.
        log_w = -recon + 0.5 * (eps.pow(2) + logvar - z.pow(2)).sum(-1)                # (k, B)
        nll = -(torch.logsumexp(log_w.double(), 0) - math.log(k))
        kl = vae.vae_loss(logits[:b], target, mu, logvar, config).kl_per_dim           # (B, D), closed form
        sums["recon"] += recon.double().mean(0).sum().item()
        sums["kl"] += kl.double().sum().item()
        sums["iwae_nll"] += nll.sum().item()
        kl_per_dim += kl.double().sum(0).cpu()
        bar.update(b)
    bar.close()
    n = len(split)
    out = {key: value / n for key, value in sums.items()}
    out["neg_elbo"] = out["recon"] + out["kl"]
    out["kl_per_dim"] = (kl_per_dim / n).tolist()
    out["n_images"], out["iwae_k"] = n, k
    return out


# ------------------------------------------------------------------------------------- the ELBO's decomposition

def _log_aggregate(z, mu, logvar, batch_size=DECOMPOSITION_BATCH):
    """log q(z_n) and log q(z_nd) under q(z) = (1/N) Σ_m q(z|x_m), the mixture of all N posteriors: (N,), (N, D).

    N² D Gaussian densities, so the work is shaped for the CPU: for each dimension, a (B, N) block of
    u² = (z − μ)² / 2σ² (a difference first, so sharp posteriors lose no precision), summed over dimensions for the
    joint density (logsumexp), and exp(−u²) weighted by σ_min/σ_m ≤ 1 for the marginals: nothing overflows, and
    z_n's own component keeps each sum away from zero. float32, except a dimension whose widths span more than
    e^20, where products of weights and densities would fall below float32's ordinary range.
    """
    n, d = mu.shape
    log_sd = 0.5 * logvar.double()
    log_sd_min = log_sd.min(0).values
    wide = (log_sd.max(0).values - log_sd_min) > 20
    dtype = torch.float64 if wide.any() else torch.float32
    cols = []   # per dimension: μ, 1/(√2 σ) and the weights σ_min/σ, (N,) each
    for j in range(d):
        col = (mu[:, j].double(), torch.exp(-log_sd[:, j]) * math.sqrt(0.5), torch.exp(log_sd_min[j] - log_sd[:, j]))
        cols.append(tuple(t.to(torch.float64 if wide[j] else torch.float32) for t in col))
    joint_const = (-log_sd.sum(1)).to(dtype)
    joint, dims = torch.empty(n, dtype=torch.float64), torch.empty(n, d, dtype=torch.float64)
    # (B, N) blocks allocated once: fresh ones per pass cost page faults
    buffers = {dt: torch.empty(batch_size, n, dtype=dt) for dt in {col[0].dtype for col in cols}}
    buffers["joint"] = torch.empty(batch_size, n, dtype=dtype)
    for start in range(0, n, batch_size):
        zb = z[start:start + batch_size]
        sq = buffers["joint"][:len(zb)].zero_()
        for j, (m, scale, weight) in enumerate(cols):
            u = torch.sub(zb[:, j:j + 1].to(m.dtype), m, out=buffers[m.dtype][:len(zb)])
            u.mul_(scale).square_()                                                 # (B, N): (z − μ)² / 2σ²
            sq.add_(u)
            # exp(−80) is near float32's smallest ordinary number (exp(−700), float64's): below it subnormals run
            # ~100x slower on x86 (2 s of 3 here), and the clamped terms cannot move a sum that holds the image's own
            # term, which is at least exp(−u² − 20) with u² = ε²/2 for its noise ε
            floor = 80.0 if u.dtype == torch.float32 else 700.0
            dims[start:start + len(zb), j] = u.clamp_(max=floor).neg_().exp_() @ weight
        log_pair = torch.sub(joint_const, sq, out=sq)                              # (B, N): log N(z_b; μ_m, σ_m) + c
        top = log_pair.max(1, keepdim=True).values
        joint[start:start + len(zb)] = log_pair.sub_(top).clamp_(min=-80.0).exp_().sum(1).log_() + top[:, 0]
    log_n = math.log(n)
    return (joint - 0.5 * d * vae.LOG_2PI - log_n,
            dims.log() - log_sd_min - 0.5 * vae.LOG_2PI - log_n)


def decomposition_terms(mu, logvar, z):
    """Per image n, at its sample z_n: (index-code MI, total correlation, dimension-wise KL), float64 (N,) each.

    MI_n = log q(z_n|x_n) − log q(z_n), TC_n = log q(z_n) − Σ_d log q(z_nd), DW_n = Σ_d log q(z_nd) − log p(z_n),
    with q the aggregate posterior over the N rows; they sum to log q(z_n|x_n) − log p(z_n), the sampled KL.
    """
    mu, logvar, z = (torch.as_tensor(t).detach().float().cpu() for t in (mu, logvar, z))
    log_qz, log_qz_dims = _log_aggregate(z, mu, logvar)
    log_qz_x = vae.log_normal(z.double(), mu.double(), logvar.double()).sum(1)
    return vae.kl_parts(log_qz_x, log_qz, log_qz_dims.sum(1), z.double())


def elbo_decomposition(mu, logvar, generator=None):
    """The average KL of a split, E_x KL(q(z|x) ‖ p(z)), in its three parts (Hoffman & Johnson 2016; Chen et al.
    2018), nats per image:

        mutual_info        I(x; z), the index-code mutual information under q(x, z) = q(z|x) / N
        total_correlation  KL(q(z) ‖ Π_d q(z_d)): how far the aggregate posterior is from independent dimensions
        dimwise_kl         Σ_d KL(q(z_d) ‖ p(z_d)): how far each dimension's aggregate is from the prior

    q(z) = (1/N) Σ_n q(z|x_n) is the aggregate posterior over all N images, exactly (no minibatch estimate); each
    expectation over q is one z_n ~ q(z|x_n) per image. The terms sum to that sampled KL, whose mean is the closed-form
    KL; mutual_info cannot exceed log N. mu, logvar: (N, D) posterior parameters (encode_split).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    mu, logvar = torch.as_tensor(mu).float().cpu(), torch.as_tensor(logvar).float().cpu()
    z = vae.reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator))
    mi, tc, dw = (t.mean().item() for t in decomposition_terms(mu, logvar, z))
    return {"mutual_info": mi, "total_correlation": tc, "dimwise_kl": dw, "n_images": len(mu),
            "mutual_info_bound": math.log(len(mu)), "units": "nats per image"}


# ------------------------------------------------------------------------------------- latent diagnostics

def active_units(mu, threshold=0.01):
    """Burda et al. 2016: dimension d is active when Var_x(E_q[z_d | x]) > threshold. Returns (count, variances)."""
    variances = torch.as_tensor(mu).double().var(0)
    return int((variances > threshold).sum()), variances.tolist()


def linear_probe_accuracy(train_z, train_y, test_z, test_y, l2=1e-4, max_iter=200):
    """Test accuracy of multinomial logistic regression on latent means, fitted on train (full-batch L-BFGS).

    Measures how much class information the latent space keeps in a linearly readable form. Deterministic: the
    weights start at zero and L-BFGS draws no random numbers. A small L2 penalty keeps separable data finite.
    """
    train_z, test_z = torch.as_tensor(train_z).double().cpu(), torch.as_tensor(test_z).double().cpu()
    train_y, test_y = torch.as_tensor(train_y).long().cpu(), torch.as_tensor(test_y).long().cpu()
    # Standardise with train statistics: L-BFGS on badly scaled latents converges slowly, and it changes no argmax.
    mean, std = train_z.mean(0), train_z.std(0).clamp_min(1e-8)
    xs, xt = (train_z - mean) / std, (test_z - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(xs.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (xt @ weight + bias).argmax(1).eq(test_y).double().mean().item()
