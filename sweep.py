"""Train and evaluate a grid of β × seeds, resumably, then summarise it with error bars, UDR and figures.

$ python sweep.py --beta 1 2 4 8 --seeds 0 1 2 --epochs 20 --data-dir ./data --out-dir runs/sweep
$ python sweep.py --objective tc --beta 4 --seeds 0 1 2 --out-dir runs/sweep         # β-TCVAE runs beside them
$ python sweep.py --dataset sprites --beta 1 2 4 8 --seeds 0 1 2 --out-dir runs/sprites  # with known factors
$ python sweep.py --beta 1 2 4 8 --seeds 0 1 2 --print-commands | parallel -j 4       # elsewhere: a line per job
$ python sweep.py --out-dir runs/sweep --aggregate                                   # summarise what is there

Each run lives in <out-dir>/<objective><β>_seed<seed>/ as train.py and evaluate.py write it; sweep.log there holds
both commands' output. A run is finished when its eval/report.json is there for what is asked: finished runs are
skipped, others run `train.py ... --resume` and evaluate.py, the self-contained line --print-commands prints. A failed
run is reported and the rest go on (exit status 1). Then sweep.csv, summary.md and the figures are rebuilt from every
finished run there. Ctrl-C, SIGTERM or SIGHUP is passed on: runs finish their epoch and save (a second one stops
them at once); a sweep that is killed takes its runs with it.
"""

import concurrent.futures
import csv
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import data
import figures
import metrics
import vae
from plumbing.cli import ArgumentParser, UsageError, add_setting, check_int, check_setting, safe_streams, shown
from plumbing.files import (Interrupted, NotReadable, atomic_write_all, clashes, clean_stale_temps, read_regular,
                            zip_problem)  # fmt: skip

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = ("beta", "tc")  # the capacity objective ignores β: a β grid of it would train one model many times
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_JOBS = max(1, min(8, CORES))  # a job peaks near 1 GB of memory
PASS_THROUGH = {"train": ("latent_dim", "batch_size", "lr", "alpha", "gamma", "compile", "device"),
                "evaluate": ("iwae_k", "device")}  # fmt: skip
# Runs a job so that it dies with the sweep (Linux: PR_SET_PDEATHSIG = 1, SIGKILL), kept across exec; a job whose
# sweep has already gone never starts
LAUNCH = ("import ctypes, os, sys\ntry:\n    ctypes.CDLL(None).prctl(1, 9)\nexcept (OSError, AttributeError):\n"
          "    pass\nif os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\nos.execv(sys.executable, [sys.executable]"
          " + sys.argv[2:])")  # fmt: skip
NUMBERS = ("epoch", "model_args.latent_dim", "model_args.beta", "model_args.alpha", "model_args.gamma",
           "train_args.seed", "train_args.batch_size", "train_args.lr", "data.n_train", "data.n_test", "test.recon",
           "test.kl", "test.neg_elbo", "test.iwae_nll", "active_units", "linear_probe_acc",
           "fid.classifier.reconstruction", "fid.classifier.generation", "fid.pixels.reconstruction",
           "fid.pixels.generation", "decomposition.mutual_info", "decomposition.total_correlation",
           "decomposition.dimwise_kl")  # fmt: skip
OPTIONAL = ("seed", "test.iwae_k", "continuous_bernoulli.neg_elbo_bits_per_dim", "continuous_bernoulli.iwae_bits_per_dim",
            "disentanglement.mig", "disentanglement.sap", "disentanglement.dci_disentanglement",
            "disentanglement.dci_completeness", "disentanglement.dci_informativeness",
            "disentanglement.factorvae_score")  # fmt: skip
COLUMNS = (("recon", "test.recon", 1), ("KL", "test.kl", 2), ("−ELBO", "test.neg_elbo", 1), ("IWAE", "test.iwae_nll",
           1), ("CB bits/px", "continuous_bernoulli.neg_elbo_bits_per_dim", 3), ("in use", "active_units", 1),
           ("probe acc.", "linear_probe_acc", 3), ("FID cls gen", "fid.classifier.generation", 1), ("MI",
           "decomposition.mutual_info", 2), ("TC", "decomposition.total_correlation", 2), ("dim-wise KL",
           "decomposition.dimwise_kl", 2), ("MIG", "disentanglement.mig", 3), ("SAP", "disentanglement.sap", 3),
           ("DCI dis.", "disentanglement.dci_disentanglement", 3), ("FactorVAE", "disentanglement.factorvae_score",
           3), ("UDR", "udr", 3))  # fmt: skip
SUMMARY = ("sweep.csv", "summary.md", "rate_distortion.png", "decomposition.png", "units_probe.png",
           "disentanglement.png", "traversals.png")  # fmt: skip


def parse_args(argv=None):
    p = ArgumentParser(description="Train and evaluate a grid of β × seeds, then summarise it.")
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="β values (default: 1 2 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per β (default: 0 1 2)")
    p.add_argument(
        "--objective",
        nargs="+",
        choices=OBJECTIVES,
        default=["beta"],
        help="beta (β-VAE) and/or tc (β-TCVAE, β weighs the total correlation) (default: beta)",
    )
    p.add_argument(
        "--dataset", choices=data.DATASETS, default="fashion-mnist", help="passed on (default: fashion-mnist)"
    )
    add_setting(p, "epochs", vae.SETTINGS["epochs"], default=None)
    p.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        help=f"runs at once; the cores are split between them (default: the cores, at most 8: {DEFAULT_JOBS})",
    )
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default="./data", help="passed on (default: ./data)")
    p.add_argument(
        "--out-dir",
        "--out_dir",
        dest="out_dir",
        default=os.path.join("runs", "sweep"),
        help="one folder per run goes in here, with the summary (default: runs/sweep)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--print-commands",
        "--print_commands",
        dest="print_commands",
        action="store_true",
        help="print one train + evaluate command line per unfinished run and run nothing",
    )
    mode.add_argument("--aggregate", action="store_true", help="only rebuild the summary from the run folders there")
    for name in (*PASS_THROUGH["train"][:5], "iwae_k"):
        add_setting(p, name, vae.SETTINGS[name], default=None)
    p.add_argument("--compile", choices=("auto", "on", "off"), help="train.py's --compile (default: train.py's)")
    p.add_argument("--device", help="passed on to both scripts (default: theirs, auto)")
    return p.parse_args(argv)


def check_args(a):
    """Every flag in the range of the script it is passed to, before any run folder is made."""
    for flag, values, name in (("--beta", a.beta, "beta"), ("--seeds", a.seeds, "seed")):
        for value in values:
            check_setting(name, value, vae.SETTINGS[name], flag)
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} lists a value twice: give each once")
    if len(set(a.objective)) != len(a.objective):
        raise UsageError("--objective lists a value twice: give each once")
    check_int("--jobs", a.jobs, 1, 256)
    for name in ("epochs", *PASS_THROUGH["train"][:5], "iwae_k"):
        if getattr(a, name) is not None:
            check_setting(name, getattr(a, name), vae.SETTINGS[name])
    if a.device is not None and not a.print_commands:  # printed commands may run on another machine
        try:
            vae.pick_device(a.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    for flag, path in (("--out-dir", a.out_dir), ("--data-dir", a.data_dir)):
        parent = os.path.abspath(path)
        while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder: pass a folder")


def number(v):
    """A float as a flag or a name holds it: short where that is exact (4, 0.5), all its digits where not."""
    return f"{v:g}" if float(f"{v:g}") == v else repr(v)


def grid(a):
    prefix = "sprites_" if a.dataset == "sprites" else ""
    return [{"name": f"{prefix}{o}{number(b)}_seed{s}", "objective": o, "beta": b, "seed": s,
             "dir": os.path.join(os.path.abspath(a.out_dir), f"{prefix}{o}{number(b)}_seed{s}")}
            for o in a.objective for b in a.beta for s in a.seeds]  # fmt: skip


def commands(run, a):
    """(train argv, evaluate argv): self-contained, absolute paths, every flag that makes the run what it is."""
    where = ["--dataset", "sprites"] if a.dataset == "sprites" else ["--data-dir", os.path.abspath(a.data_dir)]
    train = [sys.executable, os.path.join(HERE, "train.py"), "--objective", run["objective"], "--beta",
             number(run["beta"]), "--seed", str(run["seed"]), *(["--epochs", str(a.epochs)] if a.epochs else []),
             *where, "--out-dir", run["dir"]]  # fmt: skip
    evaluate = [
        sys.executable,
        os.path.join(HERE, "evaluate.py"),
        "--checkpoint",
        os.path.join(run["dir"], "checkpoint.pt"),
        *where,
        "--save-latents",
        os.path.join(run["dir"], "eval", "latents.npz"),
    ]
    for argv, names in ((train, PASS_THROUGH["train"]), (evaluate, PASS_THROUGH["evaluate"])):
        for name in names:
            value = getattr(a, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), number(value) if isinstance(value, float) else str(value)]
    return train + ["--resume"], evaluate


def read_report(path, warn=False):
    """The numbers of an eval/report.json, flattened ("test.kl": ...), each checked, or None. Read as a regular file of
    at most 4 MiB; a report that is not evaluate.py's is left out (with one line when warn)."""
    try:
        r = json.loads(read_regular(path, 2**22))
        flat = {}
        for key in (*NUMBERS, *OPTIONAL, "model_args.objective", "data.fingerprint", "data.name", "kl_per_dim"):
            value = r
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is None and key in (*OPTIONAL, "data.fingerprint", "data.name", "kl_per_dim"):
                continue
            if key == "model_args.objective":
                ok = value in vae.OBJECTIVES
            elif key in ("data.fingerprint", "data.name"):
                ok = isinstance(value, str) and len(value) < 1000
            elif key == "kl_per_dim":
                ok = isinstance(value, list) and len(value) <= 4096 and all(_finite(v) for v in value)
            else:
                ok = _finite(value)
            if not ok:
                raise ValueError(
                    f"{key} is {shown(repr(value), 40) if not isinstance(value, (dict, list)) else 'a ' + type(value).__name__}"
                )
            flat[key] = value
        return flat
    except NotReadable:
        return None
    except (ValueError, RecursionError, TypeError) as e:
        if warn:
            print(
                f"warning: {path} is not a report evaluate.py wrote ({shown(e, 120)}); left out of the summary",
                file=sys.stderr,
            )
        return None


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e15 and math.isfinite(v)


def finished(run, a):
    """Whether the run's report is there for what is asked: epochs, model, seed, every flag given and the data."""
    r = read_report(os.path.join(run["dir"], "eval", "report.json"))
    if r is None or r["model_args.objective"] != run["objective"]:
        return False
    asked = {"model_args.beta": run["beta"], "train_args.seed": run["seed"], "model_args.latent_dim": a.latent_dim,
             "model_args.alpha": a.alpha, "model_args.gamma": a.gamma, "train_args.batch_size": a.batch_size,
             "train_args.lr": a.lr, "test.iwae_k": a.iwae_k}  # fmt: skip
    epochs = a.epochs if a.epochs is not None else vae.SETTINGS["epochs"].default
    fingerprint = data.fingerprint(a.dataset, a.data_dir, "test")
    return (
        r["epoch"] >= epochs
        and r.get("data.fingerprint") == fingerprint
        and all(r.get(k) == v for k, v in asked.items() if v is not None)
    )


class Runner:
    """Runs each run's two commands as child processes, passing Ctrl-C, SIGTERM and SIGHUP on to them."""

    def __init__(self, threads):
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.children, self.stopping, self.lock = set(), threading.Event(), threading.Lock()

    def signal(self, signum, frame):
        self.stopping.set()
        with self.lock:
            for child in self.children:
                child.send_signal(signal.SIGTERM if signum == getattr(signal, "SIGHUP", None) else signum)

    def run(self, run, a):
        """(status, message), status one of "done", "FAILED", "stopped"."""
        times = []
        try:
            os.makedirs(run["dir"], exist_ok=True)
            log = open(os.path.join(run["dir"], "sweep.log"), "a", encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            return "FAILED", f"cannot write its folder {run['dir']} ({e.strerror or e})"
        with log:
            for argv in commands(run, a):
                if self.stopping.is_set():
                    return "stopped", "not finished; it resumes when the same command runs again"
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                t = time.perf_counter()
                # a session of its own: Ctrl-C reaches the job once, through signal(), never twice by the terminal
                child = subprocess.Popen(
                    [sys.executable, "-c", LAUNCH, str(os.getpid()), *argv[1:]],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=HERE,
                    start_new_session=True,
                )
                with self.lock:
                    self.children.add(child)
                code = child.wait()
                with self.lock:
                    self.children.discard(child)
                times.append(time.perf_counter() - t)
                if code != 0:
                    reason = f"ended by {signal.Signals(-code).name}" if code < 0 else last_error(log.name)
                    status = "stopped" if self.stopping.is_set() else "FAILED"
                    return status, f"{os.path.basename(argv[1])} exited {code}: {reason} (log: {log.name})"
        r = read_report(os.path.join(run["dir"], "eval", "report.json")) or {}
        numbers = ", ".join(
            f"{label} {r[key]:.4g}"
            for label, key in (
                ("-ELBO", "test.neg_elbo"),
                ("KL", "test.kl"),
                ("TC", "decomposition.total_correlation"),
                ("in use", "active_units"),
            )
            if key in r
        )
        return "done", f"train {times[0]:.0f} s, evaluate {times[1]:.0f} s | {numbers}"


def last_error(log_path):
    """The last command's `error:` line in the log (or its last line: a traceback's), for the progress line."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    lines = lines[starts[-1] + 1 :] if starts else lines
    return ([line for line in lines if line.startswith("error:")] or lines or ["(no output)"])[-1][:300]


def run_all(todo, a):
    from tqdm import tqdm

    jobs = min(a.jobs, len(todo))
    runner, threads = Runner(max(1, CORES // jobs)), max(1, CORES // jobs)
    print(
        f"{len(todo)} runs to do, {jobs} at a time with {threads} thread{'s' * (threads > 1)} each; logs in "
        "<run>/sweep.log",
        flush=True,
    )
    signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    handlers, failed = {s: signal.signal(s, runner.signal) for s in signals}, []
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=None, file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(runner.run, run, a): run for run in todo}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                status, message = future.result()
            except Exception as e:  # noqa: BLE001 (a run's failure is reported, never the sweep's end)
                status, message = "FAILED", f"{type(e).__name__}: {e}"
            if status == "FAILED":
                failed.append(futures[future]["name"])
            tqdm.write(f"[{i}/{len(todo)}] {futures[future]['name']}: {status}: {message}")
            bar.update()
    bar.close()
    for s, handler in handlers.items():
        signal.signal(s, handler)
    return failed, runner.stopping.is_set()


# ------------------------------------------------------------------------------------------------ the summary


def collect(out_dir):
    """One row per run folder with a complete report, sorted by objective, β, seed; UDR where a setting has seeds."""
    rows = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name, "eval", "report.json")
        r = read_report(path, warn=os.path.lexists(path))
        if r is not None:
            if "seed" in r:
                r["eval_seed"] = r.pop("seed")  # evaluate.py's; the run's own is train_args.seed
            rows.append({"run": name, "objective": r.pop("model_args.objective"), "beta": r["model_args.beta"],
                         "seed": r["train_args.seed"], "epochs": r["epoch"], **r})  # fmt: skip
    rows.sort(key=lambda r: (OBJECTIVES.index(r["objective"]) if r["objective"] in OBJECTIVES else 9, r["beta"],
                             r["seed"]))  # fmt: skip
    for members in groups(rows).values():
        latents = [load_latents(os.path.join(out_dir, r["run"], "eval", "latents.npz"), r) for r in members]
        usable = all(z is not None for z in latents) and all("kl_per_dim" in r for r in members)
        if len(members) > 1 and usable and len({len(z) for z in latents}) == 1:
            for r, score in zip(members, metrics.udr(latents, [r["kl_per_dim"] for r in members])):
                r["udr"] = score
    return rows


def load_latents(path, report):
    """The posterior means of an eval/latents.npz, checked against its report, or None."""
    try:
        raw = read_regular(path, 2**28)
        if zip_problem(raw):
            return None
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            mu = z["mu"]
        ok = mu.dtype == np.float32 and mu.shape == (report["data.n_test"], report["model_args.latent_dim"])
        return mu if ok and np.isfinite(mu).all() else None
    except (NotReadable, ValueError, KeyError, OSError):
        return None


def groups(rows):
    """{setting: runs} for runs that differ only in their seed (α and γ count for β-TCVAE only)."""
    out = {}
    for r in rows:
        key = (r["objective"], r["beta"], r["epochs"], r["model_args.latent_dim"], r["train_args.batch_size"],
               r["train_args.lr"], r.get("data.name"), *((r["model_args.alpha"], r["model_args.gamma"]) if
               r["objective"] == "tc" else ()))  # fmt: skip
        out.setdefault(key, []).append(r)
    return out


def model_name(r):
    return f"β-TCVAE (α {r['model_args.alpha']:g}, γ {r['model_args.gamma']:g})" if r["objective"] == "tc" else "β-VAE"


def summary_text(rows, grouped, written):
    cols = [c for c in COLUMNS if any(c[1] in r for r in rows)]
    names = sorted({r.get("data.name", "?") for r in rows})
    lines = [f"# β sweep: {', '.join(names)}", "", f"{len(rows)} runs. Each cell: mean ± s.d. over the seeds listed, on "
             "the test split, nats per image unless said. recon and −ELBO (at β = 1) use the seed's BCE, not a "
             "log-likelihood; CB bits/px is the −ELBO under the continuous Bernoulli, a normalised density on [0, 1]. "
             f"In use: dimensions whose KL exceeds {metrics.ACTIVE_KL:g} nats. MI, TC and dim-wise KL are the KL's "
             "three parts. MIG, SAP, DCI and the FactorVAE score need known factors (sprites); UDR needs only seeds "
             "(Duan et al. 2020).", ""]  # fmt: skip
    flags = {"epochs": "epochs", "model_args.latent_dim": "latent", "train_args.batch_size": "batch",
             "train_args.lr": "lr"}  # fmt: skip
    varying = [k for k in flags if len({r[k] for r in rows}) > 1]
    fixed = ", ".join(f"{flags[k]} {rows[0][k]:g}" for k in flags if k not in varying)
    lines[2] = lines[2].replace(" runs.", f" runs ({fixed}).", 1)
    head = ["model", "β", *(flags[k] for k in varying), "seeds"] + [c[0] for c in cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for members in grouped.values():
        cells = [
            model_name(members[0]),
            f"{members[0]['beta']:g}",
            *(f"{members[0][k]:g}" for k in varying),
            ",".join(str(r["seed"]) for r in members),
        ]
        for _, key, decimals in cols:
            values = [r[key] for r in members if key in r]
            sd = f" ± {statistics.stdev(values):.{decimals}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.{decimals}f}{sd}" if values else "")
        lines.append("| " + " | ".join(cells) + " |")
    both = [(r["udr"], r["disentanglement.mig"]) for r in rows if "udr" in r and "disentanglement.mig" in r]
    if len(both) > 2:
        from scipy.stats import spearmanr

        rho = spearmanr(*zip(*both)).statistic
        lines += ["", f"Rank correlation of UDR with MIG over the {len(both)} runs that have both: Spearman ρ = "
                  f"{rho:.2f}."]  # fmt: skip
    return "\n".join(lines + ["", "Figures: " + ", ".join(n for n in written if n.endswith(".png")), ""])


def summary_figures(out_dir, rows, grouped):
    """{name: PNG bytes}: rate-distortion, the KL's parts, units and probe, disentanglement, traversals."""
    where = f"{', '.join(sorted({r.get('data.name', '?') for r in rows}))}, test split"
    by_model = {}
    for members in grouped.values():
        by_model.setdefault(model_name(members[0]), []).append((members[0]["beta"], members))
    curves = list(by_model.items())
    out = {
        "rate_distortion.png": figures.rate_distortion(
            [(OBJECTIVES.index(r["objective"]), r["beta"], r["test.kl"], r["test.recon"]) for r in rows],
            [
                (
                    OBJECTIVES.index(m[0]["objective"]),
                    m[0]["beta"],
                    [r["test.kl"] for r in m],
                    [r["test.recon"] for r in m],
                )
                for m in grouped.values()
            ],
            f"Rate–distortion: every run a point, bars ±1 s.d. over seeds\n{where}",
        )
    }
    for name, panels in (("decomposition.png", [("decomposition.mutual_info", "index-code mutual information"),
                                                ("decomposition.total_correlation", "total correlation"),
                                                ("decomposition.dimwise_kl", "dimension-wise KL")]),
                         ("units_probe.png", [("active_units", f"dimensions in use (KL > {metrics.ACTIVE_KL:g})"),
                                              ("linear_probe_acc", "linear probe accuracy")]),
                         ("disentanglement.png", [(k, t) for k, t in (("disentanglement.mig", "MIG"),
                          ("disentanglement.sap", "SAP"), ("disentanglement.dci_disentanglement", "DCI "
                          "disentanglement"), ("disentanglement.factorvae_score", "FactorVAE score"), ("udr", "UDR"))
                          if any(k in r for r in rows)])):  # fmt: skip
        if panels:
            out[name] = figures.versus_beta(panels, curves, f"{name[:-4].replace('_', ' and ')} against β: mean ± "
                                            f"s.d. over seeds, dots are runs\n{where}")  # fmt: skip
    panels = []
    for members in grouped.values():  # drawn from each setting's first checkpoint: no figure is read back
        r = min(members, key=lambda r: r["seed"])
        path = os.path.join(out_dir, r["run"], "checkpoint.pt")
        if not os.path.lexists(path) or "kl_per_dim" not in r:  # kept without its checkpoint: nothing to draw
            continue
        try:
            model, _ = vae.load_checkpoint(path)
        except vae.CheckpointError as e:
            print(f"warning: {shown(e, 200)}; left out of traversals.png", file=sys.stderr)
            continue
        kl = r["kl_per_dim"]
        order = sorted(range(len(kl)), key=lambda d: -kl[d])[:10]

        def decode(z, model=model):
            return metrics.decode_batched(model, __import__("torch").as_tensor(z)).numpy()

        grid = figures.traversal(
            decode, np.zeros(len(kl), np.float32), order, [f"z{d} KL {kl[d]:.2f}" for d in order], None
        )
        panels.append((f"{model_name(r)}, β = {r['beta']:g} (seed {r['seed']})", grid))
    if panels:
        out["traversals.png"] = figures.png_bytes(figures.side_by_side(panels, "Latent traversals, one run per "
                                                  f"setting: each row sets one dimension from -3 to 3, the others at "
                                                  f"0; the 10 largest-KL rows\n{where}"))  # fmt: skip
    return out


def csv_text(rows):
    columns = ["run", "objective", "beta", "seed", "epochs"]
    columns += sorted({k for r in rows for k in r if k != "kl_per_dim"} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(out_dir, require=False):
    """sweep.csv, summary.md and the figures, from the finished runs under out_dir, written as one; the names."""
    rows = collect(out_dir)
    if not rows:
        if require:
            raise UsageError(
                f"no finished run under {out_dir} (none has eval/report.json): run the sweep first, or "
                "pass the --out-dir it wrote to"
            )
        return []
    grouped = groups(rows)
    clean_stale_temps(out_dir, SUMMARY)  # half-written files of a sweep that was killed
    pngs = summary_figures(out_dir, rows, grouped)
    files = {"sweep.csv": csv_text(rows), "summary.md": summary_text(rows, grouped, list(pngs)), **pngs}
    # a path or run name whose bytes are not UTF-8 is written escaped, as the scripts print and log it
    files = {k: v.encode("utf-8", "backslashreplace") if isinstance(v, str) else v for k, v in files.items()}
    atomic_write_all([(os.path.join(out_dir, name), b) for name, b in files.items()])
    for name in set(SUMMARY) - set(files):  # an earlier summary's figure that this one has no data for
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            print(f"warning: the earlier {name} in {out_dir} could not be removed ({e.strerror or e}); it is not this "
                  "summary's", file=sys.stderr)  # fmt: skip
    return list(files)


def main(argv=None):
    safe_streams()  # a path whose bytes are not UTF-8 is printed escaped, not a UnicodeEncodeError
    a = parse_args(argv)
    failed, stopped, todo = [], False, []
    try:
        check_args(a)
        runs = grid(a)
        todo = [run for run in runs if not finished(run, a)]
        if a.print_commands:
            print(
                f"# {len(runs) - len(todo)} of {len(runs)} runs finished already; printing the other {len(todo)}",
                file=sys.stderr,
            )
            print("\n".join(" && ".join(map(shlex.join, commands(run, a))) for run in todo))
            return 0
        if not a.aggregate:
            print(f"{len(runs)} runs in {a.out_dir}: {len(runs) - len(todo)} finished already, skipped", flush=True)
        if todo and not a.aggregate:
            try:
                os.makedirs(a.out_dir, exist_ok=True)
                tempfile.TemporaryFile(dir=a.out_dir).close()  # the only sure test of writability
            except OSError as e:
                raise UsageError(
                    f"cannot write to --out-dir {a.out_dir} ({e.strerror or e}): pass a writable folder; "
                    "nothing was run"
                ) from None
            if a.dataset == "fashion-mnist":
                data.ensure_files(a.data_dir)  # once, here, rather than in every run at the same time
            files = {f"data file {n}": data.find(a.data_dir, n) for names in data.FILES.values() for n in names}
            for run in todo:  # sweep.log is appended to in place: never a data file or the run's own
                mine = {f"{run['name']}'s {n}": os.path.join(run["dir"], n) for n in ("checkpoint.pt",
                        "eval/report.json")}  # fmt: skip
                clash = clashes(
                    {**files, **mine}, {f"{run['name']}'s sweep.log": os.path.join(run["dir"], "sweep.log")}
                )
                if clash:
                    raise UsageError(f"{clash}: pass another --out-dir; nothing was run")
            failed, stopped = run_all(todo, a)
        try:
            written = write_summary(a.out_dir, require=a.aggregate)
        except OSError as e:
            raise UsageError(
                f"cannot write the summary in {a.out_dir} ({e.strerror or e}): free space or pass another "
                "--out-dir; the runs are complete, the summary files as they were"
            ) from None
        if written:
            print(f"wrote {', '.join(written)} in {a.out_dir}")
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted:
        print("error: interrupted after writing the summary", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; the summary files are as they were", file=sys.stderr)
        return 130
    if stopped:
        print("stopped: run the same command again to resume", file=sys.stderr)
        return 130
    if failed:
        print(
            f"{len(failed)} of {len(todo)} runs failed ({', '.join(failed)}): see the error line above for each, "
            "fix, and run the same command again (finished runs are skipped)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
