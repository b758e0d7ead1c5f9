"""Train a β-VAE (Higgins et al. 2017) on Fashion-MNIST, or on the sprites set whose factors are known.

$ python train.py --beta 4
$ python train.py --beta 1 --epochs 20 --data-dir /path/to/data
$ python train.py --objective capacity --capacity-max 25 --gamma 1000     # Burgess et al. 2018
$ python train.py --objective tc --beta 4                                 # β-TCVAE, Chen et al. 2018
$ python train.py --dataset sprites --beta 4 --epochs 30                  # known factors: disentanglement metrics
$ python train.py --beta 4 --epochs 30 --resume                           # continue runs/beta4_z10_seed0

Writes into --out-dir: checkpoint.pt (every epoch), metrics.jsonl, train.log, loss.png, samples.png and
reconstructions.png. A folder that holds a checkpoint is never started over: --resume continues it. Ctrl-C (or
SIGTERM) finishes the current epoch, saves and stops; a second one stops at once.
"""

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys

import numpy as np
import torch

import data
import figures
import training
import vae
from plumbing.cli import ArgumentParser, UsageError, add_setting, check_int, check_setting, safe_streams
from plumbing.files import atomic_write, atomic_write_all, clashes, clean_stale_temps

MODEL_FLAGS = ("latent_dim", "beta", "objective", "gamma", "capacity_max", "capacity_steps", "alpha")
RUN_FLAGS = ("batch_size", "lr", "seed")  # must match the checkpoint when resuming, or the run is not one run
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "loss.png", "samples.png", "reconstructions.png")
CURVE_BINS = 50  # per-step objectives kept per epoch, averaged in bins, for loss.png across resumes
log = logging.getLogger("train")


def parse_args(argv=None):
    # model and run flags default to None, so that a resumed run tells "given" from "default"
    p = ArgumentParser(description="Train a β-VAE on Fashion-MNIST (or the sprites set).")
    for name in ("beta", "latent_dim", "epochs", "batch_size", "lr", "seed", "gamma", "alpha", "capacity_max",
                 "capacity_steps"):  # fmt: skip
        add_setting(p, name, vae.SETTINGS[name], default=None)
    p.add_argument(
        "--objective",
        choices=vae.OBJECTIVES,
        help="beta: recon + β·KL; capacity: recon + γ·|KL − C|; "
        "tc (β-TCVAE): recon + α·MI + β·TC + γ·dimension-wise KL (default: beta)",
    )
    p.add_argument(
        "--dataset",
        choices=data.DATASETS,
        help="fashion-mnist, or sprites: drawn here, with known "
        "factors (default: fashion-mnist; with --resume, the run's)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)"
    )
    p.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        help="folder holding FashionMNIST/raw, downloaded "
        "there if missing (default: ./data; with --resume, the folder the run trained on)",
    )
    p.add_argument(
        "--out-dir",
        "--out_dir",
        dest="out_dir",
        help="output folder (default: runs/beta<β>_z<latent>_seed<seed>; sprites runs add _sprites)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out-dir>/checkpoint.pt (a new run if there "
        "is none yet); flags that contradict it are refused. Without it, a folder holding a checkpoint is "
        "refused (default: off)",
    )
    p.add_argument(
        "--loop",
        choices=("fast", "seed"),
        help="fast: data resident on the device; seed: the course "
        "project's loop (torchvision transforms in DataLoader workers, BCE on probabilities), kept for "
        "comparison (default: fast)",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the training step; auto: on a CPU, for runs of a million images or more (default: auto)",
    )
    p.add_argument(
        "--num-generation-samples",
        "--num_generation_samples",
        dest="n_samples",
        type=int,
        default=64,
        help="images in samples.png, 1 to 10000 (default: 64)",
    )
    p.add_argument(
        "--num-reconstruction-samples",
        "--num_reconstruction_samples",
        dest="n_recon",
        type=int,
        default=16,
        help="test images in reconstructions.png, 1 to 1000 (default: 16)",
    )
    return p.parse_args(argv)


def run_name(s):
    head = {"capacity": f"cap{s['capacity_max']:g}", "tc": f"tc{s['beta']:g}"}.get(s["objective"], f"beta{s['beta']:g}")
    return f"{head}_z{s['latent_dim']}_seed{s['seed']}" + ("_sprites" if s["dataset"] == "sprites" else "")


def given_settings(args):
    """The settings the flags give, defaults filled in, and the run folder they name."""
    s = {k: getattr(args, k) for k in (*MODEL_FLAGS, *RUN_FLAGS, "epochs")}
    s = {k: (vae.SETTINGS[k].default if k in vae.SETTINGS else "beta") if v is None else v for k, v in s.items()}
    s["dataset"] = args.dataset or "fashion-mnist"
    s["out_dir"] = args.out_dir or os.path.join("runs", run_name(s))
    return s


def resume_settings(s, args, ckpt):
    """The checkpoint's settings where no flag was given; a flag that contradicts it is refused."""
    saved = {**ckpt["model_args"], **{k: ckpt["train_args"].get(k) for k in RUN_FLAGS}}
    saved["dataset"] = ckpt["train_args"].get("dataset", "fashion-mnist")
    for k in (*MODEL_FLAGS, *RUN_FLAGS, "dataset", "loop"):
        mine = args.loop if k == "loop" else getattr(args, k)
        theirs = ckpt["train_args"].get("loop", "fast") if k == "loop" else saved.get(k)
        if mine is not None and theirs is not None and mine != theirs:
            said = f"--loop {theirs}" if k == "loop" else theirs
            raise UsageError(
                f"--{k.replace('_', '-')} {mine} contradicts the checkpoint in {s['out_dir']} (trained "
                f"with {said}): drop the flag to resume, or use a new --out-dir"
            )
        if theirs is not None:
            s[k] = theirs
    if args.epochs is None:
        s["epochs"] = max(ckpt["train_args"].get("epochs", s["epochs"]), ckpt["epoch"])
    if s["epochs"] < ckpt["epoch"]:
        raise UsageError(
            f"--epochs {s['epochs']} is below the {ckpt['epoch']} epochs {s['out_dir']} has already "
            "trained: raise --epochs or drop it"
        )
    s["data_dir"] = args.data_dir or ckpt["train_args"].get("data_dir") or "./data"  # the data it trained on


def check_settings(s, args):
    """Every flag within its range, named in the message, before anything is read or written."""
    for name in ("latent_dim", "beta", "gamma", "capacity_max", "capacity_steps", "alpha", *RUN_FLAGS, "epochs"):
        if s[name] is not None:
            check_setting(name, s[name], vae.SETTINGS[name])
    check_int("--num-generation-samples", args.n_samples, 1, 10_000)
    check_int("--num-reconstruction-samples", args.n_recon, 1, 1_000)
    if s["loop"] == "seed" and (s["objective"] != "beta" or s["dataset"] != "fashion-mnist"):
        raise UsageError("--loop seed trains the plain β objective on Fashion-MNIST only: drop --loop seed")
    if args.compile == "on" and not training.has_cxx():
        raise UsageError(
            "--compile on needs a C++ compiler for the CPU (g++ or clang++): install one or use --compile off"
        )


def check_outputs(s, resuming):
    """Refuse an --out-dir whose files are the data's or, but for checkpoint.pt itself, the checkpoint's (a hard link,
    a symlinked folder): train.log is appended to in place, so such a link would be written into."""
    files = {f"data file {n}": data.find(s["data_dir"], n) for names in data.FILES.values() for n in names}
    ck = os.path.join(s["out_dir"], "checkpoint.pt")
    mine = {f"--out-dir {n}": os.path.join(s["out_dir"], n) for n in (*OUTPUTS[1:], "train.log", ".lock")}
    clash = clashes(files, {"--out-dir checkpoint.pt": ck}) or clashes(
        dict(files, **{"its checkpoint.pt": ck if resuming else None}), mine
    )
    if clash:
        raise UsageError(f"{clash}: pass another --out-dir; nothing was changed")


@contextlib.contextmanager
def run_folder(out_dir):
    """The folder, made if needed, with its lock held: two runs never write into one folder, and every decision that
    depends on the folder is made after this. A run that fails before training removes the folders it made."""
    made, path = None, os.path.abspath(out_dir)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        made, path = path, os.path.dirname(path)
    lock_path = os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        made_lock = not os.path.lexists(lock_path)
        lock = open(lock_path, "a+")
    except OSError as e:
        raise UsageError(f"cannot write to {out_dir} ({e.strerror}): pass a writable --out-dir") from None
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no advisory locks on this platform
        except OSError:
            raise UsageError(f"another train.py is writing to {out_dir}: wait for it, or pass another --out-dir")
        clean_stale_temps(out_dir, OUTPUTS)  # half-written files of a run that was killed
        state = {"started": False}
        try:
            yield state
        except BaseException:
            if made and not state["started"]:
                shutil.rmtree(made, ignore_errors=True)
            elif made_lock and not state["started"]:  # the folder was there: leave it as it was
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            raise


def setup_logging(out_dir):
    log.setLevel(logging.INFO)
    for h in log.handlers:  # a previous run's, in a process that runs main() again (the tests)
        h.close()
    log.handlers.clear()
    for h in (
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(os.path.join(out_dir, "train.log"), encoding="utf-8", errors="backslashreplace"),
    ):
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)


class StopFlag:
    """First SIGINT or SIGTERM: finish the epoch, save, stop. Second: stop at once (the last checkpoint stays)."""

    def __init__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker (--loop seed) inherits this handler: the trainer decides
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: the handler may run while tqdm is inside a print to stderr
        os.write(
            2, f"\n{signal.Signals(signum).name}: finishing this epoch and saving; send again to stop now\n".encode()
        )


def slow_epoch_hint(history):
    """One line when an epoch ran at under half the run's best speed: on a CPU the usual cause is another busy process
    (docs/speed.md, "A busy CPU"), and one thread is then often faster."""
    speeds = [m["img_per_s"] for m in history]
    if len(speeds) >= 2 and speeds[-1] < max(speeds) / 2:
        return (
            f"note: this epoch ran at {speeds[-1]:,.0f} img/s, under half this run's best ({max(speeds):,.0f}): "
            "another process is probably using the CPU; if it stays, stop (Ctrl-C) and continue with "
            "OMP_NUM_THREADS=1 python train.py ... --resume, often 2-3x faster on a busy CPU"
        )
    return None


def train(s, args):
    device = vae.pick_device(args.device)
    out, ck = s["out_dir"], os.path.join(s["out_dir"], "checkpoint.pt")
    if os.path.exists(ck) and not args.resume:  # said before the lock is tried (and again under it)
        raise UsageError(
            f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or --out-dir NEW "
            "for a new run; nothing was changed"
        )
    with run_folder(out) as folder:
        ckpt = None
        if os.path.exists(ck):  # read under the lock: another run may have saved an epoch since this one started
            if not args.resume:
                raise UsageError(
                    f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or "
                    "--out-dir NEW for a new run; nothing was changed"
                )
            ckpt = vae.read_checkpoint(ck)
            resume_settings(s, args, ckpt)
        s["loop"], s["data_dir"] = s.get("loop") or args.loop or "fast", s.get("data_dir") or args.data_dir or "./data"
        check_settings(s, args)
        check_outputs(s, ckpt is not None)
        if s["dataset"] == "fashion-mnist":
            data.ensure_files(s["data_dir"])  # both splits at once: one message names every missing file
        train_data, test_data = (data.load(s["data_dir"], split, device, s["dataset"]) for split in ("train", "test"))
        missing = data.missing_uncompressed(s["data_dir"]) if s["loop"] == "seed" else []
        if missing:
            raise UsageError(
                f"--loop seed reads the data through torchvision, which needs the uncompressed "
                f"{' and '.join(missing)} in {data.raw_dir(s['data_dir'])}: gunzip the .gz files there, "
                "or use --loop fast"
            )
        steps_per_epoch = math.ceil(len(train_data) / s["batch_size"])
        if s["objective"] == "capacity" and s["capacity_steps"] is None:
            s["capacity_steps"] = max(1, round(vae.CAPACITY_RAMP * s["epochs"] * steps_per_epoch))
        config = vae.VAEConfig(**{k: s[k] for k in MODEL_FLAGS}, dataset_size=len(train_data))
        torch.manual_seed(s["seed"])
        if ckpt is None:
            model = vae.BetaVAE(config).to(device)
        else:
            trained_on = ckpt["model_args"]["dataset_size"]
            if trained_on != len(train_data):
                raise UsageError(
                    f"the train split in {s['data_dir']} has {len(train_data):,} images, but the run in "
                    f"{out} trained on {trained_on:,}: pass the --data-dir it trained on, or start a new "
                    "--out-dir"
                )
            model = vae.model_from_checkpoint(ckpt, out).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
        if ckpt is not None:
            vae.load_optimizer_state(opt, ckpt, out)
        folder["started"] = True
        setup_logging(out)
        history, start = (list(ckpt["metrics"]), ckpt["epoch"]) if ckpt else ([], 0)
        log.info(
            f"device {device} | {data.describe(s['dataset'], len(train_data), len(test_data))} | "
            f"{vae.param_count(model):,} parameters | {model.config} | out {out}"
        )
        if start:
            log.info(f"resuming after epoch {start} of {s['epochs']}")
            write_metrics(out, history)  # the checkpoint's history is the truth
        elif args.resume:
            log.info(
                f"note: --resume found no checkpoint in {out}, so this is a NEW run (if you meant to continue "
                "one, check --out-dir)"
            )
        if config.objective == "capacity" and vae.capacity_at(s["epochs"] * steps_per_epoch, config) < 0.9 * \
                config.capacity_max:  # fmt: skip
            log.info(
                f"note: with --capacity-steps {config.capacity_steps:,} and {s['epochs']} epochs of "
                f"{steps_per_epoch:,} steps, C reaches only {vae.capacity_at(s['epochs'] * steps_per_epoch, config):.1f}"
                f" of C_max {config.capacity_max:g} nats by the last epoch: drop --capacity-steps, or train longer"
            )
        if s["loop"] == "seed":
            step = training.make_seed_step(model, opt, config)
        else:
            # decided from the whole run, not what is left of it: a resumed run takes the same path, bit for bit
            compiled = training.want_compile(args.compile, device, s["epochs"] * len(train_data))
            step = training.make_train_step(model, opt, config, "on" if compiled else "off", log=log.info)
            if compiled:
                log.info(
                    "compiling the training step (first batch) and the test pass: seconds to a minute, once "
                    "(--compile off skips this)"
                )
        stop = StopFlag()
        try:
            return run_epochs(model, opt, step, train_data, test_data, s, args, history, start, stop)
        finally:
            stop.restore()


def write_metrics(out_dir, history):
    lines = "".join(json.dumps(m) + "\n" for m in history)
    try:
        atomic_write(os.path.join(out_dir, "metrics.jsonl"), lines.encode())
    except OSError as e:
        raise UsageError(
            f"checkpoint.pt holds epoch {len(history)}, but metrics.jsonl in {out_dir} cannot be written "
            f"({e.strerror or e}): fix that and run the same command with --resume, which writes it "
            "again"
        ) from None


def run_epochs(model, opt, step, train_data, test_data, s, args, history, start, stop):
    train_args = {k: s[k] for k in (*RUN_FLAGS, "epochs", "data_dir", "loop", "dataset")}
    steps_per_epoch = math.ceil(len(train_data) / s["batch_size"])
    state = {"step": history[-1].get("step", start * steps_per_epoch) if history else 0}  # C follows the steps
    ck, hinted = os.path.join(s["out_dir"], "checkpoint.pt"), False
    for epoch in range(start, s["epochs"]):
        means, losses, img_s = training.epoch_loop(step, train_data, s, epoch, state)
        test = training.test_metrics(model, test_data, model.config, s["seed"], state["step"], s["batch_size"])
        if not all(math.isfinite(v) for v in test[:3]):  # the epoch's last update broke the weights: never save them
            raise training.NonFinite(f"the weights became NaN or infinite at the end of epoch {epoch + 1}")
        bins = np.array_split(np.asarray(losses), min(CURVE_BINS, len(losses)))
        history.append({"epoch": epoch + 1, "step": state["step"], "train": summary(means), "test": summary(test),
                        "img_per_s": img_s, "curve": [round(float(b.mean()), 4) for b in bins]})  # fmt: skip
        try:
            vae.save_checkpoint(ck, model, opt, epoch + 1, s["seed"], train_args, history)
        except OSError as e:
            kept = f"checkpoint.pt still holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise UsageError(
                f"cannot save epoch {epoch + 1} in {s['out_dir']} ({e.strerror or e}); {kept}: fix "
                "that (free space?) and run the same command with --resume"
            ) from None
        write_metrics(s["out_dir"], history)
        note = " (incl. compiling)" if epoch == start and getattr(step, "compiled", False) else ""
        log.info(
            f"epoch {epoch + 1:3d}/{s['epochs']} | train recon {means[0]:7.2f} kl {means[1]:6.2f} total "
            f"{means[2]:7.2f} | test recon {test[0]:7.2f} kl {test[1]:6.2f} total {test[2]:7.2f} | {img_s:,.0f} "
            f"img/s{note}"
        )
        hint = None if train_data.device.type != "cpu" or hinted else slow_epoch_hint(history[start:])
        if hint:
            log.info(hint)
            hinted = True
        if stop.signum is not None:
            log.info(
                f"stopped after epoch {epoch + 1}; continue with: python train.py --resume --out-dir "
                f"{s['out_dir']}" + ("" if s["dataset"] == "sprites" else f" --data-dir {s['data_dir']}")
            )
            return 128 + stop.signum
    try:
        draw_figures(model, test_data, s, history, args)
    except OSError as e:
        raise UsageError(
            f"cannot write the figures in {s['out_dir']} ({e.strerror or e}); checkpoint.pt is "
            "complete: free space and run the same command with --resume to draw them"
        ) from None
    data_flag = "--dataset sprites" if s["dataset"] == "sprites" else f"--data-dir {s['data_dir']}"
    stale = [n for n in ("eval/report.json", "decoder.onnx", "encoder.onnx") if start and os.path.exists(
        os.path.join(s["out_dir"], n))]  # fmt: skip
    log.info(
        f"done: {ck}, metrics.jsonl, loss.png, samples.png, reconstructions.png in {s['out_dir']}\n"
        + (
            f"note: {', '.join(stale)} in {s['out_dir']} are of epoch {start} or earlier: run the next lines "
            "again for this epoch's\n"
            if stale
            else ""
        )
        + f"next:  python evaluate.py --checkpoint {ck} {data_flag}\n"
        f"       python export_onnx.py --checkpoint {ck}{' --overwrite' if stale else ''} && python sample.py "
        f"--onnx {os.path.join(s['out_dir'], 'decoder.onnx')}"
    )
    return 0


def summary(v):
    return {"recon": v[0], "kl": v[1], "total": v[2], "kl_per_dim": v[3:]}


@torch.no_grad()
def draw_figures(model, test, s, history, args):
    """loss.png (the whole run), samples.png and reconstructions.png, written as one."""
    model.eval()
    tag = (
        f"{vae.describe(vars(model.config))}, latent {s['latent_dim']}, epoch {len(history)}, "
        f"{data.describe(s['dataset'], model.config.dataset_size, len(test))}"
    )
    z = torch.randn(args.n_samples, s["latent_dim"], generator=torch.Generator().manual_seed(s["seed"]))
    samples = model.decode(z.to(test.device)).cpu().numpy()
    x, _, _ = next(test.batches(min(args.n_recon, len(test))))
    recon = model.decode(model.encode(x)[0]).cpu().numpy()  # at the posterior mean, as the seed shows them
    model.train()
    pngs = {"loss.png": figures.training_curves(history, tag),
            "samples.png": figures.png_bytes(figures.labelled_grid(
                figures.grid_rows(samples, math.ceil(math.sqrt(len(samples)))),
                title=f"Samples from the prior: decoder means at z ~ N(0, I)\n{tag}")),
            "reconstructions.png": figures.png_bytes(figures.labelled_grid(
                [((x + 1) / 2).cpu().numpy(), recon], ["test image", "reconstruction"],
                f"Test images and their reconstructions at z = posterior mean\n{tag}"))}  # fmt: skip
    atomic_write_all([(os.path.join(s["out_dir"], name), b) for name, b in pngs.items()])


def main(argv=None):
    safe_streams()
    args = parse_args(argv)
    s = given_settings(args)
    try:
        return train(s, args)
    except (UsageError, data.DataError, vae.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except training.NonFinite as e:
        kept = (
            "the last good checkpoint is kept"
            if os.path.exists(os.path.join(s["out_dir"], "checkpoint.pt"))
            else "no epoch was completed, so no checkpoint was written"
        )
        print(f"error: {e}; {kept}: lower --lr or --beta and train again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "stopped at once; checkpoint.pt (if an epoch was completed) holds the last completed epoch: continue "
            "with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
