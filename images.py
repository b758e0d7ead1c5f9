"""Image grids and PNG files (torch-free: numpy and Pillow), labelled so a reader knows what each row shows.

sample.py imports this module, so it must never import torch or matplotlib, directly or through another module.
"""
import importlib.util
import io
import os

import numpy as np

from plumbing.files import atomic_write

# Pillow's built-in font has no Greek or math signs; matplotlib ships DejaVu Sans, found here without importing it.
_ASCII = str.maketrans({"β": "beta", "−": "-", "—": "-", "–": "-", "…": "...", "·": "*", "σ": "sigma", "μ": "mu",
                        "≈": "~", "×": "x"})


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
    save_image(img, path)


def save_image(img, path):
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def png_bytes(img):
    """A PIL image as the bytes of a PNG file (for fileio.atomic_write_all)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _font(size):
    from PIL import ImageFont
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.isfile(path):
            return ImageFont.truetype(path, size), lambda s: s
    return ImageFont.load_default(size=size), lambda s: s.translate(_ASCII)


def labelled_grid(rows, row_labels=None, title=None, col_labels=None, scale=3, pad=2, font_size=13):
    """A PIL image: a title, optional column labels, then one strip of images per row with its label on the left.

    rows: a list of arrays (n_i, H, W) or (n_i, 1, H, W) in [0, 1]. Labels are plain text (title may hold newlines).
    """
    from PIL import Image, ImageDraw
    font, text = _font(font_size)
    strips = [Image.fromarray(to_uint8(tile(r, len(r), pad=pad))) for r in rows]
    strips = [s.resize((s.width * scale, s.height * scale), Image.NEAREST) for s in strips]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))

    def size(s):
        if not s:
            return 0, 0
        box = probe.multiline_textbbox((0, 0), text(s), font=font, spacing=3)
        return box[2] - box[0], box[3] - box[1]

    row_labels = list(row_labels or [""] * len(strips))
    label_w = max([size(s)[0] for s in row_labels] + [0]) + (10 if any(row_labels) else 0)
    width = max([label_w + s.width for s in strips] + [size(title)[0] + 16])
    title_h = size(title)[1] + 14 if title else 0
    col_h = font_size + 8 if col_labels else 0
    height = title_h + col_h + sum(s.height for s in strips) + 6
    img = Image.new("L", (width + 8, height), 255)
    draw = ImageDraw.Draw(img)
    if title:
        draw.multiline_text((8, 6), text(title), font=font, fill=0, spacing=3)
    if col_labels:
        cell = (strips[0].width / max(1, len(rows[0]))) if strips else 0
        for i, label in enumerate(col_labels):
            w = size(label)[0]
            draw.text((label_w + i * cell + (cell - w) / 2, title_h), text(label), font=font, fill=90)
    y = title_h + col_h
    for strip, label in zip(strips, row_labels):
        img.paste(strip, (label_w, y))
        if label:
            h = size(label)[1]
            draw.text((label_w - size(label)[0] - 6, y + (strip.height - h) / 2 - 2), text(label), font=font, fill=0)
        y += strip.height
    return img
