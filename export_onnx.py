"""Export a trained decoder and encoder to ONNX, with their metadata, checked against torch.

$ python export_onnx.py --checkpoint runs/beta4_z10_seed0/checkpoint.pt

Writes decoder.onnx and encoder.onnx beside the checkpoint (--out, --encoder, --no-encoder change that); an existing
file is replaced only with --overwrite. decoder.onnx: z float32 [batch, latent_dim] -> images [batch, 1, 28, 28] in
[0, 1], no randomness inside; encoder.onnx: images in [-1, 1] -> mu, logvar [batch, latent_dim]. Each passes
onnx.checker and matches torch under onnxruntime at batch sizes 1, 7 and 256 before anything is written.
Route: torch.onnx's TorchScript exporter (dynamo=False): the dynamo one needs onnxscript and is slower on this stack.
"""

import copy
import io
import itertools
import json
import math
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

import data
import vae
from plumbing.cli import ArgumentParser, UsageError, add, fail, safe_streams, shown
from plumbing.files import Interrupted, atomic_write_all, clashes, clean_stale_temps_for
from plumbing.onnx_check import FORMAT_VERSION, OPSETS, SIGNATURE  # what the reader accepts is what this writes

PARITY_BATCHES, PARITY_ATOL = (1, 7, 256), 1e-5  # onnxruntime must match torch at these batch sizes, within this


class _ShiftedConv(nn.Module):
    """A convolution plus a constant (C, H, W) map: where a BatchNorm shift lands when it cannot be a plain bias."""

    def __init__(self, conv, shift):
        super().__init__()
        self.conv, self.shift = conv, nn.Buffer(shift)

    def forward(self, x):
        return self.conv(x) + self.shift


@torch.no_grad()
def fold_batchnorm(module, example):
    """A float32 copy of `module`, each eval-mode BatchNorm2d that feeds a convolution folded into it (in float64).

    BN is y = a·x + b per channel: a scales the convolution's input channels; conv(b), a constant image, is its bias
    where uniform per channel, else added whole (the decoder's padded transposed convolution gives edges fewer taps)."""
    module, shapes = copy.deepcopy(module).double().eval(), {}
    record = lambda bn, args: shapes.__setitem__(bn, args[0].shape[1:])  # the (C, H, W) each BatchNorm sees
    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    module(example.double())
    for h in hooks:
        h.remove()
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i, (bn, conv) in enumerate(itertools.pairwise(seq)):
            if bn not in shapes or not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or conv.groups != 1:
                continue
            a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = conv((bn.bias - bn.running_mean * a).view(1, -1, 1, 1).expand(1, *shapes[bn]))[0]
            conv.weight.mul_(a.view(-1, 1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else a.view(1, -1, 1, 1))
            uniform = torch.allclose(shift, shift[:, :1, :1].expand_as(shift), rtol=0, atol=1e-12)
            conv.bias = nn.Parameter(shift[:, 0, 0].clone()) if uniform else None
            seq[i], seq[i + 1] = nn.Identity(), conv if uniform else _ShiftedConv(conv, shift)
    return module.float()


def export(module, example, input_name, output_names, opset, meta):
    """The ONNX bytes of `module` (BatchNorm folded): a dynamic batch axis, fixed other axes, metadata, checked."""
    buf, axes = io.BytesIO(), {name: {0: "batch"} for name in (input_name, *output_names)}
    opts = dict(input_names=[input_name], output_names=list(output_names), opset_version=opset, dynamo=False)
    with torch.no_grad(), warnings.catch_warnings(action="ignore", category=DeprecationWarning):  # TorchScript's
        torch.onnx.export(fold_batchnorm(module, example), (example,), buf, dynamic_axes=axes, **opts)
        refs = module(example)
    proto = onnx.load_from_string(buf.getvalue())
    for out, ref in zip(proto.graph.output, refs if isinstance(refs, tuple) else (refs,)):
        for dim, size in list(zip(out.type.tensor_type.shape.dim, ref.shape))[1:]:
            dim.dim_value = size  # the tracer leaves 28 as a symbol; readers want [batch, 1, 28, 28]
    onnx.helper.set_model_props(proto, meta)
    proto.graph.name = f"beta_vae_{meta['format'].split('-')[-1]}"
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def parity(model_bytes, module, make_input):
    """The largest |onnxruntime − torch| over every output and PARITY_BATCHES; inf where a shape or count differs."""
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name, rng, worst = sess.get_inputs()[0].name, np.random.default_rng(0), 0.0
    for batch in PARITY_BATCHES:
        x = make_input(rng, batch).astype(np.float32)
        with torch.no_grad():
            want = module(torch.from_numpy(x))
        want, got = (want if isinstance(want, tuple) else (want,)), sess.run(None, {name: x})
        if len(got) != len(want) or any(g.shape != tuple(w.shape) for g, w in zip(got, want)):
            return float("inf")
        worst = float(np.max([worst] + [np.max(np.abs(g - w.numpy())) for g, w in zip(got, want)]))  # NaN wins
    return worst if np.isfinite(worst) else float("inf")


def kl_from_history(ckpt):
    """(the last epoch's test KL per dimension, that epoch), or (None, why not)."""
    if not ckpt["metrics"]:
        return None, "the checkpoint has no epoch history"
    kl, epoch = ckpt["metrics"][-1]["test"]["kl_per_dim"], ckpt["metrics"][-1]["epoch"]
    if len(kl) != ckpt["model_args"]["latent_dim"] or not all(math.isfinite(v) and v >= -1e-6 for v in kl):
        return None, "its last epoch holds no valid test kl_per_dim"
    return [round(max(0.0, float(v)), 6) for v in kl], epoch


def metadata(kind, ckpt, checkpoint_path, pixel_range, kl):
    """What sample.py and explore.py need: no local path, only the checkpoint's folder and file name and its hash."""
    args, epochs = ckpt["model_args"], ckpt["epoch"]
    source = os.path.join(*os.path.normpath(os.path.abspath(checkpoint_path)).split(os.sep)[-2:])
    size = args.get("dataset_size")  # checkpoints before it was kept: unknown, not assumed
    full = "" if size in (60_000, None) else " subset"
    dataset = "sprites" if ckpt["train_args"].get("dataset") == "sprites" else f"Fashion-MNIST{full}"
    images = "an unrecorded number of" if size is None else f"{size:,}"
    trained_on = f"{dataset}, {images} training images, {epochs} epochs, {vae.describe(args)}"
    meta = dict(format=f"beta-vae-{kind}", format_version=FORMAT_VERSION, latent_dim=args["latent_dim"])
    meta |= dict(image_shape=",".join(map(str, vae.IMAGE_SHAPE)), pixel_range=pixel_range, beta=args["beta"])
    meta |= dict(objective=args["objective"], epochs=epochs, seed=ckpt["seed"], batchnorm="folded")
    meta |= dict(model_args=json.dumps(args, sort_keys=True), source_checkpoint=shown(source, 400))
    meta |= dict(checkpoint_sha256=ckpt["sha256"], torch_version=torch.__version__, trained_on=trained_on)
    if kl[0] is not None:  # sample.py and explore.py order the dimensions by it
        meta |= {"kl_per_dim": json.dumps(kl[0]), "kl_epoch": kl[1]}
    return {key: str(value) for key, value in meta.items()}  # ONNX metadata holds strings only


def parse_args(argv=None):
    p = ArgumentParser(description="Export the β-VAE decoder and encoder to ONNX.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py (required)")
    p.add_argument("--out", help="decoder file to write (default: decoder.onnx beside the checkpoint)")
    p.add_argument("--encoder", help="encoder file to write (default: encoder.onnx beside the checkpoint)")
    add(p, "no_encoder", "export the decoder only", action="store_true")
    p.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default: 17)")
    add(p, "overwrite", "replace existing files", default_text="refuse", action="store_true")
    args = p.parse_args(argv)
    if args.no_encoder and args.encoder:
        raise UsageError("--no-encoder and --encoder contradict each other: give one of them")
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    args.out = args.out or os.path.join(folder, "decoder.onnx")
    args.encoder = None if args.no_encoder else args.encoder or os.path.join(folder, "encoder.onnx")
    if args.opset not in OPSETS:
        raise UsageError(f"--opset {args.opset} is not supported: pick {OPSETS[0]} to {OPSETS[-1]}")
    clash = clashes({"--checkpoint": args.checkpoint}, {"--out": args.out, "--encoder": args.encoder})
    if clash:  # first: an output that is the checkpoint must not be answered with "pass --overwrite"
        raise UsageError(f"{clash}: --checkpoint, --out and --encoder must be different files")
    for flag, path in (("--out", args.out), ("--encoder", args.encoder)):
        if path is not None and (not os.path.isdir(os.path.dirname(os.path.abspath(path))) or os.path.isdir(path)):
            raise UsageError(f"cannot write {path}: its folder does not exist or it is a folder; choose a file path")
        if path is not None and os.path.lexists(path) and not args.overwrite:
            raise UsageError(f"{flag} {path} already exists: pass --overwrite to replace it, or choose another path")
    return args


def main(argv=None):
    safe_streams()  # a path whose bytes are not UTF-8 is printed escaped, not a UnicodeEncodeError after writing
    try:
        args = parse_args(argv)
        model, ckpt = vae.load_checkpoint(args.checkpoint, "cpu")  # its bytes read once: weights and hash agree
        d, kl = ckpt["model_args"]["latent_dim"], kl_from_history(ckpt)
        about = f"opset {args.opset}, latent_dim {d}, epoch {ckpt['epoch']}"
        if kl[0] is None:
            order = "sample.py --traverse and explore.py show dimensions in index order"
            print(f"note: no per-dimension KL in the metadata ({kl[1]}): {order}")
        jobs = [("decoder", args.out, (d,), "0,1", lambda rng, b: rng.standard_normal((b, d)))]
        if args.encoder:
            draw = lambda rng, b: rng.uniform(-1, 1, (b, *vae.IMAGE_SHAPE))
            jobs.append(("encoder", args.encoder, vae.IMAGE_SHAPE, "-1,1", draw))
        ready, batches = [], ", ".join(map(str, PARITY_BATCHES))
        for kind, path, shape, pixel_range, make_input in jobs:
            module, meta = getattr(model, kind), metadata(kind, ckpt, args.checkpoint, pixel_range, kl)
            onnx_bytes = export(module, torch.zeros(2, *shape), *SIGNATURE[kind], args.opset, meta)
            diff = parity(onnx_bytes, module, make_input)  # these exact bytes are what gets written
            print(f"{kind}: max |onnxruntime - torch| = {diff:.2e} at batch sizes {batches} (limit {PARITY_ATOL:.0e})")
            if not diff <= PARITY_ATOL:
                why = f"the exported {kind} does not match torch (max abs diff {diff:.2e}); nothing was written"
                fail(f"{why}: report this with your torch and onnxruntime versions", 1)
            ready.append((kind, path, onnx_bytes))
        clean_stale_temps_for([path for _, path, _ in ready])
        try:  # both files or neither: a new decoder beside a stale encoder would not belong together
            atomic_write_all([(path, b) for _, path, b in ready])
        except OSError as err:
            why = f"cannot write {' and '.join(p for _, p, _ in ready)} ({err.strerror or err}); nothing was changed"
            raise UsageError(f"{why}: choose another --out/--encoder path or free some space") from None
    except (UsageError, vae.CheckpointError, data.DataError) as e:
        fail(e)
    except Interrupted:
        fail("interrupted after writing the files", 130)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    for kind, path, b in ready:
        print(f"wrote {path}: {kind}, {len(b) / 1024:.0f} KiB, {about}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
