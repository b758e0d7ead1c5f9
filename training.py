"""Training pieces shared by train.py, bench.py and sweep.py: run defaults, the step, the epoch, the test pass.

make_train_step(model, optimizer, config, compile=False) -> step(x, target, step_idx) -> the batch's sums (recon,
kl, total, kl per dim ...) as one detached tensor; nothing in it waits for the device. compile=True gives the
compiled step of compiled_step.py (and its compiled test pass, step.test_sums); the course project's loop
(make_seed_step, seed_batches) is here too, for --loop seed and bench.py.
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import compiled_step
import data
import vae


@dataclasses.dataclass
class RunConfig:
    """How a run trains (the model's own settings are vae.VAEConfig): the one place for these defaults."""
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    epochs: int = 20


RUN_DEFAULTS = RunConfig()
# Compiling (the step, then the test pass) costs ~6 s with a warm inductor cache and ~35 s cold on a 2-core CPU and
# makes an epoch 2.1-2.7x faster than the eager step's there (bench.py): it pays for itself within about a million
# images even with a cold cache, e.g. the default 20 epochs of the full 60,000. CUDA and MPS: the compiled step has
# not run on a GPU yet, so `auto` never compiles there.
COMPILE_AUTO_MIN_IMAGES = 1_000_000


def has_cxx():
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def want_compile(mode, device, images_to_train):
    """Whether to compile the training step: 'on', 'off', or 'auto' (on a CPU, for runs long enough to pay)."""
    if mode == "auto":
        return device.type == "cpu" and has_cxx() and images_to_train >= COMPILE_AUTO_MIN_IMAGES
    return mode == "on"


# ---------------------------------------------------------------------------------------------- the step

def make_train_step(model, optimizer, config, compile=False, formulation="auto", log=None):
    """Return step(x, target, step_idx) -> detached batch sums (LossTerms.batch_sums); the loss minimised is the
    batch mean of the objective. x in [-1, 1] and target in [0, 1], (B, 1, 28, 28) on the model's device. The
    reparameterization noise comes from the global RNG as model.forward draws it, so a seed gives the same run
    compiled or not (up to float rounding). formulation: "auto" (CHWN on a CPU, module layers elsewhere), "chwn" or
    "modules" (tests force each). log(message) receives the one-line notes (fallbacks, formulation); default print.
    With a plan, step.test_sums is the compiled test pass (test_metrics' fast=).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))

    def eager_step(x, target, step_idx, eps=None):
        optimizer.zero_grad(set_to_none=True)
        logits, mu, logvar, z = model.forward_with_z(x, eps=eps)
        terms = vae.vae_loss(logits, target, mu, logvar, config, step=step_idx, z=z)
        terms.total.mean().backward()
        optimizer.step()
        return terms.batch_sums().detach()

    # β-TCVAE (objective "tc") always takes the eager step: the compiled graph has no path for its batch estimators.
    if not compile or config.objective == "tc":
        return eager_step
    if not compiled_step.adam_supported(model, optimizer):
        log("note: the compiled step reproduces plain single-group Adam only; training with the eager step")
        return eager_step
    return compiled_step.make(model, optimizer, config, eager_step, formulation, log)


# ------------------------------------------------------------------------------- the course project's loop

def make_seed_step(model, opt, config):
    """The course project's step: BCE on sigmoid probabilities, loss summed over the batch (Adam is scale-invariant)."""
    def step(x, target, step_idx):
        mu, logvar = model.encode(x)
        recon = model.decode(model.reparameterize(mu, logvar))
        rec = F.binary_cross_entropy(recon, target, reduction="none").flatten(1).sum(1)
        kl_per_dim = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
        kl = kl_per_dim.sum(1)
        terms = vae.LossTerms(rec, kl, rec + config.beta * kl, kl_per_dim)
        opt.zero_grad()
        loss = terms.total.sum()
        loss.backward()
        opt.step()
        loss.item(), loss.item()   # the course project's loop reads the loss twice a step (its sum, its progress bar)
        return terms.batch_sums().detach()
    return step


def seed_batches(data_dir, batch_size, device):
    """Batches the course project's way: per-image PIL transforms in DataLoader worker processes, as many as its
    code starts (half the cores)."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.FashionMNIST(data_dir, train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=(os.cpu_count() or 0) // 2)
    for x, y in loader:
        x = x.to(device)
        yield x, (x + 1) / 2, y


# ------------------------------------------------------------------------------------- the epoch and the test

class NonFinite(Exception):
    """The loss or the weights became NaN or infinite; the message says where."""


def epoch_loop(model, step, train, s, epoch, state, progress=True):
    """Train one epoch. s: dict with seed, batch_size, epochs, latent_dim (and loop, data_dir for the seed loop).
    Returns (mean sums per image, per-step objective per image as floats, images/s)."""
    from tqdm import tqdm
    g = torch.Generator(device=train.device).manual_seed(s["seed"] * 100_003 + epoch)
    torch.manual_seed(s["seed"] * 100_003 + epoch)  # noise of the reparameterization: reproducible from the epoch
    n_steps = math.ceil(len(train) / s["batch_size"])
    hist = torch.zeros(n_steps, 3 + s["latent_dim"], device=train.device)
    sizes = torch.zeros(n_steps, device=train.device)
    bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{s['epochs']}", leave=False,
               disable=None if progress else True, file=sys.stderr)
    t0 = time.perf_counter()
    if s.get("loop", "fast") == "seed":
        batches = seed_batches(s["data_dir"], s["batch_size"], train.device)
    else:
        layout = getattr(step, "batch_innermost", None)   # the compiled step's preference, asked each epoch
        batches = train.batches(s["batch_size"], shuffle=True, generator=g, batch_innermost=bool(layout and layout()))
    for i, (x, target, _) in enumerate(batches):
        hist[i] = step(x, target, state["step"])
        sizes[i] = len(x)
        state["step"] += 1
        if i % 25 == 24 or i == n_steps - 1:  # the only host syncs: every 25 steps
            check_finite(hist[:i + 1, 2], epoch, i - i % 25)
            bar.set_postfix(loss=f"{hist[i, 2].item() / len(x):.2f}", refresh=False)
            bar.update(i + 1 - bar.n)
    if train.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    means = (hist.sum(0) / len(train)).tolist()
    return means, (hist[:, 2] / sizes).tolist(), len(train) / seconds


def check_finite(totals, epoch, first_unchecked):
    bad = (~torch.isfinite(totals[first_unchecked:])).nonzero()
    if len(bad):
        raise NonFinite(f"the loss became {totals[first_unchecked + bad[0, 0]].item()} at epoch {epoch + 1}, "
                        f"step {first_unchecked + bad[0, 0].item() + 1}")


# The test pass's batch: its activations stay in a core's cache (the compiled pass took 0.10 s at 1,000 and 0.08 s at
# 256 for 6,978 images, bench machine)
TEST_BATCH = 256


@torch.inference_mode()
def test_metrics(model, test, config, seed, step_idx, batch_size=64, fast=None):
    """Single-sample ELBO terms on the test split (mean per image), with fixed noise so epochs compare fairly.

    fast: a training step's test_sums (compiled, the same numbers up to float rounding), used where it can be.
    The tc objective's estimators depend on the batch: its test total uses the training batch size (batch_size), the
    same estimator as the train total (and M² pairs per batch rather than TEST_BATCH²).
    """
    model.eval()
    g = torch.Generator(device=test.device).manual_seed(seed)
    sums = torch.zeros(3 + config.latent_dim, device=test.device)
    for x, target, _ in test.batches(batch_size if config.objective == "tc" else TEST_BATCH,
                                     batch_innermost=fast is not None):
        # the noise model.forward_with_z(x, generator=g) would draw
        eps = torch.randn((x.shape[0], config.latent_dim), device=x.device, dtype=x.dtype, generator=g)
        batch = fast(x, target, eps, step_idx) if fast is not None else None
        if batch is None:
            logits, mu, logvar, z = model.forward_with_z(x, eps=eps)
            batch = vae.vae_loss(logits, target, mu, logvar, config, step=step_idx, z=z).batch_sums()
        sums += batch
    model.train()
    return (sums / len(test)).tolist()


class Trainer:
    """A model, optimizer and step as train.py builds them, for bench.py: .epoch() runs one epoch as train.py does
    (training, then the test pass) or as the course project did (training only), and returns (training images/s,
    epoch seconds). s: the settings dict train.py resolves (loop, batch_size, lr, seed, epochs, ...)."""

    def __init__(self, data_dir, device, s, compile_mode):
        self.data, self.test, self.s = data.load(data_dir, "train", device), data.load(data_dir, "test", device), s
        torch.manual_seed(0)
        self.config = vae.VAEConfig()
        self.model = vae.BetaVAE(self.config).to(device)
        opt = torch.optim.Adam(self.model.parameters(), lr=s["lr"])
        self.step = (make_seed_step(self.model, opt, self.config) if s["loop"] == "seed"
                     else make_train_step(self.model, opt, self.config, compile=compile_mode))
        self.state, self.n = {"step": 0}, 0

    def epoch(self):
        t = time.perf_counter()
        _, _, img_s = epoch_loop(self.model, self.step, self.data, self.s, self.n, self.state,
                                          progress=False)
        if self.s["loop"] != "seed":   # train.py's epoch ends with a test pass; the course project's had none
            test_metrics(self.model, self.test, self.config, 0, self.state["step"],
                         fast=getattr(self.step, "test_sums", None))
        self.n += 1
        return img_s, time.perf_counter() - t


SERVE_EPOCHS = """
import json, sys
sys.path.insert(0, {root!r})
import torch, training
trainer = training.Trainer(sys.argv[1], torch.device(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "1")
for line in sys.stdin:   # one epoch per line, its (images/s, seconds) back as one line
    print(json.dumps(trainer.epoch()), flush=True)
"""


class TrainerProcess:
    """A Trainer in a python process of its own, as each loop runs for its user (bench.py): sharing one process
    slowed the compiled step by up to 1.7x (measured). Its epochs run one at a time, interleaved by the caller."""

    def __init__(self, data_dir, device, s, compile_mode):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE_EPOCHS.format(root=os.path.dirname(os.path.abspath(__file__))), data_dir, str(device),
                                      json.dumps(s), "1" if compile_mode else "0"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def epoch(self):
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a training process ended (exit status {self.proc.wait()})")
        return tuple(json.loads(line))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
