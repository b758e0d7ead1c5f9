"""Fashion-MNIST held as uint8 tensors on the training device, batched from shuffled indices there.

Files are read from <data-dir>/FashionMNIST/raw (torchvision's layout). When they are missing, torchvision downloads
and verifies them (md5). Every file is read by a strict IDX reader, so a damaged file gives a message, not garbage.
"""
import os

import numpy as np
import torch

# The IDX reading is torch-free so that explore.py can read the test split too; these names stay importable here.
from idxfile import CLASSES, FILES, IDX_UBYTE, DataError, read_idx, read_pair, write_idx  # noqa: F401
from idxfile import find_file as _find


def _download(data_dir, split):
    """torchvision downloads, verifies md5 and unpacks into <data_dir>/FashionMNIST/raw."""
    from torchvision.datasets import FashionMNIST
    raw_dir = os.path.join(data_dir, "FashionMNIST", "raw")
    created = [d for d in (raw_dir, os.path.dirname(raw_dir), data_dir) if not os.path.exists(d)]
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {data_dir} ({e.strerror}): "
                        "pass a writable --data-dir, or one that already holds FashionMNIST/raw")
    if not os.access(data_dir, os.W_OK):
        raise DataError(f"the data directory {data_dir} is not writable, so Fashion-MNIST cannot be downloaded there: "
                        "pass a writable --data-dir, or one that already holds FashionMNIST/raw")
    try:
        FashionMNIST(data_dir, train=(split == "train"), download=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120].rstrip(":")
        for d in created:   # leave no empty folders behind (a partial download stays, for the next attempt)
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise DataError(f"Fashion-MNIST is not in {raw_dir} and could not be downloaded ({reason}): put "
                        f"{' and '.join(FILES[split])} (optionally .gz) there, or pass --data-dir to a folder holding "
                        "FashionMNIST/raw") from None


def load_split(data_dir, split, download=True):
    """(images uint8 (N, 28, 28), labels int64 (N,)) as torch tensors on the CPU."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    raw_dir = os.path.join(data_dir, "FashionMNIST", "raw")
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = _find(raw_dir, img_name), _find(raw_dir, lbl_name)
    if img_path is None or lbl_path is None:
        if not download:
            raise DataError(f"Fashion-MNIST {split} files are not in {raw_dir}: put {img_name} and {lbl_name} there")
        _download(data_dir, split)
        img_path, lbl_path = _find(raw_dir, img_name), _find(raw_dir, lbl_name)
        if img_path is None or lbl_path is None:
            raise DataError(f"download finished but {img_name}/{lbl_name} are not in {raw_dir}; put them there by hand")
    images, labels = read_pair(img_path, lbl_path)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fingerprint(data_dir, split="train"):
    """A short key that changes when the split's files change (size and mtime), for caches built from the data."""
    raw_dir = os.path.join(data_dir, "FashionMNIST", "raw")
    parts = []
    for name in FILES[split]:
        p = _find(raw_dir, name)
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
    def scale(batch_u8):
        """uint8 -> (encoder input in [-1, 1] as the seed's Normalize(0.5, 0.5), BCE target in [0, 1])."""
        target = batch_u8.float().mul_(1.0 / 255.0)
        return target * 2.0 - 1.0, target

    def batches(self, batch_size, shuffle=False, generator=None, skip=0):
        """Yield (x in [-1, 1], target in [0, 1], labels). Shuffles indices on the device; the last batch may be short."""
        n = len(self.images)
        if shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        for start in range(skip * batch_size, n, batch_size):
            if shuffle:
                idx = order[start:start + batch_size]
                u8, y = self.images[idx], self.labels[idx]
            else:
                u8, y = self.images[start:start + batch_size], self.labels[start:start + batch_size]
            x, target = self.scale(u8)
            yield x, target, y


def load(data_dir, split, device, download=True):
    images, labels = load_split(data_dir, split, download=download)
    return DeviceData(images, labels, device)

