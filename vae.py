"""The β-VAE: config, encoder, decoder and losses (checkpoints: checkpoint.py).

The architecture is the course project's, as its README's layer table lists it (ReLU before BatchNorm, no activation
after the encoder's 288→128 layer); see docs/usage.md for how its published code differs. The loss is the β-VAE
objective of Higgins et al. 2017, the controlled-capacity objective of Burgess et al. 2018, or the
β-TCVAE objective of Chen et al. 2018.

Changing the architecture: chwn_forward.py re-derives the fast CPU training formulation from these layers and says
in one log line when it cannot (training then uses the module's own layers, slower); export_onnx.py folds each
BatchNorm into the convolution after it; fast_decoder.py rewrites stride-2 transposed convolutions. Their tests
(tests/test_train_step.py, tests/test_onnx.py, tests/test_metrics.py) check each against this module.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

OBJECTIVES = ("beta", "capacity", "tc")
IMAGE_SHAPE = (1, 28, 28)


# γ when not given: capacity (Burgess et al.'s value for their shapes); tc: 1 (Chen et al.'s β-TCVAE, α = γ = 1).
# The beta objective has no γ; it keeps the capacity value, which older checkpoints also hold.
GAMMA_DEFAULTS = {"capacity": 1000.0, "tc": 1.0}


# The range of every model setting: VAEConfig refuses values outside it (a checkpoint from elsewhere included) and
# train.py names the flag. A latent of 10^9 would allocate 500 GB of weights before anything could fail.
LIMITS = {"latent_dim": (1, 4096), "beta": (0.0, 1e6), "gamma": (0.0, 1e9), "capacity_max": (0.0, 1e6),
          "capacity_steps": (1, 10**12), "alpha": (0.0, 1e6)}


@dataclass
class VAEConfig:
    latent_dim: int = 10
    beta: float = 4.0           # weight of the KL term (Higgins et al. 2017)
    objective: str = "beta"     # "beta": recon + β·KL; "capacity": recon + γ·|KL − C| (Burgess et al. 2018);
                                # "tc": recon + α·MI + β·TC + γ·dimension-wise KL (β-TCVAE, Chen et al. 2018)
    # γ weighs the objective's extra term, as both papers name it: |KL − C| (capacity) or the dimension-wise KL (tc).
    # None means the objective's own default, GAMMA_DEFAULTS; the resolved value is what a checkpoint stores.
    gamma: float | None = None
    capacity_max: float = 25.0  # capacity objective: C_max in nats
    capacity_steps: int = 100_000  # capacity objective: optimizer steps over which C rises from 0 to C_max
    alpha: float = 1.0          # tc objective: weight of the index-code mutual information
    dataset_size: int = 60_000  # tc objective: N, the size of the split batches are drawn from (train.py sets it)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if self.gamma is None:
            self.gamma = GAMMA_DEFAULTS.get(self.objective, GAMMA_DEFAULTS["capacity"])
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            kind = int if isinstance(low, int) else (int, float)
            # bool is an int to Python, and NaN passes no comparison: both refused here
            if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
                raise ValueError(f"{name} must be a{'n integer' if kind is int else ' number'} from {low:g} to "
                                 f"{high:g} (got {value!r})")
        if isinstance(self.dataset_size, bool) or not isinstance(self.dataset_size, int) or self.dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer (got {self.dataset_size!r})")


class Encoder(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),    # (B, 8, 14, 14)
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),   # (B, 16, 7, 7)
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=0), nn.ReLU(),  # (B, 32, 3, 3)
            nn.Flatten(),                                          # (B, 288)
            nn.Linear(288, 128),                                   # the seed has no activation here
        )
        self.fc_mu = nn.Linear(128, latent_dim)
        self.fc_logvar = nn.Linear(128, latent_dim)

    def forward(self, x):
        h = self.features(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    unflat = (32, 3, 3)  # fc's output viewed as (B, 32, 3, 3) before the transposed convolutions

    def __init__(self, latent_dim):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 128), nn.ReLU(),
            nn.Linear(128, 288), nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=0), nn.ReLU(),                    # (B, 16, 7, 7)
            nn.BatchNorm2d(16),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),   # (B, 8, 14, 14)
            nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1, output_padding=1),               # (B, 1, 28, 28)
        )

    def logits(self, z):
        # Training uses the logits: BCE-with-logits is the seed's BCE, stable where sigmoid saturates.
        return self.deconv(self.fc(z).view(-1, *self.unflat))

    def forward(self, z):
        return torch.sigmoid(self.logits(z))  # pixels in [0, 1], the seed's final Sigmoid


class BetaVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.latent_dim)
        self.decoder = Decoder(config.latent_dim)

    def encode(self, x):
        """x in [-1, 1], (B, 1, 28, 28) -> mu, logvar, each (B, latent_dim)."""
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu, logvar, generator=None):
        if generator is None:
            eps = torch.randn_like(mu)
        else:
            eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return reparameterize(mu, logvar, eps)

    def decode(self, z):
        """z (B, latent_dim) -> images in [0, 1], (B, 1, 28, 28). Runs alone: this is what gets exported."""
        return self.decoder(z)

    def forward(self, x, generator=None, eps=None):
        """Returns (reconstruction logits, mu, logvar); sigmoid(logits) is the reconstruction. `eps` (B, latent_dim)
        replaces the reparameterization noise (the compiled training step draws it outside its graph)."""
        return self.forward_with_z(x, generator, eps)[:3]

    def forward_with_z(self, x, generator=None, eps=None):
        """forward, plus the sampled z (B, latent_dim) the logits decode: the tc objective's estimators need it."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator) if eps is None else reparameterize(mu, logvar, eps)
        return self.decoder.logits(z), mu, logvar, z


def reparameterize(mu, logvar, eps):
    """z = μ + ε·σ with σ = exp(½ log σ²): the reparameterization trick (Kingma & Welling 2014)."""
    return mu + eps * torch.exp(0.5 * logvar)


class LossTerms(NamedTuple):
    recon: torch.Tensor       # (B,) Bernoulli cross-entropy summed over pixels, nats
    kl: torch.Tensor          # (B,) KL(q(z|x) || N(0, I)), nats
    total: torch.Tensor       # (B,) the objective being minimised
    kl_per_dim: torch.Tensor  # (B, latent_dim)

    def batch_sums(self):
        """One tensor (3 + latent_dim,): the batch's sums of recon, kl, total, then of each dimension's KL."""
        return torch.cat([torch.stack([self.recon.sum(), self.kl.sum(), self.total.sum()]), self.kl_per_dim.sum(0)])


def capacity_at(step, config: VAEConfig):
    """Burgess et al. 2018: C rises linearly from 0 to C_max over capacity_steps optimizer steps."""
    return config.capacity_max * min(1.0, step / config.capacity_steps)


LOG_2PI = math.log(2 * math.pi)


def log_normal(z, mu, logvar):
    """log N(z; mu, exp(logvar)) elementwise; mu = logvar = 0 gives the prior's log-density."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)


def tc_terms(z, mu, logvar, dataset_size):
    """β-TCVAE's split of KL(q(z|x) ‖ p(z)) for each image of a batch (Chen et al. 2018), nats, each (B,).

    Returns (index-code MI, total correlation, dimension-wise KL), sample estimates at z_i ~ q(z|x_i):
        MI_i = log q(z_i|x_i) − log q(z_i),  TC_i = log q(z_i) − Σ_d log q(z_id),  DW_i = Σ_d log q(z_id) − log p(z_i)
    (they sum to the sampled KL, log q(z_i|x_i) − log p(z_i)). q(z) = (1/N) Σ_n q(z|x_n) is the aggregate posterior
    over the N = dataset_size images, estimated by stratified sampling of the minibatch (the paper's minibatch
    stratified sampling idea): z_i's own posterior, one Nth of q(z), is exact; the other (N − 1)/N is estimated by
    the batch's other M − 1 images, a uniform sample of the rest, each weighted (N − 1)/(N (M − 1)). With the whole
    data set as the batch (M = N) every weight is 1/N: the exact aggregate posterior that metrics.elbo_decomposition
    uses on a test split (tested).
    """
    m, n = z.shape[0], float(dataset_size)
    pair = log_normal(z[:, None, :], mu[None], logvar[None])   # (M, M, D): log q(z_id | x_j)
    log_w = torch.full((m, m), math.log(max(n - 1.0, 1e-30) / (n * max(m - 1, 1))), dtype=z.dtype, device=z.device)
    log_w.fill_diagonal_(-math.log(n))
    log_q_zx = pair.diagonal().sum(0)                                     # (M,) log q(z_i | x_i)
    log_qz = torch.logsumexp(log_w + pair.sum(2), dim=1)                  # (M,) log q(z_i)
    log_qz_dims = torch.logsumexp(log_w[:, :, None] + pair, dim=1).sum(1)  # (M,) Σ_d log q(z_id)
    return kl_parts(log_q_zx, log_qz, log_qz_dims, z)


def kl_parts(log_q_zx, log_qz, log_qz_dims, z):
    """(MI, TC, dimension-wise KL) from log q(z|x), log q(z) and Σ_d log q(z_d) at z; they sum to log q(z|x) − log p(z)
    (Hoffman & Johnson 2016; Chen et al. 2018). Shared by the β-TCVAE loss and metrics.decomposition_terms."""
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return log_q_zx - log_qz, log_qz - log_qz_dims, log_qz_dims - log_pz


class _BCEWithLogits(torch.autograd.Function):
    """Bernoulli cross-entropy per pixel from logits x and target t in [0, 1], with the gradient σ(x) − t:
    (1 − t)·max(x, 0) + t·max(−x, 0) + log(1 + e^−|x|), F.binary_cross_entropy_with_logits to float rounding
    (tested). Written with log rather than log1p: on an AVX-512 CPU torch's log1p is about 10x slower than log
    (measured), and it was a quarter of the compiled test pass; e^−|x| ≤ 1, so 1 + e^−|x| costs at most ~1e-7 nats
    a pixel."""
    generate_vmap_rule = True   # elementwise: torch.func.vmap over the loss works as it did with torch's BCE

    @staticmethod
    def forward(x, t):
        return (1 - t) * torch.relu(x) + t * torch.relu(-x) + torch.log(1 + torch.exp(-x.abs()))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        return g * (torch.sigmoid(x) - t), (-g * x if ctx.needs_input_grad[1] else None)


def bce_with_logits(logits, target):
    """Per-pixel −[t log σ(x) + (1 − t) log(1 − σ(x))], elementwise (see _BCEWithLogits)."""
    return _BCEWithLogits.apply(logits, target)


def vae_loss(recon_logits, target, mu, logvar, config: VAEConfig, step=0, capacity=None, z=None):
    """β-VAE loss per image, in nats.

    recon = −Σ_pixels [x log p + (1 − x) log(1 − p)] with p = sigmoid(logits), target x in [0, 1];
    KL    = ½ Σ_d (μ² + σ² − 1 − log σ²)  (closed form against N(0, I)).
    objective "beta":     recon + β·KL                  (Higgins et al. 2017)
    objective "capacity": recon + γ·|KL − C(step)|      (Burgess et al. 2018)
    objective "tc":       recon + α·MI + β·TC + γ·dimension-wise KL at the sampled z (Chen et al. 2018; tc_terms)
    `capacity` overrides C(step) (a tensor there keeps a compiled step from recompiling as C changes). `z` is the
    sample the logits decode (model.forward_with_z); only the tc objective needs it. KL and kl_per_dim are the
    closed form for every objective.
    """
    recon = bce_with_logits(recon_logits, target).flatten(1).sum(1)
    kl_per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    kl = kl_per_dim.sum(1)
    if config.objective == "beta":
        total = recon + config.beta * kl
    elif config.objective == "tc":
        if z is None:
            raise ValueError("the tc objective needs the sampled z: pass z from model.forward_with_z")
        mi, tc, dw = tc_terms(z, mu, logvar, config.dataset_size)
        total = recon + config.alpha * mi + config.beta * tc + config.gamma * dw
    else:
        c = capacity_at(step, config) if capacity is None else capacity
        total = recon + config.gamma * (kl - c).abs()
    return LossTerms(recon, kl, total, kl_per_dim)


def pick_device(name="auto"):
    """cuda, then mps, then cpu; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available here: use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for but MPS is not available here: use --device cpu or auto")
    return torch.device(name)


def param_count(module):
    return sum(p.numel() for p in module.parameters())

