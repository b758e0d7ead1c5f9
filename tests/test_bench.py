"""bench.py runs in quick mode on tiny data and writes every key (a smoke test: no timing is asserted)."""

import json
import os

import warm
from conftest import run_here

import bench
import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_writes_every_key(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    fid.load_classifier(tiny_data, "cpu")  # bench.py copies the data's classifier cache to its own data folders
    proc = warm.run(
        ["bench.py", "--quick", "--data-dir", tiny_data, "--test-images", "300", "--out", str(out)],
        cwd=ROOT,
        timeout=600,
        env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("device", "torch", "onnxruntime", "threads"):
        assert key in r
    t = r["train"]
    assert set(t["img_s"]) == set(t["epoch_s"]) == {"seed", "eager"} and t["baseline"] == "seed"  # --quick: no compile
    assert all(v["median"] > 0 and v["n"] == 1 for v in (*t["img_s"].values(), *t["epoch_s"].values()))
    assert t["step_speedup"]["seed"] == 1.0 and t["step_speedup"]["eager"] > 0 and t["epoch_speedup"]["eager"] > 0
    # --quick trains on the data's own 256 images; the test pass goes through 300 (its 128 repeated)
    assert (t["images_per_epoch"], t["test_images"], t["distinct_images"]) == (256, 300, {"train": 256, "test": 128})
    assert len(t["epoch_ratios"]["eager"]) == 1
    e = r["evaluate"]
    assert e["test_images"] == 300 and e["seconds"]["median"] > 0
    assert {
        "load",
        "elbo_iwae",
        "encode",
        "probe",
        "classifier",
        "decode",
        "fid_pixels",
        "fid_classifier",
        "figures",
        "total",
    } <= set(e["parts"])
    s = r["sample"]
    assert s["onnx_cold_s"]["median"] > 0 and s["torch_cold_s"]["median"] > 0 and s["speedup"] > 0
    assert set(r["decoder"]["by_batch_size"]) == {"1", "64", "1024"}
    for v in r["decoder"]["by_batch_size"].values():
        assert v["onnxruntime_img_s"]["median"] > 0 and v["torch_img_s"]["median"] > 0
    assert "train, seed step, batch 64" in proc.stdout and "sample.py cold start" in proc.stdout
    b = r["browser"]
    if "skipped" not in b:  # the explorer page in headless Chromium: where Chromium is installed
        assert b["decode_ms"]["median"] > 0 and b["calls"] == 200 and b["console_errors"] == []
        assert b["slider_to_canvas_ms"]["n"] == 10 and b["first_image_ms"]["median"] > 0
        assert "explorer: betaVAE.decode, 1 image" in proc.stdout
    else:
        assert b["skipped"].startswith("needs ")


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tiny_data, tmp_path):
    label_file = os.path.join(tiny_data, "FashionMNIST", "raw", "train-labels-idx1-ubyte")
    os.link(label_file, tmp_path / "bench.json")  # a hard link to a data file
    before = open(label_file, "rb").read()
    for out, says in (
        (tmp_path / "bench.json", "is the same file as --data-dir file train-labels-idx1-ubyte"),
        (tmp_path, "must name a file to write, not a folder"),
        (tmp_path / "missing" / "b.json", "does not exist or cannot be written"),
    ):
        proc = run_here(bench, "--data-dir", tiny_data, "--out", out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (
            proc.stderr
        )
    assert open(label_file, "rb").read() == before and not (tmp_path / "missing").exists()


def test_a_bad_section_or_contender_is_one_line(tiny_data):
    for args, says in (
        (["--only", "train,plot"], "--only train,plot: choose from train,evaluate,sample,decoder,browser"),
        (["--contenders", "seed,fast"], "--contenders seed,fast: choose from seed,eager,plain,fused"),
        (["--quick", "--contenders", "plain"], "give seed or eager"),  # --quick trains no compiled step
    ):
        proc = run_here(bench, "--data-dir", tiny_data, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (
            proc.stderr
        )
