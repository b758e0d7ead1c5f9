"""sample.py: runs where torch cannot be imported, writes labelled grids, is reproducible, refuses bad files and flags
and never replaces a file unless told to."""

import io
import os
import re
import resource
import shutil
import subprocess
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import KL, NO_TORCH, reshape_model, run_here, run_without_torch
from PIL import Image

import sample
from plumbing import files as fileio
from plumbing import onnx_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample.py")


def run_sample(*args, cwd):
    return run_without_torch(SAMPLE, *args, cwd=cwd)


@pytest.fixture(scope="module")
def decoder(kl_exported):
    return kl_exported["decoder"]


def pixels(path):
    with Image.open(path) as img:
        return img.mode, np.asarray(img)


def decode(path, z):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"z": z.astype(np.float32)})[0]


def assert_one_error_line(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == "", proc.stderr


def test_the_hook_really_blocks_torch(tmp_path):
    script = tmp_path / "imports_torch.py"
    script.write_text("import torch\n")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ImportError: torch is blocked for this test" in proc.stderr


def test_sample_without_torch_is_reproducible(decoder, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = run_sample(
            "--onnx", decoder, "--seed", seed, "--out", f"{name}.png", "--npy", f"{name}.npy", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        mode, runs[name] = pixels(tmp_path / f"{name}.png")
        assert mode == "L"
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])
    # the documented recipe: z = default_rng(seed).standard_normal((n, latent_dim)) * temperature
    images = np.load(tmp_path / "a.npy")
    z = np.random.default_rng(0).standard_normal((64, 4))
    assert images.dtype == np.float32 and images.shape == (64, 1, 28, 28)
    assert np.array_equal(images, decode(decoder, z))


def test_defaults_need_only_onnx_and_write_into_the_current_folder(decoder, tmp_path):
    proc = subprocess.run(
        [sys.executable, SAMPLE, "--onnx", decoder], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert pixels(tmp_path / "samples.png")[0] == "L"
    defaults = ["samples.png", "samples.npy", "traversals.png", "interpolations.png"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *defaults], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == defaults  # the default outputs are in .gitignore


def test_temperature_zero_decodes_the_prior_mean(decoder, tmp_path):
    proc = run_sample("--onnx", decoder, "--n", 5, "--temperature", 0, "--npy", "t0.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "5 images, 2 x 3 grid" in proc.stdout  # the rows the grid has: 3 + 2
    images = np.load(tmp_path / "t0.npy")
    assert images.shape == (5, 1, 28, 28) and np.all(images == images[:1])


def test_traverse_rows_follow_kl_and_are_labelled(decoder, tmp_path):
    proc = run_sample("--onnx", decoder, "--traverse", "--steps", 5, "--npy", "g.npy", "--out", "g.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    order = sorted(range(4), key=lambda d: -KL[d])  # [1, 3, 2, 0]
    z = np.tile(np.random.default_rng(0).standard_normal(4), (4, 5, 1))
    for row, d in enumerate(order):
        z[row, :, d] = np.linspace(-3, 3, 5)
    assert np.array_equal(np.load(tmp_path / "g.npy"), decode(decoder, z.reshape(-1, 4)))
    args = sample.parse_args(["--onnx", decoder, "--traverse", "--steps", "5"])
    latents, ncol, labels, cols, what = sample.layout(args, onnx_check.load(decoder, "decoder"))
    assert np.array_equal(latents, z.reshape(-1, 4))  # rows in KL order, as decoded above
    assert ncol == 5 and cols == ["-3.0", "-1.5", "+0.0", "+1.5", "+3.0"]
    assert labels == ["z1  KL 2.50", "z3  KL 1.60", "z2  KL 0.70", "z0  KL 0.01  not in use"]  # KL <= 0.01 nats
    assert "largest KL first" in what and "in use: KL > 0.01 nats" in what


def test_not_in_use_means_kl_at_most_active_kl():
    """The threshold is onnx_check.ACTIVE_KL (0.01 nats), inclusive: 0.03 is in use (it was "unused" below 0.05)."""
    assert onnx_check.ACTIVE_KL == 0.01
    model = types.SimpleNamespace(latent=4, kl=[0.03, 0.01, 0.0, 1.2])
    args = sample.parse_args(["--traverse", "--steps", "3"])
    _, _, labels, _, _ = sample.layout(args, model)
    assert labels == ["z3  KL 1.20", "z0  KL 0.03", "z1  KL 0.01  not in use", "z2  KL 0.00  not in use"]


def test_traverse_dims_keeps_the_largest_kl_rows(decoder, tmp_path):
    proc = run_sample(
        "--onnx", decoder, "--traverse", "--dims", 2, "--steps", 3, "--npy", "g.npy", "--out", "g.png", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    images = np.load(tmp_path / "g.npy").reshape(2, 3, 28, 28)
    z = np.tile(np.random.default_rng(0).standard_normal(4), (2, 3, 1))
    z[0, :, 1], z[1, :, 3] = np.linspace(-3, 3, 3), np.linspace(-3, 3, 3)
    assert np.array_equal(images, decode(decoder, z.reshape(-1, 4)).reshape(2, 3, 28, 28))


def test_interpolation_rows_go_somewhere_and_grids_have_titles(decoder, tmp_path):
    proc = run_sample(
        "--onnx",
        decoder,
        "--interpolate",
        "--steps",
        5,
        "--rows",
        3,
        "--scale",
        1,
        "--out",
        "g.png",
        "--npy",
        "g.npy",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    images = np.load(tmp_path / "g.npy").reshape(3, 5, 28, 28)
    assert all(not np.array_equal(row[0], row[-1]) for row in images)
    _, grid = pixels(tmp_path / "g.png")
    bare = 3 * 30 + 2  # three rows of 28 px images and 2 px padding: the rest is the title and column labels
    assert grid.shape[0] > bare + 20 and grid[:20].min() < 128  # dark text above the images
    args = sample.parse_args(["--onnx", decoder, "--interpolate", "--steps", "4", "--rows", "2"])
    _, _, labels, cols, _ = sample.layout(args, onnx_check.load(decoder, "decoder"))
    assert labels == ["pair 1", "pair 2"] and cols == ["A", "", "", "B"]


def test_traverse_of_a_decoder_without_kl_is_in_index_order(tiny_checkpoint, tmp_path):
    import contextlib

    import export_onnx

    path = str(tmp_path / "plain.onnx")
    with contextlib.redirect_stdout(io.StringIO()) as out:  # its history is empty
        assert export_onnx.main(["--checkpoint", tiny_checkpoint["path"], "--out", path, "--no-encoder"]) == 0
    assert "note: no per-dimension KL" in out.getvalue()
    args = sample.parse_args(["--onnx", path, "--traverse", "--steps", "3"])
    latents, _, labels, _, what = sample.layout(args, onnx_check.load(path, "decoder"))
    rows = latents.reshape(4, 3, 4)
    assert all(np.array_equal(rows[r, :, r], [-3, 0, 3]) for r in range(4))  # row r sweeps dimension r
    assert labels == ["z0", "z1", "z2", "z3"] and "index order" in what


def test_a_request_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    import contextlib

    import torch

    import export_onnx
    import vae

    torch.manual_seed(0)
    ckpt, path = str(tmp_path / "wide.pt"), str(tmp_path / "wide.onnx")
    vae.save_checkpoint(ckpt, vae.BetaVAE(vae.VAEConfig(latent_dim=4096)), None, 0, 0, {}, [])
    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx.main(["--checkpoint", ckpt, "--out", path, "--encoder", str(tmp_path / "wide_encoder.onnx")])
    # the largest files the exporter writes (latent 4096; the encoder is the larger) pass, well within MAX_BYTES
    assert onnx_check.load(str(tmp_path / "wide_encoder.onnx"), "encoder").latent == 4096
    assert os.path.getsize(tmp_path / "wide_encoder.onnx") < onnx_check.MAX_BYTES / 1.8

    # refused from the flags alone: under a 4 GiB address space, where its 12.6 GiB of latents cannot even be drawn
    def at_most_4_gib():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, SAMPLE, "--onnx", path, "--traverse", "--steps", "101", "--out", "t.png"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
        preexec_fn=at_most_4_gib,
    )
    assert_one_error_line(proc, "4096 dims x 101 steps is 413,696 images")
    assert "--dims K" in proc.stderr and not (tmp_path / "t.png").exists()
    # the same model, asked for what fits, works; the work goes to onnxruntime in chunks no larger than checked
    calls = []
    real_run = onnx_check.run
    monkeypatch.setattr(onnx_check, "run", lambda m, s, x: calls.append((len(x), m.chunk)) or real_run(m, s, x))
    sample.main(["--onnx", path, "--traverse", "--dims", "2", "--steps", "3", "--out", str(tmp_path / "t.png")])
    assert calls == [(6, 1024)] and (tmp_path / "t.png").exists()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--seed", str(2**64)], f"--seed {2**64} is out of range"),
        (["--temperature", "1e300"], "--temperature 1e+300 is out of range"),
        (["--temperature", "nan"], "--temperature nan is out of range"),
        (["--dims", "2"], "--dims chooses the rows of --traverse"),
        (["--n", "0"], "--n 0 is out of range"),
    ],
)
def test_extreme_flags_are_one_line_without_warnings(decoder, tmp_path, flags, needle):
    proc = run_sample("--onnx", decoder, "--out", "x.png", *flags, cwd=tmp_path)
    assert_one_error_line(proc, needle)
    assert "Warning" not in proc.stderr and not (tmp_path / "x.png").exists()


def test_onnxruntime_prints_nothing_of_its_own_when_a_model_fails_to_run(tmp_path):
    """A model that passed the checks but fails inside onnxruntime: only our line, no coloured onnxruntime log."""
    (tmp_path / "bad.onnx").write_bytes(reshape_model())
    script = (
        "import sys, numpy as np\nfrom plumbing import onnx_check\n"  # checks bypassed on purpose
        "m = onnx_check.Model('bad.onnx', 'decoder', open('bad.onnx', 'rb').read(), {}, 3, (1, 2, 2), 7, 0, "
        "None, None)\n"
        "try:\n    onnx_check.run(m, onnx_check.session(m), np.zeros((2, 3), np.float32))\n"
        "except onnx_check.UsageError as e:\n    print('error:', e, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.stderr.startswith("error: bad.onnx loads but fails to run (")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def carried_files():
    """The files sample.py's docstring says to copy, which must be all it needs."""
    doc = sample.__doc__.replace("\n", " ")
    return re.search(r"copy these files and nothing else: ((?:\S+\.py )+)", doc).group(1).split()


def test_the_sampler_runs_from_exactly_the_documented_files(decoder, tmp_path):
    files = carried_files()
    assert files[0] == "sample.py" and "plumbing/onnx_check.py" in files and "figures.py" in files
    for name in files:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copy(decoder, tmp_path / "decoder.onnx")
    proc = run_without_torch(str(tmp_path / "sample.py"), "--traverse", "--steps", 3, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "traversals.png").exists()
    # and each listed file is needed: without the last one it fails
    os.remove(tmp_path / files[-1])
    proc = run_without_torch(str(tmp_path / "sample.py"), cwd=tmp_path)
    missing = os.path.splitext(os.path.basename(files[-1]))[0]  # `from plumbing import x`: an ImportError
    assert proc.returncode != 0 and re.search(rf"(ModuleNotFoundError|ImportError): .*\b{missing}\b", proc.stderr)


def test_stale_temp_files_of_dead_processes_are_removed(decoder, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a pid that has exited
    host, alive = fileio._host(), subprocess.Popen(["sleep", "60"])
    stale = tmp_path / f".samples.png.{dead}-{host}.abc123de.tmp"
    live = tmp_path / f".samples.png.{alive.pid}-{host}.xyz_1234.tmp"  # another sample.py writing it now
    try:
        stale.write_bytes(b"half a file")
        live.write_bytes(b"being written")
        assert run_sample("--onnx", decoder, "--n", 1, cwd=tmp_path).returncode == 0
        assert not stale.exists() and live.exists()
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no file at"),
        ("not_onnx", "is not an ONNX model"),
        ("encoder_like", "it maps images -> mu, logvar; a decoder maps float z -> images"),
        ("rank2_out", "images has shape ['batch', 784], not [batch, ...]"),
        ("huge", f"is larger than {onnx_check.MAX_BYTES:,} bytes"),
        ("not_png", "--out out.jpg: the grid is written as PNG; give a name ending in .png"),
        ("bad_out", "its folder does not exist"),
        ("clobber", "is the same file as --onnx"),
        ("symlink", "is the same file as --onnx"),
        ("hardlink", "is the same file as --onnx"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(kl_exported, decoder, tmp_path, case, message):
    path, out = str(tmp_path / "model.onnx"), "out.png"
    if case == "missing":
        path = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf \x00\xff" * 10)
    elif case == "encoder_like":  # the exporter's encoder, labelled a decoder: refused for what it maps
        model = onnx.load(kl_exported["encoder"])
        next(p for p in model.metadata_props if p.key == "format").value = "beta-vae-decoder"
        onnx.save(model, path)
    elif case == "rank2_out":  # the exporter's decoder declaring flat images
        model = onnx.load(decoder)
        del model.graph.output[0].type.tensor_type.shape.dim[1:]
        model.graph.output[0].type.tensor_type.shape.dim.add(dim_value=784)
        onnx.save(model, path)
    elif case == "huge":
        with open(path, "wb") as f:
            f.truncate(onnx_check.MAX_BYTES + 1)  # sparse: costs no disk, and sample.py must refuse it by size alone
    elif case == "not_png":  # PNG bytes under a .jpg name would mislead whoever opens it
        path, out = decoder, "out.jpg"
    elif case in ("clobber", "symlink", "hardlink"):  # an output that is the model itself must not overwrite it
        shutil.copy(decoder, path)
        if case == "clobber":
            out = path
        elif case == "symlink":  # a folder link that leads back to the model's folder
            os.symlink(tmp_path, tmp_path / "link")
            out = str(tmp_path / "link" / "model.onnx")
        else:
            os.link(path, tmp_path / "other.png")
            out = str(tmp_path / "other.png")
    else:
        path, out = decoder, "missing/out.png"
    before = open(path, "rb").read() if os.path.isfile(path) and case != "huge" else None
    proc = run_sample("--onnx", path, "--out", out, "--npy", "out.npy", cwd=tmp_path)
    assert_one_error_line(proc, message)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.npy").exists()
    assert not (tmp_path / "out.jpg").exists()
    if before is not None:
        assert open(path, "rb").read() == before


def test_odd_file_names_neither_break_the_title_nor_the_last_line(decoder, tmp_path, monkeypatch):
    """A decoder named with a newline is drawn on one title line; an --out whose bytes are not UTF-8 is printed
    escaped once written, not a UnicodeEncodeError that hides the success."""
    odd = tmp_path / "two\nlines.onnx"
    shutil.copy(decoder, odd)
    out = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"\xff.png"))
    titles, real = [], sample.labelled_grid
    monkeypatch.setattr(sample, "labelled_grid", lambda *a, **k: titles.append(a[2]) or real(*a, **k))
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as a UTF-8 terminal or pipe is
    monkeypatch.setattr(sys, "stdout", stdout)
    sample.main(["--onnx", str(odd), "--n", "4", "--out", out])
    stdout.flush()
    assert os.path.exists(out)
    trained_on = onnx_check.load(decoder, "decoder").meta["trained_on"]  # what it learnt from, in the title
    assert "Fashion-MNIST" in trained_on and "3 epochs" in trained_on
    assert titles[0].count("\n") == 1 and titles[0].startswith(f"two\\nlines.onnx: {trained_on}\nseed 0,")
    assert stdout.buffer.getvalue().decode().startswith(f"wrote {tmp_path}{os.sep}\\udcff.png: 4 images")


# ------------------------------------------------------------------------- default names, --overwrite, Ctrl-C


def test_each_mode_writes_its_own_default_file(decoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flags, name in (
        (["--n", "4"], "samples.png"),
        (["--traverse", "--steps", "3"], "traversals.png"),
        (["--interpolate", "--steps", "3", "--rows", "2"], "interpolations.png"),
    ):
        proc = run_here(sample, "--onnx", decoder, "--scale", "1", *flags)
        assert proc.returncode == 0 and proc.stdout.startswith(f"wrote {name}: "), proc.stderr
        assert pixels(tmp_path / name)[0] == "L"
    # one mode never replaces another's grid
    assert sorted(os.listdir(tmp_path)) == ["interpolations.png", "samples.png", "traversals.png"]


def test_an_existing_output_is_refused_unless_overwrite_is_given(decoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_here(sample, "--onnx", decoder, "--n", "4", "--npy", "s.npy").returncode == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("samples.png", "s.npy")}
    for flags, named in (
        (["--npy", "s.npy"], "--out samples.png already exists"),  # both there
        (["--npy", "new.npy"], "--out samples.png already exists"),  # the grid alone
        (["--out", "new.png", "--npy", "s.npy"], "--npy s.npy already exists"),
    ):  # the arrays alone
        proc = run_here(sample, "--onnx", decoder, "--n", "4", "--seed", "1", *flags)
        assert_one_error_line(proc, named)
        assert "--overwrite" in proc.stderr
        assert {name: (tmp_path / name).read_bytes() for name in before} == before
        assert sorted(os.listdir(tmp_path)) == ["s.npy", "samples.png"]  # and nothing new beside them
    proc = run_here(sample, "--onnx", decoder, "--n", "4", "--seed", "1", "--npy", "s.npy", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / name).read_bytes() != old for name, old in before.items())  # seed 1's, not seed 0's
    z = np.random.default_rng(1).standard_normal((4, 4))
    assert np.array_equal(np.load(tmp_path / "s.npy"), decode(decoder, z))


@pytest.mark.parametrize("when", ["decoding", "writing"])
def test_ctrl_c_is_one_line(decoder, tmp_path, monkeypatch, when):
    out = tmp_path / "g.png"
    if when == "decoding":

        def interrupted(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(onnx_check, "run", interrupted)
    else:  # Ctrl-C while atomic_write_all renames: it finishes, then says so
        real = sample.atomic_write_all

        def interrupted(items):
            real(items)
            raise fileio.Interrupted()

        monkeypatch.setattr(sample, "atomic_write_all", interrupted)
    try:
        proc = run_here(sample, "--onnx", decoder, "--n", "4", "--out", out)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left sample.main as a traceback")
    assert proc.returncode == 130 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if when == "decoding":
        assert proc.stderr == "error: interrupted; nothing was written\n" and os.listdir(tmp_path) == []
    else:
        assert proc.stderr == f"error: interrupted after writing {out}\n" and os.listdir(tmp_path) == ["g.png"]
