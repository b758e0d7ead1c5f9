"""What evaluate.py and sweep.py measure of a model: likelihood bounds, the KL's decomposition, latent diagnostics and
disentanglement (FIDs: fid.py). Each function takes what it needs and returns numbers or arrays: nothing here reads
flags, prints or draws. Random draws come from a seeded generator on the CPU, so a report can be reproduced exactly."""

import math
import warnings

import numpy as np
import torch
from tqdm import tqdm

import vae
from plumbing import chwn, onnx_check

IWAE_K = vae.SETTINGS["iwae_k"].default
BCE_UNITS = "nats per image; BCE on grey levels, the seed's objective: not a log-likelihood, compare within the project"
CB_UNITS = "nats per image, and bits per pixel, under the continuous Bernoulli: a normalised density on [0, 1]"
DISENTANGLEMENT = ("mig", "sap", "dci_disentanglement", "dci_completeness", "dci_informativeness", "factorvae_score")
SAMPLES_PER_PASS = 2048  # decoded images per IWAE pass (k × images)
DECOMPOSITION_BATCH = 64  # images whose z meet all N posteriors per pass: (64, N) blocks stay in the CPU's cache


@torch.no_grad()
def encode_split(model, split, batch_size=1000):
    """Posterior means and log-variances of a whole split, (N, latent_dim) each, and its labels, on the CPU."""
    parts = [(*model.encode(x), y) for x, _, y in split.batches(batch_size)]
    return tuple(torch.cat([p[i].cpu() for p in parts]) for i in range(3))


@torch.no_grad()
def decode_batched(model, z, batch_size=1000):
    """z (N, latent_dim) -> decoder means in [0, 1], (N, 1, 28, 28), on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.decode(z[i : i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)])


def prior_samples(model, n, generator, batch_size=1000):
    """n images decoded from z ~ N(0, I) (the decoder's means, as the course project shows them)."""
    return decode_batched(model, torch.randn(n, model.config.latent_dim, generator=generator), batch_size)


def bernoulli_nll(logits, target):
    """Σ over pixels of BCE-with-logits = softplus(l) − x·l, (..., 1, 28, 28) -> (...,): vae_loss's reconstruction
    term written with exp and log, cheaper on a CPU than torch's BCE and log1p kernels."""
    softplus = logits.abs().neg_().exp_().add_(1.0).log_().add_(logits.clamp_min(0.0))
    return (softplus - target * logits).flatten(-3).sum(-1)


def cb_log_norm(logits):
    """log C(λ) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), λ = σ(l), elementwise: C = l / tanh(l/2)
    in the logit, 2 at l = 0, where the closed form is 0/0 and a Taylor series takes over."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)  # each branch sees a harmless value where unused
    s = torch.where(small, logits, torch.zeros_like(logits)) ** 2
    taylor = math.log(2) + s * (1 / 12 - s * (7 / 1440 - s * 31 / 90720))
    return torch.where(small, taylor, torch.log(safe / torch.tanh(safe / 2)))


@torch.no_grad()
def likelihood_bounds(model, split, k=IWAE_K, generator=None, samples_per_pass=SAMPLES_PER_PASS, progress=False):
    """The ELBO's terms at β = 1 and the importance-weighted bound (Burda et al. 2016), nats per image, whatever β
    trained the model: −log p(x) ≈ −log (1/k Σ_j w_j), w_j = p(x|z_j) p(z_j) / q(z_j|x), z_j ~ q(z|x); under the seed's
    BCE (no density: compare within the project) and the continuous Bernoulli (a density on [0, 1]), with bits/pixel."""
    if k < 1:
        raise ValueError(f"the IWAE bound needs k >= 1 importance samples (got {k})")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    d, n = model.config.latent_dim, len(split)
    sums = dict.fromkeys(("recon", "kl", "iwae_nll", "cb_recon", "cb_iwae_nll"), 0.0)
    kl_per_dim = torch.zeros(d, dtype=torch.float64)
    bar = tqdm(total=n, desc=f"ELBO and IWAE (k={k})", unit="img", leave=False, disable=None if progress else True)
    for x, target, _ in split.batches(max(1, samples_per_pass // k)):
        b, (mu, logvar) = len(x), model.encode(x)
        eps = torch.randn(k, b, d, generator=generator).to(mu.device)
        z = vae.reparameterize(mu, logvar, eps)  # (k, B, D)
        logits = chwn.decoder_logits(model, z.reshape(k * b, d)).view(k, b, *target.shape[1:])
        recon = bernoulli_nll(logits, target)  # (k, B)
        log_prior_ratio = 0.5 * (eps.pow(2) + logvar - z.pow(2)).sum(-1)  # log p(z) − log q(z|x); (z − μ)/σ is eps
        for key, r in (("", recon), ("cb_", recon - cb_log_norm(logits).flatten(-3).sum(-1))):
            sums[key + "recon"] += r.double().mean(0).sum().item()
            sums[key + "iwae_nll"] += -(torch.logsumexp((log_prior_ratio - r).double(), 0) - math.log(k)).sum().item()
        kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).double()  # (B, D), closed form
        sums["kl"] += kl.sum().item()
        kl_per_dim += kl.sum(0).cpu()
        bar.update(b)
    bar.close()
    out = {key: v / n for key, v in sums.items()}
    bits = 1.0 / (math.prod(vae.IMAGE_SHAPE) * math.log(2))
    cb = {"recon": out.pop("cb_recon"), "iwae_nll": out.pop("cb_iwae_nll")}
    cb["neg_elbo"] = cb["recon"] + out["kl"]
    cb.update(neg_elbo_bits_per_dim=cb["neg_elbo"] * bits, iwae_bits_per_dim=cb["iwae_nll"] * bits)
    out.update(neg_elbo=out["recon"] + out["kl"], kl_per_dim=(kl_per_dim / n).tolist(), continuous_bernoulli=cb)
    return {**out, "n_images": n, "iwae_k": k}


def _log_aggregate(z, mu, logvar, batch_size=DECOMPOSITION_BATCH):
    """log q(z_n), (N,), and log q(z_nd), (N, D), under q(z) = (1/N) Σ_m q(z|x_m). Per dimension, a (B, N) block of
    u² = (z − μ)² / 2σ² (a difference first: sharp posteriors lose no precision), summed for the joint, and exp(−u²)
    weighted by σ_min/σ_m for the marginals: nothing overflows, and z_n's own term (≥ exp(−u² − 20)) keeps each sum
    off zero, so terms under exp(−80) (float32 subnormals: slow on x86) are dropped. float64 in a dimension whose
    widths span over e^20, where weights times densities would underflow float32."""
    (n, d), log_sd = mu.shape, 0.5 * logvar.double()
    log_sd_min = log_sd.min(0).values
    wide = (log_sd.max(0).values - log_sd_min) > 20
    dtype = torch.float64 if wide.any() else torch.float32
    cols = [
        (mu[:, j].double(), torch.exp(-log_sd[:, j]) * math.sqrt(0.5), torch.exp(log_sd_min[j] - log_sd[:, j]))
        for j in range(d)
    ]
    cols = [tuple(t.to(torch.float64 if w else torch.float32) for t in c) for c, w in zip(cols, wide)]
    joint_const = (-log_sd.sum(1)).to(dtype)
    joint, dims = torch.empty(n, dtype=torch.float64), torch.empty(n, d, dtype=torch.float64)
    buffers = {dt: torch.empty(batch_size, n, dtype=dt) for dt in {c[0].dtype for c in cols} | {dtype}}  # reused
    buffers["joint"] = torch.empty(batch_size, n, dtype=dtype)
    for rows in (slice(start, start + batch_size) for start in range(0, n, batch_size)):
        zb = z[rows]
        sq = buffers["joint"][: len(zb)].zero_()
        for j, (m, scale, weight) in enumerate(cols):
            u = torch.sub(zb[:, j : j + 1].to(m.dtype), m, out=buffers[m.dtype][: len(zb)])
            sq.add_(u.mul_(scale).square_())  # (B, N): (z − μ)² / 2σ²
            dims[rows, j] = u.clamp_(max=80.0 if m.dtype == torch.float32 else 700.0).neg_().exp_() @ weight
        log_pair = torch.sub(joint_const, sq, out=sq)  # (B, N): log N(z_b; μ_m, σ_m) + const
        top = log_pair.max(1, keepdim=True).values
        joint[rows] = log_pair.sub_(top).clamp_(min=-80.0).exp_().sum(1).log_() + top[:, 0]
    return joint - 0.5 * d * vae.LOG_2PI - math.log(n), dims.log() - log_sd_min - 0.5 * vae.LOG_2PI - math.log(n)


def decomposition_terms(mu, logvar, z):
    """Per image n at its sample z_n: (index-code MI, total correlation, dimension-wise KL), float64 (N,) each, under
    the aggregate posterior of the N rows; they sum to log q(z_n|x_n) − log p(z_n), the sampled KL."""
    mu, logvar, z = (torch.as_tensor(t).detach().float().cpu() for t in (mu, logvar, z))
    log_qz, log_qz_dims = _log_aggregate(z, mu, logvar)
    log_qz_x = vae.log_normal(z.double(), mu.double(), logvar.double()).sum(1)
    return vae.kl_parts(log_qz_x, log_qz, log_qz_dims.sum(1), z.double())


def elbo_decomposition(mu, logvar, generator=None):
    """E_x KL(q(z|x) ‖ p(z)) of a split in three parts (Hoffman & Johnson 2016; Chen et al. 2018), nats per image:
    mutual_info I(x; z), total_correlation KL(q(z) ‖ Π_d q(z_d)), dimwise_kl Σ_d KL(q(z_d) ‖ p(z_d)), with q(z) the
    exact aggregate posterior of the N images and one z_n ~ q(z|x_n) each. mutual_info cannot exceed log N."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    mu, logvar = torch.as_tensor(mu).float().cpu(), torch.as_tensor(logvar).float().cpu()
    z = vae.reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator))
    terms = (t.mean().item() for t in decomposition_terms(mu, logvar, z))
    out = dict(zip(("mutual_info", "total_correlation", "dimwise_kl"), terms))
    return {**out, "n_images": len(mu), "mutual_info_bound": math.log(len(mu)), "units": "nats per image"}


def linear_probe_accuracy(train_z, train_y, test_z, test_y, l2=1e-4, max_iter=200):
    """Test accuracy of multinomial logistic regression on posterior means, fitted on train (full-batch L-BFGS from
    zero weights, scipy's: deterministic, and no torch.optim, whose first step imports dynamo): how much class
    information stays linearly readable."""
    from scipy.optimize import minimize

    as_np = lambda a: torch.as_tensor(a).detach().cpu().double().numpy()
    train_z, test_z = (as_np(z).reshape(len(z), -1) for z in (train_z, test_z))
    train_y, test_y = as_np(train_y).astype(np.int64), as_np(test_y).astype(np.int64)
    if len(train_z) < 2:
        raise ValueError(f"a linear probe needs at least 2 training samples (got {len(train_z)})")
    mean, std = train_z.mean(0), np.maximum(train_z.std(0, ddof=1), 1e-8)  # L-BFGS is slow on badly scaled latents
    xs, xt = (train_z - mean) / std, (test_z - mean) / std
    (n, d), k = xs.shape, int(max(train_y.max(), test_y.max())) + 1
    onehot = np.eye(k)[train_y]

    def loss_and_grad(w):
        weight, bias = w[: d * k].reshape(d, k), w[d * k :]
        logits = xs @ weight + bias
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(n), train_y]).mean() + l2 * (weight**2).sum()
        g = (p - onehot) / n
        return loss, np.concatenate([(xs.T @ g + 2 * l2 * weight).ravel(), g.sum(0)])

    fit = minimize(
        loss_and_grad,
        np.zeros(d * k + k),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-12},
    )
    weight, bias = fit.x[: d * k].reshape(d, k), fit.x[d * k :]
    return float(np.mean((xt @ weight + bias).argmax(1) == test_y))


def _split(n, seed=0, test_share=1 / 3):
    perm = np.random.default_rng(seed).permutation(n)
    return perm[round(n * test_share) :], perm[: round(n * test_share)]


def discrete_mi(a, b):
    """Mutual information (nats) of two discrete vectors from their contingency table; discrete_mi(y, y) = H(y)."""
    (na, a), (nb, b) = ((len(u), i.ravel()) for u, i in (np.unique(v, return_inverse=True) for v in (a, b)))
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb) / a.size
    outer, nz = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True), joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))


def mig(codes, factors, bins=20):
    """Mutual Information Gap (Chen et al. 2018): each latent cut into `bins` equal-width bins over its observed range
    (numpy's histogram edges), its discrete MI with each factor over the factor's entropy (mi_normalised, (D, K)); per
    factor, the gap between the two largest; their mean. numpy alone recomputes it from evaluate.py --save-latents."""
    codes, factors = np.asarray(codes, np.float64), np.asarray(factors)
    binned = [np.digitize(c, np.histogram(c, bins)[1][:-1]) for c in codes.T]
    mi = np.array([[discrete_mi(c, f) for f in factors.T] for c in binned])
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = mi / np.array([discrete_mi(f, f) for f in factors.T])
    top = np.sort(np.vstack([np.zeros(norm.shape[1]), norm]), axis=0)  # one latent: its gap to nothing
    gap = top[-1] - top[-2]
    return {"mig": float(np.nanmean(gap)), "per_factor": gap.tolist(), "mi_normalised": np.nan_to_num(norm).tolist()}


def sap(codes, factors, seed=0):
    """SAP (Kumar et al. 2018) for discrete factors: S[d, k], the test accuracy of a linear SVM (C = 0.01, balanced)
    predicting factor k from latent d alone (standardised: the intercept is penalised too); per factor, the gap between
    the two best latents; their mean. One threshold cannot isolate middle levels: even a perfect code scores below 1."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    codes, factors = np.asarray(codes, np.float64), np.asarray(factors)
    tr, te = _split(len(codes), seed)
    codes = (codes - codes[tr].mean(0)) / np.where(codes[tr].std(0) > 0, codes[tr].std(0), 1.0)
    score = np.zeros((codes.shape[1], factors.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for d, k in np.ndindex(score.shape):
            clf = LinearSVC(C=0.01, class_weight="balanced").fit(codes[tr, d : d + 1], factors[tr, k])
            score[d, k] = np.mean(clf.predict(codes[te, d : d + 1]) == factors[te, k])
    floor = [np.bincount(f[te]).max() / len(te) for f in factors.T]  # what a classifier gets from nothing
    top = np.sort(np.vstack([floor, score]), axis=0)  # one latent: its gap to that floor
    return {"sap": float((top[-1] - top[-2]).mean()), "per_factor": (top[-1] - top[-2]).tolist()}


def _entropy(p, axis, base):
    p = (p + 1e-11) / (p + 1e-11).sum(axis=axis, keepdims=True)
    return -(p * np.log(p)).sum(axis=axis) / np.log(base) if base > 1 else np.zeros(p.shape[1 - axis])


def dci(codes, factors, seed=0):
    """DCI disentanglement, completeness, informativeness (Eastwood & Williams 2018): impurity importances from a small
    seeded random forest per factor (disentanglement_lib boosts 100 trees per class, far too slow here), so numbers
    compare within this project; informativeness is the forests' mean test accuracy."""
    from sklearn.ensemble import RandomForestClassifier

    codes, factors = np.asarray(codes, np.float64), np.asarray(factors)
    tr, te = _split(len(codes), seed)
    imp, acc = np.zeros((codes.shape[1], factors.shape[1])), []
    for k, f in enumerate(factors.T):
        forest = RandomForestClassifier(10, max_depth=8, min_samples_leaf=5, max_features=None, random_state=seed + k)
        forest.fit(codes[tr], f[tr])
        imp[:, k], acc = forest.feature_importances_, acc + [np.mean(forest.predict(codes[te]) == f[te])]
    w = imp if imp.sum() > 0 else np.ones_like(imp)
    dis, comp = (
        float(np.clip(np.sum((1 - _entropy(imp, a, imp.shape[a])) * w.sum(a) / w.sum()), 0, 1)) for a in (1, 0)
    )
    return {"disentanglement": dis, "completeness": comp, "informativeness": float(np.mean(acc))}


def factorvae_score(codes, factors, batch_size=64, n_train=10_000, n_eval=5_000, seed=0):
    """The FactorVAE score (Kim & Mnih 2018) on codes: a vote fixes factor k at a random row's value, draws
    `batch_size` rows sharing it, and names the latent of least variance over its global std (std below 0.05: pruned);
    a majority classifier from latent to factor on the train votes, its accuracy on the eval votes. Chance is 1/K."""
    codes, factors = np.asarray(codes, np.float64), np.asarray(factors)
    std = codes.std(0, ddof=1)
    active = std >= 0.05
    if not active.any():
        return {"factorvae_score": 0.0, "active": 0}
    z, n, n_factors, rng = codes[:, active] / std[active], len(codes), factors.shape[1], np.random.default_rng(seed)
    order = np.argsort(factors, axis=0, kind="stable").T  # (K, N): rows sorted by each factor
    ranked = np.take_along_axis(factors.T, order, axis=1)

    def votes(count):
        k = rng.integers(n_factors, size=count)
        v = factors[rng.integers(n, size=count), k]
        lo, hi = (np.array([np.searchsorted(ranked[j], x, side) for j, x in zip(k, v)]) for side in ("left", "right"))
        rows = order[k[:, None], lo[:, None] + (rng.random((count, batch_size)) * (hi - lo)[:, None]).astype(int)]
        best = np.concatenate([z[rows[s : s + 1000]].var(1, ddof=1).argmin(1) for s in range(0, count, 1000)])
        table = np.zeros((n_factors, z.shape[1]), np.int64)
        np.add.at(table, (k, best), 1)
        return table

    train, held_out = votes(n_train), votes(n_eval)
    right = held_out[train.argmax(0), np.arange(z.shape[1])].sum()
    return {"factorvae_score": float(right / held_out.sum()), "active": int(active.sum())}


def _relative_strength(corr):
    """Mean over columns and rows of max² / sum of a |correlation| matrix (Duan et al. 2020)."""
    if corr.size == 0:
        return 0.0  # no informative latent on one side: nothing shared
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(sum(np.nan_to_num(corr.max(a) ** 2 / corr.sum(a)).mean() for a in (0, 1)) / 2)


def udr(codes_per_run, kl_per_run, threshold=onnx_check.ACTIVE_KL):
    """Each run's Unsupervised Disentanglement Ranking (Duan et al. 2020), Spearman variant: the median over its
    pairs of the relative strength of |Spearman| between informative latents (KL above `threshold`) of runs encoded on
    the same images. A constant latent correlates 0 (disentanglement_lib's NaN zeroes a row); none informative: 0."""
    from scipy.stats import rankdata

    if len(codes_per_run) < 2 or len({len(c) for c in codes_per_run}) != 1:
        raise ValueError("UDR needs two or more runs with codes of the same images")
    ranks = []
    for c, kl in zip(codes_per_run, kl_per_run, strict=True):
        r = rankdata(np.asarray(c, np.float64)[:, np.asarray(kl) > threshold], axis=0)
        ranks.append((r - r.mean(0)) / np.where(r.std(0) > 0, r.std(0), np.inf))
    strength = lambda i, j: _relative_strength(np.abs(ranks[i].T @ ranks[j]) / len(codes_per_run[0]))
    return [float(np.median([strength(i, j) for j in range(len(ranks)) if j != i])) for i in range(len(ranks))]


def disentanglement(codes, factors, factor_names):
    """Every supervised metric on the same codes, and for each latent the factor it shares most information with."""
    m, scores = mig(codes, factors), dci(codes, factors)
    out = {"mig": m["mig"], "sap": sap(codes, factors)["sap"], **{f"dci_{k}": v for k, v in scores.items()}}
    out["factorvae_score"] = factorvae_score(codes, factors)["factorvae_score"]
    out["latents"] = [{"factor": factor_names[int(np.argmax(r))], "normalised_mi": max(r)} for r in m["mi_normalised"]]
    return out
