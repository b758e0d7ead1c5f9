"""The FID feature network: a small CNN classifier trained once on the data's training split, cached beside the data
(or in ~/.cache) under a key of the data's files and its own recipe, and read back only through the checked loader.
Its penultimate layer gives evaluate.py's classifier FID features (Inception features suit 28x28 clothing poorly).
"""
import hashlib
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
from plumbing.files import clean_stale_temps

PROJECT = "beta-vae-fashion-mnist"
CLASSIFIER_VERSION = 1  # bump whenever FeatureNet or its training changes: old cache files are then never read
CLASSIFIER_EPOCHS = 5
CLASSIFIER_SEED = 0
FEATURE_DIM = 64


class FeatureNet(nn.Module):
    """A small Fashion-MNIST CNN whose penultimate layer is the FID feature space.

    Inception features mean little on 28×28 grayscale clothing; a classifier trained on the domain itself is the
    usual substitute for MNIST-like data. 64 features keep the covariance well estimated from a few thousand images.
    """

    def __init__(self):
        super().__init__()
        # Strided convolutions rather than pooling: 4x cheaper on a CPU for about half a point of accuracy.
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),   # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # (B, 32, 7, 7)
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, FEATURE_DIM), nn.ReLU(),         # (B, 64): the features
        )
        self.head = nn.Linear(FEATURE_DIM, len(data.CLASSES))

    def features(self, images):
        """images in [0, 1] (real, reconstructed or generated alike) -> (B, 64)."""
        return self.body(images * 2.0 - 1.0)

    def forward(self, images):
        return self.head(self.features(images))


@torch.no_grad()
def classifier_features(net, images, batch_size=1000):
    """(N, 1, 28, 28) images in [0, 1] -> (N, 64) penultimate-layer features."""
    device = next(net.parameters()).device
    return torch.cat([net.features(images[i:i + batch_size].to(device).float()).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_accuracy(net, split, batch_size=1000):
    correct = 0
    for _, target, labels in split.batches(batch_size):
        correct += (net(target).argmax(1) == labels).sum().item()
    return correct / len(split)


def train_classifier(train, test, device, epochs=CLASSIFIER_EPOCHS, max_train=None, seed=CLASSIFIER_SEED,
                     batch_size=128, progress=False):
    """Train FeatureNet on (the first max_train images of) the train split. Returns (net in eval mode, test acc)."""
    n = len(train) if max_train is None else min(len(train), int(max_train))
    images, labels = train.images[:n], train.labels[:n]
    order_gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeds the weight init without touching the caller's random state
        torch.manual_seed(seed)
        net = FeatureNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = epochs * math.ceil(n / batch_size)
    bar = tqdm(total=steps, desc="training the FID classifier (once)", leave=False,
               disable=None if progress else True)  # None: a bar only on a terminal, never in a redirected log
    net.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_gen).to(images.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(net(images[idx].float() / 255.0), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    bar.close()
    net.eval()
    return net, classifier_accuracy(net, test)


def _writable_dir(path):
    # Root passes os.access everywhere, so a folder with no write bit at all (a shared, read-only data set) is
    # treated as read-only too: a cache is no reason to write into it.
    try:
        return os.path.isdir(path) and os.access(path, os.W_OK) and bool(os.stat(path).st_mode & 0o222)
    except OSError:
        return False


def classifier_cache_path(data_dir, epochs=CLASSIFIER_EPOCHS, max_train=None, seed=CLASSIFIER_SEED):
    """Where the trained classifier is cached: beside the data if that folder is writable, else ~/.cache/<project>.

    The key covers both splits' files (the test split gives the reported accuracy), the training settings and
    CLASSIFIER_VERSION, so changed data or code never reads a stale network.
    """
    splits = [data.fingerprint(data_dir, split) for split in ("train", "test")]
    recipe = "|".join([f"v{CLASSIFIER_VERSION}", *splits, f"{epochs=}", f"{max_train=}", f"{seed=}"])
    name = f"classifier-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.pt"
    beside = os.path.join(data_dir, "FashionMNIST")
    if _writable_dir(beside):
        return os.path.join(beside, name)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, PROJECT, name)


def load_classifier(data_dir, device, train=None, test=None, epochs=CLASSIFIER_EPOCHS, max_train=None,
                    seed=CLASSIFIER_SEED, progress=False):
    """The FID feature network for this data: read from the cache, else trained once and cached.

    train/test are the loaded splits when the caller has them (they are loaded here otherwise, only if training is
    needed). Returns (net in eval mode on device, info dict with test_acc, path, from_cache).
    """
    path = classifier_cache_path(data_dir, epochs, max_train, seed)
    if os.path.isfile(path):
        try:
            checkpoint.check_archive(path)  # nor make torch.load allocate gigabytes
            saved = torch.load(path, map_location="cpu", weights_only=True)  # a cache file can never run code
            if saved.get("version") == CLASSIFIER_VERSION:
                net = FeatureNet()
                net.load_state_dict(saved["state_dict"])
                return net.to(device).eval(), {"test_acc": float(saved["test_acc"]), "path": path, "from_cache": True}
        except Exception:  # a damaged or foreign cache file is rebuilt, never trusted
            pass
    train = train if train is not None else data.load(data_dir, "train", device)
    test = test if test is not None else data.load(data_dir, "test", device)
    net, acc = train_classifier(train, test, device, epochs=epochs, max_train=max_train, seed=seed, progress=progress)
    saved = {"version": CLASSIFIER_VERSION, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
             "test_acc": acc, "epochs": epochs, "max_train": -1 if max_train is None else int(max_train), "seed": seed}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        clean_stale_temps(os.path.dirname(path), [os.path.basename(path)])  # left by an evaluation that was killed
        checkpoint.save_torch(path, saved)
    except OSError as e:  # no cache is slower next time, never wrong
        warnings.warn(f"could not cache the FID classifier at {path} ({e.strerror}); it will be trained again")
    return net, {"test_acc": acc, "path": path, "from_cache": False}
