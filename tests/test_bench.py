"""bench.py runs in quick mode on tiny data and writes every key (a smoke test: no timing is asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_writes_every_key(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--data-dir", tiny_data, "--eval-images", "300",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("device", "torch", "onnxruntime", "threads"):
        assert key in r
    t = r["train"]
    assert t["reference_img_s"]["median"] > 0 and t["img_s"]["median"] > 0 and t["speedup_bs64"] > 0
    assert t["epoch_s"]["seed"]["median"] > 0 and t["epoch_speedup_bs64"] > 0
    e = r["evaluate"]
    assert e["test_images"] == 300 and e["seconds"]["median"] > 0
    assert {"load", "elbo_iwae", "encode", "probe", "classifier", "decode", "fid_pixels",
            "fid_classifier", "figures", "total"} <= set(e["parts"])
    s = r["sample"]
    assert s["onnx_cold_s"]["median"] > 0 and s["torch_cold_s"]["median"] > 0 and s["speedup"] > 0
    assert set(r["decoder"]["by_batch_size"]) == {"1", "64", "1024"}
    for v in r["decoder"]["by_batch_size"].values():
        assert v["onnxruntime_img_s"]["median"] > 0 and v["torch_img_s"]["median"] > 0
    assert "train, seed loop, batch 64" in proc.stdout and "sample.py cold start" in proc.stdout
    b = r["browser"]
    if "skipped" not in b:  # the explorer page in headless Chromium: where Chromium is installed
        assert b["decode_ms"]["median"] > 0 and b["calls"] == 200 and b["console_errors"] == []
        assert b["slider_to_canvas_ms"]["n"] == 10 and b["first_image_ms"]["median"] > 0
        assert "explorer: betaVAE.decode, 1 image" in proc.stdout
    else:
        assert b["skipped"].startswith("needs ")
