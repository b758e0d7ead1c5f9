"""Measure speed side by side in one run, print a table and write bench.json.

$ python bench.py --data-dir data
$ python bench.py --data-dir data --quick          # a smoke run: one repeat each, no warm-up runs
$ python bench.py --data-dir data --device cuda

1. training at batch 64: the course project's loop (train.py --loop seed), train.py's eager step and its compiled
   step, each in a process of its own, epochs interleaved, on a data set of the full Fashion-MNIST's size (60,000
   training and 10,000 test images: the data's own images, repeated where it has fewer; --train-images and
   --test-images change it); images/s of training, and seconds of a whole epoch (train.py's includes its test pass);
2. evaluation: evaluate.py on a test split of --test-images (10,000) images, after a warm-up run that caches the FID
   classifier; the wall time and each part's time;
3. sampling: a cold `python sample.py --onnx ... --n 64` vs the same 64 images made with torch from the checkpoint;
4. decoder throughput: onnxruntime vs torch eager at batch sizes 1, 64, 1024;
5. browser (when Chromium, chromedriver, selenium and web/node_modules are there): the explorer page that explore.py
   builds, in headless Chromium: betaVAE.decode of one image (onnxruntime-web, wasm, one thread), a slider's input
   event to new pixels on the canvas, and the first image after loading the page from the local server.
Every timing is the median of several repeats after a warm-up; the spread is (min, max). Scripts run as the user
runs them, in their own processes; bench.py imports only modules.
"""

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import data
import fid
import training
import vae
from plumbing.cli import ArgumentParser, UsageError, check_int
from plumbing.files import atomic_write, clashes, clean_stale_temps_for

ROOT = os.path.dirname(os.path.abspath(__file__))


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# How each contender trains: train.py's defaults at batch 64, one epoch at a time, each in a process of its own
CONTENDERS = {
    "seed": {"loop": "seed"},  # the course project's loop (train.py --loop seed)
    "eager": {"compile": "off"},  # train.py --compile off
    "plain": {"compile": "plain", "fused_adam": True},  # the usual recipe: torch.compile, Adam(fused=True)
    "fused": {"compile": "on"},  # train.py's compiled step on a CPU
}


class Trainer:
    """A model, optimizer and step as train.py builds them; epoch() trains one epoch as train.py does (then its test
    pass) or as the course project did (no test pass), and returns (training images/s, epoch seconds)."""

    def __init__(self, data_dir, device, how):
        self.train, self.test = data.load(data_dir, "train", device), data.load(data_dir, "test", device)
        self.how, self.n, self.state = how, 0, {"step": 0}
        self.s = {
            **dataclasses.asdict(vae.VAEConfig()),
            "batch_size": 64,
            "lr": 1e-3,
            "seed": 0,
            "epochs": 1,
            "data_dir": data_dir,
            "loop": how.get("loop", "fast"),
        }
        torch.manual_seed(0)
        self.config = vae.VAEConfig(dataset_size=len(self.train))
        self.model = vae.BetaVAE(self.config).to(device)
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=how.get("fused_adam"))
        if self.s["loop"] == "seed":
            self.step = training.make_seed_step(self.model, opt, self.config)
        else:
            self.step = training.make_train_step(self.model, opt, self.config, how["compile"], log=lambda line: None)

    def epoch(self):
        t = time.perf_counter()
        _, _, img_s = training.epoch_loop(self.step, self.train, self.s, self.n, self.state, progress=False)
        if self.s["loop"] != "seed":  # train.py's epoch ends with a test pass; the course project's had none
            training.test_metrics(self.model, self.test, self.config, 0, self.state["step"])
        self.n += 1
        return img_s, time.perf_counter() - t


SERVE = """
import json, sys
sys.path.insert(0, {root!r})
import bench, torch
trainer = bench.Trainer(sys.argv[1], torch.device(sys.argv[2]), json.loads(sys.argv[3]))
for line in sys.stdin:  # an epoch per line; its (images/s, seconds) back as one line
    print(json.dumps(trainer.epoch()), flush=True)
"""


class TrainerProcess:
    """A Trainer in a process of its own, as each loop runs for its user: sharing one process slowed the compiled
    step (docs/speed.md). The caller interleaves their epochs."""

    def __init__(self, data_dir, device, how):
        argv = [sys.executable, "-c", SERVE.format(root=ROOT), data_dir, str(device), json.dumps(how)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def epoch(self):
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a training process ended (exit status {self.proc.wait()})")
        return tuple(json.loads(line))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def bench_train(args, device, work, repeats, say):
    """The contenders, interleaved epoch by epoch at batch 64, on a data folder of --train-images and --test-images."""
    data_dir, distinct = sized_data(
        args.data_dir, work, "train-data", {"train": args.train_images, "test": args.test_images}
    )
    names = args.contenders.split(",")
    if args.quick or (device.type == "cpu" and not training.has_cxx()):
        names = [n for n in names if n in ("seed", "eager")]
    loops = {name: TrainerProcess(data_dir, device, CONTENDERS[name]) for name in names}
    try:
        for name, t in loops.items():  # warm-up epoch (includes compilation)
            w = time.perf_counter()
            t.epoch()
            say(f"  warm-up {name}: {time.perf_counter() - w:.1f} s")
        runs = {name: [] for name in loops}
        for r in range(repeats):  # interleaved, so every loop sees the same machine
            for name, t in loops.items():
                runs[name].append(t.epoch())
            say(
                f"  train repeat {r + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1][0]:,.0f} img/s, epoch {v[-1][1]:.2f} s" for k, v in runs.items())
            )
    finally:
        for t in loops.values():
            t.close()
    img_s = {k: [r[0] for r in v] for k, v in runs.items()}
    secs = {k: [r[1] for r in v] for k, v in runs.items()}
    base = "seed" if "seed" in runs else names[0]
    out = {
        "images_per_epoch": args.train_images,
        "test_images": args.test_images,
        "distinct_images": distinct,
        "baseline": base,
        "img_s": {k: stats(v) for k, v in img_s.items()},
        "epoch_s": {k: stats(v) for k, v in secs.items()},
        # medians of the paired ratios: each repeat's contenders ran back to back, on the same machine
        "step_speedup": {k: statistics.median(a / b for a, b in zip(v, img_s[base])) for k, v in img_s.items()},
        "epoch_speedup": {k: statistics.median(b / a for a, b in zip(v, secs[base])) for k, v in secs.items()},
        "epoch_ratios": {k: [round(b / a, 2) for a, b in zip(v, secs[base])] for k, v in secs.items()},
    }
    if "fused" in img_s and "plain" in img_s:
        out["fused_vs_plain"] = statistics.median(a / b for a, b in zip(img_s["fused"], img_s["plain"]))
    return out


TORCH_SAMPLE = """
import sys
sys.path.insert(0, {root!r})
import torch, vae
from figures import save_png, tile
model, ckpt = vae.load_checkpoint(sys.argv[1], "cpu")
g = torch.Generator().manual_seed(0)
with torch.inference_mode():
    images = model.decode(torch.randn(64, ckpt["model_args"]["latent_dim"], generator=g)).numpy()
save_png(tile(images, 8), sys.argv[2], scale=3)
"""


def cold_runs(cmds, repeats):
    """Each command run `repeats` times as a new process, interleaved; returns seconds per command."""
    times = [[] for _ in cmds]
    for cmd in cmds:  # warm the page cache first
        subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(repeats):
        for i, cmd in enumerate(cmds):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[i].append(time.perf_counter() - t)
    return times


def bench_sample(ckpt_path, onnx_path, work, repeats):
    onnx_cmd = [
        sys.executable,
        os.path.join(ROOT, "sample.py"),
        "--onnx",
        onnx_path,
        "--n",
        "64",
        "--out",
        os.path.join(work, "onnx.png"),
        "--overwrite",
    ]
    torch_cmd = [sys.executable, "-c", TORCH_SAMPLE.format(root=ROOT), ckpt_path, os.path.join(work, "torch.png")]
    onnx_t, torch_t = cold_runs([onnx_cmd, torch_cmd], repeats)
    return {
        "onnx_cold_s": stats(onnx_t),
        "torch_cold_s": stats(torch_t),
        "speedup": statistics.median(torch_t) / statistics.median(onnx_t),
    }


def per_call(fn, min_seconds=0.1):
    """Seconds per call, over as many calls as fill min_seconds, after one warm-up call."""
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t) / n


def bench_decoder(ckpt_path, onnx_path, repeats):
    from plumbing import onnx_check

    checked = onnx_check.load(onnx_path, "decoder")
    sess, d = onnx_check.session(checked), checked.latent  # the session exactly as sample.py configures it
    model, _ = vae.load_checkpoint(ckpt_path, "cpu")
    name, out = sess.get_inputs()[0].name, {}
    for bs in (1, 64, 1024):
        z = np.random.default_rng(0).standard_normal((bs, d)).astype(np.float32)
        zt = torch.from_numpy(z)

        def run_torch():
            with torch.inference_mode():
                model.decode(zt)

        ort_runs, torch_runs = [], []
        for _ in range(repeats):  # interleaved blocks
            ort_runs.append(per_call(lambda: sess.run(None, {name: z})))
            torch_runs.append(per_call(run_torch))
        out[str(bs)] = {
            "onnxruntime_img_s": stats([bs / t for t in ort_runs]),
            "torch_img_s": stats([bs / t for t in torch_runs]),
            "onnxruntime_speedup": statistics.median(torch_runs) / statistics.median(ort_runs),
        }
    return out


def bench_browser(onnx_path, work, repeats, quick, say):
    """The explorer page, served by `explore.py --serve`, in headless Chromium (browser.measure_explorer)."""
    from plumbing import browser

    reason = browser.missing()
    if reason:
        say(f"  browser section skipped: {reason}")
        return {"skipped": reason}
    site = os.path.join(work, "site")
    server = subprocess.Popen(
        [sys.executable, "explore.py", "--onnx", onnx_path, "--out", site, "--serve", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in server.stdout:  # "serving <site>/ at http://127.0.0.1:<port>/  (Ctrl-C stops)"
            if "http://127.0.0.1:" in line:
                url = line.split(" at ", 1)[1].split()[0]
                break
        else:
            raise RuntimeError(f"explore.py --serve failed: {server.stderr.read().strip()[-500:]}")
        m = browser.measure_explorer(url, loads=1 if quick else max(3, repeats), moves=10 if quick else 60)
    finally:
        server.terminate()
        server.communicate()
    return {
        "decode_ms": stats(m["decode_ms"]),
        "calls": m["calls"],
        "slider_to_canvas_ms": stats(m["updates_ms"]),
        "first_image_ms": stats(m["first_image_ms"]),
        "console_errors": m["console_errors"],
        "chromium": m["chromium"],
        "onnxruntime_web": json.load(open(os.path.join(site, "model.json")))["onnxruntime_web"],
    }


def parse_args(argv=None):
    p = ArgumentParser(description="Measure training, evaluation and sampling speed side by side.")
    p.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        default="./data",
        help="folder holding FashionMNIST/raw (default: ./data)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--quick", action="store_true", help="one repeat each: a smoke run in under a minute")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement (default: 5)")
    p.add_argument(
        "--contenders",
        default="seed,eager,plain,fused",
        help=f"training contenders, comma-separated, from {','.join(CONTENDERS)}; --quick runs seed and "
        "eager only (default: seed,eager,plain,fused)",
    )
    p.add_argument(
        "--train-images",
        "--train_images",
        dest="train_images",
        type=int,
        default=None,
        help="images of a training epoch (default: 60000, the full Fashion-MNIST training split, the data's "
        "own images repeated where it has fewer; with --quick, the data's own)",
    )
    p.add_argument(
        "--test-images",
        "--test_images",
        "--eval-images",
        "--eval_images",
        dest="test_images",
        type=int,
        default=10_000,
        help="images of the test split that training's test pass and evaluate.py go "
        "through (default: 10000, the full Fashion-MNIST test split)",
    )
    p.add_argument(
        "--only",
        default="train,evaluate,sample,decoder,browser",
        help="comma-separated sections to run (default: all five; browser runs where Chromium is)",
    )
    p.add_argument("--out", default="bench.json", help="JSON file to write (default: bench.json)")
    return p.parse_args(argv)


def sized_data(data_dir, work, name, sizes):
    """A data folder work/name with splits of the sizes asked for ({split: n}): a split of the data's own size is the
    data's (symlinked), another is its images repeated (or cut) to n; the FID classifier's cache goes with it when
    the data has one. Returns (folder, {split: distinct images})."""
    folder, distinct = os.path.join(work, name), {}
    raw = data.raw_dir(folder)
    os.makedirs(raw)
    for split, n in sizes.items():
        images, labels = data.read_split(data_dir, split)
        distinct[split] = min(n, len(images))
        if n == len(images):
            for file in data.FILES[split]:
                src = data.find(data_dir, file)
                os.symlink(os.path.abspath(src), os.path.join(raw, os.path.basename(src)))
            continue
        reps = -(-n // len(images))
        data.write_idx(os.path.join(raw, data.FILES[split][0]), np.tile(images, (reps, 1, 1))[:n])
        data.write_idx(os.path.join(raw, data.FILES[split][1]), np.tile(labels, reps)[:n])
    cached, target = fid.classifier_cache_path(data_dir), fid.classifier_cache_path(folder)
    if os.path.isfile(cached) and not os.path.exists(target):
        shutil.copy2(cached, target)
    return folder, distinct


def script(*argv):
    """Run one of the project's scripts as a user would, quietly; its output if it succeeds."""
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def bench_evaluate(ckpt_path, data_dir, work, device, repeats, n_images, say, warmup=True):
    train_n = len(data.read_split(data_dir, "train")[1])
    eval_dir, distinct = sized_data(data_dir, work, "eval-data", {"train": train_n, "test": n_images})
    runs = []
    for r in range(not warmup, repeats + 1):  # run 0, the warm-up, trains and caches the classifier if needed
        script(
            "evaluate.py",
            "--checkpoint",
            ckpt_path,
            "--data-dir",
            eval_dir,
            "--out-dir",
            os.path.join(work, "eval"),
            "--device",
            str(device),
        )
        with open(os.path.join(work, "eval", "report.json")) as f:
            timings = json.load(f)["timings_s"]  # measured inside evaluate.py: process start-up is not counted
        if r:
            runs.append(timings)
        say(f"  evaluate {'warm-up' if not r else f'repeat {r}/{repeats}'}: {timings['total']:.1f} s")
    return {
        "test_images": n_images,
        "distinct_test_images": distinct["test"],
        "seconds": stats([r["total"] for r in runs]),
        "parts": {k: stats([r[k] for r in runs]) for k in runs[0]},
    }


def table(result):
    rows = []
    tr = result.get("train")
    if tr:
        base = tr["baseline"]
        for k, v in tr["img_s"].items():
            rows.append(
                (
                    f"train, {k} step, batch 64",
                    f"{v['median']:,.0f} img/s",
                    "" if k == base else f"{tr['step_speedup'][k]:.2f}x the {base} loop",
                )
            )
        for k, v in tr["epoch_s"].items():
            rows.append(
                (
                    f"epoch of {tr['images_per_epoch']:,} images + test pass of {tr['test_images']:,}, {k}",
                    f"{v['median']:.2f} s",
                    "" if k == base else f"{tr['epoch_speedup'][k]:.2f}x faster",
                )
            )
        if "fused_vs_plain" in tr:
            rows.append(("the fused step against the plain compiled step", f"{tr['fused_vs_plain']:.2f}x", ""))
    ev = result.get("evaluate")
    if ev:
        rows.append(
            (
                f"evaluate, {ev['test_images']:,} test images",
                f"{ev['seconds']['median']:.1f} s",
                ", ".join(f"{k} {v['median']:.1f}" for k, v in ev["parts"].items() if k not in ("wall",)),
            )
        )
    sa = result.get("sample")
    if sa:
        rows.append(
            (
                "sample.py cold start, 64 images",
                f"{sa['onnx_cold_s']['median']:.2f} s",
                f"{sa['speedup']:.1f}x faster than torch ({sa['torch_cold_s']['median']:.2f} s)",
            )
        )
    for bs, v in result.get("decoder", {}).get("by_batch_size", {}).items():
        rows.append(
            (
                f"decoder, batch {bs}",
                f"{v['onnxruntime_img_s']['median']:,.0f} img/s onnxruntime",
                f"{v['torch_img_s']['median']:,.0f} img/s torch ({v['onnxruntime_speedup']:.1f}x)",
            )
        )
    br = result.get("browser")
    if br and "skipped" not in br:
        rows.append(
            (
                "explorer: betaVAE.decode, 1 image",
                f"{br['decode_ms']['median']:.3f} ms",
                f"onnxruntime-web {br['onnxruntime_web']}, wasm, 1 thread, {br['calls']} calls",
            )
        )
        rows.append(
            (
                "explorer: slider input -> canvas",
                f"{br['slider_to_canvas_ms']['median']:.1f} ms",
                f"max {br['slider_to_canvas_ms']['max']:.1f} ms over {br['slider_to_canvas_ms']['n']} moves",
            )
        )
        rows.append(
            (
                "explorer: first image after load",
                f"{br['first_image_ms']['median']:.0f} ms",
                f"Chromium {br['chromium']}, headless, local server",
            )
        )
    w = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"{a:<{w}}  {b:>24}  {c}" for a, b, c in rows)


def check_out(out, data_dir):
    """Refuse an --out that cannot be written or would replace a data file, before minutes of measuring."""
    if not out or os.path.isdir(out):
        raise UsageError(f"--out {out!r} must name a file to write, not a folder: pass e.g. --out bench.json")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: its folder {parent} does not exist or cannot be written: pass another --out")
    inputs = {
        f"--data-dir file {name}": data.find(data_dir, name) for split in data.FILES for name in data.FILES[split]
    }
    clash = clashes(inputs, {"--out": out})
    if clash:
        raise UsageError(f"{clash}: pass another --out")
    clean_stale_temps_for([out])


def main(argv=None):
    args = parse_args(argv)
    sections = set(args.only.split(","))
    try:
        if not sections <= {"train", "evaluate", "sample", "decoder", "browser"}:
            raise UsageError(f"--only {args.only}: choose from train,evaluate,sample,decoder,browser")
        unknown = set(args.contenders.split(",")) - set(CONTENDERS)
        if unknown:
            raise UsageError(
                f"--contenders {args.contenders}: {', '.join(sorted(unknown))} unknown; choose from "
                f"{','.join(CONTENDERS)}"
            )
        if args.train_images is None:
            args.train_images = len(data.read_split(args.data_dir, "train")[1]) if args.quick else 60_000
        check_int("--train-images", args.train_images, 1, 1_000_000)
        check_int("--test-images", args.test_images, 2, 1_000_000)
        check_int("--repeats", args.repeats, 1, 1000)
        device = vae.pick_device(args.device)
        data.ensure_files(args.data_dir)
        check_out(args.out, args.data_dir)
    except (ValueError, UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    repeats = 1 if args.quick else max(1, args.repeats)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "repeats": repeats,
        "data_dir": os.path.abspath(args.data_dir),
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    work = tempfile.mkdtemp(prefix="bench-")
    try:  # minutes of measuring end in one line too, whatever stops them
        return measure(args, sections, device, repeats, result, work, say)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(
            f"error: measuring failed ({type(e).__name__}{where}: {str(e)[:200]}); nothing was written: free space "
            "or fix the cause and run again",
            file=sys.stderr,
        )
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, sections, device, repeats, result, work, say):
    """Each section asked for, into `result`; then the table and bench.json."""
    if "train" in sections:
        say("training ...")
        result["train"] = bench_train(args, device, work, repeats, say)
    ckpt_path = os.path.join(work, "checkpoint.pt")
    model = vae.BetaVAE(vae.VAEConfig())  # timings do not depend on what the weights learned
    vae.save_checkpoint(ckpt_path, model, None, 0, 0, {}, [])
    if "evaluate" in sections:
        say("evaluation ...")
        result["evaluate"] = bench_evaluate(
            ckpt_path, args.data_dir, work, device, repeats, args.test_images, say, warmup=not args.quick
        )
    if sections & {"sample", "decoder", "browser"}:
        onnx_path = os.path.join(work, "decoder.onnx")
        script("export_onnx.py", "--checkpoint", ckpt_path, "--out", onnx_path, "--no-encoder")
        if "sample" in sections:
            say("sampling cold starts ...")
            result["sample"] = bench_sample(ckpt_path, onnx_path, work, 1 if args.quick else 2 * repeats + 1)
        if "decoder" in sections:
            say("decoder throughput ...")
            result["decoder"] = {"by_batch_size": bench_decoder(ckpt_path, onnx_path, repeats)}
        if "browser" in sections:
            say("explorer page in headless Chromium ...")
            result["browser"] = bench_browser(onnx_path, work, repeats, args.quick, say)
    print(table(result))
    try:
        atomic_write(args.out, json.dumps(result, indent=2).encode())
    except OSError as e:
        print(f"error: cannot write {args.out} ({e.strerror or e}); the table above holds the results", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
