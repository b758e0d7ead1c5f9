"""Generate images from an exported decoder with onnxruntime, numpy and Pillow: torch is never imported.

$ python sample.py --onnx decoder.onnx --n 16 --seed 3   # 16 samples of N(0, I) -> samples.png, 4 x 4
$ python sample.py --onnx decoder.onnx --traverse         # traversals.png: a row a dimension, -3 to 3
$ python sample.py --onnx decoder.onnx --interpolate      # interpolations.png: rows from one z to another

Latent size, image shape and KL per dimension come from the file, checked first (plumbing/onnx_check.py); an output
is replaced only with --overwrite; z = numpy.random.default_rng(seed).standard_normal((n, latent_dim)) * temperature.
To carry the sampler elsewhere, copy these files and nothing else: sample.py figures.py plumbing/__init__.py
plumbing/cli.py plumbing/files.py plumbing/onnx_check.py (and `pip install -r requirements-sample.txt`).
"""

import math
import os
import sys

import numpy as np

from figures import TRAVERSAL, grid_rows, labelled_grid, png_bytes
from plumbing import onnx_check
from plumbing.cli import ArgumentParser, UsageError, check_float, check_int, fail, safe_streams, shown
from plumbing.files import Interrupted, atomic_write_all, clashes, clean_stale_temps_for

MAX_OUTPUT_BYTES = 2**30  # what the images and their grid may take in memory, estimated before decoding
RANGES = {"n": (1, 10000), "scale": (1, 8), "seed": (0, 2**64 - 1), "steps": (2, 101), "rows": (1, 100)}  # and --dims


def slerp(a, b, t):
    """Spherical interpolation, (rows, d) x (rows, d) x (steps,) -> (rows, steps, d): samples of N(0, I) lie near a
    sphere, and the straight line between two passes through the low-norm middle the decoder rarely saw (White 2016)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    omega = np.arccos(np.clip(np.sum(a * b, 1) / np.maximum(norms, 1e-12), -1, 1))[:, None, None]
    t, s = t[None, :, None], np.sin(omega)  # s near 0: parallel or zero vectors, whose straight line is the same path
    wa, wb = (np.where(s > 1e-6, np.sin(f * omega) / np.where(s > 1e-6, s, 1), f) for f in (1 - t, t))  # a's, b's
    return wa * a[:, None] + wb * b[:, None]


def layout(args, model):
    """(latents (N, d) in grid order, images a row, row labels, column labels, what the grid shows)."""
    rng, d = np.random.default_rng(args.seed), model.latent
    if args.traverse:
        order, unused = onnx_check.kl_order(model.kl, d)
        dims, values = order[: args.dims or d], np.linspace(TRAVERSAL[0], TRAVERSAL[-1], args.steps)
        z = np.tile(rng.standard_normal(d) * args.temperature, (len(dims), args.steps, 1))
        z[np.arange(len(dims)), :, dims] = values
        kl = [f"  KL {v:.2f}" for v in model.kl] if model.kl else [""] * d
        labels = [f"z{i}{kl[i]}" + "  not in use" * (i in unused) for i in dims]
        ranked = "largest KL first" if model.kl else "in index order (no KL in this file: export it again)"
        what = f"traversal: a row moves one dimension from -3 to +3, the others fixed at one draw; {ranked}"
        cols = [f"{v:+.1f}" for v in values] if args.steps <= 13 else None
        return z.reshape(-1, d), args.steps, labels, cols, f"{what}; in use: KL > {onnx_check.ACTIVE_KL:g} nats"
    if args.interpolate:
        a, b = rng.standard_normal((2, args.rows, d)) * args.temperature
        z = slerp(a, b, np.linspace(0.0, 1.0, args.steps)).reshape(-1, d)
        labels, cols = [f"pair {i + 1}" for i in range(args.rows)], ["A"] + [""] * (args.steps - 2) + ["B"]
        return z, args.steps, labels, cols, "interpolation: each row goes from A to B along a great circle"
    z = rng.standard_normal((args.n, d)) * args.temperature
    return z, math.ceil(math.sqrt(args.n)), None, None, f"{args.n} samples of N(0, T^2 I)"


def parse_args(argv=None):
    p = ArgumentParser(description="Sample images from decoder.onnx without torch.")
    p.add_argument("--onnx", default="decoder.onnx", help="decoder written by export_onnx.py (default: decoder.onnx)")
    p.add_argument("--n", type=int, default=64, help="samples, 1-10000; the grid is ceil(sqrt(n)) wide (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of numpy's default_rng for z, 0 to 2**64-1 (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="z = temperature * N(0, I), 0-100 (default: 1.0)")
    p.add_argument("--out", help="PNG grid to write (default: samples.png, traversals.png or interpolations.png)")
    p.add_argument("--npy", help="also save the float32 images [N, 1, H, W] here (default: not saved)")
    p.add_argument("--scale", type=int, default=3, help="PNG pixels per image pixel, 1-8 (default: 3)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and --npy if they exist (default: refuse)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--traverse", action="store_true", help="a row per dimension, largest KL first (ignores --n)")
    mode.add_argument("--interpolate", action="store_true", help="--rows rows, each from one random z to another")
    p.add_argument("--steps", type=int, default=11, help="images a row for --traverse, --interpolate (default: 11)")
    p.add_argument("--rows", type=int, default=8, help="rows for --interpolate (default: 8)")
    p.add_argument("--dims", type=int, help="--traverse: only the K largest-KL dimensions (default: all)")
    args = p.parse_args(argv)
    grid = "traversals" if args.traverse else "interpolations" if args.interpolate else "samples"
    args.out = args.out or f"{grid}.png"
    return args


def check_args(args):
    for name, (low, high) in (RANGES | {"dims": (1, onnx_check.MAX_LATENT)}).items():
        if getattr(args, name) is not None:  # --dims may be left out
            check_int(f"--{name}", getattr(args, name), low, high)
    if args.dims is not None and not args.traverse:
        raise UsageError("--dims chooses the rows of --traverse: add --traverse, or drop --dims")
    check_float("--temperature", args.temperature, 0, 100, " (1.0 samples the prior, 0 decodes its mean)")
    outputs = {"--out": args.out, "--npy": args.npy}
    if clash := clashes({"--onnx": args.onnx}, outputs):  # first: never "pass --overwrite" for the model itself
        raise UsageError(f"{clash}: --onnx, --out and --npy must name different files")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: the grid is written as PNG; give a name ending in .png")
    for flag, path in outputs.items():
        if path is not None and (not os.path.isdir(os.path.dirname(os.path.abspath(path))) or os.path.isdir(path)):
            raise UsageError(f"{flag} {path}: its folder does not exist or it is a folder; give a file in a folder")
        if path is not None and os.path.lexists(path) and not args.overwrite:
            raise UsageError(f"{flag} {path} already exists: pass --overwrite to replace it, or --out/--npy NEW")


def check_size(args, model):
    """Refuse a grid whose latents, images and PNG would not fit in MAX_OUTPUT_BYTES, from the flags alone."""
    n, ncol = args.n, math.ceil(math.sqrt(args.n))
    if args.traverse or args.interpolate:
        ncol = args.steps
        n = ncol * (min(args.dims or model.latent, model.latent) if args.traverse else args.rows)
    rows = math.ceil(n / ncol)
    _, h, w = model.image_shape
    need = n * (h * w * 4 + model.latent * 8) + 3 * n * (h + 2) * (w + 2) * args.scale**2  # images, z, PIL
    if need > MAX_OUTPUT_BYTES:
        shape = f"{rows} dims x {ncol} steps" if args.traverse else f"{rows} rows x {ncol} images"
        size = f"about {need / 2**30:.1f} GiB in memory (limit {MAX_OUTPUT_BYTES / 2**30:.0f} GiB)"
        fewer = "ask for fewer (--dims K shows the K largest-KL dims), fewer --steps or a smaller --scale"
        raise UsageError(f"{shape} is {n:,} images of {h}x{w}, {size}: {fewer}")


def main(argv=None):
    safe_streams()  # a path whose bytes are not UTF-8 is printed escaped, not a UnicodeEncodeError after writing
    args = parse_args(argv)
    try:
        check_args(args)
        model = onnx_check.load(args.onnx, "decoder")
        check_size(args, model)  # before layout() draws the latents, which alone can take gigabytes
        z, ncol, row_labels, col_labels, what = layout(args, model)
        images = onnx_check.run(model, onnx_check.session(model), z.astype(np.float32))[0]
        source = model.meta.get("trained_on", f"beta {model.beta:g}" if model.beta is not None else "")
        about = f"{shown(os.path.basename(args.onnx), 60)}: {shown(source, 120)}"
        title = f"{about}\nseed {args.seed}, temperature {args.temperature:g}; {what}"
        grid = labelled_grid(grid_rows(images, ncol), row_labels, title, col_labels, scale=args.scale)
        clean_stale_temps_for([args.out, args.npy])
        writes = [(args.out, png_bytes(grid))] + ([(args.npy, lambda f: np.save(f, images))] if args.npy else [])
        try:  # the grid and its arrays as one pair: a failure leaves both as they were
            atomic_write_all(writes)
        except OSError as e:
            why = f"({e.strerror or e}); nothing was changed: choose another --out/--npy path or free some space"
            raise UsageError(f"cannot write {' and '.join(p for p, _ in writes)} {why}") from None
    except UsageError as e:
        fail(e)
    except Interrupted:
        fail(f"interrupted after writing {args.out}", 130)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    n, also = len(images), f"; {args.npy}" if args.npy else ""
    print(f"wrote {args.out}: {n} images, {-(-n // ncol)} x {ncol} grid, {grid.width} x {grid.height} px{also}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
