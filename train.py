"""Train a β-VAE (Higgins et al. 2017) on Fashion-MNIST.

$ python train.py --beta 4
$ python train.py --beta 1 --epochs 20 --data-dir /path/to/data
$ python train.py --objective capacity --capacity-max 25 --gamma 1000     # Burgess et al. 2018
$ python train.py --objective tc --beta 4                                 # β-TCVAE, Chen et al. 2018
$ python train.py --beta 4 --epochs 30 --resume                           # continue runs/beta4_z10_seed0

Writes into --out-dir: checkpoint.pt (every epoch), metrics.jsonl, train.log, loss.png, samples.png,
reconstructions.png. A folder that already holds a checkpoint is never started over: pass --resume to continue it.
Ctrl-C (or SIGTERM) finishes the current epoch, saves, and stops; press it twice to stop at once.
"""
import dataclasses
import json
import logging
import math
import os
import signal
import sys

import torch

import checkpoint
import data
import figures
import training
import vae
from plumbing.cli import ArgumentParser, UsageError, check_float, check_int, check_range, safe_streams
from plumbing.files import atomic_write, clashes, clean_stale_temps

MODEL_FLAGS = tuple(f.name for f in dataclasses.fields(vae.VAEConfig) if f.name != "dataset_size")  # data, not a flag
RUN_FLAGS = ("batch_size", "lr", "seed")  # must match the checkpoint when resuming, or the run is not one run
MODEL_DEFAULTS, RUN_DEFAULTS = vae.VAEConfig(), training.RUN_DEFAULTS
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "loss.png", "samples.png", "reconstructions.png")
log = logging.getLogger("train")


def parse_args(argv=None):
    m, r = MODEL_DEFAULTS, RUN_DEFAULTS
    p = ArgumentParser(description="Train a β-VAE on Fashion-MNIST.")
    # Model and run flags default to None so a resumed run can tell "given" from "default".
    p.add_argument("--beta", type=float, help=f"weight of the KL term; with --objective tc, of the total correlation "
                                              f"(default: {m.beta:g})")
    p.add_argument("--latent-dim", "--latent_dim", dest="latent_dim", type=int,
                   help=f"latent size (default: {m.latent_dim})")
    p.add_argument("--epochs", type=int, help=f"total epochs to reach (default: {r.epochs}; with --resume, may be raised)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                   help=f"batch size (default: {r.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {r.lr:g})")
    p.add_argument("--seed", type=int, help=f"seeds shuffling, initialisation and sampling, 0 to 2^32-1 (default: {r.seed})")
    p.add_argument("--objective", choices=vae.OBJECTIVES,
                   help=f"beta: recon + β·KL; capacity: recon + γ·|KL − C|; tc (β-TCVAE): recon + α·MI + β·TC + "
                        f"γ·dimension-wise KL (default: {m.objective})")
    p.add_argument("--gamma", type=float, help="weight γ of the objective's extra term: capacity: of |KL − C| "
                                               f"(default: {vae.GAMMA_DEFAULTS['capacity']:g}); tc: of the "
                                               f"dimension-wise KL (default: {vae.GAMMA_DEFAULTS['tc']:g})")
    p.add_argument("--alpha", type=float, help="tc objective: weight α of the index-code mutual information "
                                               f"(default: {m.alpha:g})")
    p.add_argument("--capacity-max", "--capacity_max", dest="capacity_max", type=float,
                   help=f"capacity objective: C_max in nats (default: {m.capacity_max:g})")
    p.add_argument("--capacity-steps", "--capacity_steps", dest="capacity_steps", type=int,
                   help=f"capacity objective: steps over which C rises from 0 to C_max (default: {m.capacity_steps})")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir",
                   help="folder holding FashionMNIST/raw, downloaded there if missing (default: ./data; with --resume, "
                        "the folder the run trained on)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir",
                   help="output folder (default: runs/beta<β>_z<latent>_seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/checkpoint.pt (a new run if there is none yet); flags that contradict "
                        "it are refused. Without it, a folder holding a checkpoint is refused (default: off)")
    p.add_argument("--loop", choices=("fast", "seed"), default=None,
                   help="fast: data resident on the device; seed: the course project's loop (torchvision transforms "
                        "in DataLoader workers, half the cores, BCE on probabilities), kept for comparison (default: fast)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step; auto: on a CPU, for runs of a million images or more "
                        "(default: auto)")
    p.add_argument("--num-generation-samples", "--num_generation_samples", dest="n_samples", type=int, default=64,
                   help="images in samples.png, 1 to 10000 (default: 64)")
    p.add_argument("--num-reconstruction-samples", "--num_reconstruction_samples", dest="n_recon", type=int,
                   default=16, help="test images in reconstructions.png, 1 to 1000 (default: 16)")
    return p.parse_args(argv)


def run_name(a):
    heads = {"capacity": f"cap{a['capacity_max']:g}", "tc": f"tc{a['beta']:g}"}
    head = heads.get(a["objective"], f"beta{a['beta']:g}")
    return f"{head}_z{a['latent_dim']}_seed{a['seed']}"


def check_settings(s, args):
    """Every flag within its range, named in the message, before anything is read or written."""
    for name, (low, high) in vae.LIMITS.items():
        flag = "--" + name.replace("_", "-")
        (check_int if isinstance(low, int) else check_float)(flag, s[name], low, high)
    for name in ("batch_size", "epochs", "seed", "lr"):
        check_range(name, s[name])
    check_int("--num-generation-samples", args.n_samples, 1, 10_000)
    check_int("--num-reconstruction-samples", args.n_recon, 1, 1_000)
    if args.loop == "seed" and s["objective"] != "beta":
        raise UsageError(f"--loop seed trains the plain β objective only: drop --objective {s['objective']}")


def resolve_args(args):
    """Fill defaults (or the checkpoint's values when resuming) and validate. Returns (settings dict, checkpoint)."""
    given = {k: getattr(args, k) for k in MODEL_FLAGS + RUN_FLAGS + ("epochs",)}
    defaults = dict(dataclasses.asdict(MODEL_DEFAULTS), **dataclasses.asdict(RUN_DEFAULTS))
    defaults["gamma"] = None  # the objective's own (vae.GAMMA_DEFAULTS), known once --objective is
    s = {k: (defaults[k] if v is None else v) for k, v in given.items()}
    out_dir = args.out_dir or os.path.join("runs", run_name(s))
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    ckpt = None
    if os.path.exists(ckpt_path) and not args.resume:
        raise UsageError(f"{out_dir} already holds a run (checkpoint.pt): pass --resume to continue it, or "
                         "--out-dir NEW for a new run; nothing was changed")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = checkpoint.read_checkpoint(ckpt_path)
        saved = dict(ckpt["model_args"], **{k: ckpt["train_args"].get(k) for k in RUN_FLAGS})
        for k in MODEL_FLAGS + RUN_FLAGS:
            if given[k] is not None and saved.get(k) is not None and given[k] != saved[k]:
                raise UsageError(f"--{k.replace('_', '-')} {given[k]} contradicts the checkpoint in {out_dir} "
                                 f"(trained with {saved[k]}): drop the flag to resume, or use a new --out-dir")
            s[k] = saved[k] if saved.get(k) is not None else s[k]
        if given["epochs"] is None:
            s["epochs"] = max(ckpt["train_args"].get("epochs", RUN_DEFAULTS.epochs), ckpt["epoch"])
        if args.data_dir is None:   # the data the run trained on, not whatever ./data holds now
            args.data_dir = ckpt["train_args"].get("data_dir")
        saved_loop = ckpt["train_args"].get("loop", "fast")
        if args.loop is not None and args.loop != saved_loop:
            raise UsageError(f"--loop {args.loop} contradicts the checkpoint in {out_dir} (trained with --loop "
                             f"{saved_loop}): drop the flag to resume, or use a new --out-dir")
        args.loop = saved_loop
        if s["epochs"] < ckpt["epoch"]:
            raise UsageError(f"--epochs {s['epochs']} is below the {ckpt['epoch']} epochs {out_dir} has already "
                             "trained: raise --epochs or drop it")
    args.loop = args.loop or "fast"
    args.data_dir = args.data_dir or "./data"
    if s["gamma"] is None:
        s["gamma"] = vae.GAMMA_DEFAULTS.get(s["objective"], vae.GAMMA_DEFAULTS["capacity"])
    check_settings(s, args)
    if args.compile == "on" and not training.has_cxx():
        raise UsageError("--compile on needs a C++ compiler for the CPU (g++ or clang++): install one or use "
                         "--compile off")
    s["out_dir"], s["data_dir"], s["loop"] = out_dir, args.data_dir, args.loop
    return s, ckpt


def setup_logging(out_dir):
    log.setLevel(logging.INFO)
    for h in log.handlers:   # a previous run's, in a process that runs main() again (the tests)
        h.close()
    log.handlers.clear()
    file_handler = logging.FileHandler(os.path.join(out_dir, "train.log"), encoding="utf-8", errors="backslashreplace")
    for h in (logging.StreamHandler(sys.stdout), file_handler):
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)


def check_outputs(s, resuming):
    """Refuse an --out-dir whose files are the data or, but for checkpoint.pt itself, the checkpoint (a hard link, a
    symlinked folder): train.log is appended to in place and .lock opened there, so such a link would be written
    into. Renamed outputs only break a link, but a run folder that is another file's name is never a run's own."""
    data_files = {f"data file {n}": data.find(s["data_dir"], n) for names in data.FILES.values() for n in names}
    ck = os.path.join(s["out_dir"], "checkpoint.pt")
    others = {f"--out-dir {n}": os.path.join(s["out_dir"], n) for n in OUTPUTS + ("train.log", ".lock")
              if n != "checkpoint.pt"}
    clash = clashes(data_files, {"--out-dir checkpoint.pt": ck}) or \
        clashes(dict(data_files, **{"its checkpoint.pt": ck if resuming else None}), others)
    if clash:
        raise UsageError(f"{clash}: pass another --out-dir; nothing was changed")


def open_out_dir(out_dir):
    """Create the folder and take its lock, so two runs never write into the same folder."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"cannot write to {out_dir} ({e.strerror}): pass a writable --out-dir") from None
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # no advisory locks on this platform
    except OSError:
        raise UsageError(f"another train.py is writing to {out_dir}: wait for it, or pass another --out-dir") from None
    clean_stale_temps(out_dir, OUTPUTS)  # half-written files of a run that was killed
    return lock


class StopFlag:
    """First SIGINT/SIGTERM: finish the epoch, save, stop. Second: stop at once (the last checkpoint stays)."""

    def __init__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:   # a DataLoader worker (--loop seed) inherits this handler: the trainer decides
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: the handler may run while tqdm is inside a print to stderr (a reentrant call)
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this epoch and saving; send again to stop "
                    "now\n".encode())


def build(s, ckpt, device, n_train):
    """The model and optimizer, fresh or from the checkpoint; (model, optimizer, history, first epoch).
    n_train: the train split's size, the tc objective's N (a resumed run keeps the N it started with)."""
    torch.manual_seed(s["seed"])
    config = vae.VAEConfig(**{k: s[k] for k in MODEL_FLAGS}, dataset_size=n_train)
    if ckpt is None:
        model = vae.BetaVAE(config).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=s["lr"]), [], 0
    model = checkpoint.model_from_checkpoint(ckpt, s["out_dir"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    checkpoint.load_optimizer_state(opt, ckpt, s["out_dir"])
    return model, opt, list(ckpt["metrics"]), ckpt["epoch"]


def slow_epoch_hint(history):
    """One line when an epoch ran at under half the run's best speed: on a CPU, the usual cause is another busy
    process, whose threads and OpenMP's wait for each other. One thread is then often 2-3x faster; nothing is changed
    by default, because on a quiet CPU two threads are faster (measured: docs/speed.md, "A busy CPU")."""
    speeds = [m["img_per_s"] for m in history]
    if len(speeds) >= 2 and speeds[-1] < max(speeds) / 2:
        return (f"note: this epoch ran at {speeds[-1]:,.0f} img/s, under half this run's best ({max(speeds):,.0f}): "
                "another process is probably using the CPU; if it stays, stop (Ctrl-C) and continue with "
                "OMP_NUM_THREADS=1 python train.py ... --resume, often 2-3x faster on a busy CPU")
    return None


def train(s, ckpt, args):
    try:
        device = vae.pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    data.ensure_files(s["data_dir"])   # both splits at once: one message names every missing file
    train_data = data.load(s["data_dir"], "train", device)  # before any file is written: bad data leaves nothing
    test_data = data.load(s["data_dir"], "test", device)
    missing = data.missing_uncompressed(s["data_dir"])
    if args.loop == "seed" and missing:
        raise UsageError(f"--loop seed reads the data through torchvision, which needs the uncompressed "
                         f"{' and '.join(missing)} in {data.raw_dir(s['data_dir'])}: gunzip the .gz files there, or "
                         "use --loop fast")
    model, opt, history, start = build(s, ckpt, device, len(train_data))
    trained_on = ckpt["model_args"].get("dataset_size") if ckpt is not None else None
    if trained_on is not None and trained_on != len(train_data):
        raise UsageError(f"the train split in {s['data_dir']} has {len(train_data):,} images, but the run in "
                         f"{s['out_dir']} trained on {trained_on:,}: pass the --data-dir it trained on, or start a new "
                         "--out-dir")
    config = model.config
    check_outputs(s, ckpt is not None)
    with open_out_dir(s["out_dir"]):  # the folder's lock, held until the run ends
        if ckpt is None and os.path.exists(os.path.join(s["out_dir"], "checkpoint.pt")):
            raise UsageError(f"{s['out_dir']} now holds a run (checkpoint.pt) that another train.py finished while "
                             "this one started: pass --resume to continue it, or --out-dir NEW; nothing was changed")
        setup_logging(s["out_dir"])
        log.info(f"device {device} | train {len(train_data)} test {len(test_data)} images | {vae.param_count(model):,} "
                 f"parameters | {config} | out {s['out_dir']}")
        if start:
            log.info(f"resuming after epoch {start} of {s['epochs']}")
            write_metrics(s["out_dir"], history)   # the checkpoint's history is the truth
        elif args.resume:
            log.info(f"note: --resume found no checkpoint in {s['out_dir']}, so this is a NEW run (if you meant to "
                     "continue one, check --out-dir)")
        if args.loop == "seed":
            step = training.make_seed_step(model, opt, config)
        else:
            # decided from the whole run, not what is left of it: a resumed run takes the same path, bit for bit
            use_compile = training.want_compile(args.compile, device, s["epochs"] * len(train_data))
            step = training.make_train_step(model, opt, config, compile=use_compile, log=log.info)
            if use_compile:
                log.info("compiling the training step (first batch) and the test pass (end of epoch 1): 6-40 s, once "
                         "(--compile off skips this)")
        stop = StopFlag()
        try:
            return run_epochs(model, opt, step, train_data, test_data, s, args, history, start, stop, config)
        finally:
            stop.restore()


def write_metrics(out_dir, history):
    lines = "".join(json.dumps(m) + "\n" for m in history)
    try:
        atomic_write(os.path.join(out_dir, "metrics.jsonl"), lambda f: f.write(lines.encode()))
    except OSError as e:
        raise UsageError(f"checkpoint.pt holds epoch {len(history)}, but metrics.jsonl in {out_dir} cannot be "
                         f"written ({e.strerror or e}): fix that and run the same command with --resume, which "
                         "writes it again") from None


def run_epochs(model, opt, step, train_data, test_data, s, args, history, start, stop, config):
    train_args = {k: s[k] for k in RUN_FLAGS + ("epochs", "data_dir", "loop")}
    # the optimizer steps already taken, as recorded (the capacity objective's C follows them)
    state = {"step": history[-1].get("step", start * math.ceil(len(train_data) / s["batch_size"])) if history else 0}
    step_losses, ck = [], os.path.join(s["out_dir"], "checkpoint.pt")
    device_type, hinted = train_data.device.type, False
    for epoch in range(start, s["epochs"]):
        means, losses, img_s = training.epoch_loop(model, step, train_data, s, epoch, state)
        step_losses += losses
        test = training.test_metrics(model, test_data, config, s["seed"], state["step"], s["batch_size"],
                                     fast=getattr(step, "test_sums", None))
        if not all(math.isfinite(v) for v in test[:3]):  # the epoch's last update broke the weights: never save them
            raise training.NonFinite(f"the weights became NaN or infinite at the end of epoch {epoch + 1}")
        history.append({"epoch": epoch + 1, "step": state["step"], "train": training_summary(means),
                        "test": training_summary(test), "img_per_s": img_s})
        try:
            checkpoint.save_checkpoint(ck, model, opt, epoch + 1, s["seed"], train_args, history)
        except OSError as e:
            kept = f"checkpoint.pt still holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise UsageError(f"cannot save epoch {epoch + 1} in {s['out_dir']} ({e.strerror or e}); {kept}: fix "
                             "that (free space?) and run the same command with --resume") from None
        write_metrics(s["out_dir"], history)
        note = " (incl. compiling)" if epoch == start and hasattr(step, "built") else ""
        log.info(f"epoch {epoch + 1:3d}/{s['epochs']} | train recon {means[0]:7.2f} kl {means[1]:6.2f} "
                 f"total {means[2]:7.2f} | test recon {test[0]:7.2f} kl {test[1]:6.2f} total {test[2]:7.2f} "
                 f"| {img_s:,.0f} img/s{note}")
        hint = None if device_type != "cpu" or hinted else slow_epoch_hint(history[start:])
        if hint:
            log.info(hint)
            hinted = True
        if stop.signum is not None:
            log.info(f"stopped after epoch {epoch + 1}; continue with: python train.py --resume --out-dir "
                     f"{s['out_dir']} --data-dir {s['data_dir']}")
            return 128 + stop.signum
    try:
        figures.training_figures(model, test_data, s, history, step_losses, start,
                                 math.ceil(len(train_data) / s["batch_size"]), args.n_samples, args.n_recon)
    except OSError as e:
        raise UsageError(f"cannot write the figures in {s['out_dir']} ({e.strerror or e}); checkpoint.pt is "
                         "complete: free space and run the same command with --resume to draw them") from None
    log.info(f"done: {ck}, metrics.jsonl, loss.png, samples.png, reconstructions.png in {s['out_dir']}\n"
             f"next:  python evaluate.py --checkpoint {ck} --data-dir {s['data_dir']}\n"
             f"       python export_onnx.py --checkpoint {ck} --out decoder.onnx && "
             f"python sample.py --onnx decoder.onnx")
    return 0


def training_summary(v):
    return {"recon": v[0], "kl": v[1], "total": v[2], "kl_per_dim": v[3:]}


def main(argv=None):
    safe_streams()
    args = parse_args(argv)
    try:
        s, ckpt = resolve_args(args)
        return train(s, ckpt, args)
    except (UsageError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except training.NonFinite as e:
        print(f"error: {e}; the last good checkpoint is kept: lower --lr or --beta and train again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped at once; checkpoint.pt (if an epoch was completed) holds the last completed epoch: continue "
              "with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
