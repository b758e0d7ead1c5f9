"""Train and evaluate a grid of β × seeds, resumably, then summarise it with error bars and figures.

$ python sweep.py --beta 1 2 4 8 --seeds 0 1 2 --epochs 20 --data-dir ./data --out-dir runs/sweep
$ python sweep.py --objective tc --beta 4 --seeds 0 1 2 --out-dir runs/sweep        # β-TCVAE runs beside them
$ python sweep.py --beta 1 2 4 8 --seeds 0 1 2 --print-commands | parallel -j 4      # elsewhere: one line per job
$ python sweep.py --out-dir runs/sweep --aggregate                                  # summarise what is there

Each run lives in <out-dir>/<objective><β>_seed<seed>/ as train.py and evaluate.py write it (checkpoint.pt, ...,
eval/report.json); sweep.log there holds both commands' output. A run is finished when eval/report.json is there for
the asked epochs: finished runs are skipped, others run `train.py ... --resume` (continue or start) and then
evaluate.py, the same self-contained line --print-commands prints. A failed run is reported, the rest go on, and
the exit status is 1. Then <out-dir>/sweep.csv, summary.md and the figures are rebuilt from every finished run there.
Ctrl-C (or SIGTERM) is passed on: runs finish their epoch and save; a second one stops them at once.
"""
import concurrent.futures
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import sweep_summary
from plumbing.cli import RANGES, ArgumentParser, UsageError, check_float, check_int, check_range, safe_streams
from plumbing.files import clashes

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = ("beta", "tc")  # the capacity objective ignores β: a β grid of it would train one model many times
# One thread per job: on a 2-core CPU a 2-β × 3-seed sweep (3 epochs, subset) took 79 s as two 1-thread jobs and
# 122 s as one 2-thread job (docs/study.md): the model is too small for a second thread to pay within one process. Capped at 8: a job peaks near 1 GB (train.py 0.9 GB, evaluate.py 1.1 GB on the subset).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_JOBS = max(1, min(8, CORES))
PASS_THROUGH = {"train": ("latent_dim", "batch_size", "lr", "alpha", "gamma", "compile", "device"),
                "evaluate": ("iwae_k", "device")}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="β values (default: 1 2 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per β (default: 0 1 2)")
    p.add_argument("--objective", nargs="+", choices=OBJECTIVES, default=["beta"],
                   help="beta (β-VAE) and/or tc (β-TCVAE, β weighs the total correlation) (default: beta)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: train.py's, 20)")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help=f"runs at once; the cores are split between them (default: the cores, at most 8: {DEFAULT_JOBS})")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default="./data", help="passed on (default: ./data)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir", default=os.path.join("runs", "sweep"),
                   help="one folder per run goes in here, with the summary (default: runs/sweep)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", "--print_commands", dest="print_commands", action="store_true",
                      help="print one train + evaluate command line per unfinished run and run nothing")
    mode.add_argument("--aggregate", action="store_true", help="only rebuild the summary from the run folders there")
    for name, kind, what in (("latent_dim", int, "latent size"), ("batch_size", int, "batch size"),
                             ("lr", float, "learning rate"), ("alpha", float, "tc objective: weight of the MI"),
                             ("gamma", float, "tc objective: weight of the dimension-wise KL"),
                             ("iwae_k", int, "evaluate.py's importance samples")):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, *([f"--{name}"] if "_" in name else []), dest=name, type=kind,
                       help=f"{what}, passed on (default: the script's own)")
    p.add_argument("--compile", choices=("auto", "on", "off"), help="train.py's --compile (default: train.py's)")
    p.add_argument("--device", help="passed on to both scripts (default: theirs, auto)")
    return p.parse_args(argv)


def check_args(a):
    """Every flag in the range of the script it is passed to (train.py's, evaluate.py's), before any run folder is
    made: a value they refuse would otherwise fail each run, one by one."""
    import vae  # the model's ranges (torch is imported once, here)
    for flag, values, (low, high) in (("--beta", a.beta, vae.LIMITS["beta"]), ("--seeds", a.seeds, RANGES["seed"])):
        for value in values:
            (check_int if isinstance(low, int) else check_float)(flag, value, low, high)
    for flag, values in (("--beta", a.beta), ("--seeds", a.seeds), ("--objective", a.objective)):
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} lists a value twice: give each once")
    check_int("--jobs", a.jobs, 1, 256)
    for name in ("epochs", "batch_size", "lr", "iwae_k"):
        if getattr(a, name) is not None:
            check_range(name, getattr(a, name))
    for name in ("latent_dim", "alpha", "gamma"):
        low, high = vae.LIMITS[name]
        if getattr(a, name) is not None:
            (check_int if isinstance(low, int) else check_float)("--" + name.replace("_", "-"), getattr(a, name),
                                                                  low, high)
    if a.device is not None and not a.print_commands:  # printed commands may run on another machine
        try:
            vae.pick_device(a.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    for flag, path in (("--out-dir", a.out_dir), ("--data-dir", a.data_dir)):
        blocked = not_a_folder(path)
        if blocked:
            raise UsageError(f"{flag} {path}: {blocked} is a file, not a folder: pass a folder")


def not_a_folder(path):
    """The part of `path` that exists and is not a folder (the path itself, or a file it goes through), or None."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def check_logs(todo, a):
    """sweep.log is appended to in place: refuse a run folder where it is the same file as the data or the run's
    own checkpoint or report (a hard link, a symlinked folder), which would be written into."""
    import data
    inputs = {f"data file {n}": data.find(a.data_dir, n) for names in data.FILES.values() for n in names}
    for run in todo:
        mine = {f"{run['name']}'s {n}": os.path.join(run["dir"], n) for n in ("checkpoint.pt", "eval/report.json")}
        clash = clashes(dict(inputs, **mine), {f"{run['name']}'s sweep.log": os.path.join(run["dir"], "sweep.log")})
        if clash:
            raise UsageError(f"{clash}: pass another --out-dir; nothing was run")


# ------------------------------------------------------------------------------------------------ the runs

def number(v):
    """A float as a flag or a name holds it: short where that is exact (4, 0.5), all its digits where not."""
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


def run_name(objective, beta, seed):
    return f"{objective}{number(beta)}_seed{seed}"


def grid(a):
    return [dict(name=run_name(o, b, s), objective=o, beta=b, seed=s, dir=os.path.join(os.path.abspath(a.out_dir),
                                                                                         run_name(o, b, s)))
            for o in a.objective for b in a.beta for s in a.seeds]


def commands(run, a):
    """(train argv, evaluate argv): self-contained, absolute paths, every flag that makes the run what it is."""
    data_dir = os.path.abspath(a.data_dir)
    train = [sys.executable, os.path.join(HERE, "train.py"), "--objective", run["objective"], "--beta",
             number(run["beta"]), "--seed", str(run["seed"])] + (["--epochs", str(a.epochs)] if a.epochs else []) + \
            ["--data-dir", data_dir, "--out-dir", run["dir"]]
    evaluate = [sys.executable, os.path.join(HERE, "evaluate.py"), "--checkpoint",
                os.path.join(run["dir"], "checkpoint.pt"), "--data-dir", data_dir]
    for argv, names in ((train, PASS_THROUGH["train"]), (evaluate, PASS_THROUGH["evaluate"])):
        for name in names:
            if getattr(a, name) is not None:
                value = getattr(a, name)
                argv += ["--" + name.replace("_", "-"), number(value) if isinstance(value, float) else str(value)]
    return train + ["--resume"], evaluate


def command_line(run, a):
    train, evaluate = commands(run, a)
    return f"{shlex.join(train)} && {shlex.join(evaluate)}"


def read_report(run_dir):
    try:
        with open(os.path.join(run_dir, "eval", "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        return report if isinstance(report, dict) else None
    except (OSError, ValueError):
        return None


def finished(run, a):
    """Whether the run's report is there for exactly what is asked: epochs, model, seed, every flag given and the
    data. A run made otherwise is not finished: train.py --resume then refuses a contradicting flag (the run is
    reported FAILED with its line), or resumes it, and evaluate.py reports it anew."""
    r = read_report(run["dir"])
    try:
        args, train_args = r["model_args"], r["train_args"]
        epochs = a.epochs if a.epochs is not None else train_args.get("epochs", r["epoch"])
        asked = {"objective": run["objective"], "beta": run["beta"], "seed": run["seed"],
                 **{k: getattr(a, k) for k in ("latent_dim", "alpha", "gamma", "batch_size", "lr")
                    if getattr(a, k) is not None}}
        found = {**args, "seed": train_args["seed"], "batch_size": train_args.get("batch_size"),
                 "lr": train_args.get("lr")}
        return (r["epoch"] >= epochs and all(found.get(k) == v for k, v in asked.items())
                and (a.iwae_k is None or r["test"]["iwae_k"] == a.iwae_k)
                and os.path.realpath(r["data"]["data_dir"]) == os.path.realpath(a.data_dir))
    except (TypeError, KeyError, AttributeError):
        return False


class Runner:
    """Runs each run's two commands as child processes, forwarding Ctrl-C / SIGTERM to them."""

    def __init__(self, threads):
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.children, self.stopping, self.lock = set(), threading.Event(), threading.Lock()

    def signal(self, signum, frame):
        self.stopping.set()
        with self.lock:
            for child in self.children:
                child.send_signal(signum)

    def run(self, run, a):
        """Returns (status, message), status one of "done", "FAILED", "stopped"."""
        os.makedirs(run["dir"], exist_ok=True)
        train, evaluate = commands(run, a)
        times = []
        with open(os.path.join(run["dir"], "sweep.log"), "a", encoding="utf-8", errors="backslashreplace") as log:
            for argv in (train, evaluate):
                if self.stopping.is_set():
                    return "stopped", "not finished; it resumes when the same command runs again"
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                t = time.perf_counter()
                # a session of its own: Ctrl-C reaches the child once, through signal(), never twice by the terminal
                child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=HERE,
                                         start_new_session=True)
                with self.lock:
                    self.children.add(child)
                code = child.wait()
                with self.lock:
                    self.children.discard(child)
                times.append(time.perf_counter() - t)
                if code != 0:
                    script = os.path.basename(argv[1])
                    status = "stopped" if self.stopping.is_set() else "FAILED"
                    reason = f"ended by {signal.Signals(-code).name}" if code < 0 else last_error(log.name)
                    return status, f"{script} exited {code}: {reason} (log: {log.name})"
        r = sweep_summary.flatten(read_report(run["dir"]) or {})
        numbers = ", ".join(f"{label} {r[key]:.4g}" for label, key in (("-ELBO", "test.neg_elbo"), ("KL", "test.kl"),
                            ("TC", "decomposition.total_correlation"), ("active units", "active_units")) if key in r)
        return "done", f"train {times[0]:.0f} s, evaluate {times[1]:.0f} s | {numbers}"


def last_error(log_path):
    """The last command's `error:` line in the log (or its last line: a traceback's), for the progress line."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_all(todo, a):
    from tqdm import tqdm
    jobs = min(a.jobs, len(todo))
    threads = max(1, CORES // jobs)
    runner = Runner(threads)
    print(f"{len(todo)} runs to do, {jobs} at a time with {threads} thread{'s' * (threads > 1)} each; logs in "
          "<run>/sweep.log", flush=True)
    handlers = {sig: signal.signal(sig, runner.signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed = []
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=None, file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(runner.run, run, a): run for run in todo}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            run = futures[future]
            try:
                status, message = future.result()
            except Exception as e:  # noqa: BLE001 (a run's failure is reported, never the sweep's end)
                status, message = "FAILED", f"{type(e).__name__}: {e}"
            if status == "FAILED":
                failed.append(run["name"])
            tqdm.write(f"[{i}/{len(todo)}] {run['name']}: {status}: {message}")
            bar.update()
    bar.close()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return failed, runner.stopping.is_set()


def fetch_data(data_dir):
    """Download the data once, here, when it is not there yet, rather than in every run at the same time."""
    if os.path.isdir(os.path.join(data_dir, "FashionMNIST", "raw")):
        return  # a damaged file there fails each run with train.py's message, reported per run
    import data
    for split in ("train", "test"):
        try:
            data.load_split(data_dir, split)
        except data.DataError as e:
            raise UsageError(str(e)) from None


def main(argv=None):
    safe_streams()  # a path whose bytes are not UTF-8 is printed escaped, not a UnicodeEncodeError
    a = parse_args(argv)
    try:
        check_args(a)
        runs = grid(a)
        todo = [run for run in runs if not finished(run, a)]
        if a.print_commands:
            print(f"# {len(runs) - len(todo)} of {len(runs)} runs finished already; printing the other "
                  f"{len(todo)}", file=sys.stderr)
            print("\n".join(command_line(run, a) for run in todo))
            return 0
        failed, stopped = [], False
        if not a.aggregate:
            print(f"{len(runs)} runs in {a.out_dir}: {len(runs) - len(todo)} finished already, skipped", flush=True)
            if todo:
                fetch_data(a.data_dir)
                check_logs(todo, a)
                failed, stopped = run_all(todo, a)
        try:
            written = sweep_summary.write(a.out_dir, require=a.aggregate)
        except OSError as e:
            raise UsageError(f"cannot write the summary in {a.out_dir} ({e.strerror or e}): free space or pass "
                             "another --out-dir; the runs are complete, the summary files as they were") from None
        if written:
            print(f"wrote {', '.join(written)} in {a.out_dir}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stopped:
        print("stopped: run the same command again to resume", file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} of {len(todo)} runs failed ({', '.join(failed)}): see each sweep.log, fix, and run the "
              "same command again (finished runs are skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
