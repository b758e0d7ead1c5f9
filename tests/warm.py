"""Script runs for the tests as new processes forked from one interpreter that has imported torch already.

`python train.py ...` spends seconds importing torch, and an optimizer's first use imports torch._dynamo, before the
script does anything; the suite starts dozens of such processes. `run` and `start` stand in for subprocess.run and
subprocess.Popen of [sys.executable, script, *args]: each run is still a process of its own (its own pid, exit status,
signals, pipes, working folder and environment; its exceptions and exit handled by the interpreter as for any
script), but it is forked from a server that imported torch, torch._dynamo, numpy and onnx once. What the interpreter
or a library reads only at start-up (thread-count and locale variables, PYTHON*, LD_*) cannot change in a fork, so a
run whose environment differs there from the server's is started the ordinary way instead.

Run as a script, this file is the server: it takes requests on the socket whose descriptor is its argument.
"""

import gc
import json
import os
import selectors
import signal
import socket
import subprocess
import sys

READ_AT_START = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH", "CUDA", "LC_", "LANG", "LD_")
READ_AT_START += ("PYTHON",)


def limit(fsize):
    """Files of at most fsize bytes from here on, as on a full disk: writes fail with EFBIG, no signal."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def serve(control_fd):
    """Forks a child per request; returns in the child only (with the request), never in the server."""
    import numpy  # noqa: F401  the imports every script pays for, paid once here
    import onnx  # noqa: F401
    import torch

    torch.optim.SGD([torch.nn.Parameter(torch.empty(0))])  # an optimizer's first construction imports dynamo

    gc.freeze()  # what was imported stays shared with the children: no collection copies it (see gc.freeze)
    control = socket.socket(fileno=control_fd)
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ)
    children = {}  # pidfd -> (pid, reply socket)
    while True:
        for key, _ in sel.select():
            if key.fileobj is control:
                msg, fds, _, _ = socket.recv_fds(control, 1 << 20, 4)
                if not msg:
                    return None  # the test process is gone
                reply, *stdio = fds
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    control.close()
                    for _, r in children.values():
                        r.close()
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
                reply.sendall(b"%d\n" % pid)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, reply)
                sel.register(pidfd, selectors.EVENT_READ)
            else:
                pid, reply = children.pop(key.fd)
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                with reply:
                    reply.sendall(b"%d\n" % status)


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
            for fd in (theirs.fileno(), in_fd, out_w, err_w):
                os.close(fd)
            theirs.detach()
        self._sock, self._buf = ours, b""
        self.pid = self._line(None)
        self.stdout = open(out_r, encoding="utf-8", errors="surrogateescape")
        self.stderr = open(err_r, encoding="utf-8", errors="surrogateescape")

    def _line(self, timeout):
        """The server's next number for this run: its pid, then its wait status."""
        self._sock.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                data = self._sock.recv(64)
            except (TimeoutError, BlockingIOError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not data:
                raise RuntimeError(f"the warm server ended before {self.args} did")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return int(line)

    def _wait(self, timeout):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(self._line(timeout))
            self._sock.close()
        return self.returncode

    def poll(self):
        try:
            return self._wait(0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout=None):
        return self._wait(timeout)

    def communicate(self, timeout=None):
        with selectors.DefaultSelector() as sel:
            chunks = {}
            for f in (self.stdout, self.stderr):
                if not f.closed:
                    sel.register(f.buffer.raw, selectors.EVENT_READ, f)
                    chunks[f] = []
            while sel.get_map():
                ready = sel.select(timeout)
                if not ready:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in ready:
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.data].append(data)
                    else:
                        sel.unregister(key.fileobj)
            texts = []
            for f in (self.stdout, self.stderr):
                texts.append(b"".join(chunks.get(f, [])).decode("utf-8", "surrogateescape"))
                f.close()
        self.wait(timeout)
        return tuple(texts)

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


_server = {}


def _connect():
    """This test process's server, started on first use."""
    if _server.get("proc") is None or _server["proc"].poll() is not None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.PIPE,  # pipes, as a run's own are: the streams Python makes at start-up suit them
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        theirs.close()
        _server.update(proc=proc, sock=ours, env=dict(os.environ))
    return _server


def _forkable(env):
    differs = set(env.items()) ^ set(_connect()["env"].items())
    return not any(k.startswith(READ_AT_START) for k, _ in differs)


def start(argv, cwd, env=None, stdin=None, fsize=None):
    """subprocess.Popen(argv with sys.executable in front, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, text=True);
    fsize: the largest file the run may write (RLIMIT_FSIZE, with SIGXFSZ ignored: a full disk)."""
    env = os.environ if env is None else env
    if not _forkable(env):
        return subprocess.Popen(
            [sys.executable, *argv], cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="surrogateescape", preexec_fn=None if fsize is None else lambda: limit(fsize),
        )  # fmt: skip
    return Process(_server["sock"], argv, cwd, env, stdin, fsize)


def run(argv, cwd, env=None, timeout=300, fsize=None):
    """subprocess.run(argv with sys.executable in front, cwd=cwd, env=env, capture_output=True, text=True, timeout)."""
    proc = start(argv, cwd, env, fsize=fsize)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


if __name__ == "__main__":
    _request = serve(int(sys.argv[1]))
    if _request is None:
        sys.exit(0)
    # the child: from here on, what `python SCRIPT ARGS...` does in the request's folder and environment
    import runpy

    if _request["fsize"] is not None:
        limit(_request["fsize"])
    os.chdir(_request["cwd"])
    os.environ.clear()
    os.environ.update(_request["env"])
    sys.argv = _request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(os.path.abspath(sys.argv[0]), run_name="__main__")
