"""Hostile and extreme input on the training side: files that would blow up memory, damaged checkpoint fields, absurd
flags, a full disk, undecodable paths, leftovers of killed runs. Each ends in one `error:` line (exit 2) or works."""

import gzip
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import warm
from conftest import make_images, write_dataset

import data
import evaluate
import train
import vae
from plumbing import files as fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder train.py made (1 epoch on tiny data), to be copied and damaged; and its data folder."""
    root = tmp_path_factory.mktemp("hostile")
    data_dir = write_dataset(root / "data", n_train=96, n_test=32)
    assert (
        train.main(
            [
                "--epochs",
                "1",
                "--latent-dim",
                "3",
                "--batch-size",
                "32",
                "--compile",
                "off",
                "--data-dir",
                data_dir,
                "--out-dir",
                str(root / "run"),
            ]
        )
        == 0
    )
    return root / "run", data_dir


# ------------------------------------------------------------------------------------------------ data files


def run_limited(code, address_space_gb):
    """Run python code in a child whose address space is capped: reading a file whole would fail with MemoryError."""
    prelude = (
        f"import resource, sys; sys.path.insert(0, {ROOT!r}); "
        f"resource.setrlimit(resource.RLIMIT_AS, ({address_space_gb} << 30, {address_space_gb} << 30))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_a_huge_file_is_judged_by_its_header_and_a_gzip_bomb_stops_at_the_declared_size(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:  # 6 GB on paper, no blocks on disk
        f.write(b"\x00\x00\x0d\x03")
        f.truncate(6 << 30)
    good_header = struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 100, 28, 28)
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:  # 100 images declared, 1.5 GB of zeros behind them
        f.write(good_header)
        zeros = bytes(64 << 20)
        for _ in range(24):
            f.write(zeros)
    assert bomb.stat().st_size < 8 << 20
    proc = run_limited(
        f"""
        import data
        for p in ({str(sparse)!r}, {str(bomb)!r}):
            try:
                data.read_idx(p, 3)
            except data.DataError as e:
                print("DataError:", e)
        """,
        address_space_gb=1,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "bad magic number" in lines[0] and "holds more than" in lines[1], proc.stdout


def test_a_corrupt_deflate_stream_is_one_error(tmp_path):
    images, _ = make_images(50, 0)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    data.write_idx(tmp_path / "plain", images)
    raw = bytearray(gzip.compress((tmp_path / "plain").read_bytes()))
    raw[12:20] = b"\xff" * 8  # inside the first deflate block, after gzip's 10-byte header
    p.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="cannot read .*while decompressing.* delete it"):
        data.read_idx(str(p), 3)


def test_only_train_files_present_names_every_missing_file_at_once(tmp_path, capsys, offline):
    data_dir = write_dataset(tmp_path / "data")
    for name in data.FILES["test"]:
        os.remove(os.path.join(data.raw_dir(data_dir), name))
    assert train.main(["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--epochs", "1"]) == 2
    line = one_error_line(capsys, "could not be downloaded", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    assert "train-images" not in line and not (tmp_path / "run").exists()
    assert sorted(os.listdir(data.raw_dir(data_dir))) == sorted(data.FILES["train"])  # nothing else appeared


# ------------------------------------------------------------------------------------------------- checkpoints


def damaged(run, tmp_path, change):
    out = tmp_path / "damaged"
    out.mkdir()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "checkpoint.pt")
    return out


def wrong_shape_moment(ckpt):
    ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)


@pytest.mark.parametrize(
    "change, needle",
    [
        (wrong_shape_moment, "optimizer state"),
        (lambda c: c.update(epoch="1"), "epoch is '1'"),
        (lambda c: c.update(train_args=[64, 0.001]), "train_args is a list"),
        (lambda c: c.update(metrics=None), "metrics is a NoneType"),
        (lambda c: c.update(metrics=[1.0, 2.0]), "metrics entry 0"),
        (lambda c: c["model"].update({"decoder.fc.0.weight": c["model"]["decoder.fc.0.weight"] * float("nan")}), "NaN"),
    ],
)
def test_resume_from_damaged_checkpoint_fields_is_one_error_and_changes_nothing(
    trained_run, tmp_path, capsys, change, needle
):
    run, data_dir = trained_run
    out = damaged(run, tmp_path, change)
    before = (out / "checkpoint.pt").read_bytes()
    assert (
        train.main(["--resume", "--epochs", "2", "--compile", "off", "--data-dir", data_dir, "--out-dir", str(out)])
        == 2
    )
    one_error_line(capsys, needle)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_nan_weights_are_refused_by_evaluate(trained_run, tmp_path, capsys):
    run, data_dir = trained_run
    out = damaged(run, tmp_path, lambda c: c["model"]["encoder.fc_mu.bias"].fill_(float("nan")))
    assert evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--data-dir", data_dir]) == 2
    one_error_line(capsys, "NaN or infinite weights", "encoder.fc_mu.bias")
    assert not (out / "eval").exists()


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--latent-dim", "1000000000"], "--latent-dim 1000000000 is out of range"),
        (["--num-generation-samples", "100000000"], "--num-generation-samples 100000000 is out of range"),
        (["--seed", str(2**64)], "--seed 18446744073709551616 is out of range"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--epochs", "0"], "--epochs 0 is out of range"),
        (["--lr", "nan"], "--lr nan is out of range"),
        (["--beta", "inf"], "--beta inf is out of range"),
        (["--capacity-steps", "0"], "--capacity-steps 0 is out of range"),
        (["--batch-size", str(10**12)], "--batch-size 1000000000000 is out of range"),
    ],
)
def test_extreme_flag_values_are_one_error_before_anything_is_read(tmp_path, capsys, flags, needle):
    assert train.main(flags + ["--data-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, needle)
    assert not (tmp_path / "run").exists() and not (tmp_path / "no-data").exists()


# ---------------------------------------------------------------------------------------- disks and names


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_says_so(trained_run, tmp_path):
    run, data_dir = trained_run
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (out / name).write_bytes((run / name).read_bytes())
    before = (out / "checkpoint.pt").read_bytes()

    proc = warm.run(  # files may grow to 64 KiB: the checkpoint (~1 MB) cannot be written, the log can
        [
            "train.py",
            "--resume",
            "--epochs",
            "2",
            "--compile",
            "off",
            "--data-dir",
            data_dir,
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        fsize=64 << 10,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: cannot save epoch 2") and "still holds epoch 1" in proc.stderr
    assert "--resume" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_an_out_dir_name_that_is_not_utf8_is_logged_whole(tiny_data, tmp_path):
    out = os.path.join(os.fsencode(tmp_path), b"run-\xff\xfe")
    proc = warm.run(
        [
            b"train.py",
            b"--epochs",
            b"1",
            b"--latent-dim",
            b"3",
            b"--compile",
            b"off",
            b"--data-dir",
            os.fsencode(tiny_data),
            b"--out-dir",
            out,
        ],
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    log = open(os.path.join(out, b"train.log"), "rb").read().decode()
    assert "epoch   1/1" in log and "done:" in log and "run-\\udcff\\udcfe" in log


def test_temp_files_of_killed_processes_are_removed_and_live_ones_kept(trained_run, tmp_path):
    run, data_dir = trained_run
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (out / name).write_bytes((run / name).read_bytes())
    host = fileio._host()
    dead = out / f".checkpoint.pt.{gone.pid}-{host}.k1ll3d_x.tmp"  # as a SIGKILL during a save leaves it
    live = out / f".metrics.jsonl.{alive.pid}-{host}.alive123.tmp"  # another process is writing it now
    keep = [out / ".notes.tmp", out / f".notes.{gone.pid}.old.tmp", out / f".photos.{gone.pid}-{host}.summer12.tmp"]
    try:
        for p in [dead, live] + keep:
            p.write_bytes(b"half")
        assert (
            train.main(["--resume", "--epochs", "2", "--compile", "off", "--data-dir", data_dir, "--out-dir", str(out)])
            == 0
        )
        assert not dead.exists() and live.exists() and all(p.exists() for p in keep)
    finally:
        alive.kill()
        alive.wait()


def test_all_or_nothing_writes_leave_every_file_as_it_was_when_one_fails(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"old a")

    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        fileio.atomic_write_all([(a, lambda f: f.write(b"new a")), (b, full)])
    assert a.read_bytes() == b"old a" and not b.exists() and sorted(os.listdir(tmp_path)) == ["a"]
    fileio.atomic_write_all([(a, lambda f: f.write(b"new a")), (b, lambda f: f.write(b"new b"))])
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b" and sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_an_output_that_resolves_to_an_input_is_refused(trained_run, tmp_path, capsys):
    run, data_dir = trained_run
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes((run / "checkpoint.pt").read_bytes())
    out = tmp_path / "eval"
    out.mkdir()
    os.symlink(ckpt, out / "report.json")  # report.json would be written over the checkpoint
    assert evaluate.main(["--checkpoint", str(ckpt), "--data-dir", data_dir, "--out-dir", str(out)]) == 2
    one_error_line(capsys, "is the same file as --checkpoint")
    assert ckpt.read_bytes() == (run / "checkpoint.pt").read_bytes()
    os.link(ckpt, tmp_path / "hard.pt")  # a hard link is the same file too
    assert fileio.clashes({"--checkpoint": ckpt}, {"--out": tmp_path / "sub" / ".." / "hard.pt"})
    assert fileio.clashes({"--checkpoint": ckpt}, {"--out": tmp_path / "other.pt"}) is None


def test_evaluate_on_a_five_image_test_split_works_and_on_one_image_is_refused(trained_run, tmp_path, capsys):
    run, _ = trained_run
    for n in (5, 1):
        data_dir = write_dataset(tmp_path / f"data{n}", n_train=64, n_test=n)
        out = tmp_path / f"eval{n}"
        argv = [
            "--checkpoint",
            str(run / "checkpoint.pt"),
            "--data-dir",
            data_dir,
            "--out-dir",
            str(out),
            "--iwae-k",
            "2",
        ]
        if n == 5:
            assert evaluate.main(argv) == 0
            assert sorted(os.listdir(out)) == sorted(("report.json",) + evaluate.FIGURES)
        else:
            assert evaluate.main(argv) == 2
            one_error_line(capsys, "has 1 image", "at least 2")
            assert not out.exists()


def test_checkpoint_fuzzing_outcomes(tmp_path, tiny_checkpoint):
    """Every damaged file either fails with CheckpointError or (a flip inside tensor bytes) loads a sound model of
    the same configuration; random bytes and truncations always fail."""
    import random

    rng = random.Random(1)
    valid = open(tiny_checkpoint["path"], "rb").read()
    config = vae.load_checkpoint(tiny_checkpoint["path"])[0].config
    p = tmp_path / "fuzz.pt"
    must_fail = [os.urandom(rng.randint(0, 2048)) for _ in range(60)]
    must_fail += [valid[: rng.randint(0, len(valid) - 1)] for _ in range(60)]
    flipped = []
    for _ in range(60):
        b = bytearray(valid)
        for _ in range(8):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        flipped.append(bytes(b))
    outcomes = {"failed": 0, "loaded": 0}
    for i, case in enumerate(must_fail + flipped):
        p.write_bytes(case)
        try:
            model, _ = vae.load_checkpoint(p)
        except vae.CheckpointError:
            outcomes["failed"] += 1
            continue
        assert i >= len(must_fail), f"case {i} (random or truncated) loaded"
        assert model.config == config and all(
            torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
        )
        outcomes["loaded"] += 1
    assert outcomes["failed"] >= len(must_fail) and outcomes["failed"] + outcomes["loaded"] == 180


def test_resume_takes_the_runs_data_and_refuses_other_data(trained_run, tmp_path, capsys, monkeypatch):
    run, data_dir = trained_run
    out = damaged(run, tmp_path, lambda c: None)  # a copy of the run, unchanged
    monkeypatch.chdir(tmp_path)  # no ./data here: the run's own folder is used
    assert train.main(["--resume", "--epochs", "2", "--compile", "off", "--out-dir", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["train_args"]["data_dir"] == data_dir
    assert ckpt["metrics"][1]["step"] == 2 * ckpt["metrics"][0]["step"]
    other = write_dataset(tmp_path / "other", n_train=64, n_test=32)
    before = (out / "checkpoint.pt").read_bytes()
    assert (
        train.main(["--resume", "--epochs", "3", "--compile", "off", "--out-dir", str(out), "--data-dir", other]) == 2
    )
    one_error_line(capsys, "has 64 images", "trained on 96", "--data-dir")
    assert (out / "checkpoint.pt").read_bytes() == before
