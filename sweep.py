"""Train and evaluate a grid of β × seeds, resumably, then summarise it with error bars, UDR and figures.

$ python sweep.py --beta 1 2 4 8 --seeds 0 1 2 --epochs 20 --out-dir runs/sweep  # docs/study.md tells the rest
"""

import csv
import functools
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch
from tqdm import tqdm

import data
import figures
import metrics
import vae
from plumbing import files, onnx_check
from plumbing.cli import ArgumentParser, UsageError, add, add_setting, check_int, check_setting, safe_streams, shown

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = ("beta", "tc")  # the capacity objective ignores β: a β grid of it would train one model many times
ORDER = (*OBJECTIVES, "capacity")  # of rows and markers: a capacity run put there by hand sorts last
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_JOBS = max(1, min(8, CORES))  # a job peaks near 1 GB of memory
SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}  # passed on to the runs
PASSED = ("latent_dim", "batch_size", "lr", "alpha", "gamma", "iwae_k")  # vae.SETTINGS entries passed on
TRAIN_FLAGS, EVALUATE_FLAGS = ("epochs", *PASSED[:5], "compile", "device"), ("iwae_k", "device")
LAUNCH = """import ctypes, os, sys
try: ctypes.CDLL(None).prctl(1, 9)  # Linux's PR_SET_PDEATHSIG, SIGKILL: a job dies with the sweep
except (OSError, AttributeError): pass
if os.getppid() != int(sys.argv[1]): sys.exit(1)  # and never starts once the sweep has gone
os.execv(sys.executable, [sys.executable] + sys.argv[2:])"""
REPORT = {  # the report's values sweep.py reads (flattened: "test.kl"), by prefix; "?": may be missing
    "": ("epoch", "active_units", "linear_probe_acc", "seed?", "kl_per_dim?"),
    "model_args.": ("objective", "latent_dim", "beta", "alpha", "gamma"),
    "train_args.": ("seed", "batch_size", "lr"),
    "data.": ("n_train", "n_test", "fingerprint?", "name?"),
    "test.": ("recon", "kl", "neg_elbo", "iwae_nll", "iwae_k?"),
    "fid.": ("classifier.reconstruction", "classifier.generation", "pixels.reconstruction", "pixels.generation"),
    "decomposition.": ("mutual_info", "total_correlation", "dimwise_kl"),
    "continuous_bernoulli.": ("neg_elbo_bits_per_dim?", "iwae_bits_per_dim?"),
    "disentanglement.": ("mig?", "sap?", "factorvae_score?"),
    "disentanglement.dci_": ("disentanglement?", "completeness?", "informativeness?"),
}
OPTIONAL = {prefix + k.rstrip("?"): k.endswith("?") for prefix, keys in REPORT.items() for k in keys}
lookup = lambda d, k: d.get(k) if isinstance(d, dict) else None
finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e15  # NaN and ±inf fail
text = lambda v: isinstance(v, str) and len(v) < 1000
CHECKS = {"model_args.objective": lambda v: v in vae.OBJECTIVES, "data.fingerprint": text, "data.name": text}
CHECKS["kl_per_dim"] = lambda v: isinstance(v, list) and len(v) <= 4096 and all(map(finite, v))  # the rest: finite
ACTIVE = onnx_check.ACTIVE_KL  # above which a dimension is in use
TABLE = f"""summary.md's columns: label | report key | decimals | for a panel against β: its figure | its title
recon       | test.recon                                 | 1
KL          | test.kl                                    | 2
−ELBO       | test.neg_elbo                              | 1
IWAE        | test.iwae_nll                              | 1
CB bits/px  | continuous_bernoulli.neg_elbo_bits_per_dim | 3
in use      | active_units                               | 1 | units_probe     | dimensions in use (KL > {ACTIVE:g})
probe acc.  | linear_probe_acc                           | 3 | units_probe     | linear probe accuracy
FID cls gen | fid.classifier.generation                  | 1
MI          | decomposition.mutual_info                  | 2 | decomposition   | index-code mutual information
TC          | decomposition.total_correlation            | 2 | decomposition   | total correlation
dim-wise KL | decomposition.dimwise_kl                   | 2 | decomposition   | dimension-wise KL
MIG         | disentanglement.mig                        | 3 | disentanglement | MIG
SAP         | disentanglement.sap                        | 3 | disentanglement | SAP
DCI dis.    | disentanglement.dci_disentanglement        | 3 | disentanglement | DCI disentanglement
FactorVAE   | disentanglement.factorvae_score            | 3 | disentanglement | FactorVAE score
UDR         | udr                                        | 3 | disentanglement | UDR"""
COLUMNS = [(*(c.strip() for c in line.split("|")), None, None)[:5] for line in TABLE.splitlines()[1:]]
FIGURES = ("decomposition", "units_probe", "disentanglement")
SUMMARY = ("sweep.csv", "summary.md", "rate_distortion.png", *(f"{f}.png" for f in FIGURES), "traversals.png")
INTRO = f"""Each cell: mean ± s.d. over the seeds listed, on the test split, nats per image unless said. recon and −ELBO
(at β = 1) use the seed's BCE, not a log-likelihood; CB bits/px is the −ELBO under the continuous Bernoulli, a
normalised density on [0, 1]. In use: dimensions whose KL exceeds {ACTIVE:g} nats. MI, TC and dim-wise KL are the KL's
three parts. MIG, SAP, DCI and the FactorVAE score need known factors (sprites); UDR needs only seeds (Duan et al.
2020).""".replace("\n", " ")  # one paragraph line in summary.md
SHOWN = {"-ELBO": "test.neg_elbo", "KL": "test.kl", "TC": "decomposition.total_correlation", "in use": "active_units"}
number = lambda v: f"{v:g}" if float(f"{v:g}") == v else repr(v)  # a float as a flag or a name: short where exact
# Runs that differ only in their seed are one setting (a row of summary.md); α and γ count for β-TCVAE only
SETUP = {"epochs": "epochs", "model_args.latent_dim": "latent", "train_args.batch_size": "batch", "train_args.lr": "lr"}
tc_args = lambda r: (r["model_args.alpha"], r["model_args.gamma"]) if r["objective"] == "tc" else ()
setting = lambda r: (r["objective"], r["beta"], *(r[k] for k in SETUP), r.get("data.name"), *tc_args(r))
groups = lambda rows: {s: [r for r in rows if setting(r) == s] for s in map(setting, rows)}  # {setting: runs}
model_name = lambda r: "β-TCVAE (α {:g}, γ {:g})".format(*tc_args(r)) if tc_args(r) else "β-VAE"
mean_sd = lambda v, d: (f"{np.mean(v):.{d}f}" + (f" ± {np.std(v, ddof=1):.{d}f}" if len(v) > 1 else "")) if v else ""
data_names = lambda rows: ", ".join(sorted({r.get("data.name", "?") for r in rows}))
table_row = lambda cells: "| " + " | ".join(cells) + " |"
say = lambda line, status=None: print(line, file=sys.stderr) or status  # a line on stderr; the exit status


def parse_args(argv=None):
    p = ArgumentParser(description="Train and evaluate a grid of β × seeds, then summarise it.")
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="β values (default: 1 2 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per β (default: 0 1 2)")
    add(p, "objective", "beta (β-VAE) and/or tc (β-TCVAE)", "beta", nargs="+", choices=OBJECTIVES, default=["beta"])
    add(p, "dataset", "passed on", choices=data.DATASETS, default="fashion-mnist")
    add(p, "jobs", "runs at once, sharing the cores", f"cores up to 8: {DEFAULT_JOBS}", type=int, default=DEFAULT_JOBS)
    add(p, "data_dir", "passed on", default="./data")
    add(p, "out_dir", "one folder per run goes in here, with the summary", default=os.path.join("runs", "sweep"))
    mode = p.add_mutually_exclusive_group()
    add(mode, "print_commands", "print a train && evaluate line per unfinished run, run nothing", action="store_true")
    add(mode, "aggregate", "only rebuild the summary from the run folders there", action="store_true")
    for name in ("epochs", *PASSED):
        add_setting(p, name, vae.SETTINGS[name], default=None)
    add(p, "compile", "train.py's --compile", "train.py's", choices=("auto", "on", "off"))
    add(p, "device", "passed on to both scripts", "theirs, auto")
    a = p.parse_args(argv)  # then every flag in the range of the script it is passed to, before any folder is made
    for flag, values in (("--beta", a.beta), ("--seeds", a.seeds), ("--objective", a.objective)):
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} lists a value twice: give each once")
    check_int("--jobs", a.jobs, 1, 256)
    given = [(n, getattr(a, n)) for n in ("epochs", *PASSED) if getattr(a, n) is not None]
    for name, value in [("beta", b) for b in a.beta] + [("seed", s) for s in a.seeds] + given:
        check_setting(name, value, vae.SETTINGS[name], "--seeds" if name == "seed" else None)
    if a.device is not None and not a.print_commands:  # printed commands may run on another machine
        vae.pick_device(a.device)  # a ValueError that main reports
    for flag, path in (("--out-dir", a.out_dir), ("--data-dir", a.data_dir)):
        parent = os.path.abspath(path)
        while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder: pass a folder")
    return a


def grid(a):
    prefix, out = "sprites_" if a.dataset == "sprites" else "", os.path.abspath(a.out_dir)
    runs = [(f"{prefix}{o}{number(b)}_seed{s}", o, b, s) for o in a.objective for b in a.beta for s in a.seeds]
    return [dict(name=n, objective=o, beta=b, seed=s, dir=os.path.join(out, n)) for n, o, b, s in runs]


def commands(run, a):
    """(train argv, evaluate argv): self-contained, absolute paths, every flag that makes the run what it is."""
    where = ["--dataset", "sprites"] if a.dataset == "sprites" else ["--data-dir", os.path.abspath(a.data_dir)]
    train = ["--objective", run["objective"], "--beta", number(run["beta"]), "--seed", str(run["seed"]), *where]
    join = functools.partial(os.path.join, run["dir"])
    evaluate = ["--checkpoint", join("checkpoint.pt"), *where, "--save-latents", join("eval", "latents.npz")]
    for argv, names in ((train, TRAIN_FLAGS), (evaluate, EVALUATE_FLAGS)):
        for name, value in ((n, getattr(a, n)) for n in names if getattr(a, n) is not None):
            argv += ["--" + name.replace("_", "-"), number(value) if isinstance(value, float) else str(value)]
    script = lambda name, *argv: [sys.executable, os.path.join(HERE, name), *argv]
    return script("train.py", *train, "--out-dir", run["dir"], "--resume"), script("evaluate.py", *evaluate)


def read_report(path, warn=False):
    """The checked values of an eval/report.json, flattened ("test.kl"); None for one evaluate.py did not write."""
    try:
        report = json.loads(files.read_regular(path, 2**22))
        flat = {key: functools.reduce(lookup, key.split("."), report) for key in OPTIONAL}
        for key, value in flat.items():
            if not ((value is None and OPTIONAL[key]) or CHECKS.get(key, finite)(value)):
                raise ValueError(f"{key} is {shown(repr(value), 40)}")
        return {k: v for k, v in flat.items() if v is not None}
    except (files.NotReadable, ValueError, RecursionError, TypeError) as e:  # NotReadable: a FIFO, a device, none
        why = f"{path} is not a report evaluate.py wrote ({shown(e, 120)}); left out of the summary"
        return say(f"warning: {why}") if warn and not isinstance(e, files.NotReadable) else None


def finished(run, a):
    """Whether the run's report is there for what is asked: epochs, model, seed, the data and each flag given (under
    the report key that ends in its name)."""
    r = read_report(os.path.join(run["dir"], "eval", "report.json"))
    asked = {k: getattr(a, n) for k in OPTIONAL if (n := k.split(".")[-1]) in PASSED and getattr(a, n) is not None}
    asked |= {"model_args.objective": run["objective"], "model_args.beta": run["beta"], "train_args.seed": run["seed"]}
    epochs = a.epochs if a.epochs is not None else vae.SETTINGS["epochs"].default
    same = r is not None and r["epoch"] >= epochs and all(r.get(k) == v for k, v in asked.items())
    return same and r.get("data.fingerprint") == data.fingerprint(a.dataset, a.data_dir, "test")


def run_all(todo, a):
    """Runs todo, a.jobs at a time, passing Ctrl-C, SIGTERM and SIGHUP on: (the runs that failed, whether stopped)."""
    jobs, threads = min(a.jobs, len(todo)), max(1, CORES // min(a.jobs, len(todo)))
    print(f"{len(todo)} runs to do, {jobs} at a time, {threads} thread(s) each; logs in <run>/sweep.log", flush=True)
    options = dict(stderr=subprocess.STDOUT, cwd=HERE, start_new_session=True)  # Ctrl-C reaches jobs by relay() only
    options["env"] = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    children, signals = [], []  # a child that has ended ignores a signal

    def relay(signum, frame):
        signals.append(signum)
        for child in list(children):
            child.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    def run_one(run):  # (status: "done", "FAILED" or "stopped", message)
        os.makedirs(run["dir"], exist_ok=True)
        times = [time.perf_counter()]
        with open(os.path.join(run["dir"], "sweep.log"), "a", encoding="utf-8", errors="backslashreplace") as log:
            for argv in commands(run, a):
                if signals:
                    return "stopped", "not finished; it resumes when the same command runs again"
                print(f"$ {shlex.join(argv)}", file=log, flush=True)
                child = subprocess.Popen([argv[0], "-c", LAUNCH, str(os.getpid()), *argv[1:]], stdout=log, **options)
                children.append(child)
                if (code := child.wait()) != 0:
                    with open(log.name, encoding="utf-8", errors="replace") as f:  # the failed command's lines
                        lines = [s.strip() for s in f.read().rsplit("\n$ ", 1)[-1].splitlines()[1:] if s.strip()]
                    why = ([s for s in lines if s.startswith("error:")] or lines or ["(no output)"])[-1][:300]
                    why = f"ended by {signal.Signals(-code).name}" if code < 0 else why
                    message = f"{os.path.basename(argv[1])} exited {code}: {why} (log: {log.name})"
                    return ("stopped" if signals else "FAILED"), message
                times.append(time.perf_counter())
        r = read_report(os.path.join(run["dir"], "eval", "report.json")) or {}
        numbers = ", ".join(f"{label} {r[key]:.4g}" for label, key in SHOWN.items() if key in r)
        return "done", f"train {times[1] - times[0]:.0f} s, evaluate {times[2] - times[1]:.0f} s | {numbers}"

    handlers = {s: signal.signal(s, relay) for s in SIGNALS}
    failed, progress = [], dict(total=len(todo), desc="sweep", unit="run", disable=None, file=sys.stderr)
    with ThreadPoolExecutor(jobs) as pool, tqdm(**progress) as bar:
        futures = {pool.submit(run_one, run): run["name"] for run in todo}
        for i, future in enumerate(as_completed(futures), 1):
            e = future.exception()  # a run's failure is reported, never the sweep's end
            status, message = ("FAILED", f"{type(e).__name__}: {e}") if e else future.result()
            failed += [futures[future]] if status == "FAILED" else []
            tqdm.write(f"[{i}/{len(todo)}] {futures[future]}: {status}: {message}")
            bar.update()
    for s, handler in handlers.items():
        signal.signal(s, handler)
    return failed, bool(signals)


def collect(out_dir):
    """One row per run folder with a complete report, sorted by objective, β, seed; UDR where a setting has seeds."""
    rows = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name, "eval", "report.json")
        if (r := read_report(path, warn=os.path.lexists(path))) is not None:
            r |= {"eval_seed": r.pop("seed")} if "seed" in r else {}  # evaluate.py's; the run's is train_args.seed
            run = {"run": name, "objective": r.pop("model_args.objective"), "beta": r["model_args.beta"]}
            rows.append(run | {"seed": r["train_args.seed"], "epochs": r["epoch"], **r})
    rows.sort(key=lambda r: (ORDER.index(r["objective"]), r["beta"], r["seed"]))
    for members in groups(rows).values():
        latents = [load_latents(os.path.join(out_dir, r["run"], "eval", "latents.npz"), r) for r in members]
        if len(members) > 1 and all(z is not None for z in latents) and len({len(z) for z in latents}) == 1:
            for r, score in zip(members, metrics.udr(latents, [r["kl_per_dim"] for r in members])):
                r["udr"] = score
    return rows


def load_latents(path, report):
    """The posterior means of an eval/latents.npz, checked against its report (which UDR needs kl_per_dim of)."""
    try:
        raw = files.read_regular(path, 2**28)
        mu = None if files.zip_problem(raw) else np.load(io.BytesIO(raw), allow_pickle=False)["mu"]
    except (files.NotReadable, ValueError, KeyError, OSError):
        return None
    shape = (report["data.n_test"], report["model_args.latent_dim"]) if "kl_per_dim" in report else None
    return mu if mu is not None and mu.dtype == np.float32 and mu.shape == shape and np.isfinite(mu).all() else None


def summary_text(rows, grouped, written):
    """summary.md: a row per setting, mean ± s.d. over its seeds of each column that some run has."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in rows)]
    varying = [k for k in SETUP if len({r[k] for r in rows}) > 1]
    fixed = ", ".join(f"{SETUP[k]} {rows[0][k]:g}" for k in SETUP if k not in varying)
    head = ["model", "β", *(SETUP[k] for k in varying), "seeds", *(c[0] for c in cols)]
    lines = [f"# β sweep: {data_names(rows)}", "", f"{len(rows)} runs ({fixed}). {INTRO}", "", table_row(head)]
    lines.append("|" + "---|" * len(head))
    for m in grouped.values():
        seeds = ",".join(str(r["seed"]) for r in m)
        cells = [model_name(m[0]), f"{m[0]['beta']:g}", *(f"{m[0][k]:g}" for k in varying), seeds]
        lines.append(table_row(cells + [mean_sd([r[k] for r in m if k in r], d) for _, k, d, *_ in cols]))
    both = [(r["udr"], r["disentanglement.mig"]) for r in rows if "udr" in r and "disentanglement.mig" in r]
    if len(both) > 2:
        from scipy.stats import spearmanr

        rho = f"Spearman ρ = {spearmanr(*zip(*both)).statistic:.2f}"
        lines += ["", f"Rank correlation of UDR with MIG over the {len(both)} runs that have both: {rho}."]
    return "\n".join([*lines, "", "Figures: " + ", ".join(n for n in written if n.endswith(".png")), ""])


def write_summary(out_dir, require=False):
    """sweep.csv, summary.md and the figures, from the finished runs under out_dir, written as one; their names."""
    rows = collect(out_dir)
    if not rows and require:
        what = f"no finished run under {out_dir} (none has eval/report.json)"
        raise UsageError(f"{what}: run the sweep first, or pass the --out-dir it wrote to")
    if not rows:
        return []
    grouped, where = groups(rows), f"{data_names(rows)}, test split"
    files.clean_stale_temps(out_dir, SUMMARY)  # half-written files of a sweep that was killed
    spot = lambda r: (ORDER.index(r["objective"]), r["beta"], r["test.kl"], r["test.recon"])
    bars = [(*spot(m[0])[:2], [r["test.kl"] for r in m], [r["test.recon"] for r in m]) for m in grouped.values()]
    title = f"Rate–distortion: every run a point, bars ±1 s.d. over seeds\n{where}"
    pngs = {"rate_distortion.png": figures.rate_distortion(list(map(spot, rows)), bars, title)}
    models = dict.fromkeys(model_name(m[0]) for m in grouped.values())  # a curve each
    curves = [(n, [(m[0]["beta"], m) for m in grouped.values() if model_name(m[0]) == n]) for n in models]
    for figure in FIGURES:
        if panels := [(key, t) for _, key, _, f, t in COLUMNS if f == figure and any(key in r for r in rows)]:
            title = f"{figure.replace('_', ' and ')} against β: mean ± s.d. over seeds, dots are runs\n{where}"
            pngs[f"{figure}.png"] = figures.versus_beta(panels, curves, title)
    panels, checkpoint = [], lambda r: os.path.join(out_dir, r["run"], "checkpoint.pt")
    for r in [m[0] for m in grouped.values() if os.path.lexists(checkpoint(m[0])) and "kl_per_dim" in m[0]]:
        try:  # drawn from the checkpoint (a run may be kept without one): no figure is read back
            model, _ = vae.load_checkpoint(checkpoint(r))
        except vae.CheckpointError as e:
            say(f"warning: {shown(e, 200)}; left out of traversals.png")
            continue
        kl, decode = r["kl_per_dim"], lambda z, model=model: metrics.decode_batched(model, torch.as_tensor(z)).numpy()
        order, base = sorted(range(len(kl)), key=lambda d: -kl[d])[:10], np.zeros(len(kl), np.float32)
        image = figures.traversal(decode, base, order, [f"z{d} KL {kl[d]:.2f}" for d in order], None)
        panels.append((f"{model_name(r)}, β = {r['beta']:g} (seed {r['seed']})", image))
    title = "Latent traversals, one run per setting: each row sets one dimension from -3 to 3, the others at 0; the"
    if panels:
        pngs["traversals.png"] = figures.png_bytes(figures.side_by_side(panels, f"{title} 10 largest-KL rows\n{where}"))
    columns = ["run", "objective", "beta", "seed", "epochs"]
    columns += sorted({k for r in rows for k in r if k != "kl_per_dim"} - set(columns))
    writer = csv.DictWriter(table := io.StringIO(), columns, lineterminator="\n", extrasaction="ignore")
    writer.writerows([dict(zip(columns, columns)), *rows])  # the header, then a line per run
    texts = {"sweep.csv": table.getvalue(), "summary.md": summary_text(rows, grouped, list(pngs))}
    # a path or run name whose bytes are not UTF-8 is written escaped, as the scripts print and log it
    written = {k: v.encode("utf-8", "backslashreplace") for k, v in texts.items()} | pngs
    files.atomic_write_all([(os.path.join(out_dir, name), b) for name, b in written.items()])
    for path in [p for n in SUMMARY if n not in written and os.path.lexists(p := os.path.join(out_dir, n))]:
        try:
            os.remove(path)
        except OSError as e:
            say(f"warning: the earlier {path} is not this summary's but stays ({e.strerror or e})")
    return list(written)


def main(argv=None):
    safe_streams()  # a path whose bytes are not UTF-8 is printed escaped, not a UnicodeEncodeError
    failed, stopped, todo = [], False, []
    try:
        a = parse_args(argv)
        runs = grid(a)
        todo = [run for run in runs if not finished(run, a)]
        if a.print_commands:
            say(f"# {len(runs) - len(todo)} of {len(runs)} runs finished already; printing the other {len(todo)}")
            print("\n".join(" && ".join(map(shlex.join, commands(run, a))) for run in todo))
            return 0
        if not a.aggregate:
            print(f"{len(runs)} runs in {a.out_dir}: {len(runs) - len(todo)} finished already, skipped", flush=True)
        if todo and not a.aggregate:  # first a writable --out-dir, the data, and no sweep.log that is an input
            try:
                os.makedirs(a.out_dir, exist_ok=True)
                tempfile.TemporaryFile(dir=a.out_dir).close()  # the only sure test of writability
            except OSError as e:
                why = f"cannot write to --out-dir {a.out_dir} ({e.strerror or e})"
                raise UsageError(f"{why}: pass a writable folder; nothing was run") from None
            if a.dataset == "fashion-mnist":
                data.ensure_files(a.data_dir)  # once, here, rather than in every run at the same time
            inputs = {f"data file {n}": data.find(a.data_dir, n) for names in data.FILES.values() for n in names}
            # sweep.log is appended to in place: never a data file, nor a run's checkpoint or report
            own = lambda n: {f"{run['name']}'s {n}": os.path.join(run["dir"], n) for run in todo}
            if clash := files.clashes(inputs | own("checkpoint.pt") | own("eval/report.json"), own("sweep.log")):
                raise UsageError(f"{clash}: pass another --out-dir; nothing was run")
            failed, stopped = run_all(todo, a)
        try:
            written = write_summary(a.out_dir, require=a.aggregate)
        except OSError as e:
            why = f"cannot write the summary in {a.out_dir} ({e.strerror or e}): free space or pass another --out-dir"
            raise UsageError(f"{why}; the runs are complete, the summary files as they were") from None
        if written:
            print(f"wrote {', '.join(written)} in {a.out_dir}")
    except (UsageError, data.DataError, ValueError) as e:  # ValueError: vae.pick_device's
        return say(f"error: {e}", 2)
    except files.Interrupted:
        return say("error: interrupted after writing the summary", 130)
    except KeyboardInterrupt:
        return say("error: interrupted; the summary files are as they were", 130)
    if stopped:
        return say("stopped: run the same command again to resume", 130)
    if failed:
        how = "see the error line above for each, fix, and run the same command again (finished runs are skipped)"
        return say(f"{len(failed)} of {len(todo)} runs failed ({', '.join(failed)}): {how}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
