"""data.py reads IDX files in both splits, scales batches right, and shuffles on the device."""
import numpy as np
import pytest
import torch

import data
import idx
from conftest import make_images


def test_reads_both_splits(tiny_data):
    for split, n in (("train", 256), ("test", 128)):
        images, labels = data.load_split(tiny_data, split, download=False)
        assert images.dtype == torch.uint8 and images.shape == (n, 28, 28)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
    expected, expected_labels = make_images(128, 1)
    images, labels = data.load_split(tiny_data, "test", download=False)
    assert np.array_equal(images.numpy(), expected) and np.array_equal(labels.numpy(), expected_labels)


def test_reads_gzipped_files(tmp_path):
    import gzip
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs, labels = make_images(20, 3)
    for name, arr in (("t10k-images-idx3-ubyte", imgs), ("t10k-labels-idx1-ubyte", labels)):
        idx.write_idx(raw / "plain", arr)
        (raw / (name + ".gz")).write_bytes(gzip.compress((raw / "plain").read_bytes()))
    images, lab = data.load_split(str(tmp_path), "test", download=False)
    assert np.array_equal(images.numpy(), imgs) and np.array_equal(lab.numpy(), labels)


def test_batches_are_scaled_for_encoder_and_bce():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).repeat(1, 784 // 3 + 1)[:, :784].reshape(1, 28, 28)
    d = data.DeviceData(u8, torch.tensor([3]), "cpu")
    x, target, y = next(d.batches(8))
    assert x.shape == target.shape == (1, 1, 28, 28) and y.tolist() == [3]
    assert target.flatten()[:3].tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert x.flatten()[:3].tolist() == pytest.approx([-1.0, -0.6, 1.0])


def test_batch_innermost_batches_hold_the_same_values_in_the_compiled_steps_layout(tiny_data):
    images, _ = data.load_split(tiny_data, "train")
    d = data.DeviceData(images, torch.arange(len(images)), "cpu")
    for shuffle in (False, True):
        plain = d.batches(50, shuffle, torch.Generator().manual_seed(3))
        inner = d.batches(50, shuffle, torch.Generator().manual_seed(3), batch_innermost=True)
        for (x, t, y), (xi, ti, yi) in zip(plain, inner, strict=True):
            assert torch.equal(x, xi) and torch.equal(t, ti) and torch.equal(y, yi)
            B = len(x)
            assert xi.reshape(B, -1).t().is_contiguous() and ti.reshape(B, -1).t().is_contiguous()   # (pixels, B)


def test_shuffling_covers_every_image_once_and_follows_the_generator(tiny_data):
    images, _ = data.load_split(tiny_data, "train")
    d = data.DeviceData(images, torch.arange(len(images)), "cpu")  # image indices as labels: duplicates would show
    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, _, y in d.batches(50, shuffle=True, generator=g)]), \
            [len(x) for x, _, _ in d.batches(50, shuffle=True, generator=torch.Generator().manual_seed(seed))]
    a, sizes = order(0)
    b, _ = order(0)
    c, _ = order(1)
    assert sizes == [50, 50, 50, 50, 50, 6]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(len(images)))  # a permutation: every image exactly once
    unshuffled = torch.cat([y for _, _, y in d.batches(50)])
    assert torch.equal(unshuffled, d.labels) and not torch.equal(a, unshuffled)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(data.DataError, match="FashionMNIST/raw"):
        data.load_split(str(tmp_path), "train", download=False)
