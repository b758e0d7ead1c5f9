"""The decoder and encoder shipped in examples/: they pass the project's own checks, carry what they were trained on
and no local path, and decode to images a person would call clothes, not blobs: real test images go through the
encoder and back and each comes out nearest to itself; prior samples differ from each other."""

import json
import os

import numpy as np
import pytest
from conftest import ROOT, run_without_torch

from plumbing import onnx_check

EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module")
def shipped():
    models = {kind: onnx_check.load(os.path.join(EXAMPLES, f"{kind}.onnx"), kind) for kind in ("decoder", "encoder")}
    return models, {kind: onnx_check.session(m) for kind, m in models.items()}


def test_the_shipped_files_pass_the_checks_and_say_what_they_are(shipped):
    models, _ = shipped
    for kind, m in models.items():
        assert os.path.getsize(os.path.join(EXAMPLES, f"{kind}.onnx")) < 400_000, kind
        meta = m.meta
        assert meta["trained_on"].startswith("Fashion-MNIST subset, 8,517 training images, 20 epochs"), meta
        assert json.loads(meta["model_args"])["beta"] == 4 and meta["objective"] == "beta"
        assert meta["source_checkpoint"] == "run/checkpoint.pt" and len(meta["checkpoint_sha256"]) == 64
        assert not [v for v in meta.values() if "/" + "home" in v or "/work" in v or "/tmp" in v], meta
    assert models["decoder"].meta["checkpoint_sha256"] == models["encoder"].meta["checkpoint_sha256"]
    assert models["decoder"].kl is not None and sum(k > onnx_check.ACTIVE_KL for k in models["decoder"].kl) >= 3


def test_real_test_images_come_back_nearest_to_themselves(shipped):
    models, sessions = shipped
    with np.load(os.path.join(EXAMPLES, "test_images.npz")) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (10, 28, 28) and sorted(labels) == list(range(10))  # one of each class
    x = (images / 255.0).astype(np.float32)[:, None]
    mu, _ = onnx_check.run(models["encoder"], sessions["encoder"], x * 2 - 1)  # the encoder takes [-1, 1]
    back = onnx_check.run(models["decoder"], sessions["decoder"], mu)[0]
    dist = ((back[:, None] - x[None]) ** 2).mean(axis=(2, 3, 4))  # [reconstruction, original]
    assert (dist.argmin(axis=1) == np.arange(10)).sum() >= 9, dist.round(3)
    flat = ((x - x.mean(0)) ** 2).mean(axis=(1, 2, 3))  # the mean image as every reconstruction
    assert (np.diag(dist) < flat).all() and np.diag(dist).mean() < 0.4 * flat.mean(), (np.diag(dist), flat)


def test_prior_samples_are_varied_images_not_blobs(shipped):
    models, sessions = shipped
    z = np.random.default_rng(0).standard_normal((64, models["decoder"].latent)).astype(np.float32)
    images = onnx_check.run(models["decoder"], sessions["decoder"], z)[0].reshape(64, -1)
    assert images.std(axis=1).min() > 0.05  # each has a garment on a dark field, none is flat
    apart = np.abs(images[:, None] - images[None]).mean(-1)[np.triu_indices(64, 1)]
    assert np.median(apart) > 0.1 and apart.min() > 0.01  # no two alike


def test_the_readmes_first_command_works_without_torch(tmp_path):
    proc = run_without_torch(
        os.path.join(ROOT, "sample.py"), "--onnx", os.path.join(EXAMPLES, "decoder.onnx"), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "samples.png").stat().st_size > 1000
