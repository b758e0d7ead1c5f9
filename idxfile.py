"""Fashion-MNIST's IDX files, read and written without torch (numpy only): data.py and explore.py both read them here.

A file is trusted no further than its header: the header is checked first, then exactly the bytes it declares are
read, in bounded pieces, so a 6 GB sparse file or a gzip bomb costs no more memory than the images it claims to hold.
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
MAX_BYTES = 1 << 30  # Fashion-MNIST's largest file is 47 MB; a header declaring more is damaged or hostile
_PIECE = 1 << 20


class DataError(Exception):
    """The data is missing or damaged; the message says where to put which files."""


def _read_body(f, path, header, dims, size_on_disk):
    expected = header + math.prod(dims)  # Python ints: numpy's int64 product wraps on hostile headers
    if expected > MAX_BYTES and size_on_disk in (None, expected):
        raise DataError(f"{path} declares {expected} bytes (shape {tuple(dims)}), far more than any Fashion-MNIST "
                        "file: it is damaged; delete it so it is downloaded again")
    if size_on_disk is None:  # compressed: read what the header declares, piece by piece, then one byte more
        body = bytearray()
        while len(body) < expected - header:
            piece = f.read(min(_PIECE, expected - header - len(body)))
            if not piece:
                break
            body += piece
        if len(body) == expected - header and not f.read(1):
            return np.frombuffer(bytes(body), dtype=np.uint8).reshape(dims)
        size = f"{header + len(body)} bytes, shorter" if len(body) < expected - header else \
            f"more than {expected} bytes, longer"
    elif size_on_disk == expected and len(body := f.read(expected - header)) == expected - header:
        return np.frombuffer(body, dtype=np.uint8).reshape(dims)
    else:
        size = f"{size_on_disk} bytes, {'shorter' if size_on_disk < expected else 'longer'}"
    raise DataError(f"{path} is {size} than its header says ({expected} for shape {tuple(dims)}): the file is "
                    "damaged; delete it so it is downloaded again")


def read_idx(path, expect_ndim):
    """Read an uncompressed (or .gz) IDX file of unsigned bytes as a numpy uint8 array, checking every header field."""
    path = os.fspath(path)
    compressed = path.endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path} is {len(head)} bytes, too short for an IDX header; delete it so it is "
                                "downloaded again")
            zero, dtype, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype != IDX_UBYTE or ndim != expect_ndim:
                raise DataError(f"{path} has a bad magic number 0x{head.hex()} (expected 0x00000{IDX_UBYTE:x}0"
                                f"{expect_ndim}): it is not a Fashion-MNIST IDX file; delete it so it is downloaded "
                                "again")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path} ends inside its header; delete it so it is downloaded again")
            dims = struct.unpack(">" + "I" * ndim, raw_dims)
            return _read_body(f, path, 4 + 4 * ndim, dims, None if compressed else os.fstat(f.fileno()).st_size)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt deflate stream inside a .gz file
        raise DataError(f"cannot read {path} ({e.__class__.__name__}: {e}); delete it so it is downloaded again") \
            from None


def find_file(raw_dir, name):
    """The path of `name` or `name.gz` in raw_dir, or None."""
    for candidate in (name, name + ".gz"):
        p = os.path.join(raw_dir, candidate)
        if os.path.isfile(p):
            return p
    return None


def read_pair(img_path, lbl_path):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) from one split's two files, checked to belong together."""
    images = read_idx(img_path, 3)
    labels = read_idx(lbl_path, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path} holds {images.shape[1]}x{images.shape[2]} images, not 28x28: "
                        "it is not Fashion-MNIST")
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
