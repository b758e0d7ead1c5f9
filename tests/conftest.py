"""Shared fixtures: tiny Fashion-MNIST-shaped data written as IDX files, and a tiny trained checkpoint.

Tests never read the real data set; every image here is made by the test run itself.
"""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest

# pytest.ini runs test files side by side, so test processes share the cores: sleeping rather than spinning OpenMP
# threads keeps them from stalling each other (docs/speed.md, "A busy CPU"); it beat one thread per process too. Set
# before torch is imported; scripts the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import warm

import data

# Test files start longest first (pytest.ini turns off xdist's own order, by number of tests), so that no long file
# starts last while the other worker has nothing left to do. Files not named here follow in the usual order.
LONGEST_FIRST = ("test_sweep.py", "test_reliability.py", "test_bench.py", "test_evaluate.py", "test_boundaries.py")


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # pytest's own process, before it starts workers: one warm server for all
        warm.share()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        warm.stop()


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


def make_images(n, seed):
    """n 28x28 uint8 images in 10 classes: each class a different bright shape on a dark field, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:28, 0:28]
    imgs = np.zeros((n, 28, 28), dtype=np.float32)
    for i, c in enumerate(labels):
        cy, cx = 8 + (c % 3) * 6, 8 + (c // 3) * 4
        size = 3 + c % 4
        imgs[i] = ((np.abs(yy - cy) < size) & (np.abs(xx - cx) < size + c % 2 * 3)) * 200.0
    imgs += rng.normal(0, 20, imgs.shape)
    return np.clip(imgs, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_dataset(root, n_train=256, n_test=128, seed=0):
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        imgs, labels = make_images(n, s)
        img_name, lbl_name = data.FILES[split]
        data.write_idx(os.path.join(raw, img_name), imgs)
        data.write_idx(os.path.join(raw, lbl_name), labels)
    return str(root)


@pytest.fixture
def tiny_data(tmp_path):
    """A data directory with 256 train and 128 test images in torchvision's layout."""
    return write_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a model trained for a few steps on tiny data (shared by the session; do not modify)."""
    import torch

    import vae

    root = tmp_path_factory.mktemp("ckpt")
    data_dir = write_dataset(root / "data")
    torch.manual_seed(0)
    config = vae.VAEConfig(latent_dim=4, beta=1.0)
    model = vae.BetaVAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = data.load(data_dir, "train", "cpu")
    for _ in range(3):
        for x, target, _ in train.batches(32, shuffle=True):
            logits, mu, logvar = model(x)
            loss = vae.vae_loss(logits, target, mu, logvar, config).total.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = str(root / "checkpoint.pt")
    vae.save_checkpoint(path, model, opt, epoch=3, seed=0, train_args={"epochs": 3}, metrics=[])
    return {"path": path, "data_dir": data_dir}


# Runs a script with a meta-path finder in front that refuses torch and every torch.* module, as an interpreter
# without torch installed would. argv: [script, args...]. The script's own folder is the only project folder on the
# path, so a copy of the script in a temporary folder sees only the files copied beside it.
NO_TORCH = r"""
import os, runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
sys.path[:] = [os.path.dirname(os.path.abspath(sys.argv[0]))] + [p for p in sys.path if p not in ("", os.getcwd())]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without_torch(script, *args, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )


def reshape_model():
    """ONNX bytes of a one-node model, z (batch, 3) -> images (batch, 1, 2, 2) by a Reshape that fails at run time
    (3 values cannot fill 4): no exporter wrote it, so the checks refuse it; past them, onnxruntime fails on it."""
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 2, 2])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["z", "shape"], ["images"])],
        "g",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


KL = [0.01, 2.5, 0.7, 1.6]  # the per-dimension test KL that `kl_exported` puts in the checkpoint's history


@pytest.fixture(scope="session")
def kl_exported(tiny_checkpoint, tmp_path_factory):
    """decoder.onnx and encoder.onnx of tiny_checkpoint, with a one-epoch history whose test KL per dim is KL."""
    import contextlib
    import io

    import torch

    import export_onnx

    folder = tmp_path_factory.mktemp("exported")
    ckpt = torch.load(tiny_checkpoint["path"], weights_only=True)
    record = {"recon": 1.0, "kl": sum(KL), "total": 2.0, "kl_per_dim": KL}
    ckpt["metrics"] = [{"epoch": 3, "step": 24, "train": record, "test": record, "img_per_s": 1000.0}]
    torch.save(ckpt, folder / "checkpoint.pt")
    paths = {k: str(folder / f"{k}.onnx") for k in ("decoder", "encoder")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            export_onnx.main(
                [
                    "--checkpoint",
                    str(folder / "checkpoint.pt"),
                    "--out",
                    paths["decoder"],
                    "--encoder",
                    paths["encoder"],
                ]
            )
            == 0
        )
    return dict(paths, checkpoint=str(folder / "checkpoint.pt"), data_dir=tiny_checkpoint["data_dir"])


# Download tests must not depend on the network: a mirror on a closed local port fails at once, everywhere.
@pytest.fixture
def offline(monkeypatch):
    """In-process: every Fashion-MNIST mirror is a closed local port."""
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])


@contextlib.contextmanager
def in_process(threads=None):
    """Run a script's main() in this process, its stdout and stderr captured (yields (stdout, stderr) StringIOs);
    signal handlers and the thread count are put back afterwards. No process, so no start-up, is paid for."""
    import signal

    import torch

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        torch.set_num_threads(before)
        for s, h in handlers.items():
            signal.signal(s, h)


def run_here(module, *args, threads=None):
    """subprocess.run's CompletedProcess (returncode, stdout, stderr) of module.main(args), run in this process: for
    what a script decides and writes, not for how its process starts, is signalled or exits (tested in processes of
    their own, with tests/warm.py: the train.py and sample.py cases of test_a_wrongly_typed_flag_is_one_line,
    test_killed_training_resumes_to_the_same_weights and others)."""
    argv = [str(a) for a in args]
    with in_process(threads) as (out, err):
        try:
            code = module.main(argv)
        except SystemExit as e:
            code = e.code
    code = 0 if code is None else code  # as sys.exit(main()) exits
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_main(module, argv):
    """(exit status, stderr) of run_here: for refusals decided from the flags alone."""
    proc = run_here(module, *argv)
    return proc.returncode, proc.stderr
