"""The β-VAE: its settings, the model, the losses, and checkpoints.

The layers are the course project's table (docs/usage.md says how its published code differs); plumbing/chwn.py (the
compiled CPU step, the IWAE bound's decoding) and export_onnx.py (BatchNorm folded in) restate them, and tests compare
both with this module.
"""

import collections
import dataclasses
import hashlib
import io
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

from plumbing import checks
from plumbing.files import NotReadable, atomic_write, read_regular

Setting = collections.namedtuple("Setting", "default low high help")
# Every setting's default and range, for flags, checkpoints and sweep.py alike: defined here only
SETTINGS = {
    "latent_dim": Setting(10, 1, 4096, "latent size"),
    "beta": Setting(4.0, 0.0, 1e6, "weight of the KL term; with --objective tc, of the total correlation"),
    "gamma": Setting(None, 0.0, 1e9, "weight of capacity's |KL - C| (1000 if not given), tc's dimension-wise KL (1)"),
    "capacity_max": Setting(25.0, 0.0, 1e6, "capacity objective: C_max, nats"),
    "capacity_steps": Setting(
        None, 1, 10**12, "capacity objective: steps for C to reach C_max (¾ of the run if not given)"
    ),
    "alpha": Setting(1.0, 0.0, 1e6, "tc objective: weight of the index-code mutual information"),
    "epochs": Setting(20, 1, 1_000_000, "epochs to train, in all"),
    "batch_size": Setting(64, 1, 1_000_000, "batch size"),
    "lr": Setting(1e-3, 1e-12, 10.0, "Adam's learning rate"),
    "seed": Setting(0, 0, 2**32 - 1, "seeds shuffling, initialisation and sampling"),
    "iwae_k": Setting(64, 1, 100_000, "importance samples per test image for the IWAE bound"),
}
OBJECTIVES = ("beta", "capacity", "tc")
GAMMA_DEFAULTS = {"beta": 1000.0, "capacity": 1000.0, "tc": 1.0}  # Burgess et al.'s and Chen et al.'s values
CAPACITY_RAMP = 0.75  # the share of a run over which C rises to C_max, unless --capacity-steps says otherwise
IMAGE_SHAPE = (1, 28, 28)
LOG_2PI = math.log(2 * math.pi)


def setting_problem(name, value):
    """Why `value` is not a valid `name` (a SETTINGS entry), or None. A bool (an int to Python) and NaN are refused."""
    s = SETTINGS[name]
    kind = int if isinstance(s.low, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not s.low <= value <= s.high:
        text = f"{value!r}" if isinstance(value, (int, float)) and abs(value) < 1e30 else checks.brief(value)
        return f"{name} must be a{'n integer' if kind is int else ' number'} from {s.low:g} to {s.high:g} (got {text})"
    return None


@dataclasses.dataclass
class VAEConfig:
    latent_dim: int = SETTINGS["latent_dim"].default
    beta: float = SETTINGS["beta"].default
    objective: str = "beta"  # beta: recon + β·KL; capacity: recon + γ·|KL − C|; tc: recon + α·MI + β·TC + γ·DW
    gamma: float | None = None  # None: the objective's own, GAMMA_DEFAULTS; a checkpoint stores the value used
    capacity_max: float = SETTINGS["capacity_max"].default
    capacity_steps: int | None = None  # the capacity objective needs it (train.py sets it from the run's length)
    alpha: float = SETTINGS["alpha"].default
    dataset_size: int = 60_000  # the tc objective's N, the size of the split batches come from

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {checks.brief(self.objective)})")
        if self.gamma is None:
            self.gamma = GAMMA_DEFAULTS[self.objective]
        if self.capacity_steps is None and self.objective == "capacity":
            raise ValueError("the capacity objective needs capacity_steps (train.py sets it from the run's length)")
        for name in ("latent_dim", "beta", "gamma", "capacity_max", "capacity_steps", "alpha"):
            if getattr(self, name) is not None and (problem := setting_problem(name, getattr(self, name))):
                raise ValueError(problem)
        if isinstance(self.dataset_size, bool) or not isinstance(self.dataset_size, int) or self.dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer (got {checks.brief(self.dataset_size)})")


def describe(args):
    """The parameters that define a model's objective, for titles: β-VAE β=4, capacity γ=1000 C_max=25, ..."""
    objective, g = args.get("objective", "beta"), lambda k: f"{args.get(k, 0):g}"
    if objective == "capacity":
        return f"capacity objective, γ={g('gamma')}, C_max={g('capacity_max')} nats"
    return f"β-TCVAE, α={g('alpha')}, β={g('beta')}, γ={g('gamma')}" if objective == "tc" else f"β-VAE, β={g('beta')}"


class Encoder(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),  # (B, 8, 14, 14)
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),  # (B, 16, 7, 7)
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=0), nn.ReLU(),  # (B, 32, 3, 3)
            nn.Flatten(),  # (B, 288)
            nn.Linear(288, 128),  # the seed has no activation here
        )  # fmt: skip
        self.fc_mu = nn.Linear(128, latent_dim)
        self.fc_logvar = nn.Linear(128, latent_dim)

    def forward(self, x):
        h = self.features(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    unflat = (32, 3, 3)  # fc's output viewed as (B, 32, 3, 3)

    def __init__(self, latent_dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(latent_dim, 128), nn.ReLU(), nn.Linear(128, 288), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=0), nn.ReLU(),  # (B, 16, 7, 7)
            nn.BatchNorm2d(16),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # (B, 8, 14, 14)
            nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1, output_padding=1),  # (B, 1, 28, 28)
        )  # fmt: skip

    def logits(self, z):
        # training uses the logits: BCE-with-logits is the seed's BCE, stable where the sigmoid saturates
        return self.deconv(self.fc(z).view(-1, *self.unflat))

    def forward(self, z):
        return torch.sigmoid(self.logits(z))  # pixels in [0, 1], the seed's final Sigmoid


class BetaVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config.latent_dim), Decoder(config.latent_dim)

    def encode(self, x):
        """x in [-1, 1], (B, 1, 28, 28) -> mu, logvar, each (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z):
        """z (B, latent_dim) -> images in [0, 1], (B, 1, 28, 28): what export_onnx.py exports."""
        return self.decoder(z)

    def forward(self, x, eps=None):
        """(reconstruction logits, mu, logvar); eps (B, latent_dim) replaces the reparameterization noise."""
        return self.forward_with_z(x, eps)[:3]

    def forward_with_z(self, x, eps=None):
        """forward, plus the z the logits decode (the tc objective's estimators need it)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, torch.randn_like(mu) if eps is None else eps)
        return self.decoder.logits(z), mu, logvar, z


def reparameterize(mu, logvar, eps):
    """z = μ + ε·σ with σ = exp(½ log σ²): the reparameterization trick (Kingma & Welling 2014)."""
    return mu + eps * torch.exp(0.5 * logvar)


class LossTerms(NamedTuple):
    recon: torch.Tensor  # (B,) Bernoulli cross-entropy summed over pixels, nats
    kl: torch.Tensor  # (B,) KL(q(z|x) ‖ N(0, I)), nats
    total: torch.Tensor  # (B,) the objective minimised
    kl_per_dim: torch.Tensor  # (B, latent_dim)

    def batch_sums(self):
        """One tensor (3 + latent_dim,): the batch's sums of recon, kl, total, then of each dimension's KL."""
        return torch.cat([torch.stack([self.recon.sum(), self.kl.sum(), self.total.sum()]), self.kl_per_dim.sum(0)])


def capacity_at(step, config: VAEConfig):
    """Burgess et al. 2018: C rises linearly from 0 to C_max over capacity_steps optimizer steps."""
    return config.capacity_max * min(1.0, step / config.capacity_steps)


def log_normal(z, mu, logvar):
    """log N(z; mu, exp(logvar)) elementwise; mu = logvar = 0 gives the prior's log-density."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)


def tc_terms(z, mu, logvar, dataset_size):
    """β-TCVAE's split of each image's KL (Chen et al. 2018), nats, each (B,): (index-code MI, total correlation,
    dimension-wise KL) at z_i ~ q(z|x_i). q(z) over N = dataset_size images is sampled stratified from the batch:
    z_i's own posterior weighs 1/N, each of the M - 1 others (N - 1) / (N (M - 1)), so a whole-set batch is exact."""
    m, n = z.shape[0], float(dataset_size)
    pair = log_normal(z[:, None, :], mu[None], logvar[None])  # (M, M, D): log q(z_id | x_j)
    log_w = torch.full((m, m), math.log(max(n - 1.0, 1e-30) / (n * max(m - 1, 1))), dtype=z.dtype, device=z.device)
    log_w.fill_diagonal_(-math.log(n))
    log_q_zx = pair.diagonal().sum(0)  # (M,) log q(z_i | x_i)
    log_qz = torch.logsumexp(log_w + pair.sum(2), dim=1)  # (M,) log q(z_i)
    log_qz_dims = torch.logsumexp(log_w[:, :, None] + pair, dim=1).sum(1)  # (M,) Σ_d log q(z_id)
    return kl_parts(log_q_zx, log_qz, log_qz_dims, z)


def kl_parts(log_q_zx, log_qz, log_qz_dims, z):
    """(MI, TC, dimension-wise KL) at z, summing to log q(z|x) − log p(z) (Hoffman & Johnson 2016; Chen et al. 2018)."""
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return log_q_zx - log_qz, log_qz - log_qz_dims, log_qz_dims - log_pz


def bce_with_logits(logits, target):
    """Per-pixel Bernoulli cross-entropy −[t log σ(x) + (1 − t) log(1 − σ(x))], elementwise."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")


def vae_loss(recon_logits, target, mu, logvar, config: VAEConfig, step=0, capacity=None, z=None, beta=None):
    """The loss per image, nats: recon = Bernoulli cross-entropy summed over pixels (target in [0, 1]), KL = ½ Σ_d
    (μ² + σ² − 1 − log σ²), and the objective's total (`beta` overrides config.beta, `capacity` C(step)):
        beta      recon + β·KL                               (Higgins et al. 2017)
        capacity  recon + γ·|KL − C(step)|                   (Burgess et al. 2018)
        tc        recon + α·MI + β·TC + γ·dimension-wise KL  (Chen et al. 2018, at the sampled z)"""
    recon = bce_with_logits(recon_logits, target).flatten(1).sum(1)
    kl_per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    kl, beta = kl_per_dim.sum(1), config.beta if beta is None else beta
    if config.objective == "beta":
        total = recon + beta * kl
    elif config.objective == "tc":
        if z is None:
            raise ValueError("the tc objective needs the sampled z: pass z from model.forward_with_z")
        mi, tc, dw = tc_terms(z, mu, logvar, config.dataset_size)
        total = recon + config.alpha * mi + beta * tc + config.gamma * dw
    else:
        total = recon + config.gamma * (kl - (capacity_at(step, config) if capacity is None else capacity)).abs()
    return LossTerms(recon, kl, total, kl_per_dim)


def pick_device(name="auto"):
    """cuda, then mps, then cpu; an explicit name must be available (ValueError says what to do)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available here: use --device cpu or auto")
    if name == "mps" and not mps:
        raise ValueError("--device mps was asked for but MPS is not available here: use --device cpu or auto")
    return torch.device(name)


def param_count(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ checkpoints

CHECKPOINT_FORMAT = 1
MAX_CHECKPOINT_BYTES = 2**30  # a 10,000-epoch run of the largest model is a fraction of this
CheckpointError = checks.CheckpointError
WRITTEN, EARLIER = "pass a checkpoint.pt written by train.py", "use an earlier checkpoint or retrain"


def save_checkpoint(path, model, optimizer, epoch, seed, train_args, metrics, extra=None):
    """One dict per run (weights, model_args, optimizer state, epoch, seed, train_args, metrics), written atomically."""
    ckpt = dict(format_version=CHECKPOINT_FORMAT, model_args=dataclasses.asdict(model.config), model=model.state_dict())
    ckpt.update(optimizer=optimizer.state_dict() if optimizer is not None else {}, epoch=int(epoch), seed=int(seed))
    ckpt.update(train_args=dict(train_args), metrics=list(metrics), torch_version=str(torch.__version__))
    buf = io.BytesIO()  # in memory first: a full disk is then an OSError in atomic_write, and the old file stays whole
    torch.save(ckpt | (extra or {}), buf)
    atomic_write(path, buf.getvalue())


def read_checkpoint(path):
    """The checkpoint dict, every field checked (plumbing/checks.py), plus "sha256" of the bytes it was read from. The
    file is read once, and torch.load(weights_only=True) unpacks those bytes: a checkpoint never runs code."""
    try:
        data = read_regular(path, MAX_CHECKPOINT_BYTES)
    except NotReadable as e:
        missing = f"no checkpoint at {path}: pass the checkpoint.pt that train.py wrote"
        raise CheckpointError(f"{path} {e}: {WRITTEN}" if os.path.lexists(path) else missing) from None
    if not data:
        raise CheckpointError(f"{path} is empty: it is not a checkpoint; train again or pick another file")
    if problem := checks.archive_problem(data):
        raise CheckpointError(f"{path} is not a readable checkpoint ({problem}); {WRITTEN}")
    try:
        with warnings.catch_warnings(action="ignore"):  # torch warns before refusing odd pickles; our error says it all
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors have many types; all mean the same to the user
        raise CheckpointError(f"{path} is not a readable checkpoint ({checks.load_error(e)}); {WRITTEN}") from None
    checks.check_checkpoint(ckpt, path, CHECKPOINT_FORMAT, SETTINGS)
    try:
        VAEConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        problem = f"model_args do not describe a model ({checks.first_line(e)})"
        raise CheckpointError(f"{path} is damaged: {problem}; {checks.DAMAGED}") from None
    ckpt["sha256"] = hashlib.sha256(data).hexdigest()
    return ckpt


def model_from_checkpoint(ckpt, source="the checkpoint"):
    """The model a checked checkpoint dict describes, with its weights (train mode), NaN ones refused (never saved)."""
    model = BetaVAE(VAEConfig(**ckpt["model_args"]))
    if problem := checks.fit_problem(model.state_dict(), ckpt["model"]):
        raise CheckpointError(f"{source} does not match this model ({problem}); retrain with train.py")
    if problem := checks.weights_problem(model.state_dict(), ckpt["model"]):
        raise CheckpointError(f"{source} is damaged: {problem}; {EARLIER}")
    model.load_state_dict(ckpt["model"])
    if bad := [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise CheckpointError(f"{source} holds NaN or infinite weights ({bad[0]}); {EARLIER}")
    return model


def load_optimizer_state(optimizer, ckpt, source):
    """optimizer.load_state_dict(ckpt["optimizer"]), refusing state that does not fit the parameters (torch finds out
    only at the first step). Only lr, betas, eps and weight_decay come from the file; how Adam runs stays."""
    problem = checks.optimizer_fit_problem(optimizer, ckpt["optimizer"])
    if problem is None:
        pairs = zip(optimizer.param_groups, ckpt["optimizer"]["param_groups"])
        groups = [{**mine, **{k: theirs[k] for k in (*checks.HYPER, "params")}} for mine, theirs in pairs]
        try:
            optimizer.load_state_dict({"state": ckpt["optimizer"]["state"], "param_groups": groups})
            return
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            problem = checks.first_line(e)
    raise CheckpointError(f"the optimizer state in {source} does not fit this model ({problem}); start a new --out-dir")


def load_checkpoint(path, device="cpu"):
    """Rebuild the trained model in one call. Returns (model in eval mode on `device`, the checkpoint dict)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, str(path)).to(device).eval(), ckpt
