"""fileio.py: several files written as one, same-file checks through links, leftovers of killed processes."""

import errno
import os
import subprocess
import sys

import pytest

from plumbing import files as fileio


def write(data):
    return lambda f: f.write(data)


def full_disk(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "decoder.onnx", tmp_path / "encoder.onnx"
    a.write_bytes(b"old decoder")
    b.write_bytes(b"old encoder")
    return a, b


def test_both_files_are_replaced_together(pair):
    a, b = pair
    fileio.atomic_write_all([(a, write(b"new decoder")), (b, write(b"new encoder"))])
    assert a.read_bytes() == b"new decoder" and b.read_bytes() == b"new encoder"
    assert listing(a.parent) == ["decoder.onnx", "encoder.onnx"]  # no temp file, no backup left


def test_a_full_disk_on_the_second_file_leaves_both_as_before(pair):
    a, b = pair
    with pytest.raises(OSError) as e:
        fileio.atomic_write_all([(a, write(b"new decoder")), (b, full_disk)])
    assert e.value.errno == errno.ENOSPC
    assert a.read_bytes() == b"old decoder" and b.read_bytes() == b"old encoder"
    assert listing(a.parent) == ["decoder.onnx", "encoder.onnx"]


def no_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")  # as FAT and some network shares answer os.link


@pytest.mark.parametrize("links", [True, False])
def test_a_failing_second_rename_puts_the_first_file_back(pair, monkeypatch, links):
    a, b = pair
    a.chmod(0o600)
    if not links:  # the old files are kept as copies instead
        monkeypatch.setattr(fileio.os, "link", no_links)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError):
        fileio.atomic_write_all([(a, write(b"new decoder")), (b, write(b"new encoder"))])
    monkeypatch.undo()
    assert a.read_bytes() == b"old decoder" and b.read_bytes() == b"old encoder"
    assert a.stat().st_mode & 0o777 == 0o600  # put back as it was, mode too
    assert listing(a.parent) == ["decoder.onnx", "encoder.onnx"]


def test_without_hard_links_both_files_are_still_replaced_together(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(fileio.os, "link", no_links)
    fileio.atomic_write_all([(a, write(b"new decoder")), (b, write(b"new encoder"))])
    assert a.read_bytes() == b"new decoder" and b.read_bytes() == b"new encoder"
    assert listing(a.parent) == ["decoder.onnx", "encoder.onnx"]


def test_a_failure_when_neither_file_existed_leaves_neither(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(OSError):
        fileio.atomic_write_all([(a, write(b"new")), (b, full_disk)])
    assert listing(tmp_path) == []


def test_same_file_sees_through_symlinks_and_hard_links(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.onnx"
    target.write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.link(target, tmp_path / "hard.onnx")
    assert fileio.same_file(target, tmp_path / "link" / "model.onnx")
    assert fileio.same_file(target, tmp_path / "hard.onnx")
    assert fileio.same_file(tmp_path / "link" / "new.png", tmp_path / "real" / "new.png")  # neither exists yet
    assert not fileio.same_file(target, tmp_path / "real" / "other.onnx")
    assert (
        fileio.clashes({"--onnx": str(target)}, {"--out": str(tmp_path / "hard.onnx"), "--npy": None})
        == f"--out {tmp_path / 'hard.onnx'} is the same file as --onnx {target}"
    )
    assert fileio.clashes({"--onnx": str(target)}, {"--out": "a.png", "--npy": "a.png"}).startswith("--npy a.png")


def test_stale_temps_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    live = subprocess.Popen(["sleep", "60"])
    host = fileio._host()
    try:
        names = [
            f".decoder.onnx.{dead}-{host}.k2j3x_9q.tmp",  # ours, its process gone: removed
            f".decoder.onnx.{live.pid}-{host}.a1b2c3d4.tmp",  # ours, its process alive
            f".decoder.onnx.{dead}-0f0f0f.k2j3x_9q.tmp",  # another machine's (a shared folder)
            f".notes.txt.{dead}-{host}.k2j3x_9q.tmp",  # not an output of this call
            f".decoder.onnx.{dead}-{host}.old.tmp",  # a user's look-alike
            "decoder.onnx",
            f"decoder.onnx.{dead}-{host}.k2j3x_9q.tmp",
        ]
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        assert fileio.clean_stale_temps(tmp_path, ["decoder.onnx"]) == [names[0]]
        assert listing(tmp_path) == sorted(names[1:])
        assert fileio.clean_stale_temps_for([tmp_path / "notes.txt", None]) == [names[3]]
    finally:
        live.kill()
        live.wait()


def test_replace_dir_swaps_a_whole_folder_or_leaves_the_old_one(tmp_path):
    site = tmp_path / "site"

    def build(text):
        return lambda folder: open(os.path.join(folder, "index.html"), "w").write(text)

    fileio.replace_dir(site, build("one"))
    fileio.replace_dir(site, build("two"))
    assert (site / "index.html").read_text() == "two" and listing(tmp_path) == ["site"]

    def half_then_fail(folder):
        build("half")(folder)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        fileio.replace_dir(site, half_then_fail)
    assert (site / "index.html").read_text() == "two" and listing(tmp_path) == ["site"]
