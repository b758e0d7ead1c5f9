"""Script runs for the tests as new processes forked from one interpreter that has imported torch already.

`python train.py ...` spends seconds importing torch, and an optimizer's first use imports torch._dynamo, before the
script does anything; the suite starts dozens of such processes. `run` and `start` stand in for subprocess.run and
subprocess.Popen of [sys.executable, script, *args] (text mode, stdout and stderr captured): each run is still a
process of its own, with its own pid, exit status, signals, pipes, working folder, environment and file-size limit,
and the interpreter handles its exit and uncaught exceptions as for any script; but it is forked from a server that
imported torch (numpy with it) and constructed an optimizer once. What a fork cannot change is what the interpreter and
the libraries read when they start (thread counts, locale, allocator and temporary-folder variables among them), so
a run whose environment differs from the server's in anything but ALLOWED is started the ordinary way instead.
Scripts that do not import torch (sample.py, explore.py) gain nothing here: the tests start those the ordinary way.
Each run gets fresh random states, but Python's hash seed is the server's: a test that compares two runs starts one of
them as a new interpreter.

Run as a script, this file is the server: it takes requests on the listening socket whose descriptor is its argument.
conftest.py starts one for the whole session (`share`), before pytest starts its workers.
"""

import contextlib
import gc
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback

ADDRESS = "WARM_SERVER"  # the environment variable that names the shared server's socket to the test processes
# What may differ from the server's environment in a forked run (as well as pytest's PYTEST_*): read when used, never
# at start-up. scikit-learn sets the two KMP_ ones when imported; they concern Intel's OpenMP, which nothing here loads.
ALLOWED = {ADDRESS, "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "COLUMNS", "LINES"}
ALLOWED |= {"KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}


def _supported():
    """Linux pidfds (kernel 5.3, Python 3.9) are what the server waits on; elsewhere every run starts the usual way."""
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except (AttributeError, OSError):
        return False


SUPPORTED = _supported()


def limit(fsize):
    """Files of at most fsize bytes from here on, as on a full disk: writes fail with EFBIG, no signal."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def serve(listener_fd):
    """Forks a child per request; returns in the child only (with the request). The server ends when its stdin does
    (the process that started it has ended); what fails in it goes to its stderr, which `stop` prints."""
    import torch

    torch.optim.SGD([torch.nn.Parameter(torch.empty(0))])  # the first optimizer imports dynamo; no op runs before fork
    gc.freeze()  # what was imported stays shared with the children: no collection copies it (see gc.freeze)
    listener, env = socket.socket(fileno=listener_fd), json.dumps(dict(os.environ)).encode()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listener")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    clients, children = [], {}  # children: pidfd -> (pid, reply socket)
    while True:
        for key, _ in sel.select():
            try:
                if key.data == "listener":
                    client, _ = listener.accept()
                    creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[1] != os.getuid():  # the name is visible to all: only its user
                        client.close()
                        continue
                    client.sendall(env)  # first, what this server's runs start from
                    clients.append(client)
                    sel.register(client, selectors.EVENT_READ, "client")
                elif key.data == "stdin":
                    if not os.read(key.fd, 1 << 10):
                        return None
                elif key.data == "client":
                    msg, fds, _, _ = socket.recv_fds(key.fileobj, 1 << 20, 4)
                    if not msg:  # that test process is gone
                        sel.unregister(key.fileobj)
                        clients.remove(key.fileobj)
                        key.fileobj.close()
                        continue
                    reply, *stdio = fds
                    sys.stderr.flush()  # nothing of the server's own may reach a run's stderr
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        for sock in (listener, *clients, *(r for _, r in children.values())):
                            sock.close()
                        for fd in children:
                            os.close(fd)
                        for target, fd in enumerate(stdio):
                            os.dup2(fd, target)
                            os.close(fd)
                        os.close(reply)
                        return json.loads(msg)
                    for fd in stdio:
                        os.close(fd)
                    reply = socket.socket(fileno=reply)
                    pidfd = os.pidfd_open(pid)
                    children[pidfd] = (pid, reply)
                    sel.register(pidfd, selectors.EVENT_READ, "child")
                    reply.sendall(b"%d\n" % pid)
                else:
                    pid, reply = children.pop(key.fd)
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    _, status = os.waitpid(pid, 0)
                    with reply, contextlib.suppress(BrokenPipeError):  # a test that let its run go closed its end
                        reply.sendall(b"%d\n" % status)
            except OSError:  # reported at the end; the server carries on
                traceback.print_exc()


class Process:
    """The subprocess.Popen subset the tests use, for a forked run (text mode, stdout and stderr piped)."""

    def __init__(self, server, argv, cwd, env, stdin, fsize):
        self.args, self.returncode = argv, None
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_fd = os.open(os.devnull, os.O_RDONLY) if stdin is None else os.dup(stdin.fileno())
        request = dict(argv=[os.fsdecode(a) for a in argv], cwd=os.fsdecode(cwd), env=dict(env), fsize=fsize)
        try:
            socket.send_fds(server, [json.dumps(request).encode()], [theirs.fileno(), in_fd, out_w, err_w])
        finally:
            for fd in (in_fd, out_w, err_w):
                os.close(fd)
            theirs.close()
        self._sock, self._buf, self._fds, self._eof = ours, b"", [out_r, err_r], set()
        self._chunks = {out_r: [], err_r: []}  # stdout's, stderr's
        self.pid = self._line(None)
        try:
            self._pidfd = os.pidfd_open(self.pid)  # signals reach this process, never one that reused its pid
        except ProcessLookupError:  # ended and reaped already: its status is on its way
            self._pidfd = None

    def close(self):
        """Closes what this object holds of the run (its pipes, its socket), as a Popen's garbage does."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._sock.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self):
        if hasattr(self, "_pidfd"):
            self.close()

    def _line(self, timeout):
        """The server's next number for this run: its pid, then its wait status."""
        self._sock.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                data = self._sock.recv(64)
            except (TimeoutError, BlockingIOError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not data:
                raise RuntimeError(f"the warm server ended before {self.args} did (its stderr comes after the tests)")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return int(line)

    def poll(self):
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(self._line(timeout))
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def communicate(self, timeout=None):
        """(stdout, stderr) to the end, then the exit status, all within timeout seconds; past it TimeoutExpired
        (with what came so far), and a later call goes on where this one stopped, as Popen's does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for fd in self._fds:
                if fd not in self._eof:
                    sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:  # checked on every pass, as Popen does; with the bytes so far
                    raise subprocess.TimeoutExpired(self.args, timeout, *map(b"".join, self._chunks.values()))
                for key, _ in sel.select(left):
                    data = os.read(key.fd, 1 << 16)
                    self._chunks[key.fd].append(data)
                    if not data:
                        self._eof.add(key.fd)
                        sel.unregister(key.fd)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        # strict UTF-8 and universal newlines, as text=True decodes
        texts = tuple(b"".join(c).decode().replace("\r\n", "\n").replace("\r", "\n") for c in self._chunks.values())
        self.close()
        return texts

    def send_signal(self, sig):
        if self.poll() is None and self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


def launch():
    """Starts a server on a new socket in the abstract namespace (no file): (its Popen, the socket's name, "@..."). It
    ends when the Popen's stdin is closed, or this process ends."""
    name = f"@warm-{os.getpid()}-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind("\0" + name[1:])
        listener.listen()
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(listener.fileno())],
            pass_fds=[listener.fileno()],
            stdin=subprocess.PIPE,  # pipes, as a run's own are: the streams Python makes at start-up suit them
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
    return proc, name


def share():
    """One server for this process and every process it starts (pytest's workers): started now, named by ADDRESS."""
    if SUPPORTED:
        _server["proc"], os.environ[ADDRESS] = launch()


def stop():
    """Ends the server this process started, and prints what it wrote to its stderr, if anything."""
    proc = _server.pop("proc", None)
    if proc is not None:
        try:
            err = proc.communicate(timeout=30)[1]  # closes its stdin: the server ends
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
        if err:
            print(f"tests/warm.py's server wrote:\n{err.decode(errors='replace')}", file=sys.stderr)


_server = {}


def _connect():
    """The server this test process sends its runs to: the shared one, else one of its own, started on first use."""
    if "sock" not in _server:
        if ADDRESS not in os.environ:
            _server["proc"], os.environ[ADDRESS] = launch()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect("\0" + os.environ[ADDRESS][1:])
        _server.update(sock=sock, env=json.loads(sock.recv(1 << 20)))
    return _server


def forkable(env):
    """Whether a run in this environment can be forked from the server (else it starts the ordinary way)."""
    if not SUPPORTED:
        return False
    differs = {k for k, _ in set(env.items()) ^ set(_connect()["env"].items())}
    return all(k in ALLOWED or k.startswith("PYTEST_") for k in differs)


def _new_interpreter(argv, cwd, env, fsize):
    """What subprocess.Popen and subprocess.run take to start argv the ordinary way."""
    limited = None if fsize is None else lambda: limit(fsize)
    return dict(args=[sys.executable, *argv], cwd=cwd, env=env, text=True, preexec_fn=limited)


def start(argv, cwd, env=None, stdin=None, fsize=None):
    """subprocess.Popen(argv with sys.executable in front, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, text=True);
    fsize: the largest file the run may write (RLIMIT_FSIZE, with SIGXFSZ ignored: a full disk)."""
    env = os.environ if env is None else env
    if not forkable(env):
        pipes = dict(stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return subprocess.Popen(**_new_interpreter(argv, cwd, env, fsize), **pipes)
    return Process(_server["sock"], argv, cwd, env, stdin, fsize)


def run(argv, cwd, env=None, timeout=300, fsize=None):
    """subprocess.run(argv with sys.executable in front, cwd=cwd, env=env, capture_output=True, text=True, timeout)."""
    env = os.environ if env is None else env
    if not forkable(env):
        return subprocess.run(**_new_interpreter(argv, cwd, env, fsize), capture_output=True, timeout=timeout)
    proc = Process(_server["sock"], argv, cwd, env, None, fsize)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()  # as subprocess.run does: not waiting for whatever else holds the pipes
        proc.close()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


if __name__ == "__main__":
    _request = serve(int(sys.argv[1]))
    if _request is None:
        sys.exit(0)
    # the child: from here on, what `python SCRIPT ARGS...` does in the request's folder and environment
    import importlib.machinery
    import types

    if _request["fsize"] is not None:
        limit(_request["fsize"])
    os.chdir(_request["cwd"])
    os.environ.clear()
    os.environ.update(_request["env"])
    sys.argv = _request["argv"]
    _path = os.path.abspath(sys.argv[0])
    sys.path[0] = os.path.dirname(_path)
    _server_module, _main = sys.modules["__main__"], types.ModuleType("__main__")  # the frame runs on in this one
    _main.__file__, _main.__builtins__, _main.__cached__ = _path, __builtins__, None
    _main.__loader__ = importlib.machinery.SourceFileLoader("__main__", _path)
    sys.modules["__main__"] = _main
    try:
        with open(_path, "rb") as _f:
            _code = compile(_f.read(), _path, "exec")
    except OSError as e:
        print(f"{sys.executable}: can't open file {_path!r}: [Errno {e.errno}] {e.strerror}", file=sys.stderr)
        sys.exit(2)
    import numpy
    import torch

    torch.default_generator.seed()  # fresh random states, as a new interpreter has (random reseeds itself after fork)
    numpy.random.seed()
    del _f, _request, _path
    exec(_code, _main.__dict__)
