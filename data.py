"""The data sets, held as uint8 tensors on the training device and batched from shuffled indices there. fashion-mnist:
<data-dir>/FashionMNIST/raw (torchvision's layout), read by a strict IDX reader; missing files are downloaded, none
replaced. sprites: a dSprites-like set (Matthey et al. 2017) drawn here at 28x28, with five known factors for the
disentanglement metrics. Reading needs numpy only (explore.py is torch-free); torch comes in where tensors are made.
"""

import contextlib
import functools
import gzip
import io
import math
import os
import struct
import zlib

import numpy as np

from plumbing.files import NotReadable, open_regular

DATASETS = ("fashion-mnist", "sprites")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MAX_ITEMS = 200_000  # Fashion-MNIST has 60,000 + 10,000; more is not this data set
REDO, NOT_IDX = "delete it so it is downloaded again (or replace it)", "it is not a Fashion-MNIST IDX file"
WRITABLE = "pass a writable --data-dir, or one that already holds FashionMNIST/raw"


class DataError(Exception):
    """The data is missing or damaged; the message says where to put which files."""


def raw_dir(data_dir):
    return os.path.join(data_dir, "FashionMNIST", "raw")


def find(data_dir, name):
    """The path of `name` (or `name`.gz) in the data folder's FashionMNIST/raw, or None."""
    paths = [os.path.join(raw_dir(data_dir), n) for n in (name, name + ".gz")]
    return next((p for p in paths if os.path.isfile(p)), None)


def read_idx(path, ndim):
    """An IDX file of 28x28 images (ndim 3) or labels (ndim 1), plain or .gz, as a uint8 array: the header is checked
    first, then exactly what it declares is read (a gzip bomb stops at the declared size)."""
    damaged = lambda what: DataError(f"{path} {what}; {REDO}")

    def exactly(f, n):
        data = f.read(n)
        if len(data) < n:
            raise damaged(f"ends after {len(data)} of the {n} bytes its header declares: it is truncated")
        return data

    try:
        with open_regular(path) as raw, gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw as f:
            head = f.read(4)
            if len(head) < 4:
                raise damaged(f"is {len(head)} bytes, too short for an IDX header")
            if struct.unpack(">HBB", head) != (0, 8, ndim):
                raise damaged(f"has a bad magic number 0x{head.hex()} (expected 0x0000080{ndim}): {NOT_IDX}")
            dims = struct.unpack(">" + "I" * ndim, exactly(f, 4 * ndim))
            if dims[1:] != {3: (28, 28), 1: ()}[ndim]:
                raise damaged(f"holds items of shape {dims[1:]}, not {dims[1:] and (28, 28)}: it is not Fashion-MNIST")
            if dims[0] > MAX_ITEMS:
                raise damaged(f"declares {dims[0]:,} items, more than any Fashion-MNIST file ({MAX_ITEMS:,} at most)")
            size, head_size = math.prod(dims), 4 + 4 * ndim
            if f is raw and (actual := os.fstat(raw.fileno()).st_size - head_size) != size:  # before the body
                what = f"{actual + head_size} bytes, {'shorter' if actual < size else 'longer'} than its header says"
                raise damaged(f"is {what} ({size + head_size} for shape {dims}): the file is damaged")
            body = exactly(f, size)
            if f is not raw and f.read(1):
                raise damaged(f"holds more than the {size} bytes its header declares (shape {dims})")
    except NotReadable as e:
        raise DataError(f"{path} {e}: replace it with the Fashion-MNIST file of that name") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a bad deflate stream, zlib.error
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); {REDO}") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_split(data_dir, split):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of a Fashion-MNIST split whose files are present."""
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = find(data_dir, img_name), find(data_dir, lbl_name)
    if img_path is None or lbl_path is None:
        put = f"put {img_name} and {lbl_name} (or their .gz) there"
        raise DataError(f"Fashion-MNIST {split} files are not in {raw_dir(data_dir)}: {put}")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if len(images) != len(labels):
        counts = f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels"
        raise DataError(f"{counts}: the two files do not belong together; replace both")
    if len(images) == 0:
        raise DataError(f"{img_path} holds no images; replace it")
    if labels.max() >= len(CLASSES):
        raise DataError(f"{lbl_path} has label {int(labels.max())}, but Fashion-MNIST has 10 classes; replace it")
    return images, labels


def write_idx(path, array):
    """Write a uint8 array as an IDX file (the tests and bench.py make small data sets with it)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def missing_files(data_dir, splits=("train", "test")):
    return [name for split in splits for name in FILES[split] if find(data_dir, name) is None]


def missing_uncompressed(data_dir):
    """The files not present uncompressed (torchvision's own reader, the seed loop's, needs them)."""
    return [n for s in FILES for n in FILES[s] if not os.path.isfile(os.path.join(raw_dir(data_dir), n))]


def ensure_files(data_dir, splits=("train", "test"), download=True):
    """Make sure every Fashion-MNIST file of `splits` is present, downloading the missing ones (only those). On
    failure, one DataError naming every missing file and why the download failed; no new folder left behind."""
    if not (missing := missing_files(data_dir, splits)):
        return
    folder = raw_dir(data_dir)
    if not download:
        raise DataError(f"Fashion-MNIST files are missing from {folder}: put {', '.join(missing)} (or their .gz) there")
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    created, path = [], os.path.abspath(folder)
    while not os.path.exists(path):  # the folders this makes, deepest first
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {data_dir} ({e.strerror}): {WRITABLE}") from None
    if not os.access(folder, os.W_OK):
        why = f"the data directory {data_dir} is not writable, so Fashion-MNIST cannot be downloaded there"
        raise DataError(f"{why}: {WRITABLE}")
    md5, reason = {os.path.splitext(f)[0]: (f, h) for f, h in FashionMNIST.resources}, None
    for name in missing:
        archive, checksum = md5[name]
        for mirror in FashionMNIST.mirrors:
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    download_and_extract_archive(mirror + archive, folder, filename=archive, md5=checksum)
                break
            except Exception as e:  # urllib and torchvision raise many kinds; each means "not downloaded"
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]
        else:
            break  # one file failed on every mirror: the network is the problem, do not try the rest
    if still := missing_files(data_dir, splits):
        for d in created:  # files that did arrive stay, for the next attempt
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise DataError(
            f"Fashion-MNIST could not be downloaded ({reason}): put {', '.join(still)} (or their .gz) in "
            f"{folder}, or pass --data-dir to a folder that holds FashionMNIST/raw"
        )


# ---------------------------------------------------------------------------------------------------- sprites

SPRITE_FACTORS = ("shape", "scale", "orientation", "x", "y")
SHAPES = ("square", "ellipse", "heart")  # corners on the unit circle; semi-axes 1 and 0.5; pointing down
SCALES = np.linspace(3.55, 5.8, 5)  # radius (pixels) of the disc around the sprite: < 6 leaves a dark border
# A square repeats after 90 degrees and an ellipse after 180: one quarter turn for every shape keeps every image
# distinct and the factor grid rectangular.
ORIENTATIONS = np.arange(8) * 90.0 / 8
PATCH, SUB = 14, 4  # each sprite is drawn in a 14x14 patch as the mean of 4x4 samples a pixel, then shifted
LEVELS = (len(SHAPES), len(SCALES), len(ORIENTATIONS), 28 - PATCH + 1, 28 - PATCH + 1)
SPRITES_TEST_EVERY = 3  # a fixed third of the set is the test split


@functools.lru_cache(maxsize=1)
def make_sprites():
    """(images uint8 (N, 28, 28), factors int64 (N, 5)): every combination of the factors once, in C order. The
    scales keep every sample off a shape's edge, so rounding cannot flip a pixel between machines."""
    c = (np.arange(PATCH * SUB) + 0.5) / SUB - PATCH / 2
    x, y, t = c[None, :], -c[:, None], np.deg2rad(ORIENTATIONS)[:, None, None]
    r = SCALES[:, None, None, None]
    u, v = (x * np.cos(t) + y * np.sin(t)) / r, (y * np.cos(t) - x * np.sin(t)) / r  # rotated, radius 1
    hx, hy = 1.25 * u, 1.25 * v + 0.25
    square, ellipse = np.maximum(abs(u), abs(v)) <= 2**-0.5, u**2 + (2 * v) ** 2 <= 1
    inside = np.stack([square, ellipse, (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0])
    patches = np.round(inside.reshape(LEVELS[:3] + (PATCH, SUB, PATCH, SUB)).mean((4, 6)) * 255).astype(np.uint8)
    images = np.zeros(LEVELS + (28, 28), np.uint8)
    for i in range(LEVELS[3]):
        for j in range(LEVELS[4]):
            images[:, :, :, i, j, j : j + PATCH, i : i + PATCH] = patches
    factors = np.indices(LEVELS).reshape(len(LEVELS), -1).T.astype(np.int64)
    return images.reshape(-1, 28, 28), factors


def sprite_split(split):
    """(images, factors) of the train or test split: a fixed, seeded permutation, a third of it held out."""
    images, factors = make_sprites()
    order = np.random.RandomState(0).permutation(len(images))  # RandomState's stream is frozen (NEP 19)
    held_out = np.zeros(len(images), bool)
    held_out[order[: len(images) // SPRITES_TEST_EVERY]] = True
    pick = held_out if split == "test" else ~held_out
    return images[pick], factors[pick]


def read(dataset, data_dir, split):
    """(images uint8 (N, 28, 28), labels (N,), factors (N, K) or None) of a split, torch-free; sprites: shape labels."""
    if dataset == "sprites":
        images, factors = sprite_split(split)
        return images, factors[:, 0], factors
    return (*read_split(data_dir, split), None)


def describe(dataset, n_train, n_test):
    """What a run trained on, in words, for titles and reports."""
    full = (n_train, n_test) == (60_000, 10_000)
    name = "sprites" if dataset == "sprites" else f"Fashion-MNIST{'' if full else ' subset'}"
    return f"{name} ({n_train:,} train / {n_test:,} test images)"


# ------------------------------------------------------------------------------------------------- on a device


class DeviceData:
    """One split on a device as uint8 (N, 1, 28, 28), with its labels (and factors): no transforms, no workers."""

    def __init__(self, images, labels, device, factors=None):
        import torch

        def tensor(a, dtype):  # numpy arrays are copied: frombuffer's are read-only
            return a.to(dtype) if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a)).to(dtype)

        self.images = tensor(images, torch.uint8).reshape(-1, 1, 28, 28).to(device)
        self.labels = tensor(labels, torch.int64).to(device)
        self.factors = None if factors is None else np.asarray(factors)
        self.device = torch.device(device)

    def __len__(self):
        return len(self.images)

    @staticmethod
    def scale(batch_u8):
        """uint8 -> (encoder input in [-1, 1], as the seed's Normalize(0.5, 0.5), BCE target in [0, 1])."""
        target = batch_u8.float().mul_(1.0 / 255.0)
        return target * 2.0 - 1.0, target

    def batches(self, batch_size, shuffle=False, generator=None):
        """Yield (x in [-1, 1], target in [0, 1], labels); shuffled by index on the device; the last may be short."""
        import torch

        n = len(self.images)
        order = torch.randperm(n, device=self.device, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if shuffle:
                idx = order[start : start + batch_size]
                u8, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)  # faster than [idx]
            else:
                u8, y = self.images[start : start + batch_size], self.labels[start : start + batch_size]
            yield *self.scale(u8), y


def load(data_dir, split, device, dataset="fashion-mnist", download=True):
    """A split on `device` (Fashion-MNIST's files downloaded first if missing and allowed)."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    if dataset == "fashion-mnist":
        ensure_files(data_dir, (split,), download)
    images, labels, factors = read(dataset, data_dir, split)
    return DeviceData(images, labels, device, factors)


def fingerprint(dataset, data_dir, split="train"):
    """A key that changes when a split's data changes (sizes and mtimes), for caches built from it."""
    if dataset == "sprites":
        return f"sprites:{LEVELS}:{SPRITES_TEST_EVERY}"
    stamp = lambda p: f"{os.path.basename(p)}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}"
    return "|".join(f"{name}:missing" if (p := find(data_dir, name)) is None else stamp(p) for name in FILES[split])
