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

import checkpoint
import data
import idx
import training
import vae
from plumbing.cli import ArgumentParser, UsageError, check_int
from plumbing.files import atomic_write, clashes, clean_stale_temps_for

ROOT = os.path.dirname(os.path.abspath(__file__))


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def settings(data_dir, batch_size, loop):
    """What train.py would train with by default, at this batch size, for one epoch."""
    return {**dataclasses.asdict(vae.VAEConfig()), **dataclasses.asdict(training.RUN_DEFAULTS),
            "batch_size": batch_size, "epochs": 1, "data_dir": data_dir, "loop": loop}


def bench_train(args, device, work, repeats, say):
    """The seed loop, train.py's eager step and its compiled step, interleaved epoch by epoch at batch 64, on a data
    folder of --train-images and --test-images."""
    data_dir, distinct = sized_data(args.data_dir, work, "train-data", {"train": args.train_images,
                                                                       "test": args.test_images})
    # where train.py's --compile auto would not compile (a GPU), bench still measures the compiled step: it is what
    # --compile on gives there
    compiled = args.compile != "off" and not args.quick and (device.type != "cpu" or training.has_cxx())
    names = ["seed", "eager"] + (["compiled"] if compiled else [])
    loops = {name: training.TrainerProcess(data_dir, device, settings(data_dir, 64, "seed" if name == "seed" else "fast"),
                             name == "compiled") for name in names}
    try:
        for name, t in loops.items():  # warm-up epoch (includes compilation)
            w = time.perf_counter()
            t.epoch()
            say(f"  warm-up {name}: {time.perf_counter() - w:.1f} s")
        runs = {name: [] for name in loops}
        for r in range(repeats):  # interleaved, so every loop sees the same machine
            for name, t in loops.items():
                runs[name].append(t.epoch())
            say(f"  train repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1][0]:,.0f} img/s, epoch {v[-1][1]:.2f} s"
                                                                   for k, v in runs.items()))
    finally:
        for t in loops.values():
            t.close()
    best = names[-1]
    img_s = {k: [r[0] for r in v] for k, v in runs.items()}
    secs = {k: [r[1] for r in v] for k, v in runs.items()}
    out = {"images_per_epoch": args.train_images, "test_images": args.test_images,
           "distinct_images": distinct, "step": best,
           "reference_img_s": stats(img_s["seed"]), "img_s": stats(img_s[best]), "eager_img_s": stats(img_s["eager"]),
           "epoch_s": {k: stats(v) for k, v in secs.items()},
           "epoch_speedup_bs64": statistics.median(s / b for s, b in zip(secs["seed"], secs[best])),
           "speedup_bs64": statistics.median(f / r for f, r in zip(img_s[best], img_s["seed"])),
           "eager_speedup_bs64": statistics.median(f / r for f, r in zip(img_s["eager"], img_s["seed"])),
           # every repeat, in order: on a shared machine the spread says as much as the median
           "epoch_ratios": [round(s / b, 2) for s, b in zip(secs["seed"], secs[best])],
           "repeats": {k: [{"img_s": round(i), "epoch_s": round(t, 3)} for i, t in v] for k, v in runs.items()}}
    return out


TORCH_SAMPLE = """
import sys
sys.path.insert(0, {root!r})
import torch, checkpoint
from images import save_png, tile
model, ckpt = checkpoint.load_checkpoint(sys.argv[1], "cpu")
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
    onnx_cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--onnx", onnx_path, "--n", "64",
                "--out", os.path.join(work, "onnx.png")]
    torch_cmd = [sys.executable, "-c", TORCH_SAMPLE.format(root=ROOT), ckpt_path, os.path.join(work, "torch.png")]
    onnx_t, torch_t = cold_runs([onnx_cmd, torch_cmd], repeats)
    return {"onnx_cold_s": stats(onnx_t), "torch_cold_s": stats(torch_t),
            "speedup": statistics.median(torch_t) / statistics.median(onnx_t)}


def per_call(fn, min_seconds=0.1):
    """Seconds per call, over as many calls as fill min_seconds, after one warm-up call."""
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t) / n


def bench_decoder(ckpt_path, onnx_path, repeats):
    import onnx_check
    checked = onnx_check.load(onnx_path, "decoder")
    sess, d = onnx_check.session(checked), checked.latent  # the session exactly as sample.py configures it
    model, _ = checkpoint.load_checkpoint(ckpt_path, "cpu")
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
        out[str(bs)] = {"onnxruntime_img_s": stats([bs / t for t in ort_runs]),
                        "torch_img_s": stats([bs / t for t in torch_runs]),
                        "onnxruntime_speedup": statistics.median(torch_runs) / statistics.median(ort_runs)}
    return out


def bench_browser(onnx_path, work, repeats, quick, say):
    """The explorer page, served by `explore.py --serve`, in headless Chromium (browser.measure_explorer)."""
    from plumbing import browser
    reason = browser.missing()
    if reason:
        say(f"  browser section skipped: {reason}")
        return {"skipped": reason}
    site = os.path.join(work, "site")
    server = subprocess.Popen([sys.executable, "explore.py", "--onnx", onnx_path, "--out", site, "--serve", "--port",
                               "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stdout:   # "serving <site>/ at http://127.0.0.1:<port>/  (Ctrl-C stops)"
            if "http://127.0.0.1:" in line:
                url = line.split(" at ", 1)[1].split()[0]
                break
        else:
            raise RuntimeError(f"explore.py --serve failed: {server.stderr.read().strip()[-500:]}")
        m = browser.measure_explorer(url, loads=1 if quick else max(3, repeats), moves=10 if quick else 60)
    finally:
        server.terminate()
        server.communicate()
    return {"decode_ms": stats(m["decode_ms"]), "calls": m["calls"], "slider_to_canvas_ms": stats(m["updates_ms"]),
            "first_image_ms": stats(m["first_image_ms"]), "console_errors": m["console_errors"],
            "chromium": m["chromium"], "onnxruntime_web": json.load(open(os.path.join(site, "model.json")))[
                "onnxruntime_web"]}


def parse_args(argv=None):
    p = ArgumentParser(description="Measure training, evaluation and sampling speed side by side.")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default="./data",
                   help="folder holding FashionMNIST/raw (default: ./data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--quick", action="store_true", help="one repeat each: a smoke run in under a minute")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement (default: 5)")
    p.add_argument("--compile", choices=("on", "off"), default="on",
                   help="also measure the compiled training step where a compiler exists; --quick skips it "
                        "(default: on)")
    p.add_argument("--train-images", "--train_images", dest="train_images", type=int, default=None,
                   help="images of a training epoch (default: 60000, the full Fashion-MNIST training split, the data's "
                        "own images repeated where it has fewer; with --quick, the data's own)")
    p.add_argument("--test-images", "--test_images", "--eval-images", "--eval_images", dest="test_images", type=int,
                   default=10_000, help="images of the test split that training's test pass and evaluate.py go "
                                        "through (default: 10000, the full Fashion-MNIST test split)")
    p.add_argument("--only", default="train,evaluate,sample,decoder,browser",
                   help="comma-separated sections to run (default: all five; browser runs where Chromium is)")
    p.add_argument("--out", default="bench.json", help="JSON file to write (default: bench.json)")
    return p.parse_args(argv)


def sized_data(data_dir, work, name, sizes):
    """A data folder work/name with splits of the sizes asked for (idx.write_sized), and the FID classifier's cache
    beside it when the data has one (its key is the training files', which a symlinked split keeps)."""
    import fid_classifier
    folder = os.path.join(work, name)
    distinct = idx.write_sized(data_dir, folder, sizes)
    cached, target = fid_classifier.classifier_cache_path(data_dir), fid_classifier.classifier_cache_path(folder)
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
    train_n = len(idx.read_split(data_dir, "train")[1])
    eval_dir, distinct = sized_data(data_dir, work, "eval-data", {"train": train_n, "test": n_images})
    runs = []
    for r in range(not warmup, repeats + 1):  # run 0, the warm-up, trains and caches the classifier if needed
        script("evaluate.py", "--checkpoint", ckpt_path, "--data-dir", eval_dir, "--out-dir", os.path.join(work, "eval"),
               "--device", str(device))
        with open(os.path.join(work, "eval", "report.json")) as f:
            timings = json.load(f)["timings_s"]   # measured inside evaluate.py: process start-up is not counted
        if r:
            runs.append(timings)
        say(f"  evaluate {'warm-up' if not r else f'repeat {r}/{repeats}'}: {timings['total']:.1f} s")
    return {"test_images": n_images, "distinct_test_images": distinct["test"],
            "seconds": stats([r["total"] for r in runs]), "parts": {k: stats([r[k] for r in runs]) for k in runs[0]}}


def table(result):
    rows = []
    tr = result.get("train")
    if tr:
        rows.append(("train, seed loop, batch 64", f"{tr['reference_img_s']['median']:,.0f} img/s", ""))
        rows.append(("train, train.py eager step, batch 64", f"{tr['eager_img_s']['median']:,.0f} img/s",
                     f"{tr['eager_speedup_bs64']:.1f}x the seed loop"))
        if tr["step"] == "compiled":
            rows.append(("train, train.py compiled step, batch 64", f"{tr['img_s']['median']:,.0f} img/s",
                         f"{tr['speedup_bs64']:.1f}x the seed loop"))
        rows.append((f"epoch of {tr['images_per_epoch']:,} images, {tr['step']} step + test pass of "
                     f"{tr['test_images']:,}", f"{tr['epoch_s'][tr['step']]['median']:.2f} s",
                     f"{tr['epoch_speedup_bs64']:.1f}x the seed loop's epoch ({tr['epoch_s']['seed']['median']:.2f} s)"))
    ev = result.get("evaluate")
    if ev:
        rows.append((f"evaluate, {ev['test_images']:,} test images", f"{ev['seconds']['median']:.1f} s",
                     ", ".join(f"{k} {v['median']:.1f}" for k, v in ev["parts"].items() if k not in ("wall",))))
    sa = result.get("sample")
    if sa:
        rows.append(("sample.py cold start, 64 images", f"{sa['onnx_cold_s']['median']:.2f} s",
                     f"{sa['speedup']:.1f}x faster than torch ({sa['torch_cold_s']['median']:.2f} s)"))
    for bs, v in result.get("decoder", {}).get("by_batch_size", {}).items():
        rows.append((f"decoder, batch {bs}", f"{v['onnxruntime_img_s']['median']:,.0f} img/s onnxruntime",
                     f"{v['torch_img_s']['median']:,.0f} img/s torch ({v['onnxruntime_speedup']:.1f}x)"))
    br = result.get("browser")
    if br and "skipped" not in br:
        rows.append(("explorer: betaVAE.decode, 1 image", f"{br['decode_ms']['median']:.3f} ms",
                     f"onnxruntime-web {br['onnxruntime_web']}, wasm, 1 thread, {br['calls']} calls"))
        rows.append(("explorer: slider input -> canvas", f"{br['slider_to_canvas_ms']['median']:.1f} ms",
                     f"max {br['slider_to_canvas_ms']['max']:.1f} ms over {br['slider_to_canvas_ms']['n']} moves"))
        rows.append(("explorer: first image after load", f"{br['first_image_ms']['median']:.0f} ms",
                     f"Chromium {br['chromium']}, headless, local server"))
    w = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"{a:<{w}}  {b:>24}  {c}" for a, b, c in rows)


def check_out(out, data_dir):
    """Refuse an --out that cannot be written or would replace a data file, before minutes of measuring."""
    if not out or os.path.isdir(out):
        raise UsageError(f"--out {out!r} must name a file to write, not a folder: pass e.g. --out bench.json")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: its folder {parent} does not exist or cannot be written: pass another --out")
    inputs = {f"--data-dir file {name}": data.find(data_dir, name) for split in data.FILES
              for name in data.FILES[split]}
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
        if args.train_images is None:
            args.train_images = len(idx.read_split(args.data_dir, "train")[1]) if args.quick else 60_000
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
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "quick": args.quick,
              "repeats": repeats, "data_dir": os.path.abspath(args.data_dir)}
    try:
        import onnxruntime
        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    work = tempfile.mkdtemp(prefix="bench-")
    try:
        if "train" in sections:
            say("training ...")
            result["train"] = bench_train(args, device, work, repeats, say)
        ckpt_path = os.path.join(work, "checkpoint.pt")
        model = vae.BetaVAE(vae.VAEConfig())  # timings do not depend on what the weights learned
        checkpoint.save_checkpoint(ckpt_path, model, None, 0, 0, {}, [])
        if "evaluate" in sections:
            say("evaluation ...")
            result["evaluate"] = bench_evaluate(ckpt_path, args.data_dir, work, device, repeats, args.test_images, say,
                                                warmup=not args.quick)
        if sections & {"sample", "decoder", "browser"}:
            onnx_path = os.path.join(work, "decoder.onnx")
            script("export_onnx.py", "--checkpoint", ckpt_path, "--out", onnx_path)
            if "sample" in sections:
                say("sampling cold starts ...")
                result["sample"] = bench_sample(ckpt_path, onnx_path, work, 1 if args.quick else 2 * repeats + 1)
            if "decoder" in sections:
                say("decoder throughput ...")
                result["decoder"] = {"by_batch_size": bench_decoder(ckpt_path, onnx_path, repeats)}
            if "browser" in sections:
                say("explorer page in headless Chromium ...")
                result["browser"] = bench_browser(onnx_path, work, repeats, args.quick, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
