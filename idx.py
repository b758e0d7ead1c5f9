"""Fashion-MNIST's files (torch-free: numpy only): names, classes, and a strict, bounded IDX reader and writer.

The reader checks the header before it reads anything else and then reads exactly what the header declares, so a
damaged or hostile file costs no more memory than a real one: a 6 GB file with a bad magic number is refused after
4 bytes, and a gzip bomb stops decompressing at the declared size.
"""
import gzip
import math
import os
import struct
import zlib

import numpy as np

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08
MAX_ITEMS = 200_000   # Fashion-MNIST has 60,000 + 10,000; more is not this data set (and would be 157 MB of images)
ITEM_SHAPE = {3: (28, 28), 1: ()}   # images, labels


class DataError(Exception):
    """The data is missing or damaged; the message says where to put which files."""


def raw_dir(data_dir):
    return os.path.join(data_dir, "FashionMNIST", "raw")


def find(data_dir, name):
    """The path of `name` (or `name`.gz) in the data folder's FashionMNIST/raw, or None."""
    for candidate in (name, name + ".gz"):
        p = os.path.join(raw_dir(data_dir), candidate)
        if os.path.isfile(p):
            return p
    return None


def _damaged(path, what):
    return DataError(f"{path} {what}; delete it so it is downloaded again (or replace it)")


def _read_exactly(f, n, path):
    data = f.read(n)
    if len(data) < n:
        raise _damaged(path, f"ends after {len(data)} of the {n} bytes its header declares: it is truncated")
    return data


def read_idx(path, expect_ndim):
    """An IDX file of unsigned bytes (plain or .gz) as a numpy uint8 array, every header field checked first.
    Images must be 28x28 and hold at most MAX_ITEMS items."""
    gz = path.endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise _damaged(path, f"is {len(head)} bytes, too short for an IDX header")
            zero, dtype, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype != IDX_UBYTE or ndim != expect_ndim:
                raise _damaged(path, f"has a bad magic number 0x{head.hex()} (expected 0x00000{IDX_UBYTE:x}"
                                     f"0{expect_ndim}): it is not a Fashion-MNIST IDX file")
            dims = struct.unpack(">" + "I" * ndim, _read_exactly(f, 4 * ndim, path))
            if dims[1:] != ITEM_SHAPE[ndim]:
                raise _damaged(path, f"holds items of shape {dims[1:]}, not {ITEM_SHAPE[ndim]}: it is not Fashion-MNIST")
            if dims[0] > MAX_ITEMS:
                raise _damaged(path, f"declares {dims[0]:,} items, more than any Fashion-MNIST file "
                                     f"({MAX_ITEMS:,} at most)")
            size = math.prod(dims)
            if not gz:  # the file's size is known: compare before reading a byte of the body
                actual = os.fstat(f.fileno()).st_size - 4 - 4 * ndim
                if actual != size:
                    what = "shorter" if actual < size else "longer"
                    raise _damaged(path, f"is {actual + 4 + 4 * ndim} bytes, {what} than its header says "
                                         f"({size + 4 + 4 * ndim} for shape {dims}): the file is damaged")
            body = _read_exactly(f, size, path)
            if gz and f.read(1):
                raise _damaged(path, f"holds more than the {size} bytes its header declares (shape {dims})")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a bad deflate stream, zlib.error
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); delete it so it is downloaded again "
                        "(or replace it)") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_split(data_dir, split):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of a split whose files are present, checked to belong together."""
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = find(data_dir, img_name), find(data_dir, lbl_name)
    if img_path is None or lbl_path is None:
        raise DataError(f"Fashion-MNIST {split} files are not in {raw_dir(data_dir)}: put {img_name} and "
                        f"{lbl_name} (or their .gz) there")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels: "
                        "the two files do not belong together; replace both")
    if len(images) == 0:
        raise DataError(f"{img_path} holds no images; replace it")
    if labels.max() >= len(CLASSES):
        raise DataError(f"{lbl_path} has label {int(labels.max())}, but Fashion-MNIST has 10 classes; replace it")
    return images, labels


def write_idx(path, array):
    """Write a uint8 array as an IDX file (used by the tests and bench to make small data sets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, IDX_UBYTE, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def write_sized(data_dir, folder, sizes):
    """A data folder with splits of the sizes asked for ({split: n}), for measuring at a data set's full size: a split
    of that size already is the data's own (symlinked), any other is the data's images repeated (or cut) to n.
    Returns {split: distinct images}."""
    raw = raw_dir(folder)
    os.makedirs(raw)
    distinct = {}
    for split, n in sizes.items():
        images, labels = read_split(data_dir, split)
        distinct[split] = min(n, len(images))
        if n == len(images):
            for name in FILES[split]:
                src = find(data_dir, name)
                os.symlink(os.path.abspath(src), os.path.join(raw, os.path.basename(src)))
            continue
        reps = math.ceil(n / len(images))
        write_idx(os.path.join(raw, FILES[split][0]), np.tile(images, (reps, 1, 1))[:n])
        write_idx(os.path.join(raw, FILES[split][1]), np.tile(labels, reps)[:n])
    return distinct
