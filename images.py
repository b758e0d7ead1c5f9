"""Torch-free helpers: image grids, PNG files, atomic writes and the scripts' argument parser (numpy, Pillow).

sample.py imports this module, so it must never import torch, directly or through another project module.
"""
import argparse
import os
import sys
import tempfile

import numpy as np


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other bad input: one line, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write_fn):
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tile(images, nrow, pad=2, pad_value=1.0):
    """(N, H, W) or (N, 1, H, W) floats in [0, 1] -> one 2-D array, nrow images per row, rows filled left to right."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images[:, 0]
    n, h, w = images.shape
    ncol = max(1, int(nrow))
    nrows = -(-n // ncol)
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return out


def to_uint8(array):
    return (np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(array, path, scale=1):
    """Write a 2-D array in [0, 1] as an 8-bit grayscale PNG, enlarged `scale` times (nearest neighbour), atomically."""
    from PIL import Image
    img = Image.fromarray(to_uint8(array))  # 2-D uint8 -> mode "L"
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
