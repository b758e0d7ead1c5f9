"""idxfile.py: the torch-free IDX reader checks the header first and reads only what it declares."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import idxfile
from conftest import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_plain_and_gzip(tmp_path):
    images = make_images(5, 0)[0]
    idxfile.write_idx(tmp_path / "a", images)
    with open(tmp_path / "a", "rb") as f, gzip.open(tmp_path / "a.gz", "wb") as g:
        g.write(f.read())
    for name in ("a", "a.gz"):
        assert np.array_equal(idxfile.read_idx(str(tmp_path / name), 3), images)


def test_a_gzip_bomb_costs_no_more_than_its_header_allows(tmp_path):
    """A valid header declaring 8 x 28 x 28 bytes, then 200 MB of zeros: refused after reading 6 KB of them."""
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=9) as g:
        g.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 8, 28, 28))
        for _ in range(200):
            g.write(bytes(2**20))
    assert os.path.getsize(path) < 1_000_000
    code = ("import sys, idxfile\n"  # VmHWM: this process's peak; ru_maxrss would include the forking parent's
            "try:\n    idxfile.read_idx(sys.argv[1], 3)\nexcept idxfile.DataError as e:\n    print(e)\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    message, peak_kib = proc.stdout.splitlines()
    assert "longer than its header says" in message
    assert int(peak_kib) < 120_000  # KiB: numpy's own start-up, far below the 200 MB the stream holds


def test_a_sparse_file_with_a_bad_magic_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
        f.truncate(6 * 2**30)  # 6 GB that cost no disk
    with pytest.raises(idxfile.DataError, match="bad magic number"):
        idxfile.read_idx(str(path), 3)


def test_a_header_declaring_gigabytes_in_a_gz_file_is_refused_at_once(tmp_path):
    path = tmp_path / "big.gz"
    with gzip.open(path, "wb") as g:
        g.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 60000, 1000, 1000))
    with pytest.raises(idxfile.DataError, match="far more than any Fashion-MNIST file"):
        idxfile.read_idx(str(path), 3)


def test_a_corrupt_deflate_stream_is_a_data_error(tmp_path):
    path = tmp_path / "bad.gz"
    good = gzip.compress(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 5000) + os.urandom(5000))
    path.write_bytes(good[:20] + bytes(b ^ 0x5A for b in good[20:60]) + good[60:])
    with pytest.raises(idxfile.DataError, match="cannot read"):
        idxfile.read_idx(str(path), 1)
