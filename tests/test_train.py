"""train.py end to end on tiny generated data (in a process of its own, forked by tests/warm.py, and in this process
where only what main() decides and writes is checked); --resume reaches the uninterrupted run's weights."""

import json
import os

import torch
import warm
from conftest import run_here
from PIL import Image

import train
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, check=True, here=False):
    """train.py with these flags, in a process of its own (here=False; tests/warm.py) or as main() in this process."""
    if here:
        proc = run_here(train, *args)
    else:
        proc = warm.run(["train.py", *map(str, args)], cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_one_epoch_writes_every_output(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run_train(
        "--epochs",
        1,
        "--batch-size",
        32,
        "--latent_dim",
        3,
        "--data-dir",
        tiny_data,
        "--out-dir",
        out,
        "--compile",
        "off",
        "--seed",
        5,
    )
    for name in ("checkpoint.pt", "metrics.jsonl", "train.log", "loss.png", "samples.png", "reconstructions.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    assert m["epoch"] == 1 and m["img_per_s"] > 0
    for split in ("train", "test"):
        assert set(m[split]) == {"recon", "kl", "total", "kl_per_dim"} and len(m[split]["kl_per_dim"]) == 3
        assert abs(sum(m[split]["kl_per_dim"]) - m[split]["kl"]) < 1e-3 * max(1.0, m[split]["kl"])
        assert abs(m[split]["recon"] + 4.0 * m[split]["kl"] - m[split]["total"]) < 1e-3 * m[split]["total"]
    log = (out / "train.log").read_text()
    assert "epoch   1/1" in log and "epoch   1/1" in proc.stdout and "test recon" in log
    assert "python evaluate.py --checkpoint" in proc.stdout.splitlines()[-2]
    assert "python export_onnx.py --checkpoint" in proc.stdout.splitlines()[-1]
    for name in ("samples.png", "reconstructions.png", "loss.png"):
        with Image.open(out / name) as im:
            im.verify()
    model, ckpt = vae.load_checkpoint(out / "checkpoint.pt")
    assert model.config.latent_dim == 3 and ckpt["epoch"] == 1 and ckpt["seed"] == 5
    assert ckpt["train_args"]["batch_size"] == 32 and len(ckpt["metrics"]) == 1
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_the_same_command_twice_never_replaces_the_first_run(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = ["--epochs", "1", "--beta", "2", "--latent-dim", "3", "--compile", "off", "--data-dir", tiny_data]
    run_train(*cmd, here=True)
    run = tmp_path / "runs" / "beta2_z3_seed0"  # the default folder is named after the run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = run_train(*cmd, check=False, here=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.startswith("error: ") and "--resume" in again.stderr and "--out-dir" in again.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # not one byte changed
    run_train(*cmd, "--resume", here=True)  # a finished run: nothing left to train
    assert (run / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]


def test_resume_without_a_checkpoint_starts_the_run(tiny_data, tmp_path):
    proc = run_train(
        "--epochs",
        1,
        "--latent-dim",
        3,
        "--data-dir",
        tiny_data,
        "--out-dir",
        tmp_path / "new",
        "--compile",
        "off",
        "--resume",
        here=True,
    )
    assert "this is a NEW run" in proc.stdout
    assert torch.load(tmp_path / "new" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path):
    common = ["--batch-size", 48, "--latent-dim", 4, "--data-dir", tiny_data, "--compile", "off", "--seed", 3]
    run_train("--epochs", 3, "--out-dir", tmp_path / "full", *common, here=True)
    run_train("--epochs", 1, "--out-dir", tmp_path / "split", *common, here=True)
    first = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1
    run_train("--epochs", 3, "--resume", "--out-dir", tmp_path / "split", *common, here=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["decoder.fc.0.weight"], first["model"]["decoder.fc.0.weight"])
    assert [m["test"] for m in a["metrics"]] == [m["test"] for m in b["metrics"]]
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_collapsed_epoch_speed_is_named_once_with_what_helps():
    import train

    record = {"recon": 1.0, "kl": 1.0, "total": 2.0, "kl_per_dim": [1.0]}
    history = [{"epoch": i + 1, "train": record, "test": record, "img_per_s": v} for i, v in enumerate([9000, 7000])]
    assert train.slow_epoch_hint(history) is None  # ordinary variation
    history.append(dict(history[-1], img_per_s=3000))
    hint = train.slow_epoch_hint(history)
    assert hint.startswith("note: this epoch ran at 3,000 img/s") and "OMP_NUM_THREADS=1" in hint and "--resume" in hint
