"""evaluate.py end to end (a process of its own, forked by tests/warm.py) and its handling of bad input (in-process,
fast)."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import warm
from conftest import run_main

import data
import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = (
    "test.recon",
    "test.kl",
    "test.neg_elbo",
    "test.iwae_nll",
    "active_units",
    "linear_probe_acc",
    "fid.pixels.reconstruction",
    "fid.pixels.generation",
    "fid.classifier.reconstruction",
    "fid.classifier.generation",
    "classifier_test_acc",
    "decomposition.mutual_info",
    "decomposition.total_correlation",
    "decomposition.dimwise_kl",
)
FIGURES = ("reconstructions.png", "samples.png", "traversals.png", "interpolations.png")


def dotted(report, key):
    for part in key.split("."):
        report = report[part]
    return report


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, tmp_path_factory):
    """Two runs with the same seed on fresh tiny data: the first trains the FID classifier, the second reads it.

    The second spells its flags in snake_case and leaves --out-dir out, so its files go to eval/ beside its checkpoint.
    """
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("evaluate")
    data_dir = write_dataset(root / "data")
    (root / "second").mkdir()
    shutil.copy(tiny_checkpoint["path"], root / "second" / "checkpoint.pt")
    commands = [
        [
            "--checkpoint",
            tiny_checkpoint["path"],
            "--data-dir",
            data_dir,
            "--out-dir",
            str(root / "first"),
            "--iwae-k",
            "4",
            "--n-show",
            "4",
            "--batch-size",
            "50",
        ],
        [
            "--checkpoint",
            str(root / "second" / "checkpoint.pt"),
            "--data_dir",
            data_dir,
            "--iwae_k",
            "4",
            "--n_show",
            "4",
            "--batch_size",
            "50",
            "--seed",
            "0",
        ],
    ]
    first = warm.run(["evaluate.py", *commands[0]], cwd=ROOT)
    # the second in a new interpreter: its random states and hash seed are its own, not a copy of the first's
    argv = [sys.executable, "evaluate.py", *commands[1]]
    runs = [first, subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)]
    return root, data_dir, runs


def test_evaluate_writes_every_key_and_figure(evaluated, tiny_checkpoint):
    root, data_dir, runs = evaluated
    result = runs[0]
    assert result.returncode == 0, result.stderr
    report = json.loads((root / "first" / "report.json").read_text())
    for key in REQUIRED:
        value = dotted(report, key)
        assert isinstance(value, (int, float)) and math.isfinite(value), key
    assert report["test"]["iwae_nll"] <= report["test"]["neg_elbo"]
    parts = report["decomposition"]
    assert parts["n_images"] == 128 and 0.0 <= parts["mutual_info"] <= parts["mutual_info_bound"] + 1e-9
    assert "index-code mutual info" in result.stdout and "total correlation" in result.stdout
    assert report["test"]["neg_elbo"] == pytest.approx(report["test"]["recon"] + report["test"]["kl"])
    assert report["test"]["n_images"] == 128 and report["test"]["iwae_k"] == 4
    assert len(report["kl_per_dim"]) == report["model_args"]["latent_dim"] == 4
    # one definition of "in use" everywhere: test KL above 0.01 nats
    assert report["active_kl"] == 0.01 and report["active_units"] == sum(v > 0.01 for v in report["kl_per_dim"])
    cb = report["continuous_bernoulli"]
    assert cb["neg_elbo"] == pytest.approx(cb["recon"] + report["test"]["kl"]) and cb["iwae_nll"] <= cb["neg_elbo"]
    assert cb["neg_elbo_bits_per_dim"] == pytest.approx(cb["neg_elbo"] / (784 * math.log(2)))
    assert "not a log-likelihood" in report["test"]["units"] and "continuous Bernoulli" in result.stdout
    assert 0.0 <= report["linear_probe_acc"] <= 1.0 and 0.0 <= report["classifier_test_acc"] <= 1.0
    for extractor in ("pixels", "classifier"):
        fid = report["fid"][extractor]
        assert fid["n_real"] == fid["n_reconstruction"] == fid["n_generation"] == 128  # the whole test split
        assert fid["reconstruction"] >= 0 and fid["generation"] >= 0
    assert report["fid"]["pixels"]["feature_dim"] == 784 and report["fid"]["classifier"]["feature_dim"] == 64
    assert (
        report["checkpoint"]
        == os.path.join(os.path.basename(os.path.dirname(tiny_checkpoint["path"])), "checkpoint.pt")
        and len(report["checkpoint_sha256"]) == 64
    )
    data = report["data"]
    assert (data["dataset"], data["n_train"], data["n_test"]) == ("fashion-mnist", 256, 128)
    assert data["name"] == "Fashion-MNIST subset (256 train / 128 test images)"
    text = json.dumps(report)  # no local path: a report can be shared
    assert str(root) not in text and os.path.abspath(data_dir) not in text and os.path.expanduser("~") + "/" not in text
    assert report["seed"] == 0 and report["device"] in ("cpu", "cuda", "mps")
    assert set(report["timings_s"]) == {
        "load",
        "elbo_iwae",
        "encode",
        "probe",
        "decomposition",
        "classifier",
        "decode",
        "fid_pixels",
        "fid_classifier",
        "figures",
        "total",
    }
    assert all(t >= 0 for t in report["timings_s"].values())
    assert any("128 samples of 784-dimensional" in w for w in report["warnings"])  # pixel FID on 128 images
    for name in FIGURES:
        with open(root / "first" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert not [n for n in os.listdir(root / "first") if n.endswith(".tmp")]
    assert "linear probe accuracy" in result.stdout and "FID classifier features" in result.stdout
    assert "Traceback" not in result.stderr


def test_same_seed_same_report_and_out_dir_defaults_to_eval_beside_the_checkpoint(evaluated):
    root, _, runs = evaluated
    assert runs[1].returncode == 0, runs[1].stderr
    assert all((root / "second" / "eval" / name).is_file() for name in FIGURES)
    assert not (root / "second" / "samples.png").exists()  # train.py's own figures there are never overwritten
    first, second = (json.loads((root / name / "report.json").read_text()) for name in ("first", "second/eval"))
    assert not first["classifier_from_cache"] and second["classifier_from_cache"]
    for report in (first, second):
        for key in ("timings_s", "classifier_from_cache", "checkpoint"):  # the copy's folder differs, not its bytes
            report.pop(key)
    assert first == second


def test_a_disk_that_fills_part_way_leaves_the_previous_evaluation_whole(evaluated, tmp_path):
    """report.json and the figures are written as one: when the disk fills at one of the figures (here a 32 KiB file
    size limit: the report and three figures fit, traversals.png does not), every earlier file is as it was."""
    root, data_dir, _ = evaluated
    out = tmp_path / "eval"
    shutil.copytree(root / "first", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before["traversals.png"]) > 32 << 10 > max(len(before[n]) for n in before if n != "traversals.png")

    argv = [
        "--checkpoint",
        str(root / "second" / "checkpoint.pt"),
        "--data-dir",
        data_dir,
        "--out-dir",
        str(out),
        "--iwae-k",
        "4",
        "--n-show",
        "4",
        "--seed",
        "1",
    ]
    proc = warm.run(["evaluate.py", *argv], cwd=ROOT, fsize=32 << 10)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write report.json and the figures in {out}")
    assert "nothing in it was changed" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new file, no temp file, not one byte


# ------------------------------------------------------------------------------------------ bad input


def fails(argv, capsys):
    try:
        code = evaluate.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path, tiny_data, capsys):
    out = tmp_path / "out"
    line = fails(["--checkpoint", str(tmp_path / "nope.pt"), "--data-dir", tiny_data, "--out-dir", str(out)], capsys)
    assert "no checkpoint at" in line
    assert not out.exists()


def test_damaged_data_is_one_line_and_writes_nothing(tmp_path, tiny_data, tiny_checkpoint, capsys):
    with open(os.path.join(tiny_data, "FashionMNIST", "raw", "t10k-images-idx3-ubyte"), "r+b") as f:
        f.truncate(1000)
    out = tmp_path / "out"
    line = fails(["--checkpoint", tiny_checkpoint["path"], "--data-dir", tiny_data, "--out-dir", str(out)], capsys)
    assert "t10k-images-idx3-ubyte" in line and "damaged" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--iwae-k", "0", "--iwae-k 0 is out of range"),
        ("--batch-size", "0", "--batch-size 0 is out of range"),
        ("--n-show", "0", "--n-show 0 is out of range"),
        ("--iwae-k", "many", "invalid int value"),
        ("--device", "tpu", "unknown device"),
    ],
)
def test_bad_flags_are_one_line(flag, value, expected, tmp_path, tiny_data, tiny_checkpoint, capsys):
    line = fails(
        [
            "--checkpoint",
            tiny_checkpoint["path"],
            "--data-dir",
            tiny_data,
            "--out-dir",
            str(tmp_path / "o"),
            flag,
            value,
        ],
        capsys,
    )
    assert expected in line
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_line(tiny_data, tiny_checkpoint, tmp_path, capsys):
    line = fails(["--checkpoint", tiny_checkpoint["path"], "--data-dir", tiny_data, "--device", "cuda"], capsys)
    assert "CUDA is not available" in line


@pytest.mark.parametrize("out", ["new/deeper/eval", "gone/../new/eval"])
def test_a_failed_write_removes_every_folder_the_run_made(
    tmp_path, tiny_data, tiny_checkpoint, capsys, monkeypatch, out
):
    def full_disk(items):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "atomic_write_all", full_disk)
    (tmp_path / "runs").mkdir()
    line = fails(
        [
            "--checkpoint",
            tiny_checkpoint["path"],
            "--data-dir",
            tiny_data,
            "--iwae-k",
            "2",
            "--out-dir",
            os.path.join(tmp_path, "runs", out),
        ],
        capsys,
    )
    assert "No space left on device" in line and "nothing in it was changed" in line
    assert os.listdir(tmp_path / "runs") == []  # every folder made, then removed; runs/ was there before


def test_an_out_dir_through_a_folder_that_does_not_exist_is_written_where_it_leads(
    tmp_path, tiny_data, tiny_checkpoint, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(
        evaluate,
        [
            "--checkpoint",
            tiny_checkpoint["path"],
            "--data-dir",
            tiny_data,
            "--iwae-k",
            "2",
            "--out-dir",
            os.path.join("gone", "..", "new", "eval"),
        ],
    )
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "new" / "eval")) == sorted(["report.json", *FIGURES])
    assert not (tmp_path / "gone").exists()


def test_a_folder_that_cannot_be_made_leaves_none_of_its_parents(tmp_path, tiny_data, tiny_checkpoint, capsys):
    line = fails(
        [
            "--checkpoint",
            tiny_checkpoint["path"],
            "--data-dir",
            tiny_data,
            "--out-dir",
            os.path.join(tmp_path, "new", "x" * 300),
        ],
        capsys,
    )
    assert "cannot write to the output folder" in line and "File name too long" in line
    assert not (tmp_path / "new").exists()


def test_unwritable_out_dir_is_one_line(tmp_path, tiny_data, tiny_checkpoint, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    line = fails(["--checkpoint", tiny_checkpoint["path"], "--data-dir", tiny_data, "--out-dir", str(blocker)], capsys)
    assert "cannot write to the output folder" in line and "--out-dir" in line
    assert blocker.read_text().startswith("a file")


def test_help_states_every_default_and_snake_case_aliases_parse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default: ./data)",
        "(default: eval/ beside the checkpoint)",
        "(default: 64)",
        "(default: 0)",
        "(default: auto)",
        "(default: 1000)",
        "(default: 10)",
    ):
        assert default in text
    args = evaluate.parse_args(
        [
            "--checkpoint",
            "c.pt",
            "--data_dir",
            "d",
            "--out_dir",
            "o",
            "--iwae_k",
            "5",
            "--batch_size",
            "7",
            "--n_show",
            "3",
        ]
    )
    assert (args.data_dir, args.out_dir, args.iwae_k, args.batch_size, args.n_show) == ("d", "o", 5, 7, 3)


def test_sigterm_cleans_up_as_ctrl_c_does_and_says_what_was_written(tmp_path, tiny_data, tiny_checkpoint, monkeypatch):
    """SIGTERM in the middle leaves no folder behind; an interrupt during the final renames waits for them and then
    says the files were written (they were), never that they were not. Real signals, to this process, while
    evaluate.main's handlers are in place."""
    import signal

    from conftest import run_here

    import metrics

    out = tmp_path / "new" / "eval"
    argv = ["--checkpoint", tiny_checkpoint["path"], "--data-dir", tiny_data, "--iwae-k", "2", "--out-dir", out]
    real, real_replace = metrics.elbo_decomposition, os.replace

    def slow(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the evaluation runs
        return real(*a, **k)

    monkeypatch.setattr(metrics, "elbo_decomposition", slow)
    proc = run_here(evaluate, *argv)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: interrupted; report.json and the figures were not written"
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(metrics, "elbo_decomposition", real)

    def replace(src, dst):  # Ctrl-C between the renames of the commit
        real_replace(src, dst)
        if str(dst).endswith("report.json"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    proc = run_here(evaluate, *argv)
    monkeypatch.setattr(os, "replace", real_replace)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: interrupted after writing report.json and the figures"
    assert sorted(os.listdir(out)) == sorted(["report.json", *FIGURES])  # every file of the commit, none half


@pytest.fixture(scope="module")
def sprites_run(tmp_path_factory):
    """A small model trained for one epoch on every 6th image of the sprites set's splits (the same code paths in a
    sixth of the time), evaluated with --save-latents (its FID classifier trained for one epoch, cached in a folder
    of the test's own)."""
    from conftest import run_here

    import fid
    import train

    root = tmp_path_factory.mktemp("sprites")
    mp = pytest.MonkeyPatch()
    mp.setattr(fid, "CLASSIFIER_EPOCHS", 1)
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
    split = data.sprite_split
    mp.setattr(data, "sprite_split", lambda which: tuple(a[::6] for a in split(which)))
    test_factors = data.sprite_split("test")[1]
    proc = run_here(
        train,
        "--dataset",
        "sprites",
        "--epochs",
        "1",
        "--latent-dim",
        "5",
        "--compile",
        "off",
        "--out-dir",
        root / "run",
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_here(
        evaluate,
        "--checkpoint",
        root / "run" / "checkpoint.pt",
        "--iwae-k",
        "2",
        "--save-latents",
        root / "z.npz",
        "--n-show",
        "4",
    )
    mp.undo()
    assert proc.returncode == 0, proc.stderr
    return root, json.loads((root / "run" / "eval" / "report.json").read_text()), proc, test_factors


def test_on_sprites_the_report_holds_every_disentanglement_metric(sprites_run):
    root, report, proc, _ = sprites_run
    dis = report["disentanglement"]
    for key in ("mig", "sap", "dci_disentanglement", "dci_completeness", "dci_informativeness", "factorvae_score"):
        assert isinstance(dis[key], float) and 0.0 <= dis[key] <= 1.0 + 1e-9, key
    assert len(dis["latents"]) == 5 and {d["factor"] for d in dis["latents"]} <= set(data.SPRITE_FACTORS)
    assert report["data"]["dataset"] == "sprites" and "disentanglement: mig" in proc.stdout


def test_saved_latents_let_numpy_alone_recompute_mig(sprites_run):
    root, report, _, test_factors = sprites_run
    with np.load(root / "z.npz") as z:
        mu, logvar, labels, factors = z["mu"], z["logvar"], z["labels"], z["factors"]
        assert list(z["factor_names"]) == list(data.SPRITE_FACTORS)
    assert mu.shape == logvar.shape == (len(test_factors), 5) and np.array_equal(factors, test_factors)
    assert np.array_equal(labels, test_factors[:, 0])  # in order: the test split's own
    gaps = []  # MIG with numpy alone, as the docs describe it
    for f in factors.T:
        h = -sum(p * np.log(p) for p in np.bincount(f) / len(f) if p > 0)
        mis = []
        for c in mu.T:
            b = np.digitize(c, np.histogram(c, 20)[1][:-1])
            joint = np.histogram2d(b, f, bins=(np.arange(b.max() + 2), np.arange(f.max() + 2)))[0] / len(f)
            outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
            mis.append(np.sum(joint[joint > 0] * np.log(joint[joint > 0] / outer[joint > 0])) / h)
        gaps.append(np.subtract(*sorted(mis)[-1:-3:-1]))
    assert np.mean(gaps) == pytest.approx(report["disentanglement"]["mig"], abs=0.01)
