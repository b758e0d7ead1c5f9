"""Reading and writing files safely (torch-free). Reading takes only a regular file (never a FIFO that blocks, a device
that never ends, a folder), opened once, so what was checked is what is read. Writing goes through a temporary file,
`.<name>.<pid>-<host>.<8 characters>.tmp`, and a rename, so a reader never sees half a file; a process killed mid-write
leaves its temporary file, which clean_stale_temps() removes once that process has gone.
"""

import contextlib
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import zipfile

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})\.[a-z0-9_]{8}\.tmp$")


class NotReadable(Exception):
    """A file that is missing, not a regular file, too large or unreadable; the message says which."""


def open_regular(path):
    """`path` opened (rb) if a regular file, else NotReadable; O_NONBLOCK: a FIFO opens at once, for fstat to refuse."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise NotReadable("does not exist") from None
    except OSError as e:
        raise NotReadable(f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotReadable("is not a regular file (a folder, a FIFO or a device)")
    return os.fdopen(fd, "rb")


def read_regular(path, limit):
    """The bytes of the regular file `path`, at most `limit` of them (NotReadable for a larger file)."""
    with open_regular(path) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise NotReadable(f"cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise NotReadable(f"is larger than {limit:,} bytes")
    return data


def zip_problem(data):
    """Why the bytes are not a zip archive whose records are stored as they are (torch.save and numpy.savez write
    such), or None: a compressed record's size says nothing of what it unpacks to."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"not a zip archive as torch.save writes: {(str(e).strip().splitlines() or [type(e).__name__])[0][:120]}"
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            return f"its record {info.filename[:80]!r} is compressed, which torch.save never does"
    if (declared := sum(info.file_size for info in records)) > len(data):
        return f"its records declare {declared:,} bytes, more than its {len(data):,}"
    return None


def _host():
    """6 hex digits naming this machine: a folder shared over a network holds other machines' live temp files."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


_prefix = lambda path: f".{os.path.basename(path)}.{os.getpid()}-{_host()}."
_temp_for = lambda p: tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(p)), prefix=_prefix(p), suffix=".tmp")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temp(path, write):
    """A temporary file beside `path` holding write(file)'s output (or the bytes `write`), flushed to disk."""
    fd, tmp = _temp_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f) if callable(write) else f.write(write)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def atomic_write(path, write):
    """write(binary file), or the bytes `write`, into a temporary file renamed to `path`: it is the old or the new."""
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, os.fspath(path))
    except BaseException:
        _unlink(tmp)
        raise


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM arrived while atomic_write_all put files in place: they were all put in place first."""


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM noted rather than acted on inside the block (main thread only); yields the list of them."""
    held = []
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signals}
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def atomic_write_all(items):
    """Write items [(path, write function or bytes)] as one: every path holds its new content, or all are as they were.
    Temporary files first (a full disk fails before any path changes); old files stay as hard links (or copies) until
    every rename is done, put back if one fails. Ctrl-C and SIGTERM wait for the renames (or their undoing), then raise
    Interrupted; a SIGKILL between renames leaves the old files' copies to clean_stale_temps()."""
    temps, backups, done = [], {}, []
    try:
        for path, write in items:
            temps.append((os.fspath(path), _write_temp(path, write)))
        with _signals_held() as held:
            try:
                for path, _ in temps:
                    if os.path.exists(path):
                        fd, backup = _temp_for(path)
                        os.close(fd)
                        os.unlink(backup)
                        backups[path] = backup
                        try:
                            os.link(path, backup)
                        except OSError:  # no hard links here: a copy, with the file's mode
                            shutil.copyfile(path, backup)
                            with contextlib.suppress(OSError):
                                shutil.copymode(path, backup)
                for path, tmp in temps:
                    done.append(path)  # before the rename: a rollback checks whether it happened
                    os.replace(tmp, path)
            except BaseException:
                for path, tmp in temps:
                    if path in done and not os.path.exists(tmp):  # its rename happened
                        os.replace(backups.pop(path), path) if path in backups else _unlink(path)
                raise
    finally:
        for _, tmp in temps:
            _unlink(tmp)
        for backup in backups.values():
            _unlink(backup)
    if held:
        raise Interrupted()


def replace_dir(path, build):
    """build(folder) fills a temporary folder that replaces `path` once built: readers see the old or the new one."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    new, old = tempfile.mkdtemp(dir=parent, prefix=_prefix(path), suffix=".tmp"), None
    try:
        build(new)
        os.chmod(new, 0o777 & ~_umask())  # mkdtemp makes 0700; a folder to be served gets the usual permissions
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=_prefix(path), suffix=".tmp")
            os.rename(path, os.path.join(old, name))
        os.rename(new, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.rename(os.path.join(old, name), path)
        shutil.rmtree(new, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid):
    try:
        with contextlib.suppress(PermissionError):  # someone else's live process
            os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    return True


def clean_stale_temps(folder, names):
    """Remove the temporary files (or replace_dir's folders) of the outputs `names` in `folder` that a process of this
    machine and user left and that no longer runs. Anything else, a user's look-alike included, stays."""
    removed, names, host = [], set(names), _host()
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry)
        ours = m and m["name"] in names and m["host"] == host and int(m["pid"]) != os.getpid()
        path = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            if ours and not _alive(int(m["pid"])) and os.lstat(path).st_uid == os.getuid():
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                removed.append(entry)
    return removed


def clean_stale_temps_for(paths):
    """clean_stale_temps for each output path (None skipped), folder by folder."""
    folders = {}
    for p in map(os.path.abspath, filter(None, paths)):
        folders.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
    return [e for folder, names in folders.items() for e in clean_stale_temps(folder, names)]


def same_file(a, b):
    """Whether two paths name one file: through symlinks, `..`, hard links or case-insensitive file systems."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    with contextlib.suppress(OSError):  # one does not exist (yet): then they are one file only if they resolve alike
        return a == b or os.path.samefile(a, b)
    return False


def clashes(inputs, outputs):
    """A message naming the first output that would replace an input or another output ({flag: path}s), or None."""
    seen = [(flag, p) for flag, p in inputs.items() if p is not None]
    for flag, path in [(flag, p) for flag, p in outputs.items() if p is not None]:
        for other_flag, other in seen:
            if same_file(path, other):
                return f"{flag} {path} is the same file as {other_flag} {other}"
        seen.append((flag, path))
    return None
