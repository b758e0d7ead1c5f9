"""Measure speed side by side in one run, print a table and write bench.json.

$ python bench.py --data-dir ../shared/data
$ python bench.py --data-dir ../shared/data --quick          # a smoke run, under a minute
$ python bench.py --data-dir ../shared/data --device cuda

1. training: images/s of one epoch of train.py's loop vs the course project's loop (train.py --loop seed), batch 64,
   interleaved epoch by epoch, and train.py's loop at batch sizes 128, 256, 512;
2. evaluation: evaluate.py on a 10,000-image test split (the data's test images repeated when it has fewer), after a
   warm-up run that caches the FID classifier; the wall time and each part's time;
3. sampling: a cold `python sample.py --onnx ... --n 64` vs the same 64 images made with torch from the checkpoint;
4. decoder throughput: onnxruntime vs torch eager at batch sizes 1, 64, 1024.
Every timing is the median of several repeats after a warm-up; the spread is (min, max).
"""
import contextlib
import io
import json
import math
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
import train_step
import vae
from cli import ArgumentParser
from fileio import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def settings(data_dir, batch_size, loop):
    return dict(latent_dim=10, beta=4.0, objective="beta", gamma=1000.0, capacity_max=25.0, capacity_steps=100_000,
                alpha=1.0, batch_size=batch_size, lr=1e-3, seed=0, epochs=1, data_dir=data_dir, loop=loop)


class Trainer:
    """A model, optimizer and step as train.py builds them; .epoch() runs train.py's epoch loop once, returns img/s."""

    def __init__(self, train_mod, train_data, s, compile_mode):
        self.t, self.data, self.s = train_mod, train_data, s
        torch.manual_seed(0)
        config = vae.VAEConfig(**{k: s[k] for k in train_mod.MODEL_FLAGS})
        self.model = vae.BetaVAE(config).to(train_data.device)
        opt = torch.optim.Adam(self.model.parameters(), lr=s["lr"])
        self.step = (train_mod.make_seed_step(self.model, opt, config) if s["loop"] == "seed"
                     else train_step.make_train_step(self.model, opt, config, compile=compile_mode))
        self.state, self.n = {"step": 0}, 0

    def epoch(self):
        _, _, img_s = self.t.epoch_loop(self.model, self.step, self.data, self.s, self.n, self.state)
        self.n += 1
        return img_s


def bench_train(args, device, repeats, say):
    """The seed loop, train.py's eager step and its compiled step, interleaved epoch by epoch at batch 64."""
    import train as train_mod
    train_data = data.load(args.data_dir, "train", device)
    compiled = args.compile != "off" and not args.quick and train_mod.want_compile("auto", device, float("inf"))
    loops = {"seed": Trainer(train_mod, train_data, settings(args.data_dir, 64, "seed"), False),
             "eager": Trainer(train_mod, train_data, settings(args.data_dir, 64, "fast"), False)}
    if compiled:
        loops["compiled"] = Trainer(train_mod, train_data, settings(args.data_dir, 64, "fast"), True)
    for name, t in loops.items():  # warm-up epoch (includes compilation)
        w = time.perf_counter()
        t.epoch()
        say(f"  warm-up {name}: {time.perf_counter() - w:.1f} s")
    runs = {name: [] for name in loops}
    for r in range(repeats):  # interleaved, so every loop sees the same machine
        for name, t in loops.items():
            runs[name].append(t.epoch())
        say(f"  train repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:,.0f} img/s" for k, v in runs.items()))
    best = "compiled" if compiled else "eager"
    out = {"images_per_epoch": len(train_data), "reference_img_s": stats(runs["seed"]), "img_s": stats(runs[best]),
           "step": best, "eager_img_s": stats(runs["eager"]),
           "speedup_bs64": statistics.median(f / r for f, r in zip(runs[best], runs["seed"])),
           "eager_speedup_bs64": statistics.median(f / r for f, r in zip(runs["eager"], runs["seed"]))}
    by_bs = {64: stats(runs[best])}
    for bs in (128, 256, 512):
        t = Trainer(train_mod, train_data, settings(args.data_dir, bs, "fast"), compiled)
        t.epoch()
        by_bs[bs] = stats([t.epoch() for _ in range(repeats)])
    out["by_batch_size"] = {str(k): v for k, v in by_bs.items()}
    return out


TORCH_SAMPLE = """
import sys
sys.path.insert(0, {root!r})
import torch, vae
from images import save_png, tile
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
    onnx_cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--onnx", onnx_path, "--n", "64",
                "--out", os.path.join(work, "onnx.png")]
    torch_cmd = [sys.executable, "-c", TORCH_SAMPLE.format(root=ROOT), ckpt_path, os.path.join(work, "torch.png")]
    onnx_t, torch_t = cold_runs([onnx_cmd, torch_cmd], repeats)
    return {"onnx_cold_s": stats(onnx_t), "torch_cold_s": stats(torch_t),
            "speedup": statistics.median(torch_t) / statistics.median(onnx_t)}


def per_call(fn, repeats, min_seconds=0.2):
    """Median seconds per call: blocks of calls long enough to time, after a warm-up."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t >= min_seconds / 4 or n >= 4096:
            break
        n *= 2
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n)
    return runs


def bench_decoder(ckpt_path, onnx_path, repeats):
    import sample
    sess, d, _ = sample.load_decoder(onnx_path)  # the session exactly as sample.py configures it
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
            ort_runs += per_call(lambda: sess.run(None, {name: z}), 1)
            torch_runs += per_call(run_torch, 1)
        out[str(bs)] = {"onnxruntime_img_s": stats([bs / t for t in ort_runs]),
                        "torch_img_s": stats([bs / t for t in torch_runs]),
                        "onnxruntime_speedup": statistics.median(torch_runs) / statistics.median(ort_runs)}
    return out


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
    p.add_argument("--eval-images", "--eval_images", dest="eval_images", type=int, default=10_000,
                   help="size of the test split evaluated (default: 10000, the full Fashion-MNIST test split)")
    p.add_argument("--only", default="train,evaluate,sample,decoder",
                   help="comma-separated sections to run (default: all four)")
    p.add_argument("--out", default="bench.json", help="JSON file to write (default: bench.json)")
    return p.parse_args(argv)


def sized_test_split(data_dir, work, n):
    """A data folder whose test split has exactly n images (the data's own, repeated if it has fewer) and whose
    train files are the data's own (symlinked, so the FID classifier's cache key stays the same)."""
    import metrics
    raw = os.path.join(work, "data", "FashionMNIST", "raw")
    os.makedirs(raw)
    for name in data.FILES["train"]:
        src = data._find(os.path.join(data_dir, "FashionMNIST", "raw"), name)
        os.symlink(os.path.abspath(src), os.path.join(raw, os.path.basename(src)))
    images, labels = data.load_split(data_dir, "test", download=False)
    reps = math.ceil(n / len(images))
    data.write_idx(os.path.join(raw, data.FILES["test"][0]), np.tile(images.numpy(), (reps, 1, 1))[:n])
    data.write_idx(os.path.join(raw, data.FILES["test"][1]), np.tile(labels.numpy().astype(np.uint8), reps)[:n])
    cached, target = metrics.classifier_cache_path(data_dir), metrics.classifier_cache_path(os.path.join(work, "data"))
    if os.path.isfile(cached) and not os.path.exists(target):
        shutil.copy2(cached, target)
    return os.path.join(work, "data"), len(images)


def bench_evaluate(ckpt_path, data_dir, work, device, repeats, n_images, say):
    import evaluate
    eval_dir, n_real = sized_test_split(data_dir, work, n_images)
    argv = ["--checkpoint", ckpt_path, "--data-dir", eval_dir, "--out-dir", os.path.join(work, "eval"),
            "--device", device.type]
    runs = []
    for r in range(repeats + 1):  # the first run is the warm-up; it trains and caches the classifier if needed
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            evaluate.main(argv)  # its table and progress bars would drown bench's own lines
        wall = time.perf_counter() - t
        with open(os.path.join(work, "eval", "report.json")) as f:
            report = json.load(f)
        if r:
            runs.append(dict(report["timings_s"], wall=wall))
        say(f"  evaluate {'warm-up' if not r else f'repeat {r}/{repeats}'}: {wall:.1f} s")
    parts = {k: stats([run[k] for run in runs]) for k in runs[0]}
    return {"test_images": n_images, "distinct_test_images": min(n_real, n_images), "seconds": stats([r["wall"] for r in runs]),
            "parts": parts}


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
        for bs, v in tr["by_batch_size"].items():
            if bs != "64":
                rows.append((f"train, train.py {tr['step']} step, batch {bs}", f"{v['median']:,.0f} img/s", ""))
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
    w = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"{a:<{w}}  {b:>24}  {c}" for a, b, c in rows)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = vae.pick_device(args.device)
        data.load_split(args.data_dir, "train", download=True)
        data.load_split(args.data_dir, "test", download=True)
    except (ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sections = set(args.only.split(","))
    if not sections <= {"train", "evaluate", "sample", "decoder"} or args.eval_images < 1 or args.repeats < 1:
        print("error: --only takes train,evaluate,sample,decoder; --eval-images and --repeats must be >= 1",
              file=sys.stderr)
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
            result["train"] = bench_train(args, device, repeats, say)
        ckpt_path = os.path.join(work, "checkpoint.pt")
        model = vae.BetaVAE(vae.VAEConfig())  # timings do not depend on what the weights learned
        vae.save_checkpoint(ckpt_path, model, None, 0, 0, {}, [])
        if "evaluate" in sections:
            say("evaluation ...")
            result["evaluate"] = bench_evaluate(ckpt_path, args.data_dir, work, device, repeats, args.eval_images, say)
        if sections & {"sample", "decoder"}:
            import export_onnx
            onnx_path = os.path.join(work, "decoder.onnx")
            with contextlib.redirect_stdout(io.StringIO()):
                export_onnx.main(["--checkpoint", ckpt_path, "--out", onnx_path])
            if "sample" in sections:
                say("sampling cold starts ...")
                result["sample"] = bench_sample(ckpt_path, onnx_path, work, 3 if args.quick else 2 * repeats + 1)
            if "decoder" in sections:
                say("decoder throughput ...")
                result["decoder"] = {"by_batch_size": bench_decoder(ckpt_path, onnx_path, repeats)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
