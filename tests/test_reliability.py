"""Bad input, interruptions and untrusted files: one clear line, a non-zero exit, nothing lost or half-written."""

import importlib
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import warm
from conftest import make_images, reshape_model, run_here, write_dataset

import data
import export_onnx
import train
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, timeout=300):
    """The script in a new process: forked from the warm server (tests/warm.py) where the script imports torch; a new
    interpreter for sample.py, which does not, and which must load onnx there as it does for its users."""
    if script == "sample.py":
        argv = [sys.executable, script, *map(str, args)]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return warm.run([script, *map(str, args)], cwd=ROOT, timeout=timeout)


def assert_clean_error(proc, *needles):
    """Exit 2, no traceback, and one line starting with 'error:' that names the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


# ------------------------------------------------------------------------------------------------------ data


def raw_dir(root):
    return os.path.join(root, "FashionMNIST", "raw")


def test_bad_magic_number(tiny_data):
    p = os.path.join(raw_dir(tiny_data), "train-images-idx3-ubyte")
    b = bytearray(open(p, "rb").read())
    b[2] = 0x0D  # float type instead of ubyte
    open(p, "wb").write(bytes(b))
    with pytest.raises(data.DataError, match="magic number"):
        data.read_split(tiny_data, "train")


def test_file_shorter_than_its_header_says(tiny_data):
    p = os.path.join(raw_dir(tiny_data), "t10k-images-idx3-ubyte")
    b = open(p, "rb").read()
    open(p, "wb").write(b[:-100])
    with pytest.raises(data.DataError, match="shorter than its header"):
        data.read_split(tiny_data, "test")


def test_labels_and_images_of_different_counts(tiny_data):
    imgs, labels = make_images(10, 0)
    data.write_idx(os.path.join(raw_dir(tiny_data), "train-labels-idx1-ubyte"), labels[:7])
    with pytest.raises(data.DataError, match="256 images but .* 7 labels"):
        data.read_split(tiny_data, "train")


def test_missing_data_without_network_in_train_py(tmp_path, offline):
    proc = run_here(train, "--data-dir", tmp_path / "nothing", "--out-dir", tmp_path / "run", "--epochs", 1)
    assert_clean_error(proc, "could not be downloaded", "train-images-idx3-ubyte")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "nothing").exists()  # no empty FashionMNIST/raw folders left behind either


def test_unwritable_data_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(data.DataError, match="cannot create the data directory"):
        data.load(str(blocker / "data"), "train", "cpu")


def test_fuzzed_idx_files_end_in_a_clear_error(tmp_path):
    rng = random.Random(0)
    good = tmp_path / "good"
    data.write_idx(good, make_images(4, 0)[0])
    valid = good.read_bytes()
    p = str(tmp_path / "fuzz")
    cases = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(150)]
    cases += [valid[: rng.randint(0, len(valid) - 1)] for _ in range(100)]
    cases += [b"\x00\x00\x08\x03" + bytes(rng.getrandbits(8) for _ in range(12)) for _ in range(50)]  # huge dims
    for case in cases:
        open(p, "wb").write(case)
        with pytest.raises(data.DataError):
            data.read_idx(p, 3)


# ----------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--beta", "-1"], "--beta"),
        (["--latent-dim", "0"], "--latent-dim"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "-1"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--num-generation-samples", "0"], "--num-generation-samples 0 is out of range"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, flags, needle):
    assert_clean_error(run_here(train, *flags, "--data-dir", tmp_path, "--out-dir", tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(tiny_data, tmp_path):
    proc = run_here(train, "--device", "cuda", "--data-dir", tiny_data, "--out-dir", tmp_path / "run")
    assert_clean_error(proc, "CUDA is not available", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tiny_data, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_here(train, "--epochs", 1, "--data-dir", tiny_data, "--out-dir", tmp_path / "file" / "run")
    assert_clean_error(proc, "cannot write to", "--out-dir")


# ----------------------------------------------------------------------------------------------- checkpoints


def test_unreadable_checkpoints_give_a_clear_error(tmp_path):
    cases = {"missing.pt": None, "empty.pt": b"", "random.pt": os.urandom(4096), "text.pt": b"hello, world\n" * 20}
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(vae.CheckpointError):
            vae.load_checkpoint(p)


def test_foreign_and_old_checkpoints_are_named(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(vae.CheckpointError, match="missing format_version"):
        vae.load_checkpoint(tmp_path / "foreign.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(vae.CheckpointError, match="not a checkpoint dict"):
        vae.load_checkpoint(tmp_path / "tensor.pt")
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=3))
    vae.save_checkpoint(tmp_path / "old.pt", model, None, 1, 0, {}, [], extra={"format_version": 0})
    with pytest.raises(vae.CheckpointError, match="format 0"):
        vae.load_checkpoint(tmp_path / "old.pt")
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    ckpt["format_version"] = vae.CHECKPOINT_FORMAT
    ckpt["model_args"]["latent_dim"] = 5  # weights for 3 dims, config for 5
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(vae.CheckpointError, match="does not match this model"):
        vae.load_checkpoint(tmp_path / "mismatch.pt")


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create the file when unpickled


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": _Exploit(str(target))}, p)
    with open(tmp_path / "evil.pkl", "wb") as f:  # a plain pickle too, not only torch's zip format
        pickle.dump(_Exploit(str(target)), f)
    for path in (p, tmp_path / "evil.pkl"):
        with pytest.raises(vae.CheckpointError):
            vae.load_checkpoint(path)
    assert not target.exists()


def test_resume_with_contradicting_flags_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_data, "--out-dir", out, "--compile", "off", "--batch-size", 64]
    assert run_here(train, "--epochs", 1, "--latent-dim", 3, *common).returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_here(train, "--resume", "--epochs", 2, "--latent-dim", 5, *common)
    assert_clean_error(proc, "--latent-dim 5 contradicts", "trained with 3")
    assert (out / "checkpoint.pt").read_bytes() == before
    proc = run_here(train, "--resume", "--epochs", 2, *common)  # no contradiction: the checkpoint's values
    assert proc.returncode == 0, proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["model_args"]["latent_dim"] == 3


@pytest.mark.parametrize(
    "script, flag",
    [
        ("train.py", "--seed"),
        ("evaluate.py", "--seed"),
        ("export_onnx.py", "--opset"),
        ("sample.py", "--seed"),
        ("bench.py", "--repeats"),
    ],
)
def test_a_wrongly_typed_flag_is_one_line(script, flag, monkeypatch):
    if script in ("train.py", "sample.py"):  # a new process for one script with torch and one without
        proc = run_script(script, flag, "many")
    else:  # the same parser in this process, named as the script: a torch start-up saved each
        monkeypatch.setattr(sys, "argv", [script])
        proc = run_here(importlib.import_module(script[:-3]), flag, "many")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: argument {flag}: invalid int value: 'many' (see python {script} --help)"
    ], proc.stderr


def test_seed_loop_without_uncompressed_files(tmp_path):
    import gzip
    import shutil

    root = write_dataset(tmp_path / "data")
    raw = os.path.join(root, "FashionMNIST", "raw")
    for name in os.listdir(raw):  # the same data, gzipped only: the fast loop reads it, torchvision's loop cannot
        with open(os.path.join(raw, name), "rb") as src, gzip.open(os.path.join(raw, name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(os.path.join(raw, name))
    proc = run_here(train, "--loop", "seed", "--data-dir", root, "--out-dir", tmp_path / "run", "--epochs", 1)
    assert_clean_error(proc, "--loop seed", "gunzip", "train-images-idx3-ubyte")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_loop_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_data, "--out-dir", out, "--compile", "off", "--batch-size", 64, "--latent-dim", 3]
    assert run_here(train, "--epochs", 1, *common).returncode == 0
    proc = run_here(train, "--resume", "--epochs", 2, "--loop", "seed", *common)
    assert_clean_error(proc, "--loop seed contradicts", "trained with --loop fast")


# ---------------------------------------------------------------------------------------- interruptions


def training_flags(data_dir, out, epochs):
    return [
        "--epochs",
        str(epochs),
        "--data-dir",
        data_dir,
        "--out-dir",
        str(out),
        "--compile",
        "off",
        "--batch-size",
        "32",
        "--latent-dim",
        "3",
        "--seed",
        "4",
    ]


def start_training(data_dir, out, epochs):
    return warm.start(["train.py", *training_flags(data_dir, out, epochs)], cwd=ROOT)


def wait_for_epoch(out, epoch, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= epoch:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    data_dir = write_dataset(root / "data", n_train=512, n_test=64)
    proc = run_here(train, *training_flags(data_dir, root / "run", 6))  # the killed runs' processes are others
    assert proc.returncode == 0, proc.stderr
    return data_dir, torch.load(root / "run" / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_training_resumes_to_the_same_weights(reference_run, tmp_path, sig):
    data_dir, reference = reference_run
    out = tmp_path / "run"
    proc = start_training(data_dir, out, 6)
    wait_for_epoch(out, 2, proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # finishes the epoch it is in, saves, and exits with 128 + the signal number
        assert proc.returncode == 128 + sig, proc.returncode
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # always complete and loadable
    assert 2 <= ckpt["epoch"] < 6 or sig == signal.SIGKILL
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    resumed = run_here(train, "--resume", "--epochs", 6, "--data-dir", data_dir, "--out-dir", out, "--compile", "off")
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    for k in reference["model"]:
        assert torch.equal(final["model"][k], reference["model"][k]), k


def test_two_runs_in_one_folder_do_not_corrupt_each_other(reference_run, tmp_path):
    data_dir, _ = reference_run
    out = tmp_path / "run"
    first = start_training(data_dir, out, 50)
    try:
        wait_for_epoch(out, 1, first)
        second = run_here(train, "--epochs", 1, "--data-dir", data_dir, "--out-dir", out)
        assert_clean_error(second, "already holds a run", "--resume")  # refused before the lock is tried
        second = run_here(train, "--resume", "--data-dir", data_dir, "--out-dir", out)  # flock: another process
        assert_clean_error(second, "another train.py is writing to")
    finally:
        first.kill()
        first.communicate()
    vae.load_checkpoint(out / "checkpoint.pt")


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_data, "--out-dir", out, "--compile", "off"]
    assert run_here(train, "--epochs", 1, *common).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = 1e30  # a step this large overflows the weights in the next epoch
    torch.save(ckpt, out / "checkpoint.pt")
    good = (out / "checkpoint.pt").read_bytes()
    proc = run_here(train, "--resume", "--epochs", 3, *common)
    assert_clean_error(proc, "at epoch 2, step", "lower --lr or --beta")
    assert (out / "checkpoint.pt").read_bytes() == good


def test_fuzzed_onnx_files_end_in_a_clear_error_in_sample_py(tmp_path, tiny_checkpoint):
    import contextlib
    import io

    import export_onnx
    from plumbing import onnx_check

    good = tmp_path / "decoder.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_onnx.main(["--checkpoint", tiny_checkpoint["path"], "--out", str(good), "--no-encoder"]) == 0
    valid = good.read_bytes()
    rng = random.Random(2)
    cases = [os.urandom(rng.randint(0, 2048)) for _ in range(100)]
    cases += [valid[: rng.randint(0, len(valid) - 1)] for _ in range(100)]
    for _ in range(60):
        b = bytearray(valid)
        for _ in range(4):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        cases.append(bytes(b))
    p = tmp_path / "fuzz.onnx"
    loaded = 0
    for case in cases:
        p.write_bytes(case)
        try:
            onnx_check.load(str(p), "decoder")
            loaded += 1  # a flipped byte inside a weight still makes a valid decoder
        except onnx_check.UsageError:
            pass
    assert loaded < len(cases) // 2


def test_idx_header_whose_size_overflows_int64_is_a_clear_error(tmp_path):
    import struct

    p = tmp_path / "hostile"
    p.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2**31, 2**31, 4))
    with pytest.raises(data.DataError, match="not \\(28, 28\\)"):
        data.read_idx(str(p), 3)
    p.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2**32 - 1, 28, 28))
    with pytest.raises(data.DataError, match="declares 4,294,967,295 items"):
        data.read_idx(str(p), 3)


def test_decoder_that_loads_but_fails_to_run_and_unwritable_outputs(tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(reshape_model())
    # refused before it runs (tests/test_sample.py runs such a model past the checks to see the run-time error)
    assert_clean_error(
        run_script("sample.py", "--onnx", bad, "--n", 1, "--out", tmp_path / "x.png"),
        "is not a decoder that export_onnx.py wrote",
    )
    good = tmp_path / "decoder.onnx"
    assert run_here(export_onnx, "--checkpoint", tiny_checkpoint["path"], "--out", good, "--no-encoder").returncode == 0
    assert_clean_error(
        run_here(export_onnx, "--checkpoint", tiny_checkpoint["path"], "--out", "/proc/decoder.onnx", "--no-encoder"),
        "cannot write /proc/decoder.onnx",
    )
    proc = run_script("sample.py", "--onnx", good, "--out", "/proc/x.png", "--npy", tmp_path / "x.npy")
    assert_clean_error(proc, "cannot write /proc/x.png")
    assert not (tmp_path / "x.npy").exists()  # the PNG goes first: a failed PNG leaves no half result behind
