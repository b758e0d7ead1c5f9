"""Fashion-MNIST held as uint8 tensors on the training device, batched from shuffled indices there.

Files are read from <data-dir>/FashionMNIST/raw (torchvision's layout) by idx.py's strict reader, so a damaged file
gives a message, not garbage. Missing files are downloaded with torchvision's download helpers (md5-verified), only
those that are missing: files already there are never replaced.
"""
import contextlib
import io
import os

import torch

from idx import CLASSES, FILES, DataError, find, raw_dir, read_split, write_idx  # noqa: F401 (re-exported)


def missing_files(data_dir, splits=("train", "test")):
    """The Fashion-MNIST files (plain or .gz) of `splits` that are not in the data folder."""
    return [name for split in splits for name in FILES[split] if find(data_dir, name) is None]


def missing_uncompressed(data_dir):
    """The files of both splits not present uncompressed (torchvision's own reader, the seed loop's, needs them)."""
    return [n for split in FILES for n in FILES[split] if not os.path.isfile(os.path.join(raw_dir(data_dir), n))]


def _new_folders(path):
    """The folders that creating `path` would create, deepest first."""
    made = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return made


def ensure_files(data_dir, splits=("train", "test"), download=True):
    """Make sure every file of `splits` is present, downloading the missing ones (and only those) if allowed.
    On failure: one DataError naming every missing file and why the download failed; no folder left behind."""
    missing = missing_files(data_dir, splits)
    if not missing:
        return
    folder = raw_dir(data_dir)
    names = ", ".join(missing)
    if not download:
        raise DataError(f"Fashion-MNIST files are missing from {folder}: put {names} (or their .gz) there")
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_and_extract_archive
    created = _new_folders(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {data_dir} ({e.strerror}): pass a writable --data-dir, "
                        "or one that already holds FashionMNIST/raw") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"the data directory {data_dir} is not writable, so Fashion-MNIST cannot be downloaded "
                        "there: pass a writable --data-dir, or one that already holds FashionMNIST/raw")
    md5 = {os.path.splitext(f)[0]: (f, h) for f, h in FashionMNIST.resources}
    reason = None
    for name in missing:
        archive, checksum = md5[name]
        for mirror in FashionMNIST.mirrors:
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    download_and_extract_archive(mirror + archive, download_root=folder, filename=archive,
                                                 md5=checksum)
                break
            except Exception as e:  # urllib and torchvision raise many kinds; every one means "not downloaded"
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]
        else:
            break   # one file failed on every mirror: the network is the problem, do not try the rest
    still = missing_files(data_dir, splits)
    if still:
        for d in created:   # leave no empty folders behind (files that did arrive stay, for the next attempt)
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise DataError(f"Fashion-MNIST could not be downloaded ({reason}): put {', '.join(still)} (or their .gz) "
                        f"in {folder}, or pass --data-dir to a folder that holds FashionMNIST/raw")


def load_split(data_dir, split, download=True):
    """(images uint8 (N, 28, 28), labels int64 (N,)) as torch tensors on the CPU."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    ensure_files(data_dir, (split,), download)
    images, labels = read_split(data_dir, split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


def fingerprint(data_dir, split="train"):
    """A short key that changes when the split's files change (size and mtime), for caches built from the data."""
    parts = []
    for name in FILES[split]:
        p = find(data_dir, name)
        if p is None:
            parts.append(f"{name}:missing")
        else:
            st = os.stat(p)
            parts.append(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class DeviceData:
    """One split resident on a device as uint8 (N, 1, 28, 28). No transforms, no workers, no per-batch copies."""

    def __init__(self, images_u8, labels, device):
        self.images = images_u8.reshape(-1, 1, 28, 28).to(device)
        self.labels = labels.to(device)
        self.device = torch.device(device)

    def __len__(self):
        return len(self.images)

    @staticmethod
    def scale(batch_u8, batch_innermost=False):
        """uint8 -> (encoder input in [-1, 1] as the seed's Normalize(0.5, 0.5), BCE target in [0, 1]).
        batch_innermost: the same values, each a (B, 1, 28, 28) view of a (pixels, B) tensor; the transposing copy is
        made once, on the uint8 batch's way to float (about half the time of scale() and then two float transposes)."""
        if batch_innermost:
            B = batch_u8.shape[0]
            pixels = torch.empty(batch_u8[0].numel(), B, dtype=torch.float32, device=batch_u8.device)
            pixels.copy_(batch_u8.reshape(B, -1).t())
        else:
            pixels = batch_u8.float()
        target = pixels.mul_(1.0 / 255.0)
        x = target * 2.0 - 1.0
        if batch_innermost:
            return x.t().view(batch_u8.shape), target.t().view(batch_u8.shape)
        return x, target

    def batches(self, batch_size, shuffle=False, generator=None, batch_innermost=False):
        """Yield (x in [-1, 1], target in [0, 1], labels). Shuffles indices on the device; the last batch may be short.
        batch_innermost: x and target are (B, 1, 28, 28) views of (pixels, B) tensors, the layout the compiled CPU
        step works in (chwn_forward.Plan.inputs then needs no copy); the same values."""
        n = len(self.images)
        if shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        for start in range(0, n, batch_size):
            if shuffle:
                idx = order[start:start + batch_size]
                u8, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)   # 6x faster than [idx]
            else:
                u8, y = self.images[start:start + batch_size], self.labels[start:start + batch_size]
            x, target = self.scale(u8, batch_innermost)
            yield x, target, y


def load(data_dir, split, device, download=True):
    images, labels = load_split(data_dir, split, download=download)
    return DeviceData(images, labels, device)

