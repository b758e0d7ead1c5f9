"""export_onnx.py: parity with torch, BatchNorm folding, the dynamic batch axis, metadata, and refusing bad input;
by default both files beside the checkpoint, never replacing one unless told to, with no local path inside."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import warm

import export_onnx
import vae
from plumbing import files as fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = (
    "format",
    "format_version",
    "latent_dim",
    "image_shape",
    "pixel_range",
    "beta",
    "objective",
    "epochs",
    "source_checkpoint",
    "torch_version",
)


def run_main(argv):
    """(exit code, stdout, stderr) of export_onnx.main in this process, as `sys.exit(main())` would exit: no second
    torch start-up."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = export_onnx.main(argv)
        except SystemExit as e:
            code = e.code
    return 0 if code is None else code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    dec, enc = str(folder / "decoder.onnx"), str(folder / "encoder.onnx")
    code, out, err = run_main(["--checkpoint", tiny_checkpoint["path"], "--out", dec, "--encoder", enc])
    assert code == 0, err
    model, ckpt = vae.load_checkpoint(tiny_checkpoint["path"])
    return {"decoder": dec, "encoder": enc, "stdout": out, "model": model, "ckpt": ckpt}


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_export_reports_parity_and_writes_both_files(exported):
    lines = exported["stdout"].splitlines()
    for kind in ("decoder", "encoder"):
        report = next(line for line in lines if line.startswith(f"{kind}: max |onnxruntime - torch|"))
        assert float(report.split("= ")[1].split()[0]) <= 1e-5
        assert os.path.getsize(exported[kind]) > 10_000


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_decoder_parity(exported, batch):
    z = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32) * 2
    got = session(exported["decoder"]).run(["images"], {"z": z})[0]
    with torch.no_grad():
        want = exported["model"].decoder(torch.from_numpy(z)).numpy()
    assert got.shape == (batch, 1, 28, 28)
    assert np.max(np.abs(got - want)) <= 1e-5
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_encoder_parity(exported, batch):
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32)
    mu, logvar = session(exported["encoder"]).run(["mu", "logvar"], {"images": x})
    with torch.no_grad():
        want_mu, want_logvar = exported["model"].encoder(torch.from_numpy(x))
    assert mu.shape == logvar.shape == (batch, 4)
    assert np.max(np.abs(mu - want_mu.numpy())) <= 1e-5
    assert np.max(np.abs(logvar - want_logvar.numpy())) <= 1e-5


def test_graph_has_dynamic_batch_metadata_and_no_batchnorm(exported, tiny_checkpoint):
    ckpt = exported["ckpt"]
    for kind, inputs, outputs in (
        ("decoder", {"z": [4]}, {"images": [1, 28, 28]}),
        ("encoder", {"images": [1, 28, 28]}, {"mu": [4], "logvar": [4]}),
    ):
        model = onnx.load(exported[kind])
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
        for value, want in zip([*model.graph.input, *model.graph.output], [*inputs.items(), *outputs.items()]):
            dims = value.type.tensor_type.shape.dim
            assert value.name == want[0]
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert dims[0].dim_param and not dims[0].dim_value  # symbolic: any batch size
            assert [d.dim_value for d in dims[1:]] == want[1]
        meta = {p.key: p.value for p in model.metadata_props}
        assert set(REQUIRED_KEYS) <= set(meta)
        assert meta["format"] == f"beta-vae-{kind}" and meta["format_version"] == "1"
        assert meta["latent_dim"] == "4" and meta["image_shape"] == "1,28,28"
        assert meta["pixel_range"] == ("0,1" if kind == "decoder" else "-1,1")
        assert float(meta["beta"]) == ckpt["model_args"]["beta"] and meta["objective"] == "beta"
        assert meta["epochs"] == "3" and meta["torch_version"] == torch.__version__
        run_folder = os.path.basename(os.path.dirname(tiny_checkpoint["path"]))
        assert meta["source_checkpoint"] == f"{run_folder}/checkpoint.pt"  # its run folder and name, no more
        assert meta["checkpoint_sha256"] == hashlib.sha256(open(tiny_checkpoint["path"], "rb").read()).hexdigest()
        assert meta["trained_on"].startswith("Fashion-MNIST, ") and "3 epochs" in meta["trained_on"]


def test_fold_batchnorm_is_exact_with_far_from_default_statistics():
    torch.manual_seed(1)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=3)).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.05, 4)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    z, x = torch.randn(16, 3) * 2, torch.rand(16, 1, 28, 28) * 2 - 1
    for module, inp in ((model.decoder, z), (model.encoder, x)):
        folded = export_onnx.fold_batchnorm(module, inp[:2])
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            want, got = module(inp), folded(inp)
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            assert torch.max(torch.abs(a - b)) <= 1e-5
    # the decoder's BN sits before a stride-2 padded ConvTranspose2d: its shift is a per-position map, not a bias;
    # the encoder's sits before an unpadded Conv2d: there it is an ordinary per-channel bias
    shifted = [
        m for m in export_onnx.fold_batchnorm(model.decoder, z[:2]).modules() if isinstance(m, export_onnx._ShiftedConv)
    ]
    assert len(shifted) == 1 and shifted[0].shift.shape == (8, 14, 14)
    assert shifted[0].shift.std(dim=(1, 2)).max() > 1e-3
    encoder = export_onnx.fold_batchnorm(model.encoder, x[:2])
    assert not any(isinstance(m, export_onnx._ShiftedConv) for m in encoder.modules())


def test_parity_failure_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "PARITY_ATOL", -1.0)  # every difference, even 0, now "breaks parity"
    out = tmp_path / "decoder.onnx"
    code, _, err = run_main(
        ["--checkpoint", tiny_checkpoint["path"], "--out", str(out), "--encoder", str(tmp_path / "encoder.onnx")]
    )
    assert code == 1 and err.startswith("error: the exported decoder does not match torch")
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no checkpoint at"),
        ("garbage", "is not a readable checkpoint"),
        ("no_folder", "does not exist"),
        ("opset", "--opset 11 is not supported"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, tiny_checkpoint, tmp_path):
    ckpt, out, extra = tiny_checkpoint["path"], str(tmp_path / "decoder.onnx"), []
    if case == "missing":
        ckpt = str(tmp_path / "nope.pt")
    elif case == "garbage":
        ckpt = str(tmp_path / "garbage.pt")
        with open(ckpt, "w") as f:
            f.write("not a checkpoint")
    elif case == "no_folder":
        out = str(tmp_path / "missing" / "decoder.onnx")
    else:
        extra = ["--opset", "11"]
    code, _, err = run_main(["--checkpoint", ckpt, "--out", out, *extra])
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_command_line_error_has_no_traceback(tmp_path):
    proc = warm.run(
        [os.path.join(ROOT, "export_onnx.py"), "--checkpoint", str(tmp_path / "nope.pt")],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no checkpoint at ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "decoder.onnx").exists()


# ---------------------------------------------------------------------------------- KL, NaN, links, the file pair


def test_decoder_metadata_carries_the_last_epochs_test_kl(kl_exported):
    from conftest import KL

    meta = {p.key: p.value for p in onnx.load(kl_exported["decoder"]).metadata_props}
    assert json.loads(meta["kl_per_dim"]) == KL and meta["kl_epoch"] == "3"


def epoch_record(kl_per_dim):
    record = {"recon": 1.0, "kl": 1.0, "total": 2.0, "kl_per_dim": kl_per_dim}
    return [{"epoch": 3, "step": 24, "train": record, "test": record, "img_per_s": 1000.0}]


@pytest.mark.parametrize("metrics", [[], epoch_record([1.0])])
def test_a_history_without_valid_kl_exports_without_it(tiny_checkpoint, tmp_path, metrics):
    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    ckpt["metrics"] = metrics
    torch.save(ckpt, tmp_path / "c.pt")
    code, out, err = run_main(
        ["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "d.onnx"), "--no-encoder"]
    )
    assert code == 0, err
    assert "note: no per-dimension KL in the metadata" in out
    meta = {p.key for p in onnx.load(tmp_path / "d.onnx").metadata_props}
    assert "kl_per_dim" not in meta and "latent_dim" in meta


def test_a_history_with_nan_kl_is_never_put_in_the_metadata(tiny_checkpoint, tmp_path):
    """The loader now refuses a history holding NaN (one line, nothing written); export_onnx's own check still keeps
    a non-finite KL out of the metadata, whatever reaches it."""
    ckpt = {"metrics": epoch_record([float("nan")] * 4), "model_args": {"latent_dim": 4}}
    assert export_onnx.kl_from_history(ckpt) == (None, "its last epoch holds no valid test kl_per_dim")
    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    ckpt["metrics"] = epoch_record([float("nan")] * 4)
    torch.save(ckpt, tmp_path / "c.pt")
    code, out, err = run_main(["--checkpoint", str(tmp_path / "c.pt")])
    assert code == 2 and err.startswith("error: ") and "kl_per_dim" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_a_checkpoint_with_nan_weights_is_refused(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    ckpt["model"]["decoder.deconv.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    code, out, err = run_main(["--checkpoint", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "d.onnx")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "NaN or infinite weights (decoder.deconv.0.weight)" in err
    assert not (tmp_path / "d.onnx").exists()


def test_parity_treats_nan_as_a_failure(exported):
    data = open(exported["decoder"], "rb").read()

    class NaNPixel(torch.nn.Module):  # torch's answer with one NaN pixel: Python's max() would skip it
        def forward(self, z):
            out = exported["model"].decoder(z).clone()
            out[0, 0, 0, 0] = float("nan")
            return out

    assert export_onnx.parity(data, NaNPixel(), lambda rng, b: rng.standard_normal((b, 4))) == float("inf")
    assert export_onnx.parity(data, exported["model"].decoder, lambda rng, b: rng.standard_normal((b, 4))) <= 1e-5


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("case", ["symlinked_folder", "hard_link", "encoder_is_checkpoint"])
def test_outputs_that_resolve_to_the_checkpoint_are_refused(tiny_checkpoint, tmp_path, case, overwrite):
    """Said as such, not as "already exists: pass --overwrite", and refused with --overwrite too."""
    shutil.copy(tiny_checkpoint["path"], tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    out, encoder = str(tmp_path / "decoder.onnx"), None
    if case == "symlinked_folder":
        os.symlink(tmp_path, tmp_path / "link")
        out = str(tmp_path / "link" / "checkpoint.pt")
    elif case == "hard_link":
        os.link(tmp_path / "checkpoint.pt", tmp_path / "decoder.onnx")
    else:
        encoder = str(tmp_path / "link2" / ".." / "checkpoint.pt")
        os.mkdir(tmp_path / "link2")
    code, _, err = run_main(
        ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", out, *overwrite]
        + (["--encoder", encoder] if encoder else [])
    )
    assert code == 2 and "is the same file as --checkpoint" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_failed_encoder_write_leaves_the_old_pair(tiny_checkpoint, tmp_path, monkeypatch):
    import errno

    from plumbing import files as fileio

    dec, enc = tmp_path / "decoder.onnx", tmp_path / "encoder.onnx"
    dec.write_bytes(b"old decoder")
    enc.write_bytes(b"old encoder")
    real = fileio._write_temp

    def disk_full_for_the_encoder(path, write_fn):
        if str(path).endswith("encoder.onnx"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write_fn)

    monkeypatch.setattr(fileio, "_write_temp", disk_full_for_the_encoder)
    code, out, err = run_main(
        ["--checkpoint", tiny_checkpoint["path"], "--out", str(dec), "--encoder", str(enc), "--overwrite"]
    )
    assert code == 2 and err.startswith("error: cannot write") and "No space left on device" in err
    assert "nothing was changed" in err and len(err.strip().splitlines()) == 1
    assert dec.read_bytes() == b"old decoder" and enc.read_bytes() == b"old encoder"
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx", "encoder.onnx"]


def test_export_removes_temp_files_that_a_killed_export_left(tiny_checkpoint, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.kill()
    proc.wait()
    stale = tmp_path / f".decoder.onnx.{proc.pid}-{fileio._host()}.x7y8z9ab.tmp"  # as fileio names them, process gone
    stale.write_bytes(b"half a decoder")
    code, _, err = run_main(
        ["--checkpoint", tiny_checkpoint["path"], "--out", str(tmp_path / "decoder.onnx"), "--no-encoder"]
    )
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx"]


def test_an_output_path_that_is_not_utf8_is_printed_escaped(tiny_checkpoint, tmp_path, monkeypatch):
    """The files are written, so the last line must not become a UnicodeEncodeError that hides it."""
    out = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"\xff.onnx"))
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as a UTF-8 terminal or pipe is
    monkeypatch.setattr(sys, "stdout", stdout)
    assert export_onnx.main(["--checkpoint", tiny_checkpoint["path"], "--out", out, "--no-encoder"]) == 0
    stdout.flush()
    assert os.path.exists(out)
    assert f"wrote {tmp_path}{os.sep}\\udcff.onnx: decoder" in stdout.buffer.getvalue().decode()


# ------------------------------------------------------------ defaults: the run folder, --overwrite, no local path


def metadata_of(path):
    return {p.key: p.value for p in onnx.load(path).metadata_props}


@pytest.fixture(scope="module")
def run_export(tiny_checkpoint, tmp_path_factory):
    """`export_onnx.py --checkpoint runs/beta1_z4_seed0/checkpoint.pt` and nothing else, run from another folder, of a
    checkpoint whose train_args name an absolute data folder."""
    root = tmp_path_factory.mktemp("defaults")
    run, elsewhere = root / "runs" / "beta1_z4_seed0", root / "elsewhere"
    run.mkdir(parents=True)
    elsewhere.mkdir()
    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    ckpt["train_args"] = {"epochs": 3, "data_dir": str(root / "data"), "dataset": "fashion-mnist"}
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(elsewhere)
        code, out, err = run_main(["--checkpoint", str(run / "checkpoint.pt")])
    assert code == 0, err
    return {"root": root, "run": run, "elsewhere": elsewhere, "stdout": out}


def test_by_default_both_files_go_beside_the_checkpoint(run_export):
    run = run_export["run"]
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "decoder.onnx", "encoder.onnx"]
    assert os.listdir(run_export["elsewhere"]) == []  # nothing in the current folder
    assert f"wrote {run / 'decoder.onnx'}: decoder" in run_export["stdout"]
    assert f"wrote {run / 'encoder.onnx'}: encoder" in run_export["stdout"]


def test_no_metadata_value_holds_a_local_path(run_export):
    run, root = run_export["run"], str(run_export["root"])
    digest = hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    for kind in ("decoder", "encoder"):
        meta = metadata_of(run / f"{kind}.onnx")
        for key, value in meta.items():  # every value, whatever its key
            assert not os.path.isabs(value) and root not in value and os.sep + "tmp" not in value, (kind, key, value)
        assert meta["source_checkpoint"] == "beta1_z4_seed0/checkpoint.pt" and meta["checkpoint_sha256"] == digest
        assert meta["trained_on"] == "Fashion-MNIST, 60,000 training images, 3 epochs, β-VAE, β=1"


def test_existing_files_are_refused_unless_overwrite(run_export, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_export["run"] / "checkpoint.pt", run / "checkpoint.pt")
    (run / "decoder.onnx").write_bytes(b"old decoder")
    (run / "encoder.onnx").write_bytes(b"old encoder")
    for gone, named in (
        (None, f"--out {run / 'decoder.onnx'} already exists"),
        ("decoder.onnx", f"--encoder {run / 'encoder.onnx'} already exists"),
    ):  # either one is enough
        if gone:
            os.remove(run / gone)
        code, out, err = run_main(["--checkpoint", str(run / "checkpoint.pt")])
        assert code == 2 and err.startswith(f"error: {named}: pass --overwrite") and out == ""
        assert len(err.strip().splitlines()) == 1
        assert (run / "encoder.onnx").read_bytes() == b"old encoder"
        assert not gone or not (run / gone).exists()
    (run / "decoder.onnx").write_bytes(b"old decoder")
    code, out, err = run_main(["--checkpoint", str(run / "checkpoint.pt"), "--overwrite"])
    assert code == 0, err
    for kind in ("decoder", "encoder"):
        assert metadata_of(run / f"{kind}.onnx")["format"] == f"beta-vae-{kind}"  # the old bytes replaced
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "decoder.onnx", "encoder.onnx"]


def test_no_encoder_writes_the_decoder_alone_hashing_the_bytes_it_read(run_export, tmp_path, monkeypatch):
    """The hash is of the bytes the weights came from: a checkpoint train.py replaces meanwhile does not change it."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_export["run"] / "checkpoint.pt", run / "checkpoint.pt")
    original = (run / "checkpoint.pt").read_bytes()
    real = vae.load_checkpoint

    def then_a_new_epoch_is_saved(path, device="cpu"):
        loaded = real(path, device)
        (run / "checkpoint.pt").write_bytes(b"the next epoch's checkpoint")
        return loaded

    monkeypatch.setattr(vae, "load_checkpoint", then_a_new_epoch_is_saved)
    code, out, err = run_main(["--checkpoint", str(run / "checkpoint.pt"), "--no-encoder"])
    assert code == 0, err
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "decoder.onnx"]
    assert [line.split(": ")[1].split(",")[0] for line in out.splitlines() if line.startswith("wrote ")] == ["decoder"]
    assert metadata_of(run / "decoder.onnx")["checkpoint_sha256"] == hashlib.sha256(original).hexdigest()


def test_ctrl_c_during_the_export_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_onnx, "export", interrupted)
    try:
        code, out, err = run_main(
            [
                "--checkpoint",
                tiny_checkpoint["path"],
                "--out",
                str(tmp_path / "d.onnx"),
                "--encoder",
                str(tmp_path / "e.onnx"),
            ]
        )
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left export_onnx.main as a traceback")
    assert code == 130 and err == "error: interrupted; nothing was written\n"
    assert os.listdir(tmp_path) == []
