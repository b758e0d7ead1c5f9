"""Fréchet distances (Heusel et al. 2017) between image sets, in the penultimate layer of a small CNN classifier
(FeatureNet: Inception features mean little on 28x28 grey images) trained once on the data's own training split, cached
under a key of the data and recipe, read only through the checkpoint checks; raw pixels (the course's "FID") too."""

import contextlib
import hashlib
import io
import math
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from plumbing import checks
from plumbing.files import atomic_write, clean_stale_temps, read_regular

CLASSIFIER_VERSION = 2  # bump whenever FeatureNet or its training changes: old cache files are then never read
CLASSIFIER_EPOCHS = 5
FEATURE_DIM = 64
PROJECT = "beta-vae-fashion-mnist"  # the folder of ~/.cache it uses when the data's folder is read-only
_float64 = lambda a: torch.as_tensor(a).detach().to("cpu", torch.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = |mu1 − mu2|² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1 Σ2)^½ between two Gaussians in float64, clamped at 0 (which it
    passes only by rounding). With R = Σ^½ symmetric, Tr (Σ1 Σ2)^½ is the sum of the singular values of R1 R2: the
    square roots of the eigenvalues of R1 Σ2 R1, symmetric and positive semi-definite, so real and non-negative
    (scipy's sqrtm of a nearly singular product returns complex values that other code silently truncates). Both
    traces come from clipped eigenvalues, so identical statistics cancel to rounding error."""
    mu1, mu2 = (_float64(m).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(_float64(s)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        shapes = ", ".join(str(tuple(t.shape)) for t in (mu1, sigma1, mu2, sigma2))
        raise ValueError(f"Fréchet distance needs means of one length d and d×d covariances (got {shapes})")
    if not all(torch.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        why = "the features contain NaN or inf (a diverged model decodes to NaN; check the checkpoint)"
        raise ValueError(f"Fréchet distance got non-finite statistics: {why}")
    root1, w1 = _psd_sqrt(sigma1)
    values = lambda a: np.linalg.eigvalsh(((a + a.T) / 2.0).numpy()).clip(0.0)  # numpy's: no eigenvectors computed
    w2, cross = values(sigma2), np.sqrt(values(root1 @ sigma2 @ root1)).sum()
    return max((mu1 - mu2).pow(2).sum().item() + w1.sum().item() + float(w2.sum()) - 2.0 * float(cross), 0.0)


def _psd_sqrt(sigma):
    """The symmetric square root of a covariance, and its eigenvalues, negative ones (rounding) set to 0."""
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2.0)
    return (v * w.clamp_min(0.0).sqrt()) @ v.T, w.clamp_min(0.0)


def feature_stats(features):
    """(mean, covariance) of (N, d) features, float64; warns when N < d (a rank-deficient covariance)."""
    f = _float64(features).reshape(len(features), -1)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples (got {n})")
    if n < d:
        why = "the covariance is rank-deficient and the distance is biased; use at least as many samples as dimensions"
        warnings.warn(f"Fréchet distance from {n} samples of {d}-dimensional features: {why}", stacklevel=2)
    centred = f - f.mean(0)
    return f.mean(0), centred.T @ centred / (n - 1)


fid_from_features = lambda real, fake: frechet_distance(*feature_stats(real), *feature_stats(fake))


def pixel_features(images):
    """images in [0, 1], (N, 1, 28, 28) -> (N, 784): the course project's "FID", kept to compare with it."""
    return images.reshape(len(images), -1).float()


class FeatureNet(nn.Module):
    """A small CNN classifier whose penultimate layer is the feature space: 64 features keep the covariance well
    estimated from a few thousand images; strided convolutions rather than pooling are cheaper on a CPU."""

    def __init__(self, n_classes=10):
        super().__init__()
        conv = lambda c_in, c_out: (nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())  # halves H and W
        layers = [*conv(1, 16), *conv(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, FEATURE_DIM), nn.ReLU()]
        self.body = nn.Sequential(*layers)  # (B, 16, 14, 14), (B, 32, 7, 7), then the (B, 64) features
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, images):
        """images in [0, 1] (real, reconstructed or generated alike) -> (B, 64)."""
        return self.body(images * 2.0 - 1.0)

    def forward(self, images):
        return self.head(self.features(images))


@torch.no_grad()
def classifier_features(net, images, batch_size=1000):
    """(N, 1, 28, 28) images in [0, 1] -> (N, 64) features, on the CPU."""
    device = next(net.parameters()).device
    return torch.cat([net.features(x.to(device).float()).cpu() for x in images.split(batch_size)])


@torch.no_grad()
def classifier_accuracy(net, split, batch_size=1000):
    return sum((net(t).argmax(1) == y).sum().item() for _, t, y in split.batches(batch_size)) / len(split)


def train_classifier(train, test, device, epochs=None, seed=0, batch_size=128, progress=False):
    """FeatureNet trained on the train split (seeded, leaving the caller's random state alone): (net in eval mode,
    test accuracy). The bar shows only on a terminal, never in a redirected log."""
    n, order_gen, epochs = len(train), torch.Generator().manual_seed(seed), epochs or CLASSIFIER_EPOCHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(int(max(train.labels.max(), test.labels.max())) + 1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = epochs * math.ceil(n / batch_size)
    bar = tqdm(total=steps, desc="training the FID classifier (once)", leave=False, disable=None if progress else True)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=order_gen).to(train.images.device).split(batch_size):
            loss = F.cross_entropy(net(train.images[idx].float() / 255.0), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    bar.close()
    return net.eval(), classifier_accuracy(net.eval(), test)


def _writable_dir(path):
    """Root passes os.access anywhere: a folder with no write bit at all (a shared data set) counts as read-only."""
    try:
        return os.path.isdir(path) and os.access(path, os.W_OK) and bool(os.stat(path).st_mode & 0o222)
    except OSError:
        return False


def classifier_cache_path(data_dir, dataset="fashion-mnist", epochs=None, seed=0):
    """Beside the data if that folder is writable, else ~/.cache/beta-vae-fashion-mnist; the name is a key of both
    splits' files, the recipe and CLASSIFIER_VERSION, so changed data or code never reads a stale network."""
    splits = [data.fingerprint(dataset, data_dir, split) for split in ("train", "test")]
    recipe = "|".join([f"v{CLASSIFIER_VERSION}", dataset, *splits, f"epochs={epochs or CLASSIFIER_EPOCHS}", f"{seed=}"])
    name = f"classifier-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.pt"
    beside = os.path.join(data_dir, "FashionMNIST")
    if dataset == "fashion-mnist" and _writable_dir(beside):
        return os.path.join(beside, name)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, PROJECT, name)


def load_classifier(data_dir, device, train=None, test=None, dataset="fashion-mnist", epochs=None, progress=False):
    """The feature network for this data, read from the cache or trained once (on train and test where the caller has
    them) and cached: (net in eval mode on `device`, {test_acc, path, from_cache}); a damaged cache is never trusted."""
    path = classifier_cache_path(data_dir, dataset, epochs)
    with contextlib.suppress(Exception):  # a damaged or foreign file: trained again
        raw = read_regular(path, 2**24)
        if checks.archive_problem(raw) is None:  # nor can it make torch.load allocate more than it holds
            saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            net = FeatureNet(saved["n_classes"])
            net.load_state_dict(saved["state_dict"])
            if saved.get("version") == CLASSIFIER_VERSION:
                return net.to(device).eval(), {"test_acc": float(saved["test_acc"]), "path": path, "from_cache": True}
    train = train if train is not None else data.load(data_dir, "train", device, dataset)
    test = test if test is not None else data.load(data_dir, "test", device, dataset)
    net, acc = train_classifier(train, test, device, epochs or CLASSIFIER_EPOCHS, progress=progress)
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    saved = {"version": CLASSIFIER_VERSION, "state_dict": state, "test_acc": acc, "n_classes": net.head.out_features}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        clean_stale_temps(os.path.dirname(path), [os.path.basename(path)])  # left by an evaluation that was killed
        torch.save(saved, buf := io.BytesIO())
        atomic_write(path, buf.getvalue())
    except OSError as e:  # no cache is slower next time, never wrong
        warnings.warn(
            f"could not cache the FID classifier at {path} ({e.strerror}); it will be trained again", stacklevel=2
        )
    return net, {"test_acc": acc, "path": path, "from_cache": False}
