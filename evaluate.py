"""Evaluate a trained β-VAE: likelihood bounds, FID under two feature extractors, latent diagnostics, figures.

    $ python evaluate.py --checkpoint runs/<run>/checkpoint.pt [--data-dir ./data] [--out-dir O] [--iwae-k 64]

Everything about the model comes from the checkpoint. Prints a table and writes O/report.json plus
reconstructions.png, samples.png, traversals.png and interpolations.png (O defaults to eval/ beside the checkpoint).
The same --seed gives the same numbers; only the timings change.
"""
import ctypes
import errno
import json
import math
import os
import sys
import tempfile
import time
import warnings

import torch

import checkpoint
import data
import fid_classifier
import figures
import metrics
import vae
from plumbing.cli import ArgumentParser, UsageError, check_int, check_range, safe_streams
from plumbing.files import atomic_write_all, clashes, clean_stale_temps

FIGURES = ("reconstructions.png", "samples.png", "traversals.png", "interpolations.png")
EXTRACTOR_NAMES = {"pixels": "raw pixels, the course project's FID", "classifier": "Fashion-MNIST CNN features"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py (required)")
    p.add_argument("--data-dir", "--data_dir", default="./data",
                   help="folder holding FashionMNIST/raw; downloaded there if missing (default: ./data)")
    p.add_argument("--out-dir", "--out_dir", default=None,
                   help="where report.json and the figures go (default: eval/ beside the checkpoint)")
    p.add_argument("--iwae-k", "--iwae_k", type=int, default=metrics.IWAE_K,
                   help="importance samples per test image for the IWAE bound on -log p(x) "
                        f"(default: {metrics.IWAE_K})")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds every random draw: IWAE samples, prior samples, image pairs (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                                                   "(default: auto)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1000,
                   help="images per forward pass when encoding, decoding and extracting features (default: 1000)")
    p.add_argument("--n-show", "--n_show", type=int, default=10,
                   help="images per row in the figures; samples.png shows n-show x n-show (default: 10)")
    return p.parse_args(argv)


def check_args(args):
    check_range("iwae_k", args.iwae_k)
    check_range("batch_size", args.batch_size)
    check_int("--n-show", args.n_show, 1, 32)
    check_range("seed", args.seed)


def prepare_out_dir(out_dir, inputs):
    """(the folder resolved, the topmost folder this run made or None). Made and written resolved: "gone/../new" is
    new/ as the kernel sees it only once gone/ exists, and gone/ is never made here. Messages name it as given."""
    real = os.path.realpath(out_dir)
    problem = clashes(inputs, {f"--out-dir {name}": os.path.join(real, name) for name in ("report.json",) + FIGURES})
    if problem:
        raise UsageError(f"{problem}: pass another --out-dir")
    created, path = None, real   # a failed run removes what it made
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        created, path = path, os.path.dirname(path)
    try:
        os.makedirs(real, exist_ok=True)
        with tempfile.TemporaryFile(dir=real):  # the only sure test of writability (root passes os.access)
            pass
    except OSError as e:
        remove_made_dirs(real, created)
        raise UsageError(f"cannot write to the output folder {out_dir} ({e.strerror}); pass a writable --out-dir")
    clean_stale_temps(real, ("report.json",) + FIGURES)  # half-written files of an evaluation that was killed
    return real, created


def remove_made_dirs(real, created):
    """Remove the resolved folder and its parents up to `created` (the topmost this run made; None: none), each only
    if empty."""
    path = real
    while created is not None:
        try:
            os.rmdir(path)
        except (FileNotFoundError, NotADirectoryError):   # makedirs stopped above it (a name too long, say)
            pass
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:   # not empty: something else wrote into it meanwhile
                return
        if path == created or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def refuse_non_finite(args, numbers):
    """Finite weights can still overflow (a log-variance of 200 makes exp() infinite): such numbers are no result."""
    found = first_non_finite(numbers)
    if found:
        raise UsageError(f"the evaluation of {args.checkpoint} gave {found[0]} = {found[1]}: its weights are finite "
                         "but overflow on this data; nothing was written: use an earlier checkpoint or retrain")


def first_non_finite(value, where=""):
    """(where, value) of the first NaN or infinite number in a nest of dicts and lists, or None. json.dumps would
    write them as NaN and Infinity, which are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in items:
        found = first_non_finite(v, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


# ------------------------------------------------------------------------------------------------ figures

# ------------------------------------------------------------------------------------------------ evaluation

def evaluate(args, caught):
    check_args(args)
    timings, t_start = {}, time.perf_counter()
    try:
        device = vae.pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e))
    model, ckpt = checkpoint.load_checkpoint(args.checkpoint, device)
    data.ensure_files(args.data_dir)   # both splits at once: one message names every missing file
    train = data.load(args.data_dir, "train", device)
    test = data.load(args.data_dir, "test", device)
    if len(test) < 2:
        raise UsageError(f"the test split in {args.data_dir} has {len(test)} image; the FIDs and the interpolation "
                         "figure need at least 2: use a data folder with more test images")
    # <run>/eval by default: train.py's samples.png and reconstructions.png stay as they are
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    inputs = {"--checkpoint": args.checkpoint}
    inputs.update({f"data file {n}": data.find(args.data_dir, n) for s in data.FILES.values() for n in s})
    real, created = prepare_out_dir(out_dir, inputs)  # only once every input is known good
    print(f"device: {device}", flush=True)  # stdout, and only now: a failing run's stderr is its error line alone
    try:
        report, pngs = measure(args, model, ckpt, train, test, device, timings, t_start)
        # ours (few samples for a covariance, a fast path not taken) belong in the report; library deprecations not
        report["warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
        found = first_non_finite(report)  # measure() checks the numbers; this keeps NaN out whatever changes
        if found:
            raise UsageError(f"the evaluation gave {found[0]} = {found[1]}; nothing was written: use an earlier "
                             "checkpoint or retrain")
        write_outputs(real, out_dir, report, pngs)
    except BaseException:
        remove_made_dirs(real, created)  # a failed run leaves no new folder
        raise
    return out_dir, report


def write_outputs(real, out_dir, report, pngs):
    """report.json and the figures as one (fileio.atomic_write_all) into the resolved folder: after a failure (a full
    disk) every file in it is as it was, so a report never sits beside figures of another evaluation."""
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    items = [(os.path.join(real, "report.json"), lambda f: f.write(text.encode()))]
    items += [(os.path.join(real, name), lambda f, b=pngs[name]: f.write(b)) for name in FIGURES]
    try:
        atomic_write_all(items)
    except OSError as e:
        raise UsageError(f"cannot write report.json and the figures in {out_dir} ({e.strerror or e}): free space or "
                         "pass another --out-dir; nothing in it was changed") from None


def measure(args, model, ckpt, train, test, device, timings, t_start):
    """Every number of the report, checked finite, then the figures. Returns (report, {figure name: PNG bytes})."""
    torch.manual_seed(args.seed)
    gen_iwae, gen_prior, gen_pairs = (torch.Generator().manual_seed(args.seed + i) for i in range(3))
    timings["load"] = time.perf_counter() - t_start

    t = time.perf_counter()
    bounds = metrics.likelihood_bounds(model, test, k=args.iwae_k, generator=gen_iwae, progress=True)
    timings["elbo_iwae"] = time.perf_counter() - t   # one pass: the ELBO averages the same k samples
    refuse_non_finite(args, {"test": bounds})  # at once: the rest would take minutes to end the same way

    t = time.perf_counter()
    mu_test, logvar_test, y_test = metrics.encode_split(model, test, args.batch_size)
    mu_train, _, y_train = metrics.encode_split(model, train, args.batch_size)
    n_active, mu_variance = metrics.active_units(mu_test)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    probe_acc = metrics.linear_probe_accuracy(mu_train, y_train, mu_test, y_test)
    timings["probe"] = time.perf_counter() - t
    t = time.perf_counter()
    decomposition = metrics.elbo_decomposition(mu_test, logvar_test, torch.Generator().manual_seed(args.seed + 3))
    timings["decomposition"] = time.perf_counter() - t

    t = time.perf_counter()
    classifier, cls_info = fid_classifier.load_classifier(args.data_dir, device, train, test, progress=True)
    timings["classifier"] = time.perf_counter() - t

    t = time.perf_counter()
    n = len(test)
    real = test.images.float().cpu() / 255.0
    recon_images = metrics.decode_batched(model, mu_test, args.batch_size)
    generated = metrics.prior_samples(model, n, gen_prior, args.batch_size)
    timings["decode"] = time.perf_counter() - t
    fid = {}
    for name, extract in (("pixels", metrics.pixel_features),
                          ("classifier", lambda im: fid_classifier.classifier_features(classifier, im, args.batch_size))):
        t = time.perf_counter()
        real_stats = metrics.feature_stats(extract(real))
        fid[name] = {part: metrics.frechet_distance(*real_stats, *metrics.feature_stats(extract(images)))
                     for part, images in (("reconstruction", recon_images), ("generation", generated))}
        fid[name].update(n_real=n, n_reconstruction=n, n_generation=n, feature_dim=int(real_stats[0].shape[0]),
                         features=EXTRACTOR_NAMES[name])
        timings[f"fid_{name}"] = time.perf_counter() - t

    refuse_non_finite(args, {"test": bounds, "decomposition": decomposition, "linear_probe_acc": probe_acc,
                             "mu_variance_per_dim": mu_variance, "fid": fid})
    t = time.perf_counter()
    cfg = ckpt["model_args"]
    caption = (f"{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}: latent {cfg['latent_dim']}, "
               f"β={cfg['beta']}, epoch {ckpt['epoch']} · data {args.data_dir} "
               f"({len(train):,} train / {n:,} test images)")
    pngs = figures.evaluation_figures(model, test, mu_test, recon_images, generated, bounds["kl_per_dim"], fid,
                                      caption, min(args.n_show, len(test)), gen_pairs)   # written with report.json
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    test_report = {key: bounds[key] for key in ("recon", "kl", "neg_elbo", "iwae_nll")}
    test_report.update(n_images=n, iwae_k=args.iwae_k, units="nats per image")
    report = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "model_args": cfg,
        "epoch": ckpt["epoch"],
        "train_args": {k: v for k, v in (ckpt["train_args"] if isinstance(ckpt["train_args"], dict) else {}).items()
                       if isinstance(v, (str, int, float, bool))},  # the flags it was trained with (sweep.py reads them)
        "seed": args.seed,
        "device": str(device),
        "data": {"data_dir": os.path.abspath(args.data_dir), "n_train": len(train), "n_test": n},
        "test": test_report,
        "kl_per_dim": bounds["kl_per_dim"],
        "decomposition": decomposition,
        "active_units": n_active,
        "mu_variance_per_dim": mu_variance,
        "linear_probe_acc": probe_acc,
        "classifier_test_acc": cls_info["test_acc"],
        "classifier_cache": cls_info["path"],
        "classifier_from_cache": cls_info["from_cache"],
        "fid": fid,
        "figures": list(FIGURES),
        "timings_s": timings,
    }
    return report, pngs


def print_table(report):
    test, fid = report["test"], report["fid"]
    rows = [("test recon (nats/image)", test["recon"]), ("test KL (nats/image)", test["kl"]),
            ("test -ELBO at β=1 (nats/image)", test["neg_elbo"]),
            (f"test IWAE -log p(x), k={test['iwae_k']}", test["iwae_nll"]),
            ("KL part: index-code mutual info", report["decomposition"]["mutual_info"]),
            ("KL part: total correlation", report["decomposition"]["total_correlation"]),
            ("KL part: dimension-wise KL", report["decomposition"]["dimwise_kl"]),
            ("active units", f"{report['active_units']} of {len(report['kl_per_dim'])}"),
            ("linear probe accuracy", report["linear_probe_acc"]),
            ("FID classifier features: reconstruction", fid["classifier"]["reconstruction"]),
            ("FID classifier features: generation", fid["classifier"]["generation"]),
            ("FID raw pixels: reconstruction", fid["pixels"]["reconstruction"]),
            ("FID raw pixels: generation", fid["pixels"]["generation"]),
            ("FID classifier's own test accuracy", report["classifier_test_acc"]),
            ("evaluation time (s)", report["timings_s"]["total"])]
    print(f"{report['checkpoint']}: {report['data']['n_test']:,} test images, FIDs against all of them")
    for label, value in rows:
        print(f"  {label:<42} {value:.4f}" if isinstance(value, float) else f"  {label:<42} {value}")
    print("  KL per dim: " + " ".join(f"{v:.2f}" for v in report["kl_per_dim"]))


def keep_freed_memory():
    """Stop glibc from handing each pass's freed buffers back to the kernel only to fault them in again.

    The IWAE pass allocates and frees megabytes per batch; with glibc's defaults that cost 4 of 27 CPU-seconds in
    page faults on a 10,000-image evaluation (measured). No-op off glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory for reuse
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: its maximum, 32 MiB; bigger blocks are few and long-lived
    except (OSError, AttributeError):
        pass


def main(argv=None):
    safe_streams()
    args = parse_args(argv)
    keep_freed_memory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out_dir, report = evaluate(args, caught)
        except (UsageError, checkpoint.CheckpointError, data.DataError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # anything else the file system refused
            print(f"error: cannot read or write {e.filename or 'a file'} ({e.strerror or e}); nothing was written",
                  file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted; report.json and the figures were not written", file=sys.stderr)
            sys.exit(130)
    for message in report["warnings"]:
        print(f"warning: {message}", file=sys.stderr)
    print_table(report)
    print(f"wrote {os.path.join(out_dir, 'report.json')} and {', '.join(FIGURES)}")


if __name__ == "__main__":
    main()
