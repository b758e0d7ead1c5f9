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
from plumbing.cli import ArgumentParser, UsageError, add, add_setting, check_int, check_setting, safe_streams
from plumbing.files import atomic_write, atomic_write_all, clashes, clean_stale_temps

MODEL_FLAGS = ("beta", "latent_dim", "objective", "gamma", "alpha", "capacity_max", "capacity_steps")
RUN_FLAGS = ("batch_size", "lr", "seed")  # must match the checkpoint when resuming, or the run is not one run
NUMBERS = (*MODEL_FLAGS[:2], "epochs", *RUN_FLAGS, *MODEL_FLAGS[3:])  # vae.SETTINGS's, in --help's order
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "loss.png", "samples.png", "reconstructions.png")
CURVE_BINS = 50  # per-step objectives kept per epoch, averaged in bins, for loss.png across resumes
log = logging.getLogger("train")


def parse_args(argv=None):
    p = ArgumentParser(description="Train a β-VAE on Fashion-MNIST (or the sprites set).")
    for name in NUMBERS:  # None: a resumed run tells "given" from "default"
        add_setting(p, name, vae.SETTINGS[name], default=None)
    objectives = "beta: recon + β·KL; capacity: recon + γ·|KL − C|; tc (β-TCVAE): recon + α·MI + β·TC + γ·dim-wise KL"
    add(p, "objective", objectives, "beta", choices=vae.OBJECTIVES)
    add(p, "dataset", "sprites: drawn here, with known factors", "fashion-mnist", choices=data.DATASETS)
    add(p, "device", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", default="auto")
    add(p, "data_dir", "folder of FashionMNIST/raw, downloaded there if missing", "./data; with --resume, the run's")
    add(p, "out_dir", "output folder", "runs/beta<β>_z<latent>_seed<seed>; sprites runs add _sprites")
    resume = "continue <out-dir>/checkpoint.pt (a new run if there is none yet); flags left out take the run's settings"
    resume += ", contradicting ones are refused. Without it, a folder holding a checkpoint is refused"
    add(p, "resume", resume, action="store_true")
    loops = "fast: data resident on the device; seed: the course project's loop (DataLoader workers, BCE on sigmoids)"
    add(p, "loop", loops, "fast", choices=("fast", "seed"))
    compiled = "torch.compile the training step; auto: on a CPU, for runs of 300,000 images or more"
    add(p, "compile", compiled, default="auto", choices=("auto", "on", "off"))
    count = dict(type=int, metavar="N")
    add(p, "num_generation_samples", "images in samples.png, 1 to 10000", default=64, **count)
    add(p, "num_reconstruction_samples", "test images in reconstructions.png, 1 to 1000", default=16, **count)
    return p.parse_args(argv)


def run_name(s):
    head = {"capacity": f"cap{s['capacity_max']:g}", "tc": f"tc{s['beta']:g}"}.get(s["objective"], f"beta{s['beta']:g}")
    return f"{head}_z{s['latent_dim']}_seed{s['seed']}" + ("_sprites" if s["dataset"] == "sprites" else "")


def given_settings(args):
    """The settings the flags give, defaults filled in, and the run folder they name."""
    s = {k: getattr(args, k) for k in (*MODEL_FLAGS, *RUN_FLAGS, "epochs")}
    s = {k: (vae.SETTINGS[k].default if k in vae.SETTINGS else "beta") if v is None else v for k, v in s.items()}
    s.update(dataset=args.dataset or "fashion-mnist", loop=args.loop or "fast", data_dir=args.data_dir or "./data")
    s["out_dir"] = args.out_dir or os.path.join("runs", run_name(s))
    return s


def resume_settings(s, args, ckpt):
    """The checkpoint's settings where no flag was given; a flag that contradicts it is refused."""
    ta = ckpt["train_args"]
    saved = {**ckpt["model_args"], **{k: ta.get(k) for k in RUN_FLAGS}}
    saved.update(dataset=ta.get("dataset", "fashion-mnist"), loop=ta.get("loop", "fast"))
    for k in (*MODEL_FLAGS, *RUN_FLAGS, "dataset", "loop"):
        mine, theirs = getattr(args, k), saved.get(k)
        if mine is not None and theirs is not None and mine != theirs:
            raise UsageError(
                f"--{k.replace('_', '-')} {mine} contradicts the checkpoint in {s['out_dir']} (trained with "
                f"{'--loop ' if k == 'loop' else ''}{theirs}): drop the flag to resume, or use a new --out-dir"
            )
        if theirs is not None:
            s[k] = theirs
    s["epochs"] = max(ta.get("epochs", s["epochs"]), ckpt["epoch"]) if args.epochs is None else s["epochs"]
    if s["epochs"] < ckpt["epoch"]:
        raise UsageError(
            f"--epochs {s['epochs']} is below the {ckpt['epoch']} epochs {s['out_dir']} has already trained: raise "
            "--epochs or drop it"
        )
    s["data_dir"] = args.data_dir or ta.get("data_dir") or "./data"  # the data it trained on


def check_settings(s, args, resuming):
    """Before anything is read or written: every flag in its range, and no --out-dir file that is another name (hard
    link, symlinked folder) of a data file or (checkpoint.pt aside) of the checkpoint: train.log is appended to."""
    for name in NUMBERS:
        if s[name] is not None:
            check_setting(name, s[name], vae.SETTINGS[name])
    check_int("--num-generation-samples", args.num_generation_samples, 1, 10_000)
    check_int("--num-reconstruction-samples", args.num_reconstruction_samples, 1, 1_000)
    if s["loop"] == "seed" and (s["objective"] != "beta" or s["dataset"] != "fashion-mnist"):
        raise UsageError("--loop seed trains the plain β objective on Fashion-MNIST only: drop --loop seed")
    if args.compile == "on" and not training.has_cxx():
        raise UsageError("--compile on needs a C++ compiler (g++ or clang++): install one or use --compile off")
    files = {f"data file {n}": data.find(s["data_dir"], n) for names in data.FILES.values() for n in names}
    ck = os.path.join(s["out_dir"], "checkpoint.pt")
    mine = {f"--out-dir {n}": os.path.join(s["out_dir"], n) for n in (*OUTPUTS[1:], "train.log", ".lock")}
    ours = dict(files, **{"its checkpoint.pt": ck if resuming else None})
    if clash := clashes(files, {"--out-dir checkpoint.pt": ck}) or clashes(ours, mine):
        raise UsageError(f"{clash}: pass another --out-dir; nothing was changed")


@contextlib.contextmanager
def run_folder(out_dir):
    """The folder, made if needed, with its lock held: two runs never write into one folder, and every decision that
    depends on the folder is made after this. A run that fails before training removes what it made."""
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
            busy = f"another train.py is writing to {out_dir}: wait for it, or pass another --out-dir"
            raise UsageError(busy) from None
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
    file = logging.FileHandler(os.path.join(out_dir, "train.log"), encoding="utf-8", errors="backslashreplace")
    log.handlers = [logging.StreamHandler(sys.stdout), file]  # no formatter: the message alone


class StopFlag:
    """First SIGINT or SIGTERM: finish the epoch, save, stop. Second: stop at once (the last checkpoint stays)."""

    def __enter__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker (--loop seed) inherits this handler: the trainer decides
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        said = f"\n{signal.Signals(signum).name}: finishing this epoch and saving; send again to stop now\n"
        os.write(2, said.encode())  # not print: the handler may run while tqdm is inside a print to stderr


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


def train(s, args):
    device = vae.pick_device(args.device)
    out, ck = s["out_dir"], os.path.join(s["out_dir"], "checkpoint.pt")
    taken = f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or --out-dir NEW for a new run"
    if os.path.exists(ck) and not args.resume:  # said before the lock is tried, and again under it
        raise UsageError(f"{taken}; nothing was changed")
    with run_folder(out) as folder:
        if os.path.exists(ck) and not args.resume:  # another run may have saved an epoch since
            raise UsageError(f"{taken}; nothing was changed")
        ckpt = vae.read_checkpoint(ck) if os.path.exists(ck) else None  # read under the lock
        if ckpt is not None:
            resume_settings(s, args, ckpt)
        check_settings(s, args, ckpt is not None)
        if s["dataset"] == "fashion-mnist":
            data.ensure_files(s["data_dir"])  # both splits at once: one message names every missing file
        train_data, test_data = (data.load(s["data_dir"], split, device, s["dataset"]) for split in ("train", "test"))
        if missing := data.missing_uncompressed(s["data_dir"]) if s["loop"] == "seed" else []:
            raise UsageError(
                f"--loop seed reads the data through torchvision, which needs the uncompressed {' and '.join(missing)} "
                f"in {data.raw_dir(s['data_dir'])}: gunzip the .gz files there, or use --loop fast"
            )
        # a checkpoint from before the size was kept trains on, and records, the size it is given now
        trained_on = None if ckpt is None else ckpt["model_args"].setdefault("dataset_size", len(train_data))
        if trained_on is not None and trained_on != len(train_data):
            raise UsageError(
                f"the train split in {s['data_dir']} has {len(train_data):,} images, but the run in {out} trained on "
                f"{trained_on:,}: pass the --data-dir it trained on, or start a new --out-dir"
            )
        steps_per_epoch = math.ceil(len(train_data) / s["batch_size"])
        if s["objective"] == "capacity" and s["capacity_steps"] is None:
            s["capacity_steps"] = max(1, round(vae.CAPACITY_RAMP * s["epochs"] * steps_per_epoch))
        config = vae.VAEConfig(**{k: s[k] for k in MODEL_FLAGS}, dataset_size=len(train_data))
        torch.manual_seed(s["seed"])
        model = (vae.BetaVAE(config) if ckpt is None else vae.model_from_checkpoint(ckpt, out)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
        if ckpt is not None:
            vae.load_optimizer_state(opt, ckpt, out)
        folder["started"] = True
        setup_logging(out)
        history, start = (list(ckpt["metrics"]), ckpt["epoch"]) if ckpt else ([], 0)
        described = data.describe(s["dataset"], len(train_data), len(test_data))
        log.info(f"device {device} | {described} | {vae.param_count(model):,} parameters | {model.config} | out {out}")
        if start:
            log.info(f"resuming after epoch {start} of {s['epochs']}")
            write_metrics(out, history)  # the checkpoint's history is the truth
        elif args.resume:
            log.info(
                f"note: --resume found no checkpoint in {out}, so this is a NEW run (if you meant to continue one, "
                "check --out-dir)"
            )
        reach = vae.capacity_at(s["epochs"] * steps_per_epoch, config) if config.objective == "capacity" else None
        if reach is not None and reach < 0.9 * config.capacity_max:
            log.info(
                f"note: with --capacity-steps {config.capacity_steps:,} and {s['epochs']} epochs of "
                f"{steps_per_epoch:,} steps, C reaches only {reach:.1f} of C_max {config.capacity_max:g} nats by the "
                "last epoch: drop --capacity-steps, or train longer"
            )
        # decided from the whole run, not what is left of it: a resumed run takes the same path, bit for bit
        compiled = s["loop"] == "fast" and training.want_compile(args.compile, device, s["epochs"] * len(train_data))
        if s["loop"] == "seed":
            step = training.make_seed_step(model, opt, config)
        else:
            step = training.make_train_step(model, opt, config, "on" if compiled else "off", log=log.info)
        if compiled:
            log.info("compiling the training step (first batch): seconds to a minute, once; --compile off skips this")
        with StopFlag() as stop:
            return run_epochs(model, opt, step, train_data, test_data, s, args, history, start, stop)


def write_metrics(out_dir, history):
    try:
        atomic_write(os.path.join(out_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history).encode())
    except OSError as e:
        raise UsageError(
            f"checkpoint.pt holds epoch {len(history)}, but metrics.jsonl in {out_dir} cannot be written "
            f"({e.strerror or e}): fix that and run the same command with --resume, which writes it again"
        ) from None


def run_epochs(model, opt, step, train_data, test_data, s, args, history, start, stop):
    out, ck, hinted = s["out_dir"], os.path.join(s["out_dir"], "checkpoint.pt"), None
    summary = lambda v: {"recon": v[0], "kl": v[1], "total": v[2], "kl_per_dim": v[3:]}
    train_args = {k: s[k] for k in (*RUN_FLAGS, "epochs", "data_dir", "loop", "dataset")}
    steps_per_epoch = math.ceil(len(train_data) / s["batch_size"])
    state = {"step": history[-1].get("step", start * steps_per_epoch) if history else 0}  # C follows the steps
    for epoch in range(start, s["epochs"]):
        means, losses, img_s = training.epoch_loop(step, train_data, s, epoch, state)
        test = training.test_metrics(model, test_data, model.config, s["seed"], state["step"], s["batch_size"])
        if not all(math.isfinite(v) for v in test[:3]):  # the epoch's last update broke the weights: never save them
            raise training.NonFinite(f"the weights became NaN or infinite at the end of epoch {epoch + 1}")
        curve = [round(float(b.mean()), 4) for b in np.array_split(np.asarray(losses), min(CURVE_BINS, len(losses)))]
        record = dict(epoch=epoch + 1, step=state["step"], train=summary(means), test=summary(test), img_per_s=img_s)
        history.append(dict(record, curve=curve))
        try:
            vae.save_checkpoint(ck, model, opt, epoch + 1, s["seed"], train_args, history)
        except OSError as e:
            kept = f"checkpoint.pt still holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise UsageError(
                f"cannot save epoch {epoch + 1} in {out} ({e.strerror or e}); {kept}: fix that (free space?) and run "
                "the same command with --resume"
            ) from None
        write_metrics(out, history)
        note = " (incl. compiling)" if epoch == start and getattr(step, "compiled", False) else ""
        log.info(
            f"epoch {epoch + 1:3d}/{s['epochs']} | train recon {means[0]:7.2f} kl {means[1]:6.2f} total {means[2]:7.2f}"
            f" | test recon {test[0]:7.2f} kl {test[1]:6.2f} total {test[2]:7.2f} | {img_s:,.0f} img/s{note}"
        )
        if not hinted and train_data.device.type == "cpu" and (hinted := slow_epoch_hint(history[start:])):
            log.info(hinted)
        if stop.signum is not None:
            again = "" if s["dataset"] == "sprites" else f" --data-dir {s['data_dir']}"
            log.info(f"stopped after epoch {epoch + 1}; continue with: python train.py --resume --out-dir {out}{again}")
            return 128 + stop.signum
    try:
        draw_figures(model, test_data, s, history, args)
    except OSError as e:
        raise UsageError(
            f"cannot write the figures in {out} ({e.strerror or e}); checkpoint.pt is complete: free space and run the "
            "same command with --resume to draw them"
        ) from None
    log.info(f"done: {ck}, metrics.jsonl, loss.png, samples.png, reconstructions.png in {out}")
    names = ("eval/report.json", "decoder.onnx", "encoder.onnx")  # of the run before it was resumed
    if stale := ", ".join(n for n in names if start and os.path.exists(os.path.join(out, n))):
        log.info(f"note: {stale} in {out} are of epoch {start} or earlier: run the next lines again for this epoch's")
    data_flag = "--dataset sprites" if s["dataset"] == "sprites" else f"--data-dir {s['data_dir']}"
    log.info(f"next:  python evaluate.py --checkpoint {ck} {data_flag}")
    overwrite, onnx = " --overwrite" if stale else "", os.path.join(out, "decoder.onnx")
    log.info(f"       python export_onnx.py --checkpoint {ck}{overwrite} && python sample.py --onnx {onnx}")
    return 0


@torch.no_grad()
def draw_figures(model, test, s, history, args):
    """loss.png (the whole run), samples.png and reconstructions.png, written as one."""
    model.eval()
    described = data.describe(s["dataset"], model.config.dataset_size, len(test))
    tag = f"{vae.describe(vars(model.config))}, latent {s['latent_dim']}, epoch {len(history)}, {described}"
    z = torch.randn(args.num_generation_samples, s["latent_dim"], generator=torch.Generator().manual_seed(s["seed"]))
    samples = model.decode(z.to(test.device)).cpu().numpy()
    x, _, _ = next(test.batches(min(args.num_reconstruction_samples, len(test))))
    recon = model.decode(model.encode(x)[0]).cpu().numpy()  # at the posterior mean, as the seed shows them
    model.train()
    grid = figures.grid_rows(samples, math.ceil(math.sqrt(len(samples))))
    samples = figures.labelled_grid(grid, title=f"Samples from the prior: decoder means at z ~ N(0, I)\n{tag}")
    rows, labels = [((x + 1) / 2).cpu().numpy(), recon], ["test image", "reconstruction"]
    recon = figures.labelled_grid(rows, labels, f"Test images and their reconstructions at z = posterior mean\n{tag}")
    pngs = [figures.training_curves(history, tag), figures.png_bytes(samples), figures.png_bytes(recon)]
    atomic_write_all([(os.path.join(s["out_dir"], name), b) for name, b in zip(OUTPUTS[2:], pngs)])


def main(argv=None):
    safe_streams()
    args = parse_args(argv)
    s = given_settings(args)
    try:
        return train(s, args)
    except (UsageError, data.DataError, vae.CheckpointError, ValueError) as e:
        said, status = f"error: {e}", 2
    except training.NonFinite as e:
        ran = os.path.exists(os.path.join(s["out_dir"], "checkpoint.pt"))
        kept = "the last good checkpoint is kept" if ran else "no epoch was completed, so no checkpoint was written"
        said, status = f"error: {e}; {kept}: lower --lr or --beta and train again", 2
    except KeyboardInterrupt:
        kept = "checkpoint.pt (if an epoch was completed) holds the last completed epoch"
        said, status = f"stopped at once; {kept}: continue with --resume", 130
    print(said, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
