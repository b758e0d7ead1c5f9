"""The classes of failure a hostile round found, each with more than one instance: work bounded by a file's bytes,
schema-checked fields, regular files only, decisions made under the run folder's lock, rollbacks that know what they
changed, one read of an input, no local path in shipped files, long jobs ending in one line, true messages."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import run_here, write_dataset

import evaluate
import export_onnx
import sweep
import train
from plumbing import files as fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder of one epoch on tiny data, and its data folder."""
    root = tmp_path_factory.mktemp("classes")
    data_dir = write_dataset(root / "data", n_train=96, n_test=32)
    argv = ["--epochs", "1", "--latent-dim", "3", "--batch-size", "32", "--compile", "off", "--data-dir", data_dir]
    assert run_here(train, *argv, "--out-dir", root / "run").returncode == 0
    return root / "run", data_dir


def edited(run_dir, tmp_path, change, name="edited"):
    out = tmp_path / name
    out.mkdir()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "checkpoint.pt")
    return out / "checkpoint.pt"


# Starts the script (argv[2:]) from this small process and writes its peak resident memory to the file argv[1]. A
# process's peak counts what it held when it was forked, so a script forked straight from the test worker (itself
# over a GB by then) would report the worker's size, not its own.
MEASURED = """import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
if os.WIFSIGNALED(status):  # ends as the script did
    if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def peak_rss_of(argv, cwd=ROOT):
    """(the process, its peak resident memory in bytes), for a script run as a user runs it."""
    with tempfile.TemporaryDirectory() as folder:
        peak = os.path.join(folder, "peak")
        cmd = [sys.executable, "-c", MEASURED, peak, *map(str, argv)]
        launcher = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)  # fmt: skip
        try:
            out, err = launcher.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)  # the script too, not the launcher alone
            launcher.communicate()
            raise
        return subprocess.CompletedProcess(cmd, launcher.returncode, out, err), int(open(peak).read())


def one_line(proc, *needles, status=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and all(n in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ 1. work bounded by the file's bytes

N = 65_536  # an expanded tensor of 4 bytes on disk: N² elements, 16 GiB of float32, once touched


@pytest.mark.parametrize("where, script", [("weight", "export_onnx.py"), ("adam", "evaluate.py")])
def test_an_expanded_tensor_is_refused_before_any_of_its_elements_is_touched(run, tmp_path, where, script):
    run_dir, data_dir = run

    def expand(ckpt):
        huge = torch.zeros(1).expand(N, N)
        if where == "weight":
            ckpt["model"]["decoder.fc.0.weight"] = huge
        else:
            ckpt["optimizer"]["state"][0]["exp_avg"] = huge

    ckpt = edited(run_dir, tmp_path, expand)
    assert ckpt.stat().st_size < (run_dir / "checkpoint.pt").stat().st_size + 4096  # a few bytes more on disk
    proc, peak = peak_rss_of([script, "--checkpoint", ckpt, *(["--data-dir", data_dir] * (script == "evaluate.py"))])
    one_line(proc, "is not a plain tensor")  # expanded: not contiguous, refused before a value is read
    assert peak < 1.5 * 2**30  # the scripts' normal peak is under 1 GB
    assert not (tmp_path / "edited" / "eval").exists() and not (tmp_path / "edited" / "decoder.onnx").exists()


# -------------------------------------------------------------------- 2. fields schema-checked, bounded in depth


def test_a_history_with_poisoned_extra_fields_resumes_with_the_known_fields_only(run, tmp_path):
    run_dir, data_dir = run
    loop = []
    for _ in range(40):  # a list that contains itself 40 times over: 2**40 items once written out as JSON
        loop = [loop, loop]
    deep = []
    for _ in range(20_000):
        deep = [deep]

    def poison(ckpt):
        ckpt["metrics"][0] |= {"loop": loop, "deep": deep, "note": "x" * 100}
        ckpt["train_args"]["evil"] = deep

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # pickle writes nested lists recursively; torch's safe loader reads them without
    try:
        ckpt = edited(run_dir, tmp_path, poison, "run")
    finally:
        sys.setrecursionlimit(limit)
    proc = run_here(train, "--resume", "--epochs", "2", "--compile", "off", "--data-dir", data_dir,
                    "--out-dir", ckpt.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and not {"loop", "deep", "note"} & set(records[0])
    assert "evil" not in torch.load(ckpt, weights_only=True)["train_args"]


# --------------------------------------------------------------------------------------- 3. regular files only


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_checkpoint_that_is_no_regular_file_is_one_line_at_once(run, tmp_path, kind):
    run_dir, data_dir = run
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    {"fifo": lambda: os.mkfifo(path), "device": lambda: os.symlink("/dev/zero", path), "folder": path.mkdir}[kind]()
    for script, argv in ((evaluate, ["--checkpoint", path, "--data-dir", data_dir]),
                         (export_onnx, ["--checkpoint", path]),
                         (train, ["--resume", "--data-dir", data_dir, "--out-dir", path.parent])):  # fmt: skip
        proc = run_here(script, *argv)
        one_line(proc, "is not a regular file")


# ------------------------------------------------------------------------- 4. decisions made under the lock


def test_a_resume_that_waited_reads_the_checkpoint_it_finds_under_the_lock(run, tmp_path, monkeypatch):
    """A slow --resume (data on a network disk) and a faster one: whatever the first read before it got the lock,
    it must continue from the checkpoint the second left, never overwrite it with an older epoch's run."""
    run_dir, data_dir = run
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())  # epoch 1
    common = ["--compile", "off", "--data-dir", data_dir, "--out-dir", out]
    real, others = train.run_folder, []

    def other_run_finishes_first(folder):  # while this one waits, another resume trains epochs 2 and 3
        if not others:
            others.append("running")
            other = run_here(train, "--resume", "--epochs", "3", *common)
            assert other.returncode == 0, other.stderr
        return real(folder)

    monkeypatch.setattr(train, "run_folder", other_run_finishes_first)
    proc = run_here(train, "--resume", "--epochs", "4", *common)
    assert proc.returncode == 0 and "resuming after epoch 3 of 4" in proc.stdout, proc.stdout + proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4


# ------------------------------------------------------------------- 5. a rollback knows exactly what it changed


def test_an_interrupt_between_renames_waits_for_all_of_them_then_says_so(tmp_path, monkeypatch):
    paths = [tmp_path / n for n in ("report.json", "a.png", "b.png")]
    for p in paths:
        p.write_bytes(b"old")
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith("report.json"):
            os.kill(os.getpid(), __import__("signal").SIGINT)  # Ctrl-C right after the first rename

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(fileio.Interrupted):
        fileio.atomic_write_all([(p, b"new") for p in paths])
    assert [p.read_bytes() for p in paths] == [b"new"] * 3  # all of them, and then the interrupt
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "report.json"]


def test_a_rename_that_fails_part_way_is_undone_exactly(tmp_path, monkeypatch):
    paths = [tmp_path / n for n in ("x", "y", "z")]
    paths[0].write_bytes(b"old x")  # y and z are new files
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError):
        fileio.atomic_write_all([(p, b"new") for p in paths])
    assert paths[0].read_bytes() == b"old x" and sorted(os.listdir(tmp_path)) == ["x"]


# ------------------------------------------------------------------------------ 7. no local path leaves the machine


def test_no_shipped_file_holds_a_local_path(run, tmp_path):
    run_dir, data_dir = run
    out = tmp_path / "export"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    assert run_here(export_onnx, "--checkpoint", ckpt).returncode == 0
    assert run_here(evaluate, "--checkpoint", ckpt, "--data-dir", data_dir, "--iwae-k", "2").returncode == 0
    local = {str(tmp_path), os.path.abspath(data_dir), os.path.expanduser("~")}
    for name in ("decoder.onnx", "encoder.onnx", "eval/report.json"):
        text = (out / name).read_bytes().decode("utf-8", "replace")
        assert not [p for p in local if p in text], name


# ------------------------------------------------------------------------------- 8. long jobs end in one line


def test_ctrl_c_in_a_summary_is_one_line(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "collect", interrupted)
    proc = run_here(sweep, "--aggregate", "--out-dir", tmp_path)
    assert one_line(proc, "interrupted", status=130)


# ---------------------------------------------------------------------------------------- 10. messages that are true


def test_a_run_that_fails_in_its_first_epoch_does_not_claim_a_checkpoint(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=96, n_test=32)
    out = tmp_path / "run"
    proc = run_here(train, "--lr", "10", "--epochs", "2", "--compile", "off", "--data-dir", data_dir, "--out-dir", out)
    line = one_line(proc, "no epoch was completed, so no checkpoint was written")
    assert "the last good checkpoint is kept" not in line and not (out / "checkpoint.pt").exists()
