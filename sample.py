"""Generate images from an exported decoder with onnxruntime, numpy and Pillow only: torch is never imported.

$ python sample.py --onnx decoder.onnx                                   # 64 samples of N(0, I) -> samples.png, 8 x 8
$ python sample.py --onnx decoder.onnx --n 16 --seed 3 --temperature 0.8 --npy samples.npy
$ python sample.py --onnx decoder.onnx --traverse --out traverse.png       # row i: z_i from -3 to 3 in --steps steps
$ python sample.py --onnx decoder.onnx --interpolate --out interpolate.png # --rows rows, each from one z to another

Latent size and image shape come from the file's input signature and metadata, so --onnx is the only flag needed.
z = numpy.random.default_rng(seed).standard_normal((n, latent_dim)) * temperature: the same seed, the same pixels.
"""
import math
import os
import sys

import numpy as np
import onnxruntime as ort

from cli import ArgumentParser, UsageError
from fileio import atomic_write
from images import save_png, tile

MAX_BYTES = 64 * 2**20  # the decoder is ~0.2 MiB; refuse to parse anything far outside that
FORMAT_VERSION = 1      # newest decoder format this script reads (export_onnx.FORMAT_VERSION)
CHUNK = 1024            # images per onnxruntime call: bounds memory for large --n


def load_decoder(path):
    """(session, latent_dim, image shape (C, H, W)) for a decoder file, or UsageError before anything runs."""
    hint = "pass the decoder.onnx that export_onnx.py wrote"
    if not os.path.isfile(path):
        raise UsageError(f"no file at {path}: {hint}")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)  # bytes, not a path: onnxruntime then reads no external-data files either
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path} is larger than {MAX_BYTES >> 20} MiB, far too big for a decoder: {hint}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # onnxruntime's own warnings would break the one-line error contract
    # Idle worker threads otherwise spin waiting for work: on a busy 2-core CPU that halved throughput at batch 1024.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several types; all mean "this is not a model we can load"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        raise UsageError(f"{path} is not an ONNX model onnxruntime can load ({reason}): {hint}") from None
    try:  # names and metadata are decoded as UTF-8 on access; a damaged file can hold anything
        ins, outs = sess.get_inputs(), sess.get_outputs()
        found = ", ".join(f"{a.name} {a.type} {a.shape}" for a in ins) + " -> " + \
            ", ".join(f"{a.name} {a.type} {a.shape}" for a in outs)
        meta = sess.get_modelmeta().custom_metadata_map
    except UnicodeDecodeError:
        raise UsageError(f"{path} has names or metadata that are not text, so it is damaged: {hint}") from None
    if not (len(ins) == 1 and len(outs) == 1 and len(ins[0].shape) == 2 and len(outs[0].shape) == 4
            and ins[0].type == outs[0].type == "tensor(float)"):
        raise UsageError(f"{path} is not a decoder (it maps {found}; a decoder maps one float [batch, latent_dim] "
                         f"to one float [batch, 1, H, W]): {hint}")
    try:
        version = int(meta.get("format_version", FORMAT_VERSION))
        latent = ins[0].shape[1] if isinstance(ins[0].shape[1], int) else int(meta["latent_dim"])
        shape = tuple(outs[0].shape[1:]) if all(isinstance(s, int) for s in outs[0].shape[1:]) else \
            tuple(int(s) for s in meta["image_shape"].split(","))
    except (KeyError, ValueError):
        raise UsageError(f"{path} has no fixed latent size or image shape in its signature or metadata: {hint}") \
            from None
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} has decoder format {version}; this sample.py reads up to {FORMAT_VERSION}: update it")
    if "latent_dim" in meta and meta["latent_dim"] != str(latent):
        raise UsageError(f"{path} says latent_dim {meta['latent_dim']} but its input takes {latent}: export it again")
    if len(shape) != 3 or shape[0] != 1 or not 1 <= shape[1] * shape[2] <= 2**22:
        raise UsageError(f"{path} makes images of shape {shape}; sample.py writes grayscale (1, H, W) only")
    if not 1 <= latent <= 4096:  # a hostile file could ask for gigabytes of z before anything runs
        raise UsageError(f"{path} takes a latent of size {latent}, outside 1-4096: not a decoder of this project")
    return sess, latent, shape


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


def latents(args, d):
    """(z of shape (N, d), images per grid row)."""
    rng = np.random.default_rng(args.seed)
    if args.traverse:  # row i: every other dim held at one draw of N(0, T^2 I), dim i swept from -3 to 3
        z = np.tile(rng.standard_normal(d) * args.temperature, (d, args.steps, 1))  # (d, steps, d)
        z[np.arange(d), :, np.arange(d)] = np.linspace(-3.0, 3.0, args.steps)
        return z.reshape(-1, d), args.steps
    if args.interpolate:
        a, b = rng.standard_normal((2, args.rows, d)) * args.temperature
        return slerp(a, b, np.linspace(0.0, 1.0, args.steps)).reshape(-1, d), args.steps
    return rng.standard_normal((args.n, d)) * args.temperature, math.ceil(math.sqrt(args.n))


def parse_args(argv=None):
    p = ArgumentParser(description="Sample images from decoder.onnx without torch.")
    p.add_argument("--onnx", default="decoder.onnx", help="decoder written by export_onnx.py (default decoder.onnx)")
    p.add_argument("--n", type=int, default=64, help="number of samples, 1-10000 (default 64; grid ceil(sqrt(n)) wide)")
    p.add_argument("--seed", type=int, default=0, help="seed of numpy's default_rng for z (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="z = temperature * N(0, I) (default 1.0)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--npy", default=None, help="also save the float32 images [N, 1, H, W] here (default: not saved)")
    p.add_argument("--scale", type=int, default=3, help="PNG pixels per image pixel, 1-8 (default 3)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--traverse", action="store_true",
                      help="one row per latent dim, that dim from -3 to 3 (default off; ignores --n)")
    mode.add_argument("--interpolate", action="store_true",
                      help="--rows rows, each from one random z to another along a great circle (default off)")
    p.add_argument("--steps", type=int, default=11, help="images per row for --traverse/--interpolate (default 11)")
    p.add_argument("--rows", type=int, default=8, help="rows for --interpolate (default 8)")
    return p.parse_args(argv)


def check_args(args):
    for flag, value, low, high in (("--n", args.n, 1, 10000), ("--scale", args.scale, 1, 8),
                                   ("--steps", args.steps, 2, 101), ("--rows", args.rows, 1, 100)):
        if not low <= value <= high:
            raise UsageError(f"{flag} {value} is out of range: use {low} to {high}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature} must be a number >= 0 (1.0 samples the prior)")
    for flag, path in (("--out", args.out), ("--npy", args.npy)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{flag} {path}: its folder does not exist; create it or choose another path")
        if path is not None and os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder: give a file name")
    paths = [os.path.abspath(p) for p in (args.onnx, args.out, args.npy) if p is not None]
    if len(set(paths)) != len(paths):
        raise UsageError("--onnx, --out and --npy must name different files")


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        sess, d, shape = load_decoder(args.onnx)
        z, ncol = latents(args, d)
        name = sess.get_inputs()[0].name
        try:
            images = np.concatenate([sess.run(None, {name: z[i:i + CHUNK].astype(np.float32)})[0]
                                     for i in range(0, len(z), CHUNK)])
        except Exception as e:  # loads, but fails on a [batch, latent] input: not a working decoder
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            raise UsageError(f"{args.onnx} loads but fails to run on z ({reason}): pass the decoder.onnx that "
                             "export_onnx.py wrote") from None
        if images.shape != (len(z), *shape):
            raise UsageError(f"{args.onnx} returned shape {images.shape}, not {(len(z), *shape)}: export it again")
        if not np.all(np.isfinite(images)):
            raise UsageError(f"{args.onnx} returned NaN or infinite pixels: export it again from a healthy checkpoint")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    grid = tile(images, ncol)
    try:
        save_png(grid, args.out, scale=args.scale)
        if args.npy:
            atomic_write(args.npy, lambda f: np.save(f, images))
    except OSError as e:
        where = args.out + (f" or {args.npy}" if args.npy else "")
        print(f"error: cannot write {where} ({e.strerror}): choose another --out/--npy path", file=sys.stderr)
        sys.exit(2)
    rows = -(-len(images) // ncol)
    print(f"wrote {args.out}: {len(images)} images, {rows} x {ncol} grid, "
          f"{grid.shape[1] * args.scale} x {grid.shape[0] * args.scale} px" + (f"; {args.npy}" if args.npy else ""))


if __name__ == "__main__":
    main()
