"""data.py: IDX files read in both splits, batches scaled and shuffled on the device, and the sprites set with its
known factors: every combination once, the same pixels everywhere, a fixed test split."""

import gzip
import hashlib
import os

import numpy as np
import pytest
import torch
from conftest import make_images

import data


def test_reads_both_splits(tiny_data):
    for split, n in (("train", 256), ("test", 128)):
        d = data.load(tiny_data, split, "cpu", download=False)
        assert d.images.dtype == torch.uint8 and d.images.shape == (n, 1, 28, 28)
        assert d.labels.dtype == torch.int64 and d.labels.shape == (n,) and d.factors is None
    expected, expected_labels = make_images(128, 1)
    images, labels = data.read_split(tiny_data, "test")
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)


def test_reads_gzipped_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs, labels = make_images(20, 3)
    for name, arr in (("t10k-images-idx3-ubyte", imgs), ("t10k-labels-idx1-ubyte", labels)):
        data.write_idx(raw / "plain", arr)
        (raw / (name + ".gz")).write_bytes(gzip.compress((raw / "plain").read_bytes()))
    images, lab = data.read_split(str(tmp_path), "test")
    assert np.array_equal(images, imgs) and np.array_equal(lab, labels)


def test_batches_are_scaled_for_encoder_and_bce():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).repeat(1, 784 // 3 + 1)[:, :784].reshape(1, 28, 28)
    d = data.DeviceData(u8, [3], "cpu")
    x, target, y = next(d.batches(8))
    assert x.shape == target.shape == (1, 1, 28, 28) and y.tolist() == [3]
    assert target.flatten()[:3].tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert x.flatten()[:3].tolist() == pytest.approx([-1.0, -0.6, 1.0])


def test_shuffling_covers_every_image_once_and_follows_the_generator(tiny_data):
    images, _ = data.read_split(tiny_data, "train")
    d = data.DeviceData(images, np.arange(len(images)), "cpu")  # image indices as labels: duplicates would show

    def order(seed):
        batches = list(d.batches(50, shuffle=True, generator=torch.Generator().manual_seed(seed)))
        return torch.cat([y for _, _, y in batches]), [len(x) for x, _, _ in batches]

    (a, sizes), (b, _), (c, _) = order(0), order(0), order(1)
    assert sizes == [50, 50, 50, 50, 50, 6]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(len(images)))  # a permutation: every image exactly once
    unshuffled = torch.cat([y for _, _, y in d.batches(50)])
    assert torch.equal(unshuffled, d.labels) and not torch.equal(a, unshuffled)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(data.DataError, match="FashionMNIST/raw"):
        data.load(str(tmp_path), "train", "cpu", download=False)


def test_a_data_file_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    os.mkfifo(raw / "t10k-images-idx3-ubyte")  # a reader that opened it would wait for a writer forever
    os.symlink("/dev/zero", raw / "t10k-labels-idx1-ubyte")  # and one that read it would never reach its end
    for name in data.FILES["test"]:
        with pytest.raises(data.DataError, match="is not a regular file"):
            data.read_idx(str(raw / name), 3 if "images" in name else 1)


# ----------------------------------------------------------------------------------------------- sprites


@pytest.fixture(scope="module")
def sprites():
    return data.make_sprites()


def grid(images):
    return images.reshape(data.LEVELS + (28, 28)).astype(np.float64)


def test_sprites_hold_every_combination_of_five_factors_once(sprites):
    images, factors = sprites
    n = int(np.prod(data.LEVELS))
    assert data.SPRITE_FACTORS == ("shape", "scale", "orientation", "x", "y") and data.LEVELS == (3, 5, 8, 15, 15)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and factors.shape == (n, 5)
    assert (np.ravel_multi_index(factors.T, data.LEVELS) == np.arange(n)).all()  # row i is combination i
    assert len({hashlib.sha1(im.tobytes()).digest() for im in images}) == n  # every image distinct
    assert images.max() == 255 and images[:, [0, -1]].max() == 0 and images[:, :, [0, -1]].max() == 0  # inside


def test_sprites_are_the_same_pixels_everywhere(sprites):
    again = data.make_sprites.__wrapped__()  # drawn again, without the cache
    assert np.array_equal(again[0], sprites[0])
    # pinned: no sub-pixel sample sits on a shape's edge, so cos/sin rounding cannot flip a pixel between machines
    assert hashlib.sha256(sprites[0].tobytes()).hexdigest()[:16] == "2dccf9098bc6d8c8"


def test_each_factor_does_what_its_name_says(sprites):
    g = grid(sprites[0])
    w = g.sum((-2, -1))
    cols, rows = (g * np.arange(28)).sum((-2, -1)) / w, (g * np.arange(28)[:, None]).sum((-2, -1)) / w
    np.testing.assert_allclose(np.diff(cols, axis=3), 1.0, atol=1e-9)  # x + 1 level: one pixel right
    np.testing.assert_allclose(np.diff(rows, axis=4), 1.0, atol=1e-9)  # y + 1 level: one pixel down
    assert (np.diff(w, axis=1) > 0).all()  # a larger scale, more ink
    assert (np.abs(np.diff(g, axis=2)).sum((-2, -1)) > 0).all()  # every rotation moves pixels


def test_the_sprites_test_split_is_fixed_disjoint_and_a_third(sprites):
    (train, f_train), (test, f_test) = data.sprite_split("train"), data.sprite_split("test")
    assert len(test) == len(sprites[0]) // 3 and len(train) + len(test) == len(sprites[0])
    key = lambda f: set(np.ravel_multi_index(f.T, data.LEVELS).tolist())
    assert not key(f_train) & key(f_test)
    assert np.array_equal(data.sprite_split("test")[1], f_test)  # the same split every time
    assert np.bincount(f_test[:, 0]).min() > len(test) / 3 - 200  # every shape well represented
    d = data.load(None, "test", "cpu", dataset="sprites")
    assert len(d) == len(test) and np.array_equal(d.factors, f_test) and d.labels.tolist() == f_test[:, 0].tolist()
