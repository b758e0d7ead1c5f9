"""sample.py: runs where torch cannot be imported, writes the right grid, is reproducible, refuses bad files."""
import contextlib
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

import export_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample.py")

# Runs a script with a meta-path finder in front that refuses torch and every torch.* module, as an interpreter
# without torch installed would. argv: [script, args...].
NO_TORCH = r"""
import os, runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_sample(*args, cwd):
    return subprocess.run([sys.executable, "-c", NO_TORCH, SAMPLE, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def decoder(tiny_checkpoint, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sample") / "decoder.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx.main(["--checkpoint", tiny_checkpoint["path"], "--out", path])
    return path


def pixels(path):
    with Image.open(path) as img:
        return img.mode, np.asarray(img)


def test_the_hook_really_blocks_torch(tmp_path):
    script = tmp_path / "imports_torch.py"
    script.write_text("import torch\n")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ImportError: torch is blocked for this test" in proc.stderr


def test_sample_without_torch_is_reproducible(decoder, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = run_sample("--onnx", decoder, "--seed", seed, "--out", f"{name}.png", "--npy", f"{name}.npy",
                          cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        mode, runs[name] = pixels(tmp_path / f"{name}.png")
        assert mode == "L" and runs[name].shape == (726, 726)  # 8 x 8 tiles of 28 + 2 px padding, + 2, times 3
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])
    # the documented recipe: z = default_rng(seed).standard_normal((n, latent_dim)) * temperature
    images = np.load(tmp_path / "a.npy")
    z = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    want = ort.InferenceSession(decoder, providers=["CPUExecutionProvider"]).run(None, {"z": z})[0]
    assert images.dtype == np.float32 and images.shape == (64, 1, 28, 28)
    assert np.array_equal(images, want)


def test_defaults_need_only_onnx(decoder, tmp_path):
    proc = subprocess.run([sys.executable, SAMPLE, "--onnx", decoder], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert pixels(tmp_path / "samples.png")[1].shape == (726, 726)


def test_temperature_zero_decodes_the_prior_mean(decoder, tmp_path):
    proc = run_sample("--onnx", decoder, "--n", 5, "--temperature", 0, "--npy", "t0.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    images = np.load(tmp_path / "t0.npy")
    assert images.shape == (5, 1, 28, 28) and np.all(images == images[:1])


@pytest.mark.parametrize("mode, rows", [("--traverse", 4), ("--interpolate", 3)])
def test_traverse_and_interpolate_grids(decoder, tmp_path, mode, rows):
    proc = run_sample("--onnx", decoder, mode, "--steps", 5, "--rows", 3, "--scale", 1, "--out", "g.png",
                      "--npy", "g.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pixels(tmp_path / "g.png")[1].shape == (rows * 30 + 2, 5 * 30 + 2)
    images = np.load(tmp_path / "g.npy").reshape(rows, 5, 28, 28)
    assert all(not np.array_equal(row[0], row[-1]) for row in images)  # every row goes somewhere


def tiny_model(path, in_shape, op, out_shape):
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("case, message", [
    ("missing", "no file at"),
    ("not_onnx", "is not an ONNX model"),
    ("encoder_like", "is not a decoder"),
    ("rank2_out", "is not a decoder"),
    ("huge", "far too big for a decoder"),
    ("bad_n", "--n 0 is out of range"),
    ("bad_out", "its folder does not exist"),
    ("clobber", "must name different files"),
])
def test_bad_input_one_line_exit_2_nothing_written(decoder, tmp_path, case, message):
    path, out, extra = str(tmp_path / "model.onnx"), "out.png", []
    if case == "missing":
        path = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf \x00\xff" * 10)
    elif case == "encoder_like":
        tiny_model(path, ["batch", 1, 28, 28], "Flatten", ["batch", 784])
    elif case == "rank2_out":
        tiny_model(path, ["batch", 4], "Identity", ["batch", 4])
    elif case == "huge":
        with open(path, "wb") as f:
            f.truncate(65 * 2**20)  # sparse: costs no disk, and sample.py must refuse it by size alone
    elif case == "clobber":  # --out naming the model itself must not overwrite it
        shutil.copy(decoder, path)
        extra = ["--out", path]
    else:
        path = decoder
        extra = ["--n", "0"] if case == "bad_n" else []
        out = "missing/out.png" if case == "bad_out" else out
    proc = run_sample("--onnx", path, "--out", out, "--npy", "out.npy", *extra, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.npy").exists()
    if case == "clobber":
        assert open(path, "rb").read() == open(decoder, "rb").read()
