"""Evaluate a trained β-VAE: likelihood bounds, FIDs under two feature extractors, the KL's decomposition, latent
diagnostics, disentanglement (on sprites), figures.

$ python evaluate.py --checkpoint runs/beta4_z10_seed0/checkpoint.pt [--data-dir ./data] [--save-latents z.npz]

Everything about the model, and which data set it trained on, comes from the checkpoint. Prints a table and writes
report.json, reconstructions.png, samples.png, traversals.png and interpolations.png to --out-dir (default: eval/
beside the checkpoint), all or none. The same --seed gives the same numbers; only the timings change.
"""

import contextlib
import ctypes
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import data
import fid
import figures
import metrics
import vae
from plumbing import onnx_check
from plumbing.cli import ArgumentParser, UsageError, add, add_device, add_setting, check_setting, safe_streams, shown
from plumbing.files import Interrupted, atomic_write_all, clashes, clean_stale_temps

FIGURES = ("reconstructions.png", "samples.png", "traversals.png", "interpolations.png")
EXTRACTORS = {"pixels": "raw pixels, the course project's FID", "classifier": "CNN features of the data's classes"}
TABLE = (  # (label, report key) of the printed table
    ("test recon, BCE (nats/image)", "test.recon"),
    ("test KL (nats/image)", "test.kl"),
    ("test -ELBO at β=1, BCE (nats/image)", "test.neg_elbo"),
    ("test IWAE, BCE (nats/image)", "test.iwae_nll"),
    ("continuous Bernoulli -ELBO (bits/pixel)", "continuous_bernoulli.neg_elbo_bits_per_dim"),
    ("continuous Bernoulli IWAE (bits/pixel)", "continuous_bernoulli.iwae_bits_per_dim"),
    ("KL part: index-code mutual info", "decomposition.mutual_info"),
    ("KL part: total correlation", "decomposition.total_correlation"),
    ("KL part: dimension-wise KL", "decomposition.dimwise_kl"),
    ("dimensions in use (KL > 0.01 nats)", "active_units"),
    ("linear probe accuracy", "linear_probe_acc"),
    ("FID classifier features: reconstruction", "fid.classifier.reconstruction"),
    ("FID classifier features: generation", "fid.classifier.generation"),
    ("FID raw pixels: reconstruction", "fid.pixels.reconstruction"),
    ("FID raw pixels: generation", "fid.pixels.generation"),
    ("FID classifier's own test accuracy", "classifier_test_acc"),
    *((f"disentanglement: {k}", f"disentanglement.{k}") for k in metrics.DISENTANGLEMENT),
    ("evaluation time (s)", "timings_s.total"),
)


def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate a trained β-VAE.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py (required)")
    p.add_argument("--dataset", choices=data.DATASETS, help="the data to evaluate on (default: the run's)")
    add(p, "data_dir", "folder holding FashionMNIST/raw, downloaded there if missing", default="./data")
    add(p, "out_dir", "where report.json and the figures go", default_text="eval/ beside the checkpoint")
    add_setting(p, "iwae_k", vae.SETTINGS["iwae_k"])
    add(p, "save_latents", "also save the test images' posterior means and labels (.npz)", default_text="none")
    p.add_argument("--seed", type=int, default=0, help="seeds every draw: IWAE samples, samples, pairs (default: 0)")
    add_device(p)
    add(p, "batch_size", "images a pass when encoding, decoding, extracting features", type=int, default=1000)
    add(p, "n_show", "images a row in the figures (samples.png: n-show x n-show), 1 to 32", type=int, default=10)
    return p.parse_args(argv)


def check_args(args):
    for name in ("iwae_k", "batch_size", "seed"):
        check_setting(name, getattr(args, name), vae.SETTINGS[name])
    if not 1 <= args.n_show <= 32:
        raise UsageError(f"--n-show {args.n_show} is out of range: use 1 to 32")
    if args.save_latents is not None and not args.save_latents.endswith(".npz"):
        raise UsageError(f"--save-latents {args.save_latents}: numpy's savez writes .npz files; name it *.npz")


def prepare_out_dir(out_dir, inputs):
    """(the folder resolved, the folders this made, deepest first). Made and written resolved: "gone/../new" is new/
    as the kernel sees it only once gone/ exists, and gone/ is never made here."""
    real = os.path.realpath(out_dir)
    outputs = {f"--out-dir {name}": os.path.join(real, name) for name in ("report.json", *FIGURES)}
    if problem := clashes(inputs, outputs):
        raise UsageError(f"{problem}: pass another --out-dir")
    made, path = [], real
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        made, path = [*made, path], os.path.dirname(path)
    try:
        os.makedirs(real, exist_ok=True)
        tempfile.TemporaryFile(dir=real).close()  # the only sure test of writability (root passes os.access)
    except OSError as e:
        remove_made_dirs(made)
        why = f"cannot write to the output folder {out_dir} ({e.strerror})"
        raise UsageError(f"{why}; pass a writable --out-dir") from None
    clean_stale_temps(real, ("report.json", *FIGURES))  # half-written files of an evaluation that was killed
    return real, made


def remove_made_dirs(made):
    """Remove the folders this evaluation made, deepest first, each only if empty: one that something else wrote into
    stays, and so does every folder above it."""
    for path in made:
        with contextlib.suppress(OSError):  # also one never made: makedirs stopped above it (a name too long, say)
            os.rmdir(path)


def first_non_finite(value, where=""):
    """(where, value) of the first NaN or infinite number in nested dicts and lists, or None: json.dumps would write
    them as NaN and Infinity, which are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    for key, v in value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ():
        if found := first_non_finite(v, f"{where}.{key}" if where else str(key)):
            return found
    return None


def refuse_non_finite(args, numbers):
    """Finite weights can still overflow (a log-variance of 200 makes exp() infinite): such numbers are no result."""
    if found := first_non_finite(numbers):
        gave = f"the evaluation of {args.checkpoint} gave {found[0]} = {found[1]}"
        why = "its weights are finite but overflow on this data; nothing was written"
        raise UsageError(f"{gave}: {why}: use an earlier checkpoint or retrain")


def evaluate(args, caught):
    check_args(args)
    t_start = time.perf_counter()
    device = vae.pick_device(args.device)
    model, ckpt = vae.load_checkpoint(args.checkpoint, device)
    args.dataset = args.dataset or ckpt["train_args"].get("dataset", "fashion-mnist")
    if args.dataset == "fashion-mnist":
        data.ensure_files(args.data_dir)  # both splits at once: one message names every missing file
    train, test = (data.load(args.data_dir, split, device, args.dataset) for split in ("train", "test"))
    if len(test) < 2:
        why = "the FIDs and the interpolation figure need at least 2: use a data folder with more test images"
        raise UsageError(f"the test split in {args.data_dir} has {len(test)} image; {why}")
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    inputs = {f"data file {n}": data.find(args.data_dir, n) for split in data.FILES.values() for n in split}
    inputs["--checkpoint"] = args.checkpoint
    if problem := clashes(inputs, {"--save-latents": args.save_latents}):
        raise UsageError(f"{problem}: pass another --save-latents")
    real, made = prepare_out_dir(out_dir, inputs)  # only once every input is known good
    print(f"device: {device}", flush=True)  # stdout, and only now: a failing run's stderr is its error line alone
    try:
        report, files = measure(args, model, ckpt, train, test, device, t_start)
        # ours (few samples for a covariance, a fast path not taken) belong in the report; library deprecations not
        report["warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
        items = [(os.path.join(real, "report.json"), json.dumps(report, indent=2, allow_nan=False).encode() + b"\n")]
        items += [(os.path.join(real, name), files[name]) for name in FIGURES]
        items += [(args.save_latents, files["latents"])] if args.save_latents else []
        try:  # as one: a report never sits beside figures of another evaluation
            atomic_write_all(items)
        except OSError as e:
            why = f"cannot write report.json and the figures in {out_dir} ({e.strerror or e})"
            raise UsageError(f"{why}: free space or pass another --out-dir; nothing in it was changed") from None
    except Interrupted:
        raise
    except BaseException:
        remove_made_dirs(made)  # a failed run leaves no new folder
        raise
    return out_dir, report


def measure(args, model, ckpt, train, test, device, t_start):
    """Every number of the report, then the figures: (report, {file name: bytes})."""
    torch.manual_seed(args.seed)
    gen_iwae, gen_prior, gen_pairs, gen_mi = (torch.Generator().manual_seed(args.seed + i) for i in range(4))
    timings, n = {"load": time.perf_counter() - t_start}, len(test)

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        result = fn(*a, **k)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return result

    bounds = timed("elbo_iwae", metrics.likelihood_bounds, model, test, args.iwae_k, gen_iwae, progress=True)
    refuse_non_finite(args, {"test": bounds})  # at once: the rest would take minutes to end the same way
    mu, logvar, y = timed("encode", metrics.encode_split, model, test, args.batch_size)
    mu_train, _, y_train = metrics.encode_split(model, train, args.batch_size)
    probe = timed("probe", metrics.linear_probe_accuracy, mu_train, y_train, mu, y)
    decomposition = timed("decomposition", metrics.elbo_decomposition, mu, logvar, gen_mi)
    net, info = timed("classifier", fid.load_classifier, args.data_dir, device, train, test, args.dataset, None, True)
    recon = timed("decode", metrics.decode_batched, model, mu, args.batch_size)
    generated = timed("decode", metrics.prior_samples, model, n, gen_prior, args.batch_size)
    fids, real, parts = {}, test.images.float().cpu() / 255.0, {"reconstruction": recon, "generation": generated}
    for name, extract in (("pixels", fid.pixel_features), ("classifier", lambda im: fid.classifier_features(net, im))):
        t = time.perf_counter()
        stats = fid.feature_stats(extract(real))
        fids[name] = {k: fid.frechet_distance(*stats, *fid.feature_stats(extract(v))) for k, v in parts.items()}
        fids[name] |= dict(n_real=n, n_reconstruction=n, n_generation=n, feature_dim=int(stats[0].shape[0]))
        fids[name]["features"], timings[f"fid_{name}"] = EXTRACTORS[name], time.perf_counter() - t
    kl, dis = bounds["kl_per_dim"], None
    active = [d for d, v in enumerate(kl) if v > onnx_check.ACTIVE_KL]
    if test.factors is not None:
        dis = timed("disentanglement", metrics.disentanglement, mu.numpy(), test.factors, data.SPRITE_FACTORS)
    checkpoint = os.path.join(*os.path.normpath(os.path.abspath(args.checkpoint)).split(os.sep)[-2:])
    train_args = {k: v for k, v in ckpt["train_args"].items() if k != "data_dir"}  # no local path
    report = dict(checkpoint=checkpoint, checkpoint_sha256=ckpt["sha256"], model_args=ckpt["model_args"])
    report |= dict(epoch=ckpt["epoch"], train_args=train_args, seed=args.seed, device=str(device))
    where = dict(dataset=args.dataset, name=data.describe(args.dataset, len(train), n), n_train=len(train), n_test=n)
    report["data"] = where | {"fingerprint": data.fingerprint(args.dataset, args.data_dir, "test")}
    terms = {k: bounds[k] for k in ("recon", "kl", "neg_elbo", "iwae_nll")}
    report["test"] = terms | {"n_images": n, "iwae_k": args.iwae_k, "units": metrics.BCE_UNITS}
    report["continuous_bernoulli"] = bounds["continuous_bernoulli"] | {"units": metrics.CB_UNITS}
    report |= dict(kl_per_dim=kl, active_units=len(active), active_dims=active, active_kl=onnx_check.ACTIVE_KL)
    report |= dict(mu_variance_per_dim=mu.double().var(0).tolist(), decomposition=decomposition, linear_probe_acc=probe)
    report |= dict(classifier_test_acc=info["test_acc"], classifier_cache=os.path.basename(info["path"]))
    report |= dict(classifier_from_cache=info["from_cache"], fid=fids, **({"disentanglement": dis} if dis else {}))
    report |= dict(figures=list(FIGURES), timings_s=timings)
    refuse_non_finite(args, report)
    files = timed("figures", draw, model, ckpt, test, mu, recon, generated, kl, fids, dis, args, gen_pairs)
    buf, extra = io.BytesIO(), ({"factors": test.factors, "factor_names": data.SPRITE_FACTORS} if dis else {})
    timed("figures", np.savez, buf, mu=mu.numpy(), logvar=logvar.numpy(), labels=y.numpy(), **extra)
    timings["total"] = time.perf_counter() - t_start
    return report, files | {"latents": buf.getvalue()}


def draw(model, ckpt, test, mu, recon, generated, kl, fids, dis, args, generator):
    """The four figures as {file name: PNG bytes}, each titled with the run, its objective, epoch and data."""
    n, grid = min(args.n_show, len(test)), figures.labelled_grid
    run = shown(os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))), 60)
    about = f"{vae.describe(ckpt['model_args'])}, latent {ckpt['model_args']['latent_dim']}, epoch {ckpt['epoch']}"
    caption = f"{run}: {about} · {data.describe(args.dataset, model.config.dataset_size, len(test))}"
    scores = lambda part: "".join(f"FID {part} vs test, {v['features']}: {v[part]:.2f}\n" for v in fids.values())
    decode = lambda z: metrics.decode_batched(model, torch.as_tensor(z, dtype=torch.float32)).numpy()
    originals = test.images[:n].float().cpu().numpy() / 255.0
    order = sorted(range(len(kl)), key=lambda d: -kl[d])
    labels = [f"z{d}  KL {kl[d]:.2f}" + ("" if kl[d] > onnx_check.ACTIVE_KL else "  not in use") for d in order]
    for i, d in enumerate(order if dis else ()):  # the factor each latent shares most information with
        labels[i] += f"  ~ {dis['latents'][d]['factor']} ({dis['latents'][d]['normalised_mi']:.2f})"
    pairs = torch.randperm(len(test), generator=generator)[: 2 * max(1, n // 2)].view(-1, 2).tolist()
    w = np.linspace(0.0, 1.0, n)[:, None]
    paths = [decode((1 - w) * mu[a].numpy() + w * mu[b].numpy()) for a, b in pairs]
    paths = [np.concatenate([originals[a : a + 1], p, originals[b : b + 1]]) for (a, b), p in zip(pairs, paths)]
    titles = [
        f"Test images and their reconstructions at z = posterior mean\n{scores('reconstruction')}{caption}",
        f"Samples from the prior: decoder means at z ~ N(0, I)\n{scores('generation')}{caption}",
        "Latent traversals from the first test image's posterior mean: one dimension set to -3..3, the rest fixed\n"
        f"rows sorted by KL (nats per image, test split); in use: KL > {onnx_check.ACTIVE_KL:g}\n{caption}",
        "Interpolations between posterior means of random test-image pairs\n(first and last columns: the original "
        f"images; between: decoder means)\n{caption}",
    ]
    images = (
        grid([originals, recon[:n].numpy()], ["test", "reconstruction"], titles[0]),
        grid(figures.grid_rows(generated[: n * n].numpy(), n), None, titles[1]),
        figures.traversal(decode, mu[0].numpy(), order, labels, titles[2]),
        grid(paths, [f"#{a} -> #{b}" for a, b in pairs], titles[3]),
    )
    return {name: figures.png_bytes(image) for name, image in zip(FIGURES, images)}


def print_table(report):
    where = report["data"]
    print(f"{report['checkpoint']}: {where['name']}, FIDs against all {where['n_test']:,} test images")
    for label, key in TABLE:
        value = report
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            print(f"  {label:<44} {value:.4f}" if isinstance(value, float) else f"  {label:<44} {value}")
    print("  KL per dim: " + " ".join(f"{v:.2f}" for v in report["kl_per_dim"]))


def keep_freed_memory():
    """Stop glibc from handing each pass's freed buffers back to the kernel only to fault them in again (no-op off
    glibc): the page faults cost more than the memory kept."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory for reuse
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: its maximum, 32 MiB; bigger blocks are few and long-lived


def stale_exports(args, epoch):
    """A note when the run folder's exported files are of an earlier epoch than the checkpoint just evaluated."""
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    for name in ("decoder.onnx", "encoder.onnx"):
        try:
            exported = int(onnx_check.load(os.path.join(folder, name), name[:7]).meta.get("epochs", -1))
        except (UsageError, ValueError):
            continue
        if 0 <= exported < epoch:
            again = f"export it again (python export_onnx.py --checkpoint {args.checkpoint} --overwrite)"
            print(f"note: {name} in {folder} is from epoch {exported}, this checkpoint from epoch {epoch}: {again}")


def main(argv=None):
    safe_streams()
    args = parse_args(argv)
    keep_freed_memory()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does
    with warnings.catch_warnings(record=True, action="always") as caught:
        try:
            out_dir, report = evaluate(args, caught)
        except (UsageError, vae.CheckpointError, data.DataError, ValueError) as e:
            return fail(e)
        except OSError as e:  # anything else the file system refused
            return fail(f"cannot read or write {e.filename or 'a file'} ({e.strerror or e}); nothing was written")
        except Interrupted:
            return fail("interrupted after writing report.json and the figures", 130)
        except KeyboardInterrupt:
            return fail("interrupted; report.json and the figures were not written", 130)
        finally:
            signal.signal(signal.SIGTERM, previous)
    for message in report["warnings"]:
        print(f"warning: {message}", file=sys.stderr)
    print_table(report)
    latents = f"; {args.save_latents}" if args.save_latents else ""
    print(f"wrote {os.path.join(out_dir, 'report.json')} and {', '.join(FIGURES)}{latents}")
    stale_exports(args, report["epoch"])
    return 0


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
