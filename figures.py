"""Every figure the project draws, as PNG: labelled grey image grids (Pillow) and plots (matplotlib's Agg backend).
Torch-free (numpy arrays in, PNG bytes out): sample.py imports it, so matplotlib is imported only where a plot is
drawn. Each figure's title says what it shows and of which model and data."""

import importlib.util
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from plumbing.files import atomic_write

TRAVERSAL = np.linspace(-3.0, 3.0, 11)  # prior standard deviations a traversal sweeps
# Pillow's built-in font has no Greek or math signs; matplotlib ships DejaVu Sans, found here without importing it
_WORDS = {"β": "beta", "γ": "gamma", "α": "alpha", "σ": "sigma", "μ": "mu", "…": "...", "←": "<-"}
_ASCII = str.maketrans(_WORDS | dict(zip("−—–·≈×", "---*~x")))
_sd = lambda v: np.std(v, ddof=1) if len(v) > 1 else 0.0  # the error bars' s.d. over seeds; one seed: none


def tile(images, ncol, pad=2, pad_value=1.0):
    """(N, H, W) or (N, 1, H, W) floats in [0, 1] -> one 2-D array, ncol images a row."""
    images = np.asarray(images, dtype=np.float32).reshape(len(images), *np.shape(images)[-2:])
    (n, h, w), ncol = images.shape, max(1, ncol)
    out = np.full((-(-n // ncol) * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return out


def to_uint8(array):
    return (np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(img):
    """A PIL image, or a matplotlib figure (then closed), as the bytes of a PNG file."""
    buf = io.BytesIO()
    if hasattr(img, "savefig"):  # a figure drawn here, so on the Agg backend already
        img.savefig(buf, format="png", dpi=110)
        _plt().close(img)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(array, path, scale=1):
    """A 2-D array in [0, 1] as an 8-bit grey PNG, enlarged `scale` times (nearest neighbour), written atomically."""
    img = Image.fromarray(to_uint8(array))
    atomic_write(path, png_bytes(img.resize((img.width * scale, img.height * scale), Image.NEAREST)))


def _font(size):
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.isfile(path):
            return ImageFont.truetype(path, size), lambda s: s
    return ImageFont.load_default(size=size), lambda s: s.translate(_ASCII)


def labelled_grid(rows, row_labels=None, title=None, col_labels=None, scale=3, pad=2, font_size=13):
    """A grey PIL image: a title, optional column labels, then a strip of images per row, its label on the left.
    rows: arrays (n_i, H, W) or (n_i, 1, H, W) in [0, 1]; labels are plain text (the title may hold newlines)."""
    font, text = _font(font_size)
    strips = [Image.fromarray(to_uint8(tile(r, len(r), pad=pad))) for r in rows]
    strips = [s.resize((s.width * scale, s.height * scale), Image.NEAREST) for s in strips]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))

    def size(s):
        box = probe.multiline_textbbox((0, 0), text(s), font=font, spacing=3) if s else (0, 0, 0, 0)
        return box[2] - box[0], box[3] - box[1]

    row_labels = list(row_labels or [""] * len(strips))
    label_w = max([size(s)[0] for s in row_labels] + [0]) + (10 if any(row_labels) else 0)
    title_h, col_h = (size(title)[1] + 14 if title else 0), (font_size + 8 if col_labels else 0)
    width = max([label_w + s.width for s in strips] + [size(title)[0] + 16])
    img = Image.new("L", (width + 8, title_h + col_h + sum(s.height for s in strips) + 6), 255)
    draw = ImageDraw.Draw(img)
    if title:
        draw.multiline_text((8, 6), text(title), font=font, fill=0, spacing=3)
    cell = strips[0].width / max(1, len(rows[0])) if strips and col_labels else 0
    for i, label in enumerate(col_labels or []):
        draw.text((label_w + i * cell + (cell - size(label)[0]) / 2, title_h), text(label), font=font, fill=90)
    y = title_h + col_h
    for strip, label in zip(strips, row_labels):
        img.paste(strip, (label_w, y))
        if label:
            w, h = size(label)
            draw.text((label_w - w - 6, y + (strip.height - h) / 2 - 2), text(label), font=font, fill=0)
        y += strip.height
    return img


def grid_rows(images, ncol):
    return [images[i : i + ncol] for i in range(0, len(images), ncol)]


def traversal(decode, base, order, labels, title):
    """A row per latent dimension in `order`: base (latent_dim,) with that dimension set to each TRAVERSAL value."""
    z = np.repeat(np.asarray(base, np.float32)[None, None], len(order), 0).repeat(len(TRAVERSAL), 1)
    z[np.arange(len(order)), :, order] = TRAVERSAL
    images = decode(z.reshape(-1, len(base)))
    return labelled_grid(grid_rows(images, len(TRAVERSAL)), labels, title, [f"{v:+.1f}" for v in TRAVERSAL])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def training_curves(history, tag):
    """loss.png: the objective per step (binned) and per epoch, the test objective and reconstruction; beside it the
    test KL, in all and of each dimension, over the whole run (records of resumed epochs included)."""
    plt = _plt()
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(12, 4.2))
    curves = [(m["epoch"], m.get("curve", [])) for m in history]
    steps = [(epoch - 1 + (i + 0.5) / len(curve), v) for epoch, curve in curves for i, v in enumerate(curve)]
    if steps:
        ax.plot(*zip(*steps), lw=1, alpha=0.7, label="train objective (per step, binned)")
    epochs = [m["epoch"] for m in history]
    ax.plot([e - 0.5 for e in epochs], [m["train"]["total"] for m in history], "^:", label="train objective (epoch)")
    ax.plot(epochs, [m["test"]["total"] for m in history], "o-", label="test objective")
    ax.plot(epochs, [m["test"]["recon"] for m in history], "s--", label="test reconstruction")
    ax.set(xlabel="epoch", ylabel="nats per image", title=f"Loss: {tag}")
    ax.legend(fontsize=8)
    per_dim = np.array([m["test"]["kl_per_dim"] for m in history])
    kx.plot(epochs, per_dim.sum(1), "k-", lw=2, label="KL, all dimensions")
    for d in np.argsort(-per_dim[-1])[:10]:
        kx.plot(epochs, per_dim[:, d], lw=1, label=f"z{d}")
    kx.set(xlabel="epoch", ylabel="nats per image", title="Test KL, in all and per dimension (largest 10)")
    kx.legend(fontsize=7, ncol=2)
    for a in (ax, kx):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def versus_beta(panels, groups, title):
    """One panel per (value key, panel title): mean ± s.d. over seeds against β, one line per objective, every run a
    dot. groups: [(objective name, [(β, [values of each seed])])]."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], panels):
        for n, (name, points) in enumerate(groups):
            points = [(b, [v[key] for v in vs]) for b, vs in points if all(key in v for v in vs)]
            if not points:
                continue
            betas = [b * (1.07**n) for b, _ in points]  # side by side where objectives share a β
            means, sds = [np.mean(v) for _, v in points], [_sd(v) for _, v in points]
            style = dict(capsize=3, marker="o^sd"[n % 4], label=name, linestyle="-" if len(points) > 1 else "none")
            ax.errorbar(betas, means, yerr=sds, **style)
            for b, (_, v) in zip(betas, points):
                ax.scatter([b] * len(v), v, s=10, alpha=0.5, color=f"C{n}", zorder=3)
        betas = sorted({b for _, pts in groups for b, _ in pts})
        if betas and betas[0] > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.minorticks_off()
        ax.set(xlabel="β", title=panel_title)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def rate_distortion(runs, groups, title):
    """Every run a point (KL, reconstruction), coloured by β, marked by objective; bars ±1 s.d. over seeds.
    runs: [(objective index, β, kl, recon)]; groups: [(objective index, β, [kl], [recon])]."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    betas = sorted({r[1] for r in runs})
    colour = {b: plt.get_cmap("viridis")(0.9 * i / max(1, len(betas) - 1)) for i, b in enumerate(betas)}
    for o, b, kl, rec in runs:
        ax.scatter(kl, rec, color=colour[b], marker="o^sd"[o % 4], s=40, edgecolor="black", linewidth=0.5, zorder=3)
    for _, b, kls, recs in groups:
        ax.errorbar(np.mean(kls), np.mean(recs), xerr=_sd(kls), yerr=_sd(recs), color=colour[b], capsize=3, zorder=2)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="none", label=f"β = {b:g}") for b, c in colour.items()]
    ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="rate: KL(q(z|x) ‖ p(z)), nats per image", ylabel="distortion: reconstruction, nats per image")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(useOffset=False)
    fig.tight_layout()
    return png_bytes(fig)


def side_by_side(panels, title, font_size=16):
    """Grey PIL images, each under its own title, two to a row, at their own size (nothing shrunk)."""
    font, text = _font(font_size)
    ncol = min(2, len(panels))
    cell_w = max(p.width for _, p in panels) + 20
    cell_h = max(p.height for _, p in panels) + font_size + 16
    img = Image.new("L", (ncol * cell_w + 10, font_size * 3 + math.ceil(len(panels) / ncol) * cell_h), 255)
    draw = ImageDraw.Draw(img)
    draw.multiline_text((10, 8), text(title), font=font, fill=0, spacing=4)
    for i, (name, panel) in enumerate(panels):
        x, y = 10 + (i % ncol) * cell_w, font_size * 3 + (i // ncol) * cell_h
        draw.text((x, y), text(name), font=font, fill=0)
        img.paste(panel.convert("L"), (x, y + font_size + 8))
    return img
