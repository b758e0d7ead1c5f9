"""Evaluate a trained β-VAE: likelihood bounds, FIDs under two feature extractors, the KL's decomposition, latent
diagnostics, disentanglement (on sprites), figures.

$ python evaluate.py --checkpoint runs/beta4_z10_seed0/checkpoint.pt [--data-dir ./data] [--save-latents z.npz]

Everything about the model, and which data set it trained on, comes from the checkpoint. Prints a table and writes
report.json, reconstructions.png, samples.png, traversals.png and interpolations.png to --out-dir (default: eval/
beside the checkpoint), all or none. The same --seed gives the same numbers; only the timings change.
"""

import ctypes
import errno
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
from plumbing.cli import ArgumentParser, UsageError, add_setting, check_int, check_setting, safe_streams, shown
from plumbing.files import Interrupted, atomic_write_all, clashes, clean_stale_temps

FIGURES = ("reconstructions.png", "samples.png", "traversals.png", "interpolations.png")
EXTRACTORS = {"pixels": "raw pixels, the course project's FID", "classifier": "CNN features of the data's classes"}


def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate a trained β-VAE.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py (required)")
    p.add_argument("--dataset", choices=data.DATASETS, help="the data to evaluate on (default: the run's)")
    p.add_argument(
        "--data-dir",
        "--data_dir",
        default="./data",
        help="folder holding FashionMNIST/raw; downloaded there if missing (default: ./data)",
    )
    p.add_argument(
        "--out-dir", "--out_dir", help="where report.json and the figures go (default: eval/ beside the checkpoint)"
    )
    add_setting(p, "iwae_k", vae.SETTINGS["iwae_k"])
    p.add_argument(
        "--save-latents",
        "--save_latents",
        help="also write the test images' posterior means and "
        "log-variances, with their labels (and factors), to this .npz file (default: not written)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds every random draw: IWAE samples, prior samples, image pairs (default: 0)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)"
    )
    p.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=1000,
        help="images per forward pass when encoding, decoding and extracting features, 1 to 1000000 (default: 1000)",
    )
    p.add_argument(
        "--n-show",
        "--n_show",
        type=int,
        default=10,
        help="images per row in the figures; samples.png shows n-show x n-show, 1 to 32 (default: 10)",
    )
    return p.parse_args(argv)


def check_args(args):
    check_setting("iwae_k", args.iwae_k, vae.SETTINGS["iwae_k"])
    check_setting("batch_size", args.batch_size, vae.SETTINGS["batch_size"])
    check_setting("seed", args.seed, vae.SETTINGS["seed"])
    check_int("--n-show", args.n_show, 1, 32)
    if args.save_latents is not None and not args.save_latents.endswith(".npz"):
        raise UsageError(f"--save-latents {args.save_latents}: numpy's savez writes .npz files; name it *.npz")


def prepare_out_dir(out_dir, inputs):
    """(the folder resolved, the topmost folder this made or None). Made and written resolved: "gone/../new" is new/
    as the kernel sees it only once gone/ exists, and gone/ is never made here."""
    real = os.path.realpath(out_dir)
    problem = clashes(inputs, {f"--out-dir {name}": os.path.join(real, name) for name in ("report.json", *FIGURES)})
    if problem:
        raise UsageError(f"{problem}: pass another --out-dir")
    created, path = None, real
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        created, path = path, os.path.dirname(path)
    try:
        os.makedirs(real, exist_ok=True)
        with tempfile.TemporaryFile(dir=real):  # the only sure test of writability (root passes os.access)
            pass
    except OSError as e:
        remove_made_dirs(real, created)
        raise UsageError(f"cannot write to the output folder {out_dir} ({e.strerror}); pass a writable --out-dir")
    clean_stale_temps(real, ("report.json", *FIGURES))  # half-written files of an evaluation that was killed
    return real, created


def remove_made_dirs(real, created):
    """Remove the resolved folder and its parents up to `created` (None: none), each only if empty."""
    path = real
    while created is not None:
        try:
            os.rmdir(path)
        except (FileNotFoundError, NotADirectoryError):  # makedirs stopped above it (a name too long, say)
            pass
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:  # not empty: something else wrote into it meanwhile
                return
        if path == created or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def first_non_finite(value, where=""):
    """(where, value) of the first NaN or infinite number in nested dicts and lists, or None: json.dumps would write
    them as NaN and Infinity, which are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    for key, v in value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ():
        found = first_non_finite(v, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def refuse_non_finite(args, numbers):
    """Finite weights can still overflow (a log-variance of 200 makes exp() infinite): such numbers are no result."""
    found = first_non_finite(numbers)
    if found:
        raise UsageError(
            f"the evaluation of {args.checkpoint} gave {found[0]} = {found[1]}: its weights are finite "
            "but overflow on this data; nothing was written: use an earlier checkpoint or retrain"
        )


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
        raise UsageError(
            f"the test split in {args.data_dir} has {len(test)} image; the FIDs and the interpolation "
            "figure need at least 2: use a data folder with more test images"
        )
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    inputs = {"--checkpoint": args.checkpoint, **{f"data file {n}": data.find(args.data_dir, n) for s in
              data.FILES.values() for n in s}}  # fmt: skip
    if args.save_latents and clashes(inputs, {"--save-latents": args.save_latents}):
        raise UsageError(f"{clashes(inputs, {'--save-latents': args.save_latents})}: pass another --save-latents")
    real, created = prepare_out_dir(out_dir, inputs)  # only once every input is known good
    print(f"device: {device}", flush=True)  # stdout, and only now: a failing run's stderr is its error line alone
    try:
        report, files = measure(args, model, ckpt, train, test, device, t_start)
        # ours (few samples for a covariance, a fast path not taken) belong in the report; library deprecations not
        report["warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
        refuse_non_finite(args, report)
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        items = [(os.path.join(real, "report.json"), text.encode())]
        items += [(os.path.join(real, name), b) for name, b in files.items() if name in FIGURES]
        items += [(args.save_latents, files["latents"])] if args.save_latents else []
        try:  # as one: a report never sits beside figures of another evaluation
            atomic_write_all(items)
        except OSError as e:
            raise UsageError(
                f"cannot write report.json and the figures in {out_dir} ({e.strerror or e}): free space "
                "or pass another --out-dir; nothing in it was changed"
            ) from None
    except Interrupted:
        raise
    except BaseException:
        remove_made_dirs(real, created)  # a failed run leaves no new folder
        raise
    return out_dir, report


def measure(args, model, ckpt, train, test, device, t_start):
    """Every number of the report (checked finite), then the figures: (report, {file: bytes})."""
    torch.manual_seed(args.seed)
    gen_iwae, gen_prior, gen_pairs = (torch.Generator().manual_seed(args.seed + i) for i in range(3))
    timings = {"load": time.perf_counter() - t_start}

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        result = fn(*a, **k)
        timings[name] = time.perf_counter() - t
        return result

    bounds = timed("elbo_iwae", metrics.likelihood_bounds, model, test, k=args.iwae_k, generator=gen_iwae,
                   progress=True)  # fmt: skip
    refuse_non_finite(args, {"test": bounds})  # at once: the rest would take minutes to end the same way
    mu, logvar, y = timed("encode", metrics.encode_split, model, test, args.batch_size)
    mu_train, _, y_train = metrics.encode_split(model, train, args.batch_size)
    probe = timed("probe", metrics.linear_probe_accuracy, mu_train, y_train, mu, y)
    decomposition = timed("decomposition", metrics.elbo_decomposition, mu, logvar,
                          torch.Generator().manual_seed(args.seed + 3))  # fmt: skip
    classifier, cls_info = timed(
        "classifier", fid.load_classifier, args.data_dir, device, train, test, args.dataset, progress=True
    )
    t = time.perf_counter()
    real = test.images.float().cpu() / 255.0
    recon, generated = metrics.decode_batched(model, mu, args.batch_size), metrics.prior_samples(
        model, len(test), gen_prior, args.batch_size)  # fmt: skip
    timings["decode"] = time.perf_counter() - t
    fids = {}
    for name, extract in (
        ("pixels", fid.pixel_features),
        ("classifier", lambda im: fid.classifier_features(classifier, im, args.batch_size)),
    ):
        t = time.perf_counter()
        real_stats = fid.feature_stats(extract(real))
        fids[name] = {part: fid.frechet_distance(*real_stats, *fid.feature_stats(extract(images)))
                      for part, images in (("reconstruction", recon), ("generation", generated))}  # fmt: skip
        fids[name].update(n_real=len(test), n_reconstruction=len(test), n_generation=len(test),
                          feature_dim=int(real_stats[0].shape[0]), features=EXTRACTORS[name])  # fmt: skip
        timings[f"fid_{name}"] = time.perf_counter() - t
    kl = bounds["kl_per_dim"]
    active = [d for d, v in enumerate(kl) if v > onnx_check.ACTIVE_KL]
    dis = None
    if test.factors is not None:
        dis = timed("disentanglement", metrics.disentanglement, mu.numpy(), test.factors, data.SPRITE_FACTORS)
    report = {
        "checkpoint": os.path.join(*os.path.normpath(os.path.abspath(args.checkpoint)).split(os.sep)[-2:]),
        "checkpoint_sha256": ckpt["sha256"], "model_args": ckpt["model_args"], "epoch": ckpt["epoch"],
        "train_args": {k: v for k, v in ckpt["train_args"].items() if k != "data_dir"}, "seed": args.seed,
        "device": str(device),
        "data": {"dataset": args.dataset, "name": data.describe(args.dataset, len(train), len(test)),
                 "n_train": len(train), "n_test": len(test), "fingerprint": data.fingerprint(
                 args.dataset, args.data_dir, "test")},
        "test": {**{k: bounds[k] for k in ("recon", "kl", "neg_elbo", "iwae_nll")}, "n_images": len(test),
                 "iwae_k": args.iwae_k, "units": "nats per image; BCE on grey levels, the seed's objective: not a "
                 "log-likelihood, comparable within this project only"},
        "continuous_bernoulli": {**bounds["continuous_bernoulli"], "units": "nats per image, and bits per pixel: the "
                                 "bounds under the continuous Bernoulli, a normalised density on [0, 1]"},
        "kl_per_dim": kl, "active_units": len(active), "active_dims": active, "active_kl": onnx_check.ACTIVE_KL,
        "mu_variance_per_dim": mu.double().var(0).tolist(), "decomposition": decomposition,
        "linear_probe_acc": probe, "classifier_test_acc": cls_info["test_acc"],
        "classifier_cache": os.path.basename(cls_info["path"]), "classifier_from_cache": cls_info["from_cache"],
        "fid": fids, **({"disentanglement": dis} if dis else {}), "figures": list(FIGURES), "timings_s": timings,
    }  # fmt: skip
    refuse_non_finite(args, report)
    t = time.perf_counter()
    files = draw(model, ckpt, test, mu, recon, generated, kl, fids, dis, args, gen_pairs)
    if args.save_latents:
        buf = io.BytesIO()
        extra = {"factors": test.factors, "factor_names": np.array(data.SPRITE_FACTORS)} if dis else {}
        np.savez(buf, mu=mu.numpy(), logvar=logvar.numpy(), labels=y.numpy(), **extra)
        files["latents"] = buf.getvalue()
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return report, files


def draw(model, ckpt, test, mu, recon, generated, kl, fids, dis, args, generator):
    """The four figures as {file name: PNG bytes}, each titled with the run, its objective, epoch and data."""
    n = min(args.n_show, len(test))
    caption = (f"{shown(os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))), 60)}: "
               f"{vae.describe(ckpt['model_args'])}, latent {ckpt['model_args']['latent_dim']}, epoch {ckpt['epoch']}"
               f" · {data.describe(args.dataset, model.config.dataset_size, len(test))}")  # fmt: skip

    def scores(part):
        return "".join(f"FID {part} vs test, {v['features']}: {v[part]:.2f}\n" for v in fids.values())

    def decode(z):
        return metrics.decode_batched(model, torch.as_tensor(z, dtype=torch.float32)).numpy()

    grid, png = figures.labelled_grid, figures.png_bytes
    originals = test.images[:n].float().cpu().numpy() / 255.0
    order = sorted(range(len(kl)), key=lambda d: -kl[d])
    factor = [f"  ~ {dis['latents'][d]['factor']} ({dis['latents'][d]['normalised_mi']:.2f})" if dis else ""
              for d in order]  # fmt: skip
    labels = [f"z{d}  KL {kl[d]:.2f}" + ("" if kl[d] > onnx_check.ACTIVE_KL else "  not in use") + f
              for d, f in zip(order, factor)]  # fmt: skip
    pairs = torch.randperm(len(test), generator=generator)[: 2 * max(1, n // 2)].view(-1, 2).tolist()
    weights = np.linspace(0.0, 1.0, n)[:, None]
    paths = [np.concatenate([originals[a : a + 1], decode((1 - weights) * mu[a].numpy() + weights * mu[b].numpy()),
                             originals[b : b + 1]]) for a, b in pairs]  # fmt: skip
    return {
        "reconstructions.png": png(grid([originals, recon[:n].numpy()], ["test image", "reconstruction"],
                                        f"Test images and their reconstructions at z = posterior mean\n"
                                        f"{scores('reconstruction')}{caption}")),
        "samples.png": png(grid(figures.grid_rows(generated[: n * n].numpy(), n), None,
                                f"Samples from the prior: decoder means at z ~ N(0, I)\n{scores('generation')}{caption}")),
        "traversals.png": png(figures.traversal(
            decode, mu[0].numpy(), order, labels, "Latent traversals from the first test image's posterior mean: one "
            f"dimension set to -3..3, the rest fixed\nrows sorted by KL (nats per image, test split); in use: KL > "
            f"{onnx_check.ACTIVE_KL:g}" + ("; ~ the factor it shares most information with" if dis else "")
            + f"\n{caption}")),
        "interpolations.png": png(grid(paths, [f"#{a} -> #{b}" for a, b in pairs], "Interpolations between posterior "
                                       "means of random test-image pairs\n(first and last columns: the original "
                                       f"images; between: decoder means)\n{caption}")),
    }  # fmt: skip


def print_table(report):
    test, cb, fids, dec = report["test"], report["continuous_bernoulli"], report["fid"], report["decomposition"]
    rows = [("test recon, BCE (nats/image)", test["recon"]), ("test KL (nats/image)", test["kl"]),
            ("test -ELBO at β=1, BCE (nats/image)", test["neg_elbo"]),
            (f"test IWAE, BCE, k={test['iwae_k']}", test["iwae_nll"]),
            ("continuous Bernoulli -ELBO (bits/pixel)", cb["neg_elbo_bits_per_dim"]),
            ("continuous Bernoulli IWAE (bits/pixel)", cb["iwae_bits_per_dim"]),
            ("KL part: index-code mutual info", dec["mutual_info"]), ("KL part: total correlation",
            dec["total_correlation"]), ("KL part: dimension-wise KL", dec["dimwise_kl"]),
            (f"dimensions in use (KL > {report['active_kl']:g} nats)", f"{report['active_units']} of "
             f"{len(report['kl_per_dim'])}"), ("linear probe accuracy", report["linear_probe_acc"]),
            ("FID classifier features: reconstruction", fids["classifier"]["reconstruction"]),
            ("FID classifier features: generation", fids["classifier"]["generation"]),
            ("FID raw pixels: reconstruction", fids["pixels"]["reconstruction"]),
            ("FID raw pixels: generation", fids["pixels"]["generation"]),
            ("FID classifier's own test accuracy", report["classifier_test_acc"])]  # fmt: skip
    dis = report.get("disentanglement")
    if dis:
        rows += [(f"disentanglement: {k}", dis[k]) for k in ("mig", "sap", "dci_disentanglement",
                 "dci_completeness", "dci_informativeness", "factorvae_score")]  # fmt: skip
    rows.append(("evaluation time (s)", report["timings_s"]["total"]))
    print(
        f"{report['checkpoint']}: {report['data']['name']}, FIDs against all {report['data']['n_test']:,} test images"
    )
    for label, value in rows:
        print(f"  {label:<44} {value:.4f}" if isinstance(value, float) else f"  {label:<44} {value}")
    print("  KL per dim: " + " ".join(f"{v:.2f}" for v in report["kl_per_dim"]))


def keep_freed_memory():
    """Stop glibc from handing each pass's freed buffers back to the kernel only to fault them in again (page
    faults were a sixth of an evaluation's CPU time). No-op off glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory for reuse
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: its maximum, 32 MiB; bigger blocks are few and long-lived
    except (OSError, AttributeError):
        pass


def stale_exports(args, report):
    """A note when the run folder's exported files are of an earlier epoch than the checkpoint just evaluated."""
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    for name in ("decoder.onnx", "encoder.onnx"):
        try:
            epochs = int(onnx_check.load(os.path.join(folder, name), name[:7]).meta.get("epochs", -1))
        except (UsageError, ValueError):
            continue
        if 0 <= epochs < report["epoch"]:
            print(
                f"note: {name} in {folder} is from epoch {epochs}, this checkpoint from epoch {report['epoch']}: "
                f"export it again (python export_onnx.py --checkpoint {args.checkpoint} --overwrite)"
            )


def main(argv=None):
    safe_streams()
    args = parse_args(argv)
    keep_freed_memory()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out_dir, report = evaluate(args, caught)
        except (UsageError, vae.CheckpointError, data.DataError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # anything else the file system refused
            print(
                f"error: cannot read or write {e.filename or 'a file'} ({e.strerror or e}); nothing was written",
                file=sys.stderr,
            )
            return 2
        except Interrupted:
            print("error: interrupted after writing report.json and the figures", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print("error: interrupted; report.json and the figures were not written", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    for message in report["warnings"]:
        print(f"warning: {message}", file=sys.stderr)
    print_table(report)
    print(
        f"wrote {os.path.join(out_dir, 'report.json')} and {', '.join(FIGURES)}"
        + (f"; {args.save_latents}" if args.save_latents else "")
    )
    stale_exports(args, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
