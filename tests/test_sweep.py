"""sweep.py end to end on tiny data (runs, a crash, resuming, the same command twice, printed commands, --aggregate),
its bad input, and a β-TCVAE run through train (and resume), evaluate, export and sample."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import warm
from conftest import in_process, run_here, run_main, write_dataset

import evaluate
import export_onnx
import fid
import sample
import sweep
import train
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = ["--beta", "1", "4", "--seeds", "0", "--epochs", "2", "--latent-dim", "3", "--iwae-k", "2", "--compile", "off"]
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # what sweep.py gives each of 2 jobs here


def files_and_times(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, names in os.walk(folder)
        for f in names
    }


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep in a/, with one run interrupted after its first epoch and one with a damaged checkpoint; at the same
    time, the printed command lines run on their own into b/. Then a/ is made whole and the sweep runs again."""
    root = tmp_path_factory.mktemp("sweep")
    data_dir = write_dataset(root / "data")
    # the FID classifier cached beside the data: no run trains it again (test_evaluate covers training it)
    fid.load_classifier(data_dir, "cpu")
    a, b = root / "a", root / "b"
    common = [*GRID, "--data-dir", data_dir]
    printed = run_here(sweep, *common, "--out-dir", b, "--print-commands")  # in this process: no torch start-up
    with in_process(threads=1):  # the interrupted run: epoch 1 of 2, exactly as the sweep's train command starts it
        assert (
            train.main(
                [
                    "--objective",
                    "beta",
                    "--beta",
                    "1",
                    "--seed",
                    "0",
                    "--epochs",
                    "1",
                    "--data-dir",
                    data_dir,
                    "--out-dir",
                    str(a / "beta1_seed0"),
                    "--latent-dim",
                    "3",
                    "--compile",
                    "off",
                ]
            )
            == 0
        )
    first_epoch = (a / "beta1_seed0" / "metrics.jsonl").read_text()
    (a / "beta4_seed0").mkdir()
    (a / "beta4_seed0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    children = [warm.start(["sweep.py", *common, "--out-dir", a, "--jobs", "2"], cwd=ROOT)]
    children += [
        subprocess.Popen(
            line, shell=True, cwd="/", env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for line in printed.stdout.splitlines()
    ]
    first, *lines = [(c.communicate(timeout=300), c.returncode) for c in children]
    shutil.rmtree(a / "beta4_seed0")  # a/ made whole with b/'s copy of the run that could not run in a/
    shutil.copytree(b / "beta4_seed0", a / "beta4_seed0")
    before = {run: files_and_times(a / run) for run in ("beta1_seed0", "beta4_seed0")}
    again = run_here(sweep, *common, "--out-dir", a, "--jobs", 2)  # nothing to run: no process of its own needed
    aggregated = run_here(sweep, "--out-dir", b, "--aggregate")
    after = {run: files_and_times(a / run) for run in ("beta1_seed0", "beta4_seed0")}
    return dict(
        a=a,
        b=b,
        printed=printed,
        first=first,
        lines=lines,
        again=again,
        before=before,
        after=after,
        aggregated=aggregated,
        first_epoch=first_epoch,
    )


def test_a_crash_is_reported_the_others_finish_and_an_interrupted_run_resumes(swept):
    (out, err), code = swept["first"]
    assert code == 1, err
    assert "2 runs in" in out and "0 finished already" in out
    failed = [line for line in out.splitlines() if "beta4_seed0: FAILED" in line]
    assert failed and "train.py exited 2: error:" in failed[0] and "not a readable checkpoint" in failed[0]
    assert any(line.startswith("[") and "beta1_seed0: done" in line for line in out.splitlines())
    assert "1 of 2 runs failed (beta4_seed0)" in err and "Traceback" not in err
    run = swept["a"] / "beta1_seed0"
    assert "resuming after epoch 1 of 2" in (run / "train.log").read_text()
    history = (run / "metrics.jsonl").read_text().splitlines()
    assert len(history) == 2 and history[0] == swept["first_epoch"].strip()  # epoch 1 was kept, not trained again
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["epoch"] == 2 and report["train_args"]["seed"] == 0 and report["model_args"]["latent_dim"] == 3
    assert report["test"]["iwae_k"] == 2


def test_the_same_command_again_does_no_work(swept):
    again = swept["again"]
    assert again.returncode == 0, again.stderr
    assert "2 finished already, skipped" in again.stdout and "runs to do" not in again.stdout
    assert swept["before"] == swept["after"]  # no run folder file was written again


def test_printed_commands_run_on_their_own_and_aggregate_to_the_same_summary(swept):
    lines = swept["printed"].stdout.splitlines()
    assert len(lines) == 2 and "# 0 of 2 runs finished already" in swept["printed"].stderr
    for line, run in zip(lines, ("beta1_seed0", "beta4_seed0")):
        train_part, evaluate_part = line.split(" && ")
        assert "train.py --objective beta" in train_part and train_part.endswith(" --resume")
        assert f"--out-dir {swept['b'] / run} " in train_part
        assert "--latent-dim 3" in train_part and "--compile off" in train_part and "--epochs 2" in train_part
        assert "evaluate.py --checkpoint" in evaluate_part and "--iwae-k 2" in evaluate_part
    for (_, err), code in swept["lines"]:
        assert code == 0, err[-2000:]
    assert swept["aggregated"].returncode == 0, swept["aggregated"].stderr
    summary = [(swept[k] / "summary.md").read_text() for k in ("a", "b")]
    assert summary[0] == summary[1]
    assert "| β-VAE | 1 | 0 |" in summary[0] and "| β-VAE | 4 | 0 |" in summary[0]


def test_summary_csv_and_figures(swept):
    a = swept["a"]
    text = (a / "sweep.csv").read_text().splitlines()
    head = text[0].split(",")
    assert len(text) == 3 and head[:4] == ["run", "objective", "beta", "seed"]
    for column in (
        "decomposition.total_correlation",
        "decomposition.mutual_info",
        "decomposition.dimwise_kl",
        "test.iwae_nll",
        "fid.classifier.generation",
        "linear_probe_acc",
        "active_units",
        "eval_seed",
    ):
        assert column in head, column
    summary = (a / "summary.md").read_text()
    assert summary.startswith("# β sweep: Fashion-MNIST subset (256 train / 128 test images)")
    assert "| model | β | seeds | recon | KL | −ELBO | IWAE |" in summary and "| MI | TC | dim-wise KL |" in summary
    assert "2 runs (epochs 2, latent 3, batch 64, lr 0.001)" in summary and "| UDR |" not in summary  # one seed each
    for name in ("rate_distortion.png", "decomposition.png", "units_probe.png", "traversals.png"):
        assert (a / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not [n for n in os.listdir(a) if n.endswith(".tmp")]


def test_summary_statistics_are_mean_and_sample_std():
    rows = [
        {
            "objective": "beta",
            "beta": 2.0,
            "seed": s,
            "epochs": 1,
            "model_args.latent_dim": 3,
            "model_args.alpha": 1.0,
            "model_args.gamma": 1.0,
            "train_args.batch_size": 64,
            "train_args.lr": 1e-3,
            **{key: float(v) for _, key, *_ in sweep.COLUMNS},
        }
        for s, v in ((0, 1.0), (1, 2.0), (2, 6.0))
    ]
    text = sweep.summary_text(rows, sweep.groups(rows), [])
    assert "| β-VAE | 2 | 0,1,2 | 3.0 ± 2.6 | 3.00 ± 2.65 |" in text  # mean 3, sample std √7


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--beta", "-1"], "--beta -1.0 is out of range"),
        (["--seeds", "0", "0"], "--seeds lists a value twice"),
        (["--jobs", "0"], "--jobs 0 is out of range"),
        (["--lr", "0"], "--lr 0.0 is out of range"),
        (["--objective", "capacity"], "invalid choice"),
        (["--aggregate", "--print-commands"], "not allowed with"),
        (["--beta", "two"], "invalid float value"),
    ],
)
def test_bad_input_is_one_error_line(argv, expected, tmp_path):
    code, err = run_main(sweep, argv + ["--out-dir", str(tmp_path / "out")])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_aggregate_without_runs_and_an_out_dir_that_is_a_file_are_errors(tmp_path):
    code, err = run_main(sweep, ["--aggregate", "--out-dir", str(tmp_path)])
    assert code == 2 and "no finished run under" in err
    (tmp_path / "file").write_text("x")
    code, err = run_main(sweep, ["--out-dir", str(tmp_path / "file"), "--print-commands"])
    assert code == 2 and "is a file" in err


def test_tc_model_trains_resumes_evaluates_exports_and_samples(tmp_path):
    data_dir = write_dataset(tmp_path / "data")
    run = tmp_path / "tc"
    common = ["--data-dir", data_dir, "--out-dir", str(run), "--latent-dim", "3", "--batch-size", "32"]
    with in_process():
        assert train.main(["--objective", "tc", "--beta", "6", "--alpha", "0.5", "--epochs", "1", *common]) == 0
    first = (run / "metrics.jsonl").read_text()
    with in_process() as (_, err):
        assert train.main(["--resume", "--epochs", "2", *common]) == 0, err.getvalue()
    model, ckpt = vae.load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and (run / "metrics.jsonl").read_text().startswith(first)
    assert (
        ckpt["model_args"]["objective"],
        ckpt["model_args"]["beta"],
        ckpt["model_args"]["alpha"],
        ckpt["model_args"]["gamma"],
        ckpt["model_args"]["dataset_size"],
    ) == ("tc", 6.0, 0.5, 1.0, 256)
    with in_process():
        evaluate.main(
            ["--checkpoint", str(run / "checkpoint.pt"), "--data-dir", data_dir, "--iwae-k", "2", "--n-show", "3"]
        )
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["model_args"]["objective"] == "tc" and set(report["decomposition"]) >= {
        "mutual_info",
        "total_correlation",
        "dimwise_kl",
    }
    onnx_path, png = tmp_path / "decoder.onnx", tmp_path / "samples.png"
    with in_process():
        export_onnx.main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(onnx_path)])
        sample.main(["--onnx", str(onnx_path), "--n", "4", "--out", str(png), "--npy", str(tmp_path / "s.npy")])
    z = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(z)).numpy()
    assert np.abs(np.load(tmp_path / "s.npy") - expected).max() < 1e-5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_disk_that_fills_part_way_leaves_the_summary_as_it_was(swept, tmp_path):
    """sweep.csv, summary.md and the figures are written as one: when the disk fills at a figure (a file size limit
    that the two text files fit in), every earlier summary file is as it was, though the new one differs (a run
    less)."""
    import resource

    out = tmp_path / "sweep"
    for run in ("beta1_seed0", "beta4_seed0"):
        shutil.copytree(swept["a"] / run / "eval", out / run / "eval")
    figures = ("rate_distortion.png", "decomposition.png", "units_probe.png", "traversals.png")
    for name in ["sweep.csv", "summary.md", *figures]:
        shutil.copy(swept["a"] / name, out / name)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "beta4_seed0" / "eval" / "report.json").unlink()
    del before[out / "beta4_seed0" / "eval" / "report.json"]
    limit = max(len(before[out / n]) for n in ("sweep.csv", "summary.md")) + 1
    assert any(len(before[out / n]) > limit for n in figures)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: a write fails with EFBIG
    try:
        code, err = run_main(sweep, ["--out-dir", out, "--aggregate"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and err.startswith(f"error: cannot write the summary in {out}") and "as they were" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no temp file, not one byte


def test_a_summary_without_readable_checkpoints_removes_the_old_traversals(swept, tmp_path, capsys):
    out = tmp_path / "sweep"
    for run in ("beta1_seed0", "beta4_seed0"):
        shutil.copytree(swept["a"] / run / "eval", out / run / "eval")  # reports, but no checkpoint to draw from
    shutil.copy(swept["a"] / "traversals.png", out / "traversals.png")  # an earlier summary's
    written = sweep.write_summary(out)
    assert "traversals.png" not in written and not (out / "traversals.png").exists()
    assert (out / "summary.md").read_text().splitlines()[
        -1
    ] == "Figures: rate_distortion.png, decomposition.png, units_probe.png"
    assert capsys.readouterr().err == ""  # a sweep kept without its checkpoints is no error


def test_runs_made_otherwise_are_not_finished_and_close_betas_stay_apart(swept, tmp_path, capsys):
    a = swept["a"]
    data_dir = str(a.parent / "data")
    same = sweep.parse_args([*GRID, "--data-dir", data_dir, "--out-dir", str(a)])
    run = sweep.grid(same)[0]
    assert sweep.finished(run, same)
    for change in (["--latent-dim", "4"], ["--lr", "0.002"], ["--epochs", "3"], ["--iwae-k", "3"]):
        other = sweep.parse_args([*GRID, *change, "--data-dir", data_dir, "--out-dir", str(a)])
        assert not sweep.finished(sweep.grid(other)[0], other), change
    close = sweep.parse_args(["--beta", "1.0000001", "1.0000002", "0.5", "--seeds", "0", "--out-dir", str(tmp_path)])
    names = [r["name"] for r in sweep.grid(close)]
    assert names == ["beta1.0000001_seed0", "beta1.0000002_seed0", "beta0.5_seed0"]
    assert "1.0000002" in sweep.commands(sweep.grid(close)[1], close)[0]


def test_a_damaged_checkpoint_is_left_out_of_the_traversals_with_a_warning(swept, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept["a"], out)
    (out / "beta1_seed0" / "checkpoint.pt").write_bytes(b"junk")
    code, err = run_main(sweep, ["--out-dir", str(out), "--aggregate"])
    assert code == 0 and "Traceback" not in err and err.count("warning:") == 1 and "left out of traversals" in err
    assert (out / "summary.md").is_file() and (out / "traversals.png").is_file()


def test_the_traversals_figure_is_grey_and_drawn_at_full_size(swept):
    from PIL import Image

    with Image.open(swept["a"] / "traversals.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # no false colour
    # nothing is shrunk: two panels of 11 images of 28 pixels drawn 3 pixels a pixel (with 2 of padding) side by
    # side, so their 13-pixel row labels stay readable at 100% zoom, where a scaled-down plot made them 5 pixels high
    assert rgb.shape[1] >= 2 * 11 * 30 * 3


def test_udr_joins_the_table_for_settings_with_two_or_more_seeds(swept, tmp_path):
    out = tmp_path / "udr"
    shutil.copytree(swept["a"] / "beta1_seed0", out / "beta1_seed0")
    shutil.copytree(swept["a"] / "beta1_seed0", out / "beta1_seed1")  # a second seed: the same model, copied
    report = json.loads((out / "beta1_seed1" / "eval" / "report.json").read_text())
    report["train_args"]["seed"] = 1
    (out / "beta1_seed1" / "eval" / "report.json").write_text(json.dumps(report))
    assert sweep.write_summary(out)
    rows = (out / "sweep.csv").read_text().splitlines()
    udr = [float(v) for v in (r.split(",")[rows[0].split(",").index("udr")] for r in rows[1:])]
    in_use = sum(v > 0.01 for v in report["kl_per_dim"])
    assert udr == ([1.0, 1.0] if in_use else [0.0, 0.0])  # two copies of one representation agree completely
    assert "| UDR |" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    "poison",
    [
        lambda r: r["model_args"].__setitem__("beta", "4"),
        lambda r: r["model_args"].__setitem__("beta", None),
        lambda r: r["test"].__setitem__("kl", 10**4000 // 10**3999 * 10**3999),
        lambda r: r["model_args"].__setitem__("objective", 3),
        lambda r: r["test"].__setitem__("recon", float("nan")),
    ],
)
def test_a_poisoned_report_is_left_out_with_one_line_and_the_summary_still_written(swept, tmp_path, poison):
    out = tmp_path / "poisoned"
    for run in ("beta1_seed0", "beta4_seed0"):
        shutil.copytree(swept["a"] / run / "eval", out / run / "eval")
    path = out / "beta4_seed0" / "eval" / "report.json"
    report = json.loads(path.read_text())
    poison(report)
    path.write_text(json.dumps(report, allow_nan=True))
    code, err = run_main(sweep, ["--out-dir", str(out), "--aggregate"])
    assert code == 0 and "Traceback" not in err, err
    assert err.count("\n") == 1 and f"warning: {path} is not a report evaluate.py wrote" in err
    assert len((out / "sweep.csv").read_text().splitlines()) == 2  # the header and the one good run


def test_reports_nested_deep_or_that_are_not_regular_files_never_stall_the_summary(swept, tmp_path):
    out = tmp_path / "odd"
    for run in ("beta1_seed0", "beta4_seed0", "deep", "fifo", "zero"):
        (out / run / "eval").mkdir(parents=True)
    shutil.copy(swept["a"] / "beta1_seed0" / "eval" / "report.json", out / "beta1_seed0" / "eval")
    (out / "deep" / "eval" / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(out / "fifo" / "eval" / "report.json")  # a reader that opened it would wait forever
    os.symlink("/dev/zero", out / "zero" / "eval" / "report.json")  # and one that read it would never stop
    proc = warm.run(["sweep.py", "--out-dir", out, "--aggregate"], cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("warning:") == 1 and "deep" in proc.stderr  # the FIFO and /dev/zero are no reports
    assert len((out / "sweep.csv").read_text().splitlines()) == 2


def test_a_sweep_killed_takes_its_runs_with_it(tmp_path):
    """SIGKILL of the sweep (which can pass nothing on) ends its train.py jobs too: the same command at once
    resumes instead of finding another train.py writing."""
    import time

    data_dir = write_dataset(tmp_path / "data", n_train=2000)
    argv = [
        "sweep.py",
        "--beta",
        "1",
        "--seeds",
        "0",
        "--epochs",
        "50",
        "--latent-dim",
        "3",
        "--compile",
        "off",
        "--data-dir",
        data_dir,
        "--out-dir",
        tmp_path / "out",
    ]
    proc = warm.start(argv, cwd=ROOT)
    log = tmp_path / "out" / "beta1_seed0" / "train.log"
    deadline = time.time() + 120
    while not (log.exists() and "epoch   1/" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    time.sleep(1)
    lock = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import fcntl; f = open({str(log.parent / '.lock')!r}, 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        ],
        capture_output=True,
        text=True,
    )
    assert lock.returncode == 0, "a train.py of the killed sweep still holds its run folder"


def test_an_unwritable_out_dir_says_so_and_runs_nothing(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, err = run_main(sweep, ["--beta", "1", "--seeds", "0", "--out-dir", str(tmp_path / "out")])
    assert code == 2 and err.startswith("error: cannot write to --out-dir") and "nothing was run" in err
    assert "sweep.log" not in err
