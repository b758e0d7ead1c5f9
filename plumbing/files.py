"""Writing files safely (torch-free): atomic replaces, outputs that never clobber inputs, leftovers of killed runs.

Every file this project writes goes through a temporary file in the same folder, named
`.<name>.<pid>-<host>.<8 random characters>.tmp`, and a rename, so a reader never sees half a file (a folder, such
as explore.py's site, likewise). A process killed mid-write (SIGKILL, power cut) leaves its temp file behind;
`clean_stale_temps(folder, names)` removes those of the outputs `names` that a process of this machine left and that
no longer runs, the next time a script writes them.
"""
import hashlib
import os
import re
import shutil
import socket
import tempfile

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})\.[a-z0-9_]{8}\.tmp$")


def _host():
    """6 hex digits naming this machine: a folder shared over a network holds other machines' live temp files."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


def _prefix(path):
    return f".{os.path.basename(path)}.{os.getpid()}-{_host()}."


def _temp_for(path):
    folder = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(dir=folder, prefix=_prefix(path), suffix=".tmp")


def _write_temp(path, write_fn):
    fd, tmp = _temp_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write(path, write_fn):
    """write_fn(binary file) into a temporary file beside `path`, then rename: `path` is the old file or the new one."""
    tmp = _write_temp(path, write_fn)
    try:
        os.replace(tmp, os.fspath(path))
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_all(items):
    """Write several files as one: afterwards either every path holds its new content or every path is as before.

    items: [(path, write_fn)]. Everything is written to temporary files first (a full disk fails here, before any
    path changes); old files are kept as hard links (copies on a file system without them: FAT, some network
    shares) until every rename has happened, and put back if one fails. This holds for every error Python sees. A
    SIGKILL in the microseconds between two renames leaves a new file beside an old one (its old copy, a temp file,
    is then removed by the next clean_stale_temps).
    """
    temps, backups, done = [], {}, []
    try:
        for path, write_fn in items:
            temps.append((os.fspath(path), _write_temp(path, write_fn)))
        for path, tmp in temps:
            if os.path.exists(path):
                fd, backup = _temp_for(path)
                os.close(fd)
                os.unlink(backup)
                backups[path] = backup   # removed at the end, whatever happens
                try:
                    os.link(path, backup)
                except OSError:   # no hard links here: a copy (a full disk fails here, before any path changes)
                    shutil.copyfile(path, backup)
                    try:
                        shutil.copymode(path, backup)   # a rollback puts it back as it was
                    except OSError:
                        pass
        for path, tmp in temps:
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in done:  # put the old files back (or remove new files that had no old one)
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                _unlink(path)
        for _, tmp in temps:
            _unlink(tmp)
        raise
    finally:
        for backup in backups.values():
            _unlink(backup)


def replace_dir(path, build_fn):
    """build_fn(folder) fills a new temporary folder beside `path`, which then takes the place of `path`.

    A reader sees the old folder or the new one, never half of one; if build_fn fails, `path` is as it was.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    new = tempfile.mkdtemp(dir=parent, prefix=_prefix(path), suffix=".tmp")
    old = None
    try:
        build_fn(new)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(new, 0o777 & ~umask)  # mkdtemp makes 0700; a folder to be served gets the usual permissions
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
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def clean_stale_temps(folder, names):
    """Remove the temporary files (or replace_dir's folders) of the outputs `names` in `folder` that a process of
    this machine and user left and that no longer runs. Anything else, a user's look-alike included, stays."""
    removed, names, host = [], set(names), _host()
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry)
        if not m or m["name"] not in names or m["host"] != host or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        path = os.path.join(folder, entry)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            if os.path.isdir(path) and not os.path.islink(path):  # a folder replace_dir was building
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(entry)
        except OSError:
            pass
    return removed


def clean_stale_temps_for(paths):
    """clean_stale_temps for each output path (None skipped), folder by folder."""
    folders = {}
    for p in paths:
        if p is not None:
            p = os.path.abspath(p)
            folders.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
    return [e for folder, names in folders.items() for e in clean_stale_temps(folder, names)]


def same_file(a, b):
    """Whether two paths name one file: through symlinks, `..`, hard links or case-insensitive file systems."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): then they are one file only if they resolve alike
        return False


def clashes(inputs, outputs):
    """Names the first output that would replace an input or another output, or None.

    inputs, outputs: {flag: path} (a path may be None: not used). Paths are compared by what they resolve to.
    """
    seen = [(flag, p) for flag, p in inputs.items() if p is not None]
    for flag, path in outputs.items():
        if path is None:
            continue
        for other_flag, other in seen:
            if same_file(path, other):
                return f"{flag} {path} is the same file as {other_flag} {other}"
        seen.append((flag, path))
    return None
