"""Measure speed side by side in one run, print a table and write bench.json (docs/speed.md explains each figure).

Usage: python bench.py --data-dir data [--quick] [--device cuda] [--only train,evaluate,sample,decoder,browser].
Scripts run as a user runs them, in processes of their own; so does each training contender (sharing one process
slowed the compiled step), their epochs interleaved so that each sees the same machine. Figures are medians.
"""

import contextlib
import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from statistics import median
from subprocess import DEVNULL, PIPE

import numpy as np
import torch

import data
import fid
import training
import vae
from plumbing import browser, onnx_check
from plumbing.cli import ArgumentParser, UsageError, add, add_device, check_int
from plumbing.files import atomic_write, clashes, clean_stale_temps_for

ROOT = os.path.dirname(os.path.abspath(__file__))
# How each contender trains, with train.py's defaults at batch 64: the course project's loop (train.py --loop seed),
# train.py --compile off, the usual recipe (torch.compile, Adam(fused=True)) and train.py's compiled step.
CONTENDERS = {"seed": {"loop": "seed"}, "eager": {"compile": "off"}, "plain": {"compile": "plain", "fused_adam": True}}
CONTENDERS["fused"] = {"compile": "on"}
say = lambda *line: print(*line, file=sys.stderr, flush=True)  # the stderr of the moment
stats = lambda v: {"median": median(v), "min": min(v), "max": max(v), "n": len(v)}
paired = lambda a, b: median(x / y for x, y in zip(a, b))  # a/b of repeats that ran back to back


def trainer(data_dir, device, how):
    """train.py's model, optimizer and step; the function returned trains epoch n, then train.py's test pass (the
    course project's loop had none), and returns (training images/s, epoch seconds)."""
    train, test = data.load(data_dir, "train", device), data.load(data_dir, "test", device)
    config, loop, state = vae.VAEConfig(dataset_size=len(train)), how.get("loop", "fast"), {"step": 0}
    s = dataclasses.asdict(config) | dict(batch_size=64, seed=0, epochs=1, data_dir=data_dir, loop=loop)
    torch.manual_seed(0)
    model = vae.BetaVAE(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=how.get("fused_adam"))
    if loop == "seed":
        step = training.make_seed_step(model, opt, config)
    else:
        step = training.make_train_step(model, opt, config, how["compile"], log=lambda line: None)

    def epoch(n):
        t = time.perf_counter()
        img_s = training.epoch_loop(step, train, s, n, state, progress=False)[2]
        if loop != "seed":
            training.test_metrics(model, test, config, 0, state["step"])
        return img_s, time.perf_counter() - t

    return epoch


SERVE = """import bench, json, sys, torch
epoch = bench.trainer(sys.argv[1], torch.device(sys.argv[2]), json.loads(sys.argv[3]))
for n, line in enumerate(sys.stdin):  # an epoch per line; its (images/s, seconds) back as one line
    print(json.dumps(epoch(n)), flush=True)
"""


def trainer_process(data_dir, device, how):
    """trainer() in a process of its own, as each loop runs for its user: each next() is an epoch there."""
    argv = [sys.executable, "-c", SERVE, data_dir, str(device), json.dumps(how)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=PIPE, stdout=PIPE, stderr=DEVNULL, text=True)
    try:
        while True:
            print("epoch", file=proc.stdin, flush=True)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a training process ended (exit status {proc.wait()})")
            yield json.loads(line)
    finally:
        proc.stdin.close()
        proc.wait()


def bench_train(a):
    data_dir, distinct = sized_data(a.data_dir, a.work, "train-data", {"train": a.train_images, "test": a.test_images})
    loops = {name: trainer_process(data_dir, a.device, CONTENDERS[name]) for name in a.contenders}
    runs = {name: [] for name in loops}
    try:
        for r in range(a.repeats + 1):  # epoch 0 warms up (compilation included)
            for name, epochs in loops.items():
                runs[name].append(next(epochs))
            done = ", ".join(f"{k} {v[-1][0]:,.0f} img/s, epoch {v[-1][1]:.2f} s" for k, v in runs.items())
            say(f"  train {f'repeat {r}/{a.repeats}' if r else 'warm-up'}: {done}")
    finally:
        for epochs in loops.values():
            epochs.close()
    img_s, secs = ({k: [run[i] for run in v[1:]] for k, v in runs.items()} for i in (0, 1))
    b = "seed" if "seed" in runs else a.contenders[0]
    step_x = {k: paired(v, img_s[b]) for k, v in img_s.items()}
    epoch_x = {k: paired(secs[b], v) for k, v in secs.items()}
    for k, v in img_s.items():
        vs = k != b and f"{step_x[k]:.2f}x the {b} loop"
        a.rows.append((f"train, {k} step, batch 64", f"{median(v):,.0f} img/s", vs))
    for k, v in secs.items():
        what = f"epoch of {a.train_images:,} images" + ("" if k == "seed" else f" + test pass of {a.test_images:,}")
        a.rows.append((f"{what}, {k}", f"{median(v):.2f} s", k != b and f"{epoch_x[k]:.2f}x faster"))
    out = dict(images_per_epoch=a.train_images, test_images=a.test_images, distinct_images=distinct, baseline=b)
    out |= {"img_s": {k: stats(v) for k, v in img_s.items()}, "epoch_s": {k: stats(v) for k, v in secs.items()}}
    out |= {"step_speedup": step_x, "epoch_speedup": epoch_x}
    out["epoch_ratios"] = {k: [round(y / x, 2) for x, y in zip(v, secs[b])] for k, v in secs.items()}
    if {"fused", "plain"} <= img_s.keys():
        out["fused_vs_plain"] = paired(img_s["fused"], img_s["plain"])
        a.rows.append(("the fused step against the plain compiled step", f"{out['fused_vs_plain']:.2f}x", ""))
    return out


def sized_data(data_dir, work, name, sizes):
    """A data folder work/name with the data's images repeated (or cut) to the sizes asked for ({split: n}), and the
    FID classifier's cache when the data has one. Returns (folder, {split: distinct images})."""
    folder, distinct = os.path.join(work, name), {}
    os.makedirs(data.raw_dir(folder))
    for split, n in sizes.items():
        images, labels = data.read_split(data_dir, split)
        distinct[split], reps = min(n, len(images)), -(-n // len(images))
        for file, array in zip(data.FILES[split], (np.tile(images, (reps, 1, 1)), np.tile(labels, reps))):
            data.write_idx(os.path.join(data.raw_dir(folder), file), array[:n])
    cached, target = fid.classifier_cache_path(data_dir), fid.classifier_cache_path(folder)
    if os.path.isfile(cached) and not os.path.exists(target):
        shutil.copy2(cached, target)
    return folder, distinct


def script(*argv):
    """Run a script (or `-c` program) in a new process as a user would, quietly; RuntimeError says why it failed."""
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")


def bench_evaluate(a):
    """evaluate.py's own timings (they leave out its process's start-up) on a test split of --test-images."""
    train_n = len(data.read_split(a.data_dir, "train")[1])
    d, distinct = sized_data(a.data_dir, a.work, "eval-data", {"train": train_n, "test": a.test_images})
    out, runs = os.path.join(a.work, "eval"), []
    for r in range(a.quick, a.repeats + 1):  # run 0, the warm-up (not with --quick), caches the FID classifier
        script("evaluate.py", "--checkpoint", a.ckpt, "--data-dir", d, "--out-dir", out, "--device", a.device)
        with open(os.path.join(out, "report.json")) as f:
            runs.append(json.load(f)["timings_s"])
        say(f"  evaluate {f'repeat {r}/{a.repeats}' if r else 'warm-up'}: {runs[-1]['total']:.1f} s")
    parts = {k: stats([run[k] for run in runs[-a.repeats :]]) for k in runs[0]}
    shown = ", ".join(f"{k} {v['median']:.1f}" for k, v in parts.items() if k != "total")
    a.rows.append((f"evaluate, {a.test_images:,} test images", f"{parts['total']['median']:.1f} s", shown))
    return dict(test_images=a.test_images, distinct_test_images=distinct["test"], seconds=parts["total"], parts=parts)


TORCH_SAMPLE = """import sys, torch, vae
from figures import save_png, tile
model, ckpt = vae.load_checkpoint(sys.argv[1], "cpu")
with torch.inference_mode():
    z = torch.randn(64, ckpt["model_args"]["latent_dim"], generator=torch.Generator().manual_seed(0))
    save_png(tile(model.decode(z).numpy(), 8), sys.argv[2], scale=3)
"""


def bench_sample(a):
    """Cold starts, each a new process, interleaved, after a run each that warms the page cache (with --quick, a
    smoke run, that one run is all, and timed)."""
    onnx = ("sample.py", "--onnx", a.onnx, "--n", "64", "--out", os.path.join(a.work, "onnx.png"), "--overwrite")
    runs = {"onnx": onnx, "torch": ("-c", TORCH_SAMPLE, a.ckpt, os.path.join(a.work, "torch.png"))}
    times = {k: [] for k in runs}
    for i in range(1 if a.quick else 2 * a.repeats + 2):  # run 0 warms the cache; --quick keeps it
        for k, argv in runs.items():
            t = time.perf_counter()
            script(*argv)
            times[k] += [time.perf_counter() - t] if i or a.quick else []
    (o, t), x = times.values(), median(times["torch"]) / median(times["onnx"])
    vs = f"{x:.1f}x faster than torch ({median(t):.2f} s)"
    a.rows.append(("sample.py cold start, 64 images", f"{median(o):.2f} s", vs))
    return dict(onnx_cold_s=stats(o), torch_cold_s=stats(t), speedup=x)


def per_call(fn):
    """Seconds a call, over calls that fill 0.2 s after timeit's shorter rounds have warmed it up."""
    n, seconds = timeit.Timer(fn).autorange()
    return seconds / n


@torch.inference_mode()
def bench_decoder(a):
    """onnxruntime, its session exactly as sample.py configures it, against torch eager, in interleaved blocks."""
    checked = onnx_check.load(a.onnx, "decoder")
    sess, model, out = onnx_check.session(checked), vae.load_checkpoint(a.ckpt, "cpu")[0], {}
    for bs in (1, 64, 1024):
        z = np.random.default_rng(0).standard_normal((bs, checked.latent)).astype(np.float32)
        ort = functools.partial(sess.run, None, {sess.get_inputs()[0].name: z})
        pt = functools.partial(model.decode, torch.from_numpy(z))
        ort_s, pt_s = zip(*[(per_call(ort), per_call(pt)) for _ in range(a.repeats)])
        o, t, x = stats([bs / s for s in ort_s]), stats([bs / s for s in pt_s]), median(pt_s) / median(ort_s)
        out[str(bs)] = {"onnxruntime_img_s": o, "torch_img_s": t, "onnxruntime_speedup": x}
        vs = f"{t['median']:,.0f} img/s torch ({x:.1f}x)"
        a.rows.append((f"decoder, batch {bs}", f"{o['median']:,.0f} img/s onnxruntime", vs))
    return {"by_batch_size": out}


def bench_browser(a):
    """The explorer page, served by `explore.py --serve`, in headless Chromium (browser.measure_explorer)."""
    if reason := browser.missing():
        say(f"  browser section skipped: {reason}")
        return {"skipped": reason}
    site = os.path.join(a.work, "site")
    argv = [sys.executable, "explore.py", "--onnx", a.onnx, "--out", site, "--serve", "--port", "0"]
    server = subprocess.Popen(argv, cwd=ROOT, stdout=PIPE, stderr=PIPE, text=True)
    try:  # it prints "serving <site>/ at http://127.0.0.1:<port>/  (Ctrl-C stops)"
        url = next((w for line in server.stdout for w in line.split() if w.startswith("http://127.0.0.1:")), None)
        if url is None:
            raise RuntimeError(f"explore.py --serve failed: {server.stderr.read().strip()[-500:]}")
        m = browser.measure_explorer(url, loads=1 if a.quick else max(3, a.repeats), moves=10 if a.quick else 60)
    finally:
        server.terminate()
        server.communicate()
    with open(os.path.join(site, "model.json")) as f:
        m["onnxruntime_web"] = json.load(f)["onnxruntime_web"]
    m = {k: stats(v) if k.endswith("_ms") else v for k, v in m.items()}
    ui, first = m["slider_to_canvas_ms"], m["first_image_ms"]["median"]
    web = f"onnxruntime-web {m['onnxruntime_web']}, wasm, 1 thread, {m['calls']} calls"
    a.rows.append(("explorer: betaVAE.decode, 1 image", f"{m['decode_ms']['median']:.3f} ms", web))
    a.rows.append(("explorer: slider input -> canvas", f"{ui['median']:.1f} ms", f"max {ui['max']:.1f} ms"))
    a.rows.append(("explorer: first image after load", f"{first:.0f} ms", f"Chromium {m['chromium']}"))
    return m


SECTIONS = {f.__name__[6:]: f for f in (bench_train, bench_evaluate, bench_sample, bench_decoder, bench_browser)}


def parse_args(argv=None):
    p = ArgumentParser(description="Measure training, evaluation and sampling speed side by side.")
    add(p, "data_dir", "folder holding FashionMNIST/raw", default="./data")
    add_device(p)
    p.add_argument("--quick", action="store_true", help="a smoke run: one repeat each")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement (default: 5)")
    add(p, "contenders", "training contenders; --quick runs seed and eager only", default=",".join(CONTENDERS))
    add(p, "train_images", "images an epoch, the data's repeated", type=int, default_text="60000; --quick: the data's")
    flags = ("--test-images", "--test_images", "--eval-images", "--eval_images")
    p.add_argument(*flags, dest="test_images", type=int, default=10_000, help="test images (default: 10000)")
    add(p, "only", "sections to run; browser where Chromium is", default=",".join(SECTIONS))
    add(p, "out", "JSON file to write", default="bench.json")
    return p.parse_args(argv)


def check_out(out, data_dir):
    """Refuse an --out that cannot be written or would replace a data file, before minutes of measuring."""
    if not out or os.path.isdir(out):
        raise UsageError(f"--out {out!r} must name a file to write, not a folder: pass e.g. --out bench.json")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: its folder {parent} does not exist or cannot be written: pass another --out")
    inputs = {f"--data-dir file {n}": data.find(data_dir, n) for n in sum(data.FILES.values(), ())}
    if clash := clashes(inputs, {"--out": out}):
        raise UsageError(f"{clash}: pass another --out")
    clean_stale_temps_for([out])


def main(argv=None):
    a = parse_args(argv)
    sections, a.contenders, a.rows = a.only.split(","), a.contenders.split(","), []
    try:
        for flag, asked, known in (("--only", sections, SECTIONS), ("--contenders", a.contenders, CONTENDERS)):
            if not set(asked) <= set(known):
                raise UsageError(f"{flag} {','.join(asked)}: choose from {','.join(known)}")
        check_int("--test-images", a.test_images, 2, 1_000_000)
        check_int("--repeats", a.repeats, 1, 1000)
        a.device = vae.pick_device(a.device)
        data.ensure_files(a.data_dir)
        if a.train_images is None:
            a.train_images = len(data.read_split(a.data_dir, "train")[1]) if a.quick else 60_000
        check_int("--train-images", a.train_images, 1, 1_000_000)
        if a.quick or (a.device.type == "cpu" and not training.has_cxx()):  # then no compiled contenders
            a.contenders = [name for name in a.contenders if name in ("seed", "eager")]
        if not a.contenders and "train" in sections:
            raise UsageError("--contenders: with --quick, or on a CPU without a C++ compiler, give seed or eager")
        check_out(a.out, a.data_dir)
    except (ValueError, UsageError, data.DataError) as e:
        say(f"error: {e}")
        return 2
    a.repeats = 1 if a.quick else a.repeats
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else cpu
    result = dict(device=str(a.device), device_name=name, torch=torch.__version__, threads=torch.get_num_threads())
    result |= dict(cpu_count=os.cpu_count(), quick=a.quick, repeats=a.repeats, data_dir=os.path.abspath(a.data_dir))
    with contextlib.suppress(ImportError):
        result["onnxruntime"] = __import__("onnxruntime").__version__
    a.work = tempfile.mkdtemp(prefix="bench-")
    a.ckpt, a.onnx = os.path.join(a.work, "checkpoint.pt"), os.path.join(a.work, "decoder.onnx")
    try:  # minutes of measuring end in one line too, whatever stops them
        vae.save_checkpoint(a.ckpt, vae.BetaVAE(vae.VAEConfig()), None, 0, 0, {}, [])  # timings do not need weights
        if {"sample", "decoder", "browser"} & set(sections):
            script("export_onnx.py", "--checkpoint", a.ckpt, "--out", a.onnx, "--no-encoder")
        for name in [name for name in SECTIONS if name in sections]:  # in order, into result and a.rows
            say(f"{name} ...")
            result[name] = SECTIONS[name](a)
        w = max((len(row[0]) for row in a.rows), default=0)
        print("\n".join(f"{what:<{w}}  {fig:>24}  {vs or ''}".rstrip() for what, fig, vs in a.rows))
        try:
            atomic_write(a.out, json.dumps(result, indent=2).encode())
        except OSError as e:
            say(f"error: cannot write {a.out} ({e.strerror or e}); the table above holds the results")
            return 2
    except KeyboardInterrupt:
        say("error: interrupted; nothing was written")
        return 130
    except (OSError, RuntimeError) as e:
        cause = f"{type(e).__name__}{f' {e.filename}' if getattr(e, 'filename', None) else ''}: {str(e)[:200]}"
        say(f"error: measuring failed ({cause}); nothing was written: free space or fix the cause and run again")
        return 2
    finally:
        shutil.rmtree(a.work, ignore_errors=True)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
