"""Edges an audit found between the scripts' promises and what they did: checkpoints that declare gigabytes or hold
numbers no run writes, outputs that are inputs, empty and undecodable paths, pairs of files written half, flags a
sweep passed on unchecked, leftovers of killed processes in every folder a script writes. Each ends in one `error:`
line (exit 2) and leaves nothing half-written, or works."""

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
import warm
from conftest import write_dataset

import evaluate
import explore
import export_onnx
import fid
import sample
import sweep
import train
import vae
from plumbing import files as fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call(main, argv):
    """(exit status, stderr) of a script's main run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def one_line(code, err, *needles):
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (code, err)
    for n in needles:
        assert n in err, (n, err)


def changed_copy(tiny_checkpoint, folder, change):
    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    change(ckpt)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "checkpoint.pt")
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------- what torch.load may allocate


def test_a_checkpoint_that_could_unpack_to_more_than_it_holds_is_refused_before_torch_load(tmp_path, monkeypatch):
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(40 << 20)}}, buf)  # 160 MiB of zeros, stored
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():  # the same archive, compressed: a bomb
            dst.writestr(info.filename, src.read(info))
    del buf
    assert packed.stat().st_size < 2 << 20
    small = tmp_path / "small.pt"  # a stored record whose sizes claim 1.5 GB
    torch.save({"model": {"w": torch.zeros(1000)}}, small)
    raw = bytearray(small.read_bytes())
    with zipfile.ZipFile(small) as z:
        record = next(i for i in z.infolist() if i.file_size == 4000)
    name = record.filename.encode()
    at = raw.find(b"PK\x01\x02")  # the record's central-directory entry
    while raw[at + 46 : at + 46 + len(name)] != name:
        at = raw.find(b"PK\x01\x02", at + 4)
    raw[at + 20 : at + 28] = struct.pack("<II", 1_500_000_000, 1_500_000_000)  # compressed, uncompressed size
    small.write_bytes(bytes(raw))

    def never(*a, **k):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(vae.torch, "load", never)
    with pytest.raises(vae.CheckpointError, match="is compressed, which torch.save never does"):
        vae.read_checkpoint(packed)
    with pytest.raises(vae.CheckpointError, match="records declare .* bytes, more than its"):
        vae.read_checkpoint(small)
    legacy = tmp_path / "legacy.pt"  # the older format allocates what it declares
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(vae.CheckpointError, match="not a zip archive"):
        vae.read_checkpoint(legacy)


def test_a_long_run_of_the_largest_model_loads(tmp_path):
    # every epoch's record its own lists, as train.py's history holds them: no size cap may refuse a real run
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=vae.SETTINGS["latent_dim"].high))
    opt = torch.optim.Adam(model.parameters())
    logits, mu, logvar = model(torch.zeros(2, 1, 28, 28))
    (logits.sum() + mu.sum() + logvar.sum()).backward()
    opt.step()
    d = model.config.latent_dim

    def record(e):
        return {"recon": 1.0 + e, "kl": 1.0, "total": 2.0, "kl_per_dim": [0.1 + e / 1e6 + j / 1e9 for j in range(d)]}

    history = [{"epoch": e, "step": e, "train": record(e), "test": record(-e), "img_per_s": 1.0} for e in range(1, 26)]
    path = tmp_path / "checkpoint.pt"
    vae.save_checkpoint(path, model, opt, 25, 0, {"epochs": 25}, history)
    assert path.stat().st_size > 3 << 20  # a history of 200,000 numbers: torch's own unpickler takes seconds a million
    model2, ckpt = vae.load_checkpoint(path)
    assert len(ckpt["metrics"]) == 25 and len(ckpt["metrics"][-1]["test"]["kl_per_dim"]) == d


# ------------------------------------------------------------------------------------ fields no run ever writes


def set_state(value):
    return lambda c: c["optimizer"].update(state=value)


def set_group(key, value):
    return lambda c: c["optimizer"]["param_groups"][0].update({key: value})


def negative_variance(c):
    c["model"]["encoder.features.4.running_var"][0] = -1.0


def first_state(c):
    return next(iter(c["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    "change, needle",
    [
        (set_state([1, 2]), "optimizer state is a list"),
        (set_state({0: [1, 2]}), "optimizer state entry 0 is not a parameter's state"),
        (lambda c: first_state(c).update(exp_avg="x"), "optimizer state exp_avg of parameter 0 is 'x'"),
        (lambda c: first_state(c)["exp_avg"].fill_(float("nan")), "exp_avg of parameter 0 is not finite"),
        (lambda c: c["optimizer"].update(param_groups={}), "its param_groups a dict"),
        (lambda c: c["optimizer"].update(param_groups=[3]), "parameter group 0 has not a dict"),
        (set_group("lr", float("inf")), "group 0 has lr inf"),
        (set_group("lr", float("nan")), "group 0 has lr nan"),
        (set_group("betas", (0.9, float("nan"))), "group 0 has betas (0.9, nan)"),
        (set_group("eps", float("inf")), "group 0 has eps inf"),
        (lambda c: c.update(seed=-1), "seed is -1, not a seed from 0 to 4294967295"),
        (lambda c: c.update(seed=2**70), "seed is 1180591620717411303424, not a seed"),
        (lambda c: c.update(epoch=10**30), "epoch is an integer of 100 bits"),
        (lambda c: c["train_args"].update(lr=float("inf")), "train_args['lr'] is inf"),
        (lambda c: c["model_args"].update(dataset_size=10**30), "dataset_size is an integer of 100 bits"),
        (lambda c: c.update(metrics=[{"epoch": 10**30, "train": {}, "test": {}}]), "metrics entry 0 is not an epoch"),
        (negative_variance, "encoder.features.4.running_var holds negative variances"),
        (
            lambda c: c["model"].update({"decoder.fc.0.weight": c["model"]["decoder.fc.0.weight"].to(torch.complex64)}),
            "decoder.fc.0.weight holds complex64 values, not float32",
        ),
        (
            lambda c: c["model"].update({"decoder.fc.0.bias": c["model"]["decoder.fc.0.bias"].double()}),
            "decoder.fc.0.bias holds float64 values, not float32",
        ),
    ],
)
def test_checkpoint_fields_no_run_writes_are_damage_named_at_load(tiny_checkpoint, tmp_path, change, needle):
    path = changed_copy(tiny_checkpoint, tmp_path, change)
    with pytest.raises(vae.CheckpointError) as e:
        vae.load_checkpoint(path)
    assert "is damaged" in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "change, needle", [(set_state([1, 2]), "optimizer state is a list"), (set_group("lr", float("inf")), "lr inf")]
)
def test_resume_from_broken_optimizer_state_is_one_line(tiny_data, tmp_path, change, needle):
    out = tmp_path / "run"
    base = [
        "--epochs",
        "1",
        "--latent-dim",
        "3",
        "--batch-size",
        "64",
        "--compile",
        "off",
        "--data-dir",
        tiny_data,
        "--out-dir",
        str(out),
    ]
    assert call(train.main, base)[0] == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    code, err = call(train.main, base[2:] + ["--epochs", "2", "--resume"])
    one_line(code, err, "is damaged", needle)
    assert "loss became" not in err and (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c.update(seed=-1),
        lambda c: c.update(seed=2**70),
        lambda c: c.update(metrics=[{"epoch": 10**30, "step": 1, "img_per_s": 1.0, "train": REC, "test": REC}]),
    ],
)
def test_export_refuses_what_sample_py_would_refuse(tiny_checkpoint, tmp_path, change):
    path = changed_copy(tiny_checkpoint, tmp_path, change)
    code, err = call(export_onnx.main, ["--checkpoint", path, "--out", str(tmp_path / "d.onnx")])
    one_line(code, err, "is damaged")
    assert not (tmp_path / "d.onnx").exists()


REC = {"recon": 1.0, "kl": 1.0, "total": 2.0, "kl_per_dim": [0.1, 0.2, 0.3, 0.4]}


def test_export_of_a_checkpoint_path_that_is_not_utf8_writes_metadata_sample_py_reads(tiny_checkpoint, tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"ck\xff")
    os.mkdir(folder)
    ck = os.path.join(folder, b"checkpoint.pt")
    with open(ck, "wb") as f:
        f.write(open(tiny_checkpoint["path"], "rb").read())
    dec = os.path.join(os.fsencode(tmp_path), b"dec.onnx")
    proc = warm.run([b"export_onnx.py", b"--checkpoint", ck, b"--out", dec], cwd=ROOT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    code, err = call(sample.main, ["--onnx", os.fsdecode(dec), "--out", str(tmp_path / "s.png"), "--n", "4"])
    assert code in (None, 0) and err == "", err
    assert "ck\\udcff" in sample.onnx_check.load(os.fsdecode(dec), "decoder").meta["source_checkpoint"]


# ------------------------------------------------------------------------------------------------ evaluate.py


def test_evaluate_refuses_non_finite_results_and_prints_only_the_error(tiny_checkpoint, tmp_path):
    path = changed_copy(
        tiny_checkpoint, tmp_path / "ck", lambda c: c["model"]["encoder.fc_logvar.bias"].fill_(200.0)
    )  # finite, exp() is not
    out = tmp_path / "eval"
    code, err = call(
        evaluate.main,
        ["--checkpoint", path, "--data-dir", tiny_checkpoint["data_dir"], "--out-dir", str(out), "--iwae-k", "2"],
    )
    one_line(code, err, "gave test.", "= inf" if "= inf" in err else "= nan", "nothing was written")
    assert not out.exists()
    code, err = call(evaluate.main, ["--checkpoint", str(tmp_path / "nonexist.pt"), "--out-dir", str(out)])
    one_line(code, err, "no checkpoint at")  # no `device: cpu` line before it
    path = changed_copy(tiny_checkpoint, tmp_path / "bn", negative_variance)
    code, err = call(
        evaluate.main, ["--checkpoint", path, "--data-dir", tiny_checkpoint["data_dir"], "--out-dir", str(out)]
    )
    one_line(code, err, "negative variances")
    assert not out.exists()


def test_report_json_never_holds_nan():
    assert evaluate.first_non_finite({"a": [1.0, {"b": float("nan")}]})[0] == "a.1.b"
    assert evaluate.first_non_finite({"a": [1.0, 2], "b": "x"}) is None


# --------------------------------------------------------------------------------------- outputs that are inputs


def test_train_refuses_a_train_log_that_is_a_data_file(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    labels = os.path.join(tiny_data, "FashionMNIST", "raw", "train-labels-idx1-ubyte")
    before = open(labels, "rb").read()
    os.link(labels, out / "train.log")
    code, err = call(
        train.main,
        ["--epochs", "1", "--latent-dim", "3", "--compile", "off", "--data-dir", tiny_data, "--out-dir", str(out)],
    )
    one_line(code, err, "--out-dir train.log", "is the same file as data file train-labels-idx1-ubyte")
    assert open(labels, "rb").read() == before and sorted(os.listdir(out)) == ["train.log"]


def test_sweep_refuses_a_sweep_log_that_is_a_data_file(tiny_data, tmp_path):
    run = tmp_path / "sweep" / "beta1_seed0"
    run.mkdir(parents=True)
    labels = os.path.join(tiny_data, "FashionMNIST", "raw", "t10k-labels-idx1-ubyte")
    before = open(labels, "rb").read()
    os.link(labels, run / "sweep.log")
    code, err = call(
        sweep.main,
        ["--beta", "1", "--seeds", "0", "--epochs", "1", "--data-dir", tiny_data, "--out-dir", str(tmp_path / "sweep")],
    )
    one_line(code, err, "beta1_seed0's sweep.log", "is the same file as data file t10k-labels-idx1-ubyte")
    assert open(labels, "rb").read() == before and sorted(os.listdir(run)) == ["sweep.log"]


# ------------------------------------------------------------------------------------------------ flags and paths


@pytest.mark.parametrize(
    "main, argv",
    [
        (train.main, ["--out-dir", ""]),
        (train.main, ["--data-dir", ""]),
        (evaluate.main, ["--checkpoint", "x.pt", "--out-dir", ""]),
        (export_onnx.main, ["--checkpoint", ""]),
        (sample.main, ["--npy", ""]),
        (explore.main, ["--out", ""]),
        (sweep.main, ["--out-dir", ""]),
        (sweep.main, ["--data-dir", "", "--print-commands"]),
    ],
)
def test_an_empty_path_is_refused_in_every_script(main, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = call(main, argv)
    one_line(code, err, "an empty value names nothing")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--latent-dim", "5000"], "--latent-dim 5000 is out of range: use 1 to 4096"),
        (["--lr", "100"], "--lr 100.0 is out of range"),
        (["--gamma", "2e9"], "--gamma 2000000000.0 is out of range"),
        (["--epochs", "2000000"], "--epochs 2000000 is out of range"),
        (["--batch-size", "2000000"], "--batch-size 2000000 is out of range"),
        (["--iwae-k", "200000"], "--iwae-k 200000 is out of range"),
        (["--seeds", "-1"], "--seeds -1 is out of range"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--out-dir", "AFILE/x"], "AFILE is a file, not a folder"),
        (["--data-dir", "AFILE/x"], "AFILE is a file, not a folder"),
    ],
)
def test_sweep_checks_every_flag_it_passes_on_before_making_anything(tmp_path, argv, needle):
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("AFILE", str(tmp_path / "afile")) for a in argv]
    needle = needle.replace("AFILE", str(tmp_path / "afile"))
    argv += [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "out")]
    code, err = call(sweep.main, ["--beta", "1", "--seeds", "0"] + argv)
    one_line(code, err, needle)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


# ---------------------------------------------------------------------------------------- sweep's own outputs


def fake_report(run_dir, checkpoint_path):
    eval_dir = os.path.join(run_dir, "eval")
    os.makedirs(eval_dir)
    report = {
        "model_args": {"objective": "beta", "beta": 1.0, "latent_dim": 3, "alpha": 1.0, "gamma": 1.0},
        "train_args": {"seed": 0, "batch_size": 64, "lr": 1e-3},
        "epoch": 1,
        "checkpoint": checkpoint_path,
        "test": {"recon": 1.0, "kl": 2.0, "neg_elbo": 3.0, "iwae_nll": 2.9},
        "active_units": 2,
        "linear_probe_acc": 0.5,
        "decomposition": {"mutual_info": 1.0, "total_correlation": 0.5, "dimwise_kl": 0.5},
        "fid": {
            "classifier": {"reconstruction": 1.0, "generation": 2.0},
            "pixels": {"reconstruction": 3.0, "generation": 4.0},
        },
        "data": {"n_train": 96, "n_test": 32},
    }
    with open(os.path.join(eval_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)


def test_sweep_summary_of_a_folder_that_is_not_utf8_and_its_leftovers(tmp_path):
    out = os.path.join(str(tmp_path), os.fsdecode(b"sweep-\xff"))
    run = os.fsdecode(b"beta1-\xff")  # a run folder, and the sweep's, named with bytes that are not UTF-8
    fake_report(os.path.join(out, run), os.path.join(out, run, "checkpoint.pt"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = os.path.join(out, f".sweep.csv.{gone.pid}-{fileio._host()}.k1ll3d_x.tmp")
    open(stale, "wb").close()
    code, err = call(sweep.main, ["--aggregate", "--out-dir", out])
    assert code == 0 and "Traceback" not in err, err
    assert "beta1-\\udcff" in open(os.path.join(out, "sweep.csv"), encoding="utf-8").read()
    assert not os.path.exists(stale)


# ------------------------------------------------------------------------------------------------ sample.py


def test_sample_writes_its_png_and_npy_as_a_pair(kl_exported, tmp_path):
    png = tmp_path / "s1.png"
    code, err = call(sample.main, ["--onnx", kl_exported["decoder"], "--out", str(png), "--npy", "/proc/s1.npy"])
    one_line(code, err, "cannot write", "nothing was changed")
    assert not png.exists()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import resource, signal, sys
sys.path.insert(0, {ROOT!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))   # a full disk: the grid fits, the array does not
import sample
sample.main(["--onnx", {kl_exported["decoder"]!r}, "--out", {str(png)!r}, "--npy", {str(tmp_path / "s1.npy")!r},
             "--n", "64", "--scale", "1"])
""",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "(None)" not in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------------------------------ leftovers in every folder written


def dead_pid():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_the_classifier_cache_folder_is_cleaned_of_killed_writes(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=64, n_test=32)
    path = fid.classifier_cache_path(data_dir, epochs=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stale = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{dead_pid()}-{fileio._host()}.k1ll3d_x.tmp")
    open(stale, "wb").close()
    fid.load_classifier(data_dir, "cpu", epochs=1)
    assert os.path.isfile(path) and not os.path.exists(stale)


def test_explore_screenshot_folder_is_cleaned_and_a_full_disk_names_the_destination(tmp_path, monkeypatch, kl_exported):
    class Session:
        def __getattr__(self, name):
            return lambda *a, **k: b"png" if name == "get_screenshot_as_png" else None

    monkeypatch.setattr(explore.browser, "start", Session)
    monkeypatch.setattr(explore.browser, "call", lambda *a, **k: None)
    monkeypatch.setattr(explore.browser, "console_errors", lambda *a, **k: [])
    shot = tmp_path / "shot.png"
    stale = tmp_path / f".shot.png.{dead_pid()}-{fileio._host()}.k1ll3d_x.tmp"
    stale.write_bytes(b"half")
    (tmp_path / "site").mkdir()
    explore.screenshot(str(tmp_path / "site"), str(shot))
    assert shot.read_bytes() == b"png" and not stale.exists()

    web = tmp_path / "web"  # a runtime of 2 MiB files: a disk of 1 MiB
    dist = web / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    (web / "package.json").write_text('{"dependencies": {"onnxruntime-web": "1.0.0"}}')
    (dist.parent / "package.json").write_text('{"version": "1.0.0"}')
    for name in explore.RUNTIME:
        (dist / name).write_bytes(bytes(2 << 20))
    for name in explore.PAGE:
        (web / name).write_text("x")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import resource, signal, sys
sys.path.insert(0, {ROOT!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
import explore
explore.WEB = {str(web)!r}
explore.main(["--onnx", {kl_exported["decoder"]!r}, "--out", {str(tmp_path / "site2")!r}])
""",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot write the site {tmp_path / 'site2'} (File too large)" in proc.stderr
    assert "node_modules" not in proc.stderr and not (tmp_path / "site2").exists()


def test_a_checkpoint_from_before_dataset_size_was_kept_exports_and_resumes(tiny_checkpoint, tmp_path):
    from conftest import run_here

    import export_onnx
    import train

    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    del ckpt["model_args"]["dataset_size"]
    ckpt["train_args"] |= {"batch_size": 64, "seed": 0, "lr": 1e-3}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    assert run_here(export_onnx, "--checkpoint", tmp_path / "checkpoint.pt").returncode == 0
    meta = {p.key: p.value for p in __import__("onnx").load(tmp_path / "decoder.onnx").metadata_props}
    assert meta["trained_on"].startswith("Fashion-MNIST, an unrecorded number of training images, 3 epochs")
    flags = ["--epochs", 4, "--data-dir", tiny_checkpoint["data_dir"], "--out-dir", tmp_path, "--compile", "off"]
    proc = run_here(train, "--resume", *flags)
    assert proc.returncode == 0, proc.stderr
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == 4 and resumed["model_args"]["dataset_size"] == 256  # the data it trains on
    flags[1] = 5
    assert run_here(train, "--resume", *flags).returncode == 0  # and it resumes again
