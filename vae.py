"""The β-VAE: config, encoder, decoder, loss and checkpoints.

The architecture is the course project's, as its README's layer table lists it (ReLU before BatchNorm, no activation
after the encoder's 288→128 layer); see docs/usage.md for how its published code differs. The loss is the β-VAE
objective of Higgins et al. 2017, the controlled-capacity objective of Burgess et al. 2018, or the
β-TCVAE objective of Chen et al. 2018.

Changing the architecture: nhwc_forward.py re-derives the fast CPU training formulation from these layers and says
in one log line when it cannot (training then uses the module's own layers, slower); export_onnx.py folds each
BatchNorm into the convolution after it; fast_decoder.py rewrites stride-2 transposed convolutions. Their tests
(tests/test_train_step.py, tests/test_onnx.py, tests/test_metrics.py) check each against this module.
"""
import dataclasses
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import atomic_write

CHECKPOINT_FORMAT = 1
OBJECTIVES = ("beta", "capacity", "tc")
IMAGE_SHAPE = (1, 28, 28)


# γ when not given: capacity (Burgess et al.'s value for their shapes); tc: 1 (Chen et al.'s β-TCVAE, α = γ = 1).
# The beta objective has no γ; it keeps the capacity value, which older checkpoints also hold.
GAMMA_DEFAULTS = {"capacity": 1000.0, "tc": 1.0}


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, foreign or inconsistent; the message says what to do."""


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
    recon = F.binary_cross_entropy_with_logits(recon_logits, target, reduction="none").flatten(1).sum(1)
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


# ---------------------------------------------------------------------------------------------- checkpoints

REQUIRED_KEYS = ("format_version", "model_args", "model", "optimizer", "epoch", "seed", "train_args", "metrics")


def save_checkpoint(path, model, optimizer, epoch, seed, train_args, metrics, extra=None):
    model = getattr(model, "_orig_mod", model)  # never a compiled wrapper's keys
    ckpt = {
        "format_version": CHECKPOINT_FORMAT,
        "model_args": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "seed": int(seed),
        "train_args": dict(train_args),
        "metrics": list(metrics),
        "torch_version": str(torch.__version__),
    }
    if extra:
        ckpt.update(extra)
    save_torch(path, ckpt)


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, checked. weights_only=True: a checkpoint can never run code when loaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass the checkpoint.pt that train.py wrote")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty: it is not a checkpoint; train again or pick another file")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them; our error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle/zip errors have many types; all mean the same thing to the user
        text = str(e).strip()
        if "WeightsUnpickler error:" in text:  # torch's own text suggests weights_only=False: never for a stranger's file
            detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:120]
            reason = f"the safe loader refused it, it may hold code: {detail}"
        else:
            reason = text.splitlines()[0][:160] if text else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); "
                              "pass a checkpoint.pt written by train.py") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; "
                              "pass a checkpoint.pt written by train.py")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project's format (missing {', '.join(missing)}); "
                              "retrain with train.py")
    if ckpt["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']!r}, this code reads "
                              f"{CHECKPOINT_FORMAT}; use the matching version of the project or retrain")
    problem = _field_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}; retrain, or resume from a backup of the run folder")
    return ckpt


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _summary_problem(m):
    if not isinstance(m, dict) or not all(_is_number(m.get(k)) for k in ("recon", "kl", "total")):
        return "recon, kl and total numbers"
    if not isinstance(m.get("kl_per_dim"), list) or not all(_is_number(v) for v in m["kl_per_dim"]):
        return "a kl_per_dim list of numbers"
    return None


def _field_problem(ckpt):
    """What is wrong with the types of a checkpoint's fields (a file from elsewhere can hold anything), or None."""
    for key, kind in (("model_args", dict), ("model", dict), ("optimizer", dict), ("train_args", dict),
                      ("metrics", list)):
        if not isinstance(ckpt[key], kind):
            return f"{key} is a {type(ckpt[key]).__name__}, not a {kind.__name__}"
    if not _is_int(ckpt["epoch"]) or ckpt["epoch"] < 0:
        return f"epoch is {ckpt['epoch']!r}, not a count of epochs"
    if not _is_int(ckpt["seed"]):
        return f"seed is {ckpt['seed']!r}, not an integer"
    try:
        VAEConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        return f"model_args do not describe a model ({(str(e).splitlines() or [''])[0][:120]})"
    args = ckpt["train_args"]
    for key, ok in (("batch_size", lambda v: _is_int(v) and v >= 1), ("seed", _is_int),
                    ("epochs", lambda v: _is_int(v) and v >= 0), ("lr", lambda v: _is_number(v) and v > 0),
                    ("loop", lambda v: v in ("fast", "seed")), ("data_dir", lambda v: isinstance(v, str))):
        if key in args and not ok(args[key]):
            return f"train_args[{key!r}] is {args[key]!r}"
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in ckpt["model"].items()):
        return "model holds entries that are not named tensors"
    for i, m in enumerate(ckpt["metrics"]):
        if not isinstance(m, dict) or not _is_int(m.get("epoch")) or not _is_number(m.get("img_per_s", 0)) \
                or not (_is_int(m.get("step", 0)) and m.get("step", 0) >= 0):
            return f"metrics entry {i} is not an epoch record"
        for split in ("train", "test"):
            problem = _summary_problem(m.get(split))
            if problem:
                return f"metrics entry {i} has no {split} record with {problem}"
    return None


def load_optimizer_state(optimizer, ckpt, source):
    """optimizer.load_state_dict(ckpt["optimizer"]), refusing state that does not fit the parameters (torch only
    finds out at the first step, deep inside Adam). Only the hyperparameters lr, betas, eps and weight_decay come
    from the file; how the update runs (amsgrad, fused, capturable, ...) stays as the optimizer was built."""
    try:
        saved = ckpt["optimizer"]
        groups = saved["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
            raise ValueError(f"it has {len(groups) if isinstance(groups, list) else 'no'} parameter groups")
        merged = []
        for mine, theirs in zip(optimizer.param_groups, groups):
            lr, betas, eps, wd = (theirs[k] for k in ("lr", "betas", "eps", "weight_decay"))
            if not (_is_number(lr) and lr > 0 and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
                    and _is_number(eps) and eps >= 0 and _is_number(wd) and wd >= 0):
                raise ValueError("its hyperparameters are not numbers in range")
            group = {k: v for k, v in mine.items() if k != "params"}
            merged.append(dict(group, lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd, params=theirs["params"]))
        optimizer.load_state_dict({"state": saved["state"], "param_groups": merged})
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if not st:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    t = st.get(key)
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point():
                        raise ValueError(f"its {key} does not match a parameter of shape {tuple(p.shape)}")
                step = st.get("step")
                step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
                if not _is_number(step) or not 0 <= step < 2**53:
                    raise ValueError(f"its step count is {step!r}")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"the optimizer state in {source} does not fit this model ({reason}); start a new "
                              "--out-dir") from None


def save_torch(path, obj):
    """torch.save into memory, then an atomic write: a full disk is then an OSError, not an error inside torch's
    zip writer, and the old file stays whole."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def model_from_checkpoint(ckpt, source="the checkpoint"):
    """Build the model a checkpoint dict describes and load its weights (train mode)."""
    try:
        model = BetaVAE(VAEConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{source} does not match this model ({reason}); retrain with train.py") from None
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # train.py never saves such weights; whatever made this file, nothing useful can come of it
        raise CheckpointError(f"{source} holds NaN or infinite weights ({bad[0]}); use an earlier checkpoint or "
                              "retrain")
    return model


def load_checkpoint(path, device="cpu"):
    """Rebuild the trained model from a checkpoint in one call. Returns (model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, os.fspath(path)).to(device).eval(), ckpt


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

