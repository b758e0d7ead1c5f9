"""Generate images from an exported decoder with onnxruntime, numpy and Pillow only: torch is never imported.

$ python sample.py --onnx decoder.onnx                                   # 64 samples of N(0, I) -> samples.png, 8 x 8
$ python sample.py --onnx decoder.onnx --n 16 --seed 3 --temperature 0.8 --npy samples.npy
$ python sample.py --onnx decoder.onnx --traverse --out traverse.png       # a row per dim, largest KL first, -3 to 3
$ python sample.py --onnx decoder.onnx --interpolate --out interpolate.png # --rows rows, each from one z to another

Latent size, image shape and per-dimension KL come from the file, so --onnx is the only flag needed. The file is
checked before it runs (onnx_check.py): only what export_onnx.py writes is accepted.
z = numpy.random.default_rng(seed).standard_normal((n, latent_dim)) * temperature: the same seed, the same pixels.
To carry the sampler elsewhere, copy these files and nothing else: sample.py plumbing/__init__.py plumbing/cli.py
plumbing/files.py images.py onnx_check.py protowire.py (and `pip install -r requirements-sample.txt`).
"""
import math
import os

import numpy as np

import onnx_check
from plumbing.cli import ArgumentParser, UsageError, check_float, check_int, fail, safe_streams, shown
from plumbing.files import atomic_write_all, clashes, clean_stale_temps_for
from images import labelled_grid

MAX_OUTPUT_BYTES = 2**30  # what the requested images and their grid may take in memory, estimated before decoding
TRAVERSE = 3.0            # --traverse sweeps each dimension from -3 to 3 (prior standard deviations)


def slerp(a, b, t):
    """Spherical interpolation, (rows, d) x (rows, d) x (steps,) -> (rows, steps, d). Samples of N(0, I) lie near a
    sphere; the straight line between two passes through the low-norm middle the decoder rarely saw (White 2016)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    omega = np.arccos(np.clip(np.sum(a * b, 1) / np.maximum(norms, 1e-12), -1, 1))[:, None, None]
    t = t[None, :, None]
    s = np.sin(omega)
    ok = s > 1e-6  # parallel or zero vectors: the straight line is the same path
    wa = np.where(ok, np.sin((1 - t) * omega) / np.where(ok, s, 1), 1 - t)
    wb = np.where(ok, np.sin(t * omega) / np.where(ok, s, 1), t)
    return wa * a[:, None] + wb * b[:, None]


def layout(args, model):
    """(rows of the grid, images per row, row labels, column labels, a line saying what the grid shows)."""
    if args.traverse:
        order, unused = onnx_check.kl_order(model.kl, model.latent)
        dims = order[:args.dims or model.latent]
        kl = model.kl or [None] * model.latent
        labels = [f"z{d}" + (f"  KL {kl[d]:.2f}" if kl[d] is not None else "") + ("  unused" if d in unused else "")
                  for d in dims]
        ranked = "largest KL first" if model.kl else "in index order (no KL in this file: export it again)"
        values = np.linspace(-TRAVERSE, TRAVERSE, args.steps)
        return dims, args.steps, labels, [f"{v:+.1f}" for v in values] if args.steps <= 13 else None, \
            f"traversal: each row moves one dim from -3 to +3, the others fixed at one draw; {ranked}"
    if args.interpolate:
        return range(args.rows), args.steps, [f"pair {i + 1}" for i in range(args.rows)], \
            ["A"] + [""] * (args.steps - 2) + ["B"], "interpolation: each row goes from A to B along a great circle"
    ncol = math.ceil(math.sqrt(args.n))
    return range(math.ceil(args.n / ncol)), ncol, None, None, f"{args.n} samples of N(0, T^2 I)"


def latents(args, d, rows):
    """z of shape (N, d) in grid order."""
    rng = np.random.default_rng(args.seed)
    if args.traverse:  # row of dim i: every other dim held at one draw of N(0, T^2 I), dim i swept from -3 to 3
        z = np.tile(rng.standard_normal(d) * args.temperature, (len(rows), args.steps, 1))  # (rows, steps, d)
        z[np.arange(len(rows)), :, rows] = np.linspace(-TRAVERSE, TRAVERSE, args.steps)
        return z.reshape(-1, d)
    if args.interpolate:
        a, b = rng.standard_normal((2, args.rows, d)) * args.temperature
        return slerp(a, b, np.linspace(0.0, 1.0, args.steps)).reshape(-1, d)
    return rng.standard_normal((args.n, d)) * args.temperature


def parse_args(argv=None):
    p = ArgumentParser(description="Sample images from decoder.onnx without torch.")
    p.add_argument("--onnx", default="decoder.onnx", help="decoder written by export_onnx.py (default decoder.onnx)")
    p.add_argument("--n", type=int, default=64, help="number of samples, 1-10000 (default 64; grid ceil(sqrt(n)) wide)")
    p.add_argument("--seed", type=int, default=0, help="seed of numpy's default_rng for z, 0 to 2**64-1 (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="z = temperature * N(0, I), 0-100 (default 1.0)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write, named *.png (default samples.png)")
    p.add_argument("--npy", default=None, help="also save the float32 images [N, 1, H, W] here (default: not saved)")
    p.add_argument("--scale", type=int, default=3, help="PNG pixels per image pixel, 1-8 (default 3)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--traverse", action="store_true",
                      help="one row per latent dim, largest KL first, that dim from -3 to 3 (default off; ignores --n)")
    mode.add_argument("--interpolate", action="store_true",
                      help="--rows rows, each from one random z to another along a great circle (default off)")
    p.add_argument("--steps", type=int, default=11, help="images per row for --traverse/--interpolate (default 11)")
    p.add_argument("--rows", type=int, default=8, help="rows for --interpolate (default 8)")
    p.add_argument("--dims", type=int, default=None, help="--traverse: only the K largest-KL dims (default: all)")
    return p.parse_args(argv)


def check_args(args):
    for flag, value, low, high in (("--n", args.n, 1, 10000), ("--scale", args.scale, 1, 8), ("--seed", args.seed, 0,
                                   2**64 - 1), ("--steps", args.steps, 2, 101), ("--rows", args.rows, 1, 100)):
        check_int(flag, value, low, high)
    if args.dims is not None:
        check_int("--dims", args.dims, 1, onnx_check.MAX_LATENT)
        if not args.traverse:
            raise UsageError("--dims chooses the rows of --traverse: add --traverse, or drop --dims")
    check_float("--temperature", args.temperature, 0, 100, " (1.0 samples the prior, 0 decodes its mean)")
    for flag, path in (("--out", args.out), ("--npy", args.npy)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{flag} {path}: its folder does not exist; create it or choose another path")
        if path is not None and os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder: give a file name")
    clash = clashes({"--onnx": args.onnx}, {"--out": args.out, "--npy": args.npy})
    if clash:
        raise UsageError(f"{clash}: --onnx, --out and --npy must name different files")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: the grid is written as PNG; give a name ending in .png")


def check_size(args, model, rows, ncol):
    """Refuse a request whose images and grid would not fit in MAX_OUTPUT_BYTES, before anything is decoded."""
    n, (_, h, w) = len(rows) * ncol, model.image_shape
    need = n * (h * w * 4 + model.latent * 8) + 3 * n * (h + 2) * (w + 2) * args.scale ** 2  # images, z, PIL copies
    if need > MAX_OUTPUT_BYTES:
        what = f"{len(rows)} dims x {ncol} steps" if args.traverse else f"{len(rows)} rows x {ncol} images"
        raise UsageError(f"{what} is {n:,} images of {h}x{w}, about {need / 2**30:.1f} GiB in memory (limit "
                         f"{MAX_OUTPUT_BYTES / 2**30:.0f} GiB): ask for fewer (--dims K shows the K largest-KL dims), "
                         "fewer --steps or a smaller --scale")


def main(argv=None):
    safe_streams()  # a path whose bytes are not UTF-8 is printed escaped, not a UnicodeEncodeError after writing
    args = parse_args(argv)
    try:
        check_args(args)
        model = onnx_check.load(args.onnx, "decoder")
        rows, ncol, row_labels, col_labels, what = layout(args, model)
        check_size(args, model, rows, ncol)
        sess = onnx_check.session(model)
        z = latents(args, model.latent, rows).astype(np.float32)
        images = onnx_check.run(model, sess, z)[0]
    except UsageError as e:
        fail(e)
    strips = [images[i:i + ncol] for i in range(0, len(images), ncol)]
    beta = "?" if model.beta is None else f"{model.beta:g}"  # a number: the checks refused anything else
    title = f"{shown(os.path.basename(args.onnx), 60)}  beta {beta}  seed {args.seed}  temperature " \
            f"{args.temperature:g}\n{what}"
    grid = labelled_grid(strips, row_labels, title, col_labels, scale=args.scale)
    clean_stale_temps_for([args.out, args.npy])
    writes = [(args.out, lambda f: grid.save(f, format="PNG"))] + \
        ([(args.npy, lambda f: np.save(f, images))] if args.npy else [])
    try:  # the grid and its arrays as one pair: a failure leaves both files as they were
        atomic_write_all(writes)
    except OSError as e:
        where = args.out + (f" and {args.npy}" if args.npy else "")
        fail(f"cannot write {where} ({e.strerror or e}); nothing was changed: choose another --out/--npy path "
             "or free some space")
    print(f"wrote {args.out}: {len(images)} images, {len(strips)} x {ncol} grid, {grid.width} x {grid.height} px"
          + (f"; {args.npy}" if args.npy else ""))


if __name__ == "__main__":
    main()
