"""tests/warm.py, the forked script runs the other tests use, against `python SCRIPT` in a new interpreter: what the
script sees, how it ends, signals, time limits, and that the forked path is the one taken."""

import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import warm

pytestmark = pytest.mark.skipif(not warm.SUPPORTED, reason="forked runs need Linux's pidfds; runs start the usual way")

PROBE = r"""
import json, os, resource, signal, sys
print(json.dumps(dict(
    argv=sys.argv, file=__file__, name=__name__, cwd=os.getcwd(), path0=sys.path[0],
    env=os.environ.get("XDG_CACHE_HOME"),
    streams=[[s.encoding, s.errors, s.line_buffering, s.isatty()] for s in (sys.stdin, sys.stdout, sys.stderr)],
    stdin=sys.stdin.read(), sigint=signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    sigpipe=int(signal.getsignal(signal.SIGPIPE)), sigterm=int(signal.getsignal(signal.SIGTERM)),
    fsize=resource.getrlimit(resource.RLIMIT_FSIZE), main=sys.modules["__main__"].__dict__ is globals(),
    project=[m for m in ("vae", "train", "warm", "conftest") if m in sys.modules],
    fds=sorted(os.listdir("/proc/self/fd")),
    loader=type(__loader__).__name__, cached=__cached__, spec=__spec__,
)))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(3)
if how == "message":
    sys.exit("a message")
if how == "raise":
    raise ValueError("the error line")
if how == "interrupt":
    raise KeyboardInterrupt
if how == "term":
    os.kill(os.getpid(), signal.SIGTERM)
if how == "big":
    open("big", "wb").write(bytes(1 << 20))
"""


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


def real(argv, cwd, env=None, fsize=None):
    """subprocess.run of a new interpreter, as the tests ran scripts before warm.py."""
    limit = None if fsize is None else lambda: warm.limit(fsize)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=limit)


@pytest.mark.parametrize("how", ["ok", "exit", "message", "raise", "interrupt", "term", "big"])
def test_a_forked_run_sees_and_ends_as_a_new_interpreter_does(probe, how):
    argv, env = ["probe.py", how, os.fsdecode(b"not-utf8-\xff")], dict(os.environ, XDG_CACHE_HOME="seen")
    assert warm.forkable(env)  # the fast path is the one under test
    fsize = 4096 if how == "big" else None  # a disk that fills: the 1 MiB write fails
    forked, new = warm.run(argv, probe, env, fsize=fsize), real(argv, probe, env, fsize)
    assert forked.returncode == new.returncode, (forked.stderr, new.stderr)
    assert json.loads(forked.stdout) == json.loads(new.stdout)
    last = lambda err: err.strip().splitlines()[-1]
    assert last(forked.stderr) == last(new.stderr)
    assert ("Traceback" in forked.stderr) == ("Traceback" in new.stderr)


def test_signals_reach_the_run_and_its_status_says_so(probe):
    (probe / "sleeper.py").write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "open(f'ready-{sys.argv[1]}', 'w').write(str(os.getppid()))\n"
        "time.sleep(60)\n"
    )
    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT), (signal.SIGKILL, -signal.SIGKILL)):
        proc = warm.start(["sleeper.py", str(sig)], probe)
        assert isinstance(proc, warm.Process) and proc.poll() is None
        ready = probe / f"ready-{sig}"
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(ready.read_text()) not in (0, 1, os.getpid())  # a process of the server's, not this one's
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode == status


def test_a_time_limit_holds_for_a_run_that_keeps_printing(probe):
    chatty = "import time\nfor _ in range(400):\n    print('x', flush=True)\n    time.sleep(0.05)\n"  # 20 s at most
    (probe / "chatty.py").write_text(chatty)
    t = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        warm.run(["chatty.py"], probe, timeout=1)
    assert time.monotonic() - t < 30 and b"x" in e.value.stdout  # one limit for the whole run, not per read


def test_a_run_let_go_leaves_the_server_serving(probe):
    first = warm.start(["probe.py", "ok"], probe)
    del first
    gc.collect()
    time.sleep(1)  # the first run has ended: its status found nobody to read it
    assert warm.run(["probe.py", "exit"], probe).returncode == 3


def test_an_environment_read_at_start_up_gets_a_new_interpreter(probe):
    for name in ("OMP_NUM_THREADS", "TMPDIR", "MALLOC_ARENA_MAX", "PYTHONHASHSEED"):
        env = dict(os.environ, **{name: "1" if name != "TMPDIR" else str(probe)})
        assert not warm.forkable(env)
        proc = warm.start(["probe.py", "ok"], probe, env)
        assert isinstance(proc, subprocess.Popen)
        proc.communicate(timeout=120)
        assert proc.returncode == 0


def test_each_forked_run_draws_its_own_random_numbers(probe):
    """As new interpreters do: a script that forgot to seed is not rescued by sharing the server's random states."""
    draw = "import random, numpy, torch\nprint(torch.rand(1).item(), numpy.random.rand(), random.random())\n"
    (probe / "draw.py").write_text(draw)
    first, second = (warm.run(["draw.py"], probe).stdout.split(" ") for _ in range(2))
    assert all(a != b for a, b in zip(first, second)), (first, second)


@pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="acting as another user needs root"
)
def test_another_user_is_turned_away(tmp_path):
    """The server's socket name can be read by anyone (/proc/net/unix); only its own user may have runs started."""
    warm.forkable(os.environ)  # connected: the server is up
    client = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect('\\0' + os.environ['WARM_SERVER'][1:])\n"
        "print(len(s.recv(1 << 20)))\n"
    )
    env = {"WARM_SERVER": os.environ[warm.ADDRESS]}
    nobody = subprocess.run(
        ["/usr/bin/python3", "-c", client], user=65534, env=env, cwd="/", capture_output=True, text=True, timeout=60
    )
    assert nobody.returncode == 0 and nobody.stdout.strip() == "0", nobody.stderr  # closed: not even its environment
    mine = subprocess.run(
        ["/usr/bin/python3", "-c", client], env=env, cwd="/", capture_output=True, text=True, timeout=60
    )
    assert int(mine.stdout) > 100, mine.stderr  # the same client, as the server's user: it is answered
