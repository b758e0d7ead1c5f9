"""Train a β-VAE (Higgins et al. 2017) on Fashion-MNIST.

$ python train.py --beta 4
$ python train.py --beta 1 --epochs 20 --data-dir ../shared/data
$ python train.py --objective capacity --capacity-max 25 --gamma 1000     # Burgess et al. 2018
$ python train.py --objective tc --beta 4                                 # β-TCVAE, Chen et al. 2018
$ python train.py --beta 4 --epochs 30 --resume                           # continue runs/beta4_z10_seed0

Writes into --out-dir: checkpoint.pt (every epoch), metrics.jsonl, train.log, loss.png, samples.png,
reconstructions.png. Ctrl-C (or SIGTERM) finishes the current epoch, saves, and stops; press it twice to stop at once.
"""
import json
import logging
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.nn.functional as F

import data
import train_step
import vae
from cli import ArgumentParser, UsageError
from fileio import atomic_write
from images import save_png, tile

MODEL_FLAGS = ("latent_dim", "beta", "objective", "gamma", "capacity_max", "capacity_steps", "alpha")
RUN_FLAGS = ("batch_size", "lr", "seed")  # must match the checkpoint when resuming, or the run is not one run
DEFAULTS = dict(latent_dim=10, beta=4.0, objective="beta", gamma=None, capacity_max=25.0, capacity_steps=100_000,
                alpha=vae.VAEConfig.alpha, batch_size=64, lr=1e-3, seed=0, epochs=20)  # gamma None: VAEConfig picks
log = logging.getLogger("train")


def parse_args(argv=None):
    p = ArgumentParser(description="Train a β-VAE on Fashion-MNIST.")
    # Model and run flags default to None so a resumed run can tell "given" from "default" (defaults in DEFAULTS).
    p.add_argument("--beta", type=float, help="weight of the KL term; with --objective tc, of the total correlation "
                                              "(default: 4.0)")
    p.add_argument("--latent-dim", "--latent_dim", dest="latent_dim", type=int, help="latent size (default: 10)")
    p.add_argument("--epochs", type=int, help="total epochs to reach (default: 20; with --resume, may be raised)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--seed", type=int, help="seeds shuffling, initialisation and sampling (default: 0)")
    p.add_argument("--objective", choices=vae.OBJECTIVES,
                   help="beta: recon + β·KL; capacity: recon + γ·|KL − C|; tc (β-TCVAE): recon + α·MI + β·TC + "
                        "γ·dimension-wise KL (default: beta)")
    p.add_argument("--gamma", type=float, help="weight γ of the objective's extra term: capacity: of |KL − C| "
                                               "(default: 1000); tc: of the dimension-wise KL (default: 1)")
    p.add_argument("--alpha", type=float, help="tc objective: weight α of the index-code mutual information "
                                               "(default: 1)")
    p.add_argument("--capacity-max", "--capacity_max", dest="capacity_max", type=float,
                   help="capacity objective: C_max in nats (default: 25)")
    p.add_argument("--capacity-steps", "--capacity_steps", dest="capacity_steps", type=int,
                   help="capacity objective: steps over which C rises from 0 to C_max (default: 100000)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default="./data",
                   help="folder holding FashionMNIST/raw, downloaded there if missing (default: ./data)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir",
                   help="output folder (default: runs/beta<β>_z<latent>_seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt; flags that contradict it are refused")
    p.add_argument("--loop", choices=("fast", "seed"), default=None,
                   help="fast: data resident on the device; seed: the course project's loop (torchvision transforms "
                        "through a 2-worker DataLoader, BCE on probabilities), kept for comparison and bench.py (default: fast)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step; auto: where it measurably helps (default: auto)")
    p.add_argument("--num-generation-samples", "--num_generation_samples", dest="n_samples", type=int, default=64,
                   help="images in samples.png (default: 64)")
    p.add_argument("--num-reconstruction-samples", "--num_reconstruction_samples", dest="n_recon", type=int,
                   default=16, help="test images in reconstructions.png (default: 16)")
    return p.parse_args(argv)


def run_name(a):
    heads = {"capacity": f"cap{a['capacity_max']:g}", "tc": f"tc{a['beta']:g}"}
    head = heads.get(a["objective"], f"beta{a['beta']:g}")
    return f"{head}_z{a['latent_dim']}_seed{a['seed']}"


def resolve_args(args):
    """Fill defaults (or the checkpoint's values when resuming) and validate. Returns (settings dict, checkpoint)."""
    given = {k: getattr(args, k) for k in MODEL_FLAGS + RUN_FLAGS + ("epochs",)}
    s = {k: (DEFAULTS[k] if v is None else v) for k, v in given.items()}
    out_dir = args.out_dir or os.path.join("runs", run_name(s))
    ckpt = None
    if args.resume:
        ckpt = vae.read_checkpoint(os.path.join(out_dir, "checkpoint.pt"))
        saved = dict(ckpt["model_args"], **{k: ckpt["train_args"].get(k) for k in RUN_FLAGS})
        for k in MODEL_FLAGS + RUN_FLAGS:
            if given[k] is not None and saved.get(k) is not None and given[k] != saved[k]:
                raise UsageError(f"--{k.replace('_', '-')} {given[k]} contradicts the checkpoint in {out_dir} "
                                 f"(trained with {saved[k]}): drop the flag to resume, or use a new --out-dir")
            s[k] = saved[k] if saved.get(k) is not None else s[k]
        if given["epochs"] is None:
            s["epochs"] = max(ckpt["train_args"].get("epochs", DEFAULTS["epochs"]), ckpt["epoch"])
        saved_loop = ckpt["train_args"].get("loop", "fast")
        if args.loop is not None and args.loop != saved_loop:
            raise UsageError(f"--loop {args.loop} contradicts the checkpoint in {out_dir} (trained with --loop "
                             f"{saved_loop}): drop the flag to resume, or use a new --out-dir")
        args.loop = saved_loop
    args.loop = args.loop or "fast"
    checks = [(s["beta"] >= 0, f"--beta must be >= 0 (got {s['beta']})"),
              (s["latent_dim"] >= 1, f"--latent-dim must be at least 1 (got {s['latent_dim']})"),
              (s["batch_size"] >= 1, f"--batch-size must be at least 1 (got {s['batch_size']})"),
              (s["epochs"] >= 0, f"--epochs must be >= 0 (got {s['epochs']})"),
              (s["lr"] > 0 and math.isfinite(s["lr"]), f"--lr must be a positive number (got {s['lr']})"),
              (args.n_samples >= 1 and args.n_recon >= 1,
               "--num-generation-samples and --num-reconstruction-samples must be at least 1")]
    if args.loop == "seed":
        checks.append((s["objective"] == "beta", f"--loop seed trains the plain β objective only: drop --objective "
                                                 f"{s['objective']}"))
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    try:
        vae.VAEConfig(**{k: s[k] for k in MODEL_FLAGS})
    except ValueError as e:
        raise UsageError(str(e)) from None
    s["out_dir"], s["data_dir"], s["loop"] = out_dir, args.data_dir, args.loop
    return s, ckpt


# Compiling costs ~10 s (warm inductor cache) to ~45 s (cold) on a 2-core CPU and saves ~55 µs per image there
# (bench.py: ~8,900 vs ~17,000 img/s): it pays for itself within about a million images even with a cold cache,
# e.g. the default 20 epochs of the full 60,000.
COMPILE_AUTO_MIN_IMAGES = 1_000_000


def want_compile(mode, device, images_to_train):
    """Whether to compile the training step: 'on', 'off', or 'auto' (only where it saves time overall)."""
    has_cxx = device.type != "cpu" or any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if mode == "on" and not has_cxx:
        raise UsageError("--compile on needs a C++ compiler for the CPU (g++ or clang++): install one or use "
                         "--compile off")
    if mode == "auto":
        return has_cxx and device.type in ("cpu", "cuda") and images_to_train >= COMPILE_AUTO_MIN_IMAGES
    return mode == "on"


def make_seed_step(model, opt, config):
    """The course project's step: BCE on sigmoid probabilities, loss summed over the batch (Adam is scale-invariant)."""
    def step(x, target, step_idx):
        mu, logvar = model.encode(x)
        recon = model.decode(model.reparameterize(mu, logvar))
        rec = F.binary_cross_entropy(recon, target, reduction="none").flatten(1).sum(1)
        kl_per_dim = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
        kl = kl_per_dim.sum(1)
        total = rec + config.beta * kl
        opt.zero_grad()
        total.sum().backward()
        opt.step()
        return torch.cat([torch.stack([rec.sum(), kl.sum(), total.sum()]), kl_per_dim.sum(0)]).detach()
    return step


def seed_batches(data_dir, batch_size, device):
    """Batches the course project's way: per-image PIL transforms in DataLoader worker processes."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.FashionMNIST(data_dir, train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2)
    for x, y in loader:
        x = x.to(device)
        yield x, (x + 1) / 2, y


@torch.no_grad()
def test_metrics(model, test, config, seed, step_idx, batch_size):
    """Single-sample ELBO terms on the test split, with a fixed noise generator so epochs compare fairly.

    The tc objective's estimators depend on the batch: its test total uses the training batch size, the same
    estimator as the train total (and M² rather than 1000² pairs per batch).
    """
    model.eval()
    g = torch.Generator(device=test.device).manual_seed(seed)
    sums = torch.zeros(3 + config.latent_dim, device=test.device)
    for x, target, _ in test.batches(batch_size if config.objective == "tc" else 1000):
        logits, mu, logvar, z = model.forward_with_z(x, generator=g)
        t = vae.vae_loss(logits, target, mu, logvar, config, step=step_idx, z=z)
        sums += torch.cat([torch.stack([t.recon.sum(), t.kl.sum(), t.total.sum()]), t.kl_per_dim.sum(0)])
    model.train()
    return (sums / len(test)).tolist()


def summarize(v):
    return {"recon": v[0], "kl": v[1], "total": v[2], "kl_per_dim": v[3:]}


def epoch_loop(model, step, train, s, epoch, state):
    """Train one epoch. Returns (mean stats per image, per-step total loss as floats, images/s)."""
    from tqdm import tqdm
    g = torch.Generator(device=train.device).manual_seed(s["seed"] * 100_003 + epoch)
    torch.manual_seed(s["seed"] * 100_003 + epoch)  # noise of the reparameterization: reproducible from the epoch
    n_steps = math.ceil(len(train) / s["batch_size"])
    hist = torch.zeros(n_steps, 3 + s["latent_dim"], device=train.device)
    sizes = torch.zeros(n_steps, device=train.device)
    bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{s['epochs']}", leave=False, disable=None, file=sys.stderr)
    t0 = time.perf_counter()
    if s.get("loop", "fast") == "seed":
        batches = seed_batches(s["data_dir"], s["batch_size"], train.device)
    else:
        batches = train.batches(s["batch_size"], shuffle=True, generator=g)
    for i, (x, target, _) in enumerate(batches):
        hist[i] = step(x, target, state["step"])
        sizes[i] = len(x)
        state["step"] += 1
        if i % 25 == 24 or i == n_steps - 1:  # the only host syncs: every 25 steps
            check_finite(hist[:i + 1, 2], epoch, i - i % 25)
            bar.set_postfix(loss=f"{hist[i, 2].item() / len(x):.2f}", refresh=False)
            bar.update(i + 1 - bar.n)
    if train.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    means = (hist.sum(0) / len(train)).tolist()
    return means, (hist[:, 2] / sizes).tolist(), len(train) / seconds


def check_finite(totals, epoch, first_unchecked):
    bad = (~torch.isfinite(totals[first_unchecked:])).nonzero()
    if len(bad):
        raise UsageError(f"the loss became {totals[first_unchecked + bad[0, 0]].item()} at epoch {epoch + 1}, "
                         f"step {first_unchecked + bad[0, 0].item() + 1}; the last good checkpoint is kept: "
                         "lower --lr or --beta and train again")


def write_figures(model, test, s, history, step_losses, first_epoch, steps_per_epoch, n_samples, n_recon):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, tag = s["out_dir"], f"β={s['beta']:g}, z={s['latent_dim']}, epoch {len(history)}"
    fig, ax = plt.subplots(figsize=(7, 4))
    if step_losses:  # per-step train loss of the epochs trained in this process, averaged in ~200 bins
        t = torch.tensor(step_losses)
        k = max(1, len(t) // 200)
        t = t[:len(t) // k * k].view(-1, k).mean(1)
        ax.plot(first_epoch + (torch.arange(len(t)) * k + k / 2) / steps_per_epoch, t, lw=1, alpha=0.7,
                label="train objective (per step)")
    epochs = [m["epoch"] for m in history]
    ax.plot(epochs, [m["test"]["total"] for m in history], "o-", label="test objective")
    ax.plot(epochs, [m["test"]["recon"] for m in history], "s--", label="test reconstruction")
    ax.set(xlabel="epoch", ylabel="nats per image", title=f"Loss — {tag}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, "loss.png"), lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    model.eval()
    with torch.no_grad():
        g = torch.Generator(device=test.device).manual_seed(s["seed"])
        z = torch.randn(n_samples, s["latent_dim"], device=test.device, generator=g)
        save_png(tile(model.decode(z).cpu().numpy(), nrow=math.ceil(math.sqrt(n_samples))),
                 os.path.join(out, "samples.png"), scale=3)
        x, _, _ = next(test.batches(n_recon))
        recon = model.decode(model.encode(x)[0])  # the posterior mean, as the seed shows reconstructions
        both = torch.cat([(x + 1) / 2, recon]).cpu().numpy()
        save_png(tile(both, nrow=len(x)), os.path.join(out, "reconstructions.png"), scale=3)
    model.train()


def setup_logging(out_dir):
    log.setLevel(logging.INFO)
    log.handlers.clear()
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(out_dir, "train.log"))):
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)


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
    return lock


class StopFlag:
    """First SIGINT/SIGTERM: finish the epoch, save, stop. Second: stop at once (the last checkpoint stays)."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this epoch and saving; send again to stop now",
              file=sys.stderr, flush=True)


def train(s, ckpt, args):
    try:
        device = vae.pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    train_data = data.load(s["data_dir"], "train", device)  # before any file is written: bad data leaves nothing
    test_data = data.load(s["data_dir"], "test", device)
    raw = os.path.join(s["data_dir"], "FashionMNIST", "raw")
    missing = [n for n in data.FILES["train"] + data.FILES["test"] if not os.path.isfile(os.path.join(raw, n))]
    if args.loop == "seed" and missing:
        raise UsageError(f"--loop seed reads the data through torchvision, which needs the uncompressed "
                         f"{' and '.join(missing)} in {raw}: gunzip the .gz files there, or use --loop fast")
    torch.manual_seed(s["seed"])
    # the tc objective's N is the train split's size, fixed when the run starts (a resumed run keeps its own)
    n = ckpt["model_args"].get("dataset_size", len(train_data)) if ckpt is not None else len(train_data)
    config = vae.VAEConfig(**{k: s[k] for k in MODEL_FLAGS}, dataset_size=n)
    model = (vae.BetaVAE(config) if ckpt is None else vae.model_from_checkpoint(ckpt, s["out_dir"])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    history, start = [], 0
    if ckpt is not None:
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise vae.CheckpointError(f"the optimizer state in {s['out_dir']}/checkpoint.pt does not fit ({e}); "
                                      "start a new --out-dir") from None
        history, start = list(ckpt["metrics"]), ckpt["epoch"]
    lock = open_out_dir(s["out_dir"])  # noqa: F841 (held until exit)
    setup_logging(s["out_dir"])
    log.info(f"device {device} | train {len(train_data)} test {len(test_data)} images | {vae.param_count(model):,} "
             f"parameters | {config} | out {s['out_dir']}")
    if start:
        log.info(f"resuming after epoch {start} of {s['epochs']}")
    if args.loop == "seed":
        step = make_seed_step(model, opt, config)
    else:
        # decided from the whole run, not what is left of it: a resumed run takes the same path, bit for bit
        use_compile = want_compile(args.compile, device, s["epochs"] * len(train_data))
        step = train_step.make_train_step(model, opt, config, compile=use_compile)
        if use_compile:
            log.info("compiling the training step (--compile off skips this)")
    train_args = {k: s[k] for k in RUN_FLAGS + ("epochs", "data_dir", "loop")}
    state = {"step": start * math.ceil(len(train_data) / s["batch_size"])}
    stop, step_losses = StopFlag(), []
    for epoch in range(start, s["epochs"]):
        means, losses, img_s = epoch_loop(model, step, train_data, s, epoch, state)
        step_losses += losses
        test = test_metrics(model, test_data, config, s["seed"], state["step"], s["batch_size"])
        if not all(math.isfinite(v) for v in test[:3]):  # the epoch's last update broke the weights: never save them
            raise UsageError(f"the weights became NaN or infinite at the end of epoch {epoch + 1}; the last good "
                             "checkpoint is kept: lower --lr or --beta and train again")
        history.append({"epoch": epoch + 1, "step": state["step"], "train": summarize(means),
                        "test": summarize(test), "img_per_s": img_s})
        vae.save_checkpoint(os.path.join(s["out_dir"], "checkpoint.pt"), model, opt, epoch + 1, s["seed"],
                            train_args, history)
        lines = "".join(json.dumps(m) + "\n" for m in history)
        atomic_write(os.path.join(s["out_dir"], "metrics.jsonl"), lambda f: f.write(lines.encode()))
        log.info(f"epoch {epoch + 1:3d}/{s['epochs']} | train recon {means[0]:7.2f} kl {means[1]:6.2f} "
                 f"total {means[2]:7.2f} | test recon {test[0]:7.2f} kl {test[1]:6.2f} total {test[2]:7.2f} "
                 f"| {img_s:,.0f} img/s")
        if stop.signum is not None:
            log.info(f"stopped after epoch {epoch + 1}; continue with: python train.py --resume --out-dir "
                     f"{s['out_dir']}")
            return 128 + stop.signum
    write_figures(model, test_data, s, history, step_losses, start, math.ceil(len(train_data) / s["batch_size"]),
                  args.n_samples, args.n_recon)
    ck = os.path.join(s["out_dir"], "checkpoint.pt")
    log.info(f"done: {ck}, metrics.jsonl, loss.png, samples.png, reconstructions.png in {s['out_dir']}\n"
             f"next:  python evaluate.py --checkpoint {ck} --data-dir {s['data_dir']}\n"
             f"       python export_onnx.py --checkpoint {ck} --out decoder.onnx && "
             f"python sample.py --onnx decoder.onnx")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        s, ckpt = resolve_args(args)
        return train(s, ckpt, args)
    except (UsageError, data.DataError, vae.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped at once; checkpoint.pt holds the last completed epoch: continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
