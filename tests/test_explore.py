"""explore.py: the site it builds (torch-free), the server (127.0.0.1, nothing outside the folder), refusals, and the
page itself in a real headless Chromium: decode and encode equal onnxruntime in Python, sliders, scatter (pointer and
keys), drawing, files chosen or dropped. Without web/node_modules the site and server tests build from a stand-in."""

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import numpy as np
import onnxruntime as ort
import pytest
from conftest import KL, run_without_torch
from PIL import Image

import data
import explore
from plumbing import browser, onnx_check
from plumbing import files as fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPLORE = os.path.join(ROOT, "explore.py")
POINTS = 100
HAS_RUNTIME = os.path.isdir(os.path.join(explore.WEB, "node_modules", "onnxruntime-web"))


def ort_run(path, feeds):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def decode(kl_exported, z):
    return ort_run(kl_exported["decoder"], {"z": np.asarray(z, np.float32).reshape(-1, 4)})[0]


def encode(kl_exported, pixels):
    x = np.asarray(pixels, np.float32).reshape(-1, 1, 28, 28) * np.float32(2) - np.float32(1)
    return ort_run(kl_exported["encoder"], {"images": x})


def one_error_line(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """The web/ folder explore.py builds from: the real one when `npm ci --prefix web` has filled web/node_modules,
    else a stand-in holding the page, package.json and placeholder runtime files of the pinned version. The stand-in
    is enough to build and serve a site (what the site and server tests need), not to run it: the browser tests skip
    without the real runtime (browser.missing() says so). explore.runtime() checks the stand-in as it checks the real
    folder; only where it looks moves."""
    if HAS_RUNTIME:
        return explore.WEB
    fake = tmp_path_factory.mktemp("web")
    for name in (*explore.PAGE, "package.json"):
        shutil.copyfile(os.path.join(explore.WEB, name), fake / name)
    pinned = json.load(open(fake / "package.json"))["dependencies"]["onnxruntime-web"]
    dist = fake / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    (dist.parent / "package.json").write_text(json.dumps({"name": "onnxruntime-web", "version": pinned}))
    for name in explore.RUNTIME:
        (dist / name).write_bytes(b"// a stand-in: the tests without web/node_modules never run it")
    return str(fake)


def explore_script(web, folder):
    """explore.py, or with the stand-in web/ a script beside `folder` that runs explore.py's main() on it."""
    if web == explore.WEB:
        return EXPLORE
    script = os.path.join(folder, "explore_stand_in.py")
    with open(script, "w") as f:
        f.write(
            f"import sys\nsys.path.insert(0, {ROOT!r})\nimport explore\nexplore.WEB = {web!r}\n"
            "sys.exit(explore.main())\n"
        )
    return script


@pytest.fixture(scope="module")
def site(kl_exported, web, tmp_path_factory):
    """One site for the module, built by explore.py in a process where torch cannot be imported."""
    folder = tmp_path_factory.mktemp("explore")
    proc = run_without_torch(
        explore_script(web, folder),
        "--onnx",
        kl_exported["decoder"],
        "--encoder",
        kl_exported["encoder"],
        "--data-dir",
        kl_exported["data_dir"],
        "--points",
        POINTS,
        "--out",
        folder / "site",
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and f"{POINTS} scatter points" in proc.stdout
    return str(folder / "site")


@pytest.fixture(scope="module")
def server(site):
    srv = explore.make_server(site, 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(server, path, host=None):
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host or f"127.0.0.1:{port}")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, response.getheader("Content-Type"), body


# ------------------------------------------------------------------------------------------------------ the site


def test_the_site_holds_page_models_runtime_and_metadata(site, kl_exported):
    names = sorted(os.listdir(site))
    assert names == sorted(
        [
            "index.html",
            "explorer.js",
            "vae.js",
            "style.css",
            "model.json",
            "decoder.onnx",
            "encoder.onnx",
            "points.bin",
            "ort",
        ]
    )
    assert sorted(os.listdir(os.path.join(site, "ort"))) == sorted(explore.RUNTIME)
    for name in ("decoder", "encoder"):
        assert open(os.path.join(site, f"{name}.onnx"), "rb").read() == open(kl_exported[name], "rb").read()
    meta = json.load(open(os.path.join(site, "model.json")))
    assert meta["format"] == "beta-vae-explorer" and meta["latent_dim"] == 4 and meta["image_shape"] == [1, 28, 28]
    assert [x["index"] for x in meta["dims"]] == [1, 3, 2, 0]  # largest KL first
    assert [x["kl"] for x in meta["dims"]] == sorted(KL, reverse=True)
    assert [x["unused"] for x in meta["dims"]] == [False, False, False, True]  # KL 0.01 <= 0.01 nats
    assert meta["unused_kl"] == onnx_check.ACTIVE_KL == 0.01
    assert meta["model"]["trained_on"].startswith("Fashion-MNIST, ")
    assert (
        meta["onnxruntime_web"]
        == json.load(open(os.path.join(ROOT, "web", "package.json")))["dependencies"]["onnxruntime-web"]
    )
    assert meta["points"]["count"] == POINTS and meta["points"]["axes"] == [1, 3]
    # what a hosted site publishes: the checkpoint's hash, never a path on the machine that built it
    assert "source_checkpoint" not in meta["model"] and len(meta["model"]["checkpoint_sha256"]) == 64
    assert kl_exported["checkpoint"] not in open(os.path.join(site, "model.json")).read()


def test_the_scatter_holds_the_encoders_posterior_means_of_the_test_images(site, kl_exported):
    images, labels = data.read_split(kl_exported["data_dir"], "test")
    blob = open(os.path.join(site, "points.bin"), "rb").read()
    assert len(blob) == POINTS * (4 * 4 + 1 + 784)
    mu = np.frombuffer(blob[: POINTS * 16], "<f4").reshape(POINTS, 4)
    assert np.max(np.abs(mu - encode(kl_exported, images[:POINTS] / 255.0)[0])) <= 1e-5
    assert np.array_equal(np.frombuffer(blob[POINTS * 16 : POINTS * 17], np.uint8), labels[:POINTS])
    assert np.array_equal(np.frombuffer(blob[POINTS * 17 :], np.uint8).reshape(-1, 28, 28), images[:POINTS])


def test_building_again_replaces_the_site_and_removes_leftovers(kl_exported, web, tmp_path, monkeypatch):
    monkeypatch.setattr(explore, "WEB", web)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".site.{proc.pid}-{fileio._host()}.abc_1234.tmp"  # a build killed half-way, its process gone
    stale.mkdir()
    (stale / "index.html").write_text("half")
    out = str(tmp_path / "site")
    with contextlib.redirect_stdout(io.StringIO()):
        explore.main(
            [
                "--onnx",
                kl_exported["decoder"],
                "--encoder",
                kl_exported["encoder"],
                "--data-dir",
                kl_exported["data_dir"],
                "--points",
                "10",
                "--out",
                out,
            ]
        )
        assert {"encoder.onnx", "points.bin"} <= set(os.listdir(out))
        assert explore.main(["--onnx", kl_exported["decoder"], "--out", out]) is None
    assert sorted(os.listdir(tmp_path)) == ["site"]
    assert sorted(os.listdir(out)) == sorted([*explore.PAGE, "ort", "model.json", "decoder.onnx"])
    meta = json.load(open(os.path.join(out, "model.json")))
    assert meta["encoder"] is None and meta["points"] is None


def test_not_in_use_means_kl_at_most_active_kl():
    """0.03 nats is in use now (it was "unused" below 0.05); 0.01 and 0 are not."""
    dec = types.SimpleNamespace(latent=4, kl=[0.03, 0.01, 0.0, 1.2], image_shape=(1, 28, 28), meta={})
    meta = explore.site_meta(dec, None, None, "1.0.0")
    assert [(x["index"], x["unused"]) for x in meta["dims"]] == [(3, False), (0, False), (1, True), (2, True)]


def test_a_note_says_when_the_run_trained_past_the_exported_epoch(kl_exported, web, tmp_path, monkeypatch):
    monkeypatch.setattr(explore, "WEB", web)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(kl_exported["decoder"], run / "decoder.onnx")  # exported at epoch 3

    def build(last_epoch):
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({"epoch": e, "test": {"kl": 1.0}}) + "\n" for e in range(1, last_epoch + 1))
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert explore.main(["--onnx", str(run / "decoder.onnx"), "--out", str(tmp_path / "site")]) is None
        return out.getvalue()

    notes = [line for line in build(5).splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {run / 'decoder.onnx'} is from epoch 3, but its run has trained to epoch 5: export it "
        "again to explore the latest model"
    ]
    assert "note: " not in build(3)  # the run stopped where the file was exported: nothing to say


def test_ctrl_c_while_building_is_one_line_and_leaves_the_old_site(kl_exported, web, tmp_path, monkeypatch):
    monkeypatch.setattr(explore, "WEB", web)
    out = tmp_path / "site"
    with contextlib.redirect_stdout(io.StringIO()):
        explore.main(["--onnx", kl_exported["decoder"], "--out", str(out)])
    before = {name: (out / name).read_bytes() for name in ("model.json", "decoder.onnx")}
    real = explore.replace_dir

    def interrupted_half_way(path, build):
        def half(folder):
            build(folder)
            raise KeyboardInterrupt  # Ctrl-C with the new site all but in place

        real(path, half)

    monkeypatch.setattr(explore, "replace_dir", interrupted_half_way)
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, monkeypatch.context() as m, contextlib.redirect_stdout(io.StringIO()) as o:
        m.setattr(sys, "stderr", err)
        try:
            explore.main(["--onnx", kl_exported["decoder"], "--encoder", kl_exported["encoder"], "--out", str(out)])
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C left explore.main as a traceback")
    assert e.value.code == 130 and o.getvalue() == ""
    assert err.getvalue() == "error: interrupted; the site was not written (a site already there is as it was)\n"
    assert sorted(os.listdir(tmp_path)) == ["site"]  # no half-built folder beside it
    assert {name: (out / name).read_bytes() for name in before} == before and not (out / "encoder.onnx").exists()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("out_holds_input", "is inside --out"),
        ("out_is_input", "is the same file as --onnx"),
        ("foreign_folder", "exists and is not a site explore.py wrote"),
        (
            "user_files_in_site",
            "holds files explore.py did not write (.git, CNAME, NOTES.md and 1 more) that replacing",
        ),
        ("screenshot_not_png", "shot.jpg must be a .png in an existing folder"),
        ("data_without_encoder", "add --encoder"),
        ("other_checkpoint", "come from different checkpoints"),
        ("hostile_decoder", "is not a decoder that export_onnx.py wrote"),
        ("no_runtime", "npm ci --prefix web"),
        ("bad_points", "--points 0 is out of range"),
        ("port_taken", "Address already in use"),
    ],
)
def test_refusals_are_one_line_and_touch_nothing(
    kl_exported, tiny_checkpoint, web, tmp_path, case, needle, monkeypatch
):
    monkeypatch.setattr(explore, "WEB", web)
    shutil.copy(kl_exported["decoder"], tmp_path / "decoder.onnx")
    args, out = ["--onnx", str(tmp_path / "decoder.onnx")], tmp_path / "site"
    if case == "out_holds_input":
        out = tmp_path
    elif case == "out_is_input":
        os.symlink(tmp_path / "decoder.onnx", tmp_path / "site")
    elif case == "foreign_folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "user_files_in_site":  # a hosted copy: a site explore.py wrote, plus the user's own files
        out.mkdir()
        (out / "model.json").write_text(json.dumps({"format": explore.SITE_FORMAT}))
        (out / "decoder.onnx").write_bytes(b"old")
        for name in (".git/HEAD", "CNAME", "NOTES.md", "ort/mine.txt"):
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_text("mine")
    elif case == "screenshot_not_png":
        args += ["--screenshot", str(tmp_path / "shot.jpg")]
    elif case == "data_without_encoder":
        args += ["--data-dir", kl_exported["data_dir"]]
    elif case == "other_checkpoint":
        import contextlib

        import export_onnx

        with contextlib.redirect_stdout(io.StringIO()):
            export_onnx.main(
                [
                    "--checkpoint",
                    tiny_checkpoint["path"],
                    "--out",
                    str(tmp_path / "d2.onnx"),
                    "--encoder",
                    str(tmp_path / "other.onnx"),
                ]
            )
        args += ["--encoder", str(tmp_path / "other.onnx")]
    elif case == "hostile_decoder":
        import onnx

        model = onnx.load(tmp_path / "decoder.onnx")
        model.graph.node[-1].op_type = "Erf"  # onnxruntime would run it; the checks refuse it
        onnx.save(model, tmp_path / "decoder.onnx")
    elif case == "no_runtime":
        monkeypatch.setattr(explore, "WEB", str(tmp_path / "web"))
    elif case == "port_taken":  # known before anything is built
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args += ["--serve", "--port", str(taken.getsockname()[1])]
    else:
        args += ["--points", "0"]
    before = sorted(os.listdir(tmp_path))
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, monkeypatch.context() as m:
        m.setattr(sys, "stderr", err)
        explore.main(args + ["--out", str(out)])
    assert e.value.code == 2
    one_error_line(subprocess.CompletedProcess([], 2, "", err.getvalue()), needle)
    assert sorted(os.listdir(tmp_path)) == before
    if case == "foreign_folder":
        assert os.listdir(out) == ["notes.txt"]
    if case == "user_files_in_site":
        assert sorted(os.listdir(out)) == [".git", "CNAME", "NOTES.md", "decoder.onnx", "model.json", "ort"]
        assert (out / ".git" / "HEAD").read_text() == "mine" and (out / "decoder.onnx").read_bytes() == b"old"


# ---------------------------------------------------------------------------------------------------- the server


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/ort/../../secret.txt",
        "//secret.txt",
        "/etc/passwd",
        "/.hidden",
        "http://127.0.0.1/../secret.txt",
        "/%00",
        "/ort",
    ],
)
def test_nothing_outside_the_folder_is_served(server, path):
    secret = os.path.join(os.path.dirname(server.root), "secret.txt")
    with open(secret, "w") as f:
        f.write("not for the page")
    with open(os.path.join(server.root, ".hidden"), "w") as f:
        f.write("hidden")
    status, _, body = get(server, path)
    assert status == 404 and b"not for the page" not in body and b"hidden" not in body


def test_links_inside_the_site_that_lead_out_of_it_are_not_served(server):
    outside = os.path.join(os.path.dirname(server.root), "outside")
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "secret.txt"), "w") as f:
        f.write("not for the page")
    for name, target in (("linked.txt", os.path.join(outside, "secret.txt")), ("linked", outside)):
        if not os.path.lexists(os.path.join(server.root, name)):
            os.symlink(target, os.path.join(server.root, name))
    for path in ("/linked.txt", "/linked/secret.txt", "/linked/", "/linked"):
        status, _, body = get(server, path)
        assert status == 404 and b"not for the page" not in body, path
    assert get(server, "/model.json")[0] == 200  # the folder's own files still are


def test_the_server_serves_the_site_on_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1"
    status, kind, body = get(server, "/")
    assert status == 200 and kind.startswith("text/html") and b"betaVAE" not in body and b"explorer.js" in body
    assert get(server, "/ort/ort.wasm.bundle.min.mjs")[1] == "text/javascript"  # a module needs a JS type
    assert get(server, "/ort/ort-wasm-simd-threaded.wasm")[1] == "application/wasm"
    assert get(server, "/", host="evil.example:80")[0] == 404  # DNS rebinding gets nothing


def test_serve_prints_the_url_and_stops_cleanly(kl_exported, web, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "faulthandler",
            explore_script(web, tmp_path),
            "--onnx",
            kl_exported["decoder"],
            "--out",
            tmp_path / "s",
            "--serve",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        host, port = url.split("//")[1].rstrip("/").split(":")
        assert host == "127.0.0.1"
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/model.json")
        assert json.loads(conn.getresponse().read())["latent_dim"] == 4
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"explore.py --serve did not stop on Ctrl-C within 20 s; its stacks:\n{err[-6000:]}")
    assert proc.returncode == 0 and "stopped" in out and err == ""


@contextlib.contextmanager
def watched_server(site, monkeypatch, send_buffer=None):
    """explore's server for `site` in this process, its stderr captured: yields (server, stderr, the exceptions
    passed to handle_error, a semaphore released as each request's thread ends). send_buffer: the bytes each
    connection's kernel buffer may hold, so a response larger than that is still being written when a client goes."""
    err, errors, ended = io.StringIO(), [], threading.Semaphore(0)
    monkeypatch.setattr(sys, "stderr", err)  # where socketserver prints a handler's traceback
    srv = explore.make_server(site, 0)
    get_request, process = srv.get_request, srv.process_request_thread

    def accept():
        conn, address = get_request()
        if send_buffer:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        return conn, address

    def handle_error(request, address):
        errors.append(sys.exc_info()[1])
        type(srv).handle_error(srv, request, address)  # explore's own, which decides what is printed

    def thread(request, address):
        try:
            process(request, address)
        finally:
            ended.release()

    srv.get_request, srv.handle_error, srv.process_request_thread = accept, handle_error, thread
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv, err, errors, ended
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_client_that_drops_a_download_leaves_no_traceback(site, monkeypatch):
    size = os.path.getsize(os.path.join(site, "decoder.onnx"))
    with watched_server(site, monkeypatch, send_buffer=4096) as (srv, err, errors, ended):
        port = srv.server_address[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(f"GET /decoder.onnx HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert client.recv(1024).startswith(b"HTTP/1.0 200")
        time.sleep(0.1)  # the server fills the buffers and waits to write more
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # gone mid-download, as a closed tab: a reset, not an orderly end
        assert ended.acquire(timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], ConnectionError), errors  # the server was cut off
        status, _, body = get(srv, "/decoder.onnx")  # and serves the next client as before
        assert status == 200 and len(body) == size
        assert err.getvalue() == ""


def test_a_stalled_client_neither_holds_the_server_nor_its_connection(site, monkeypatch):
    assert explore.SiteHandler.timeout is not None and 0 < explore.SiteHandler.timeout <= 10  # seconds: shortened
    # below to keep the test fast
    monkeypatch.setattr(explore.SiteHandler, "timeout", 0.5)
    with watched_server(site, monkeypatch) as (srv, err, errors, ended):
        port = srv.server_address[1]
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(f"GET /model.json HTTP/1.1\r\nHost: 127.0.0.1:{port}".encode())  # half a request, then nothing
        start = time.monotonic()
        assert get(srv, "/model.json")[0] == 200  # others are served meanwhile
        with contextlib.suppress(ConnectionResetError):
            assert stalled.recv(1024) == b""  # the server gave up on it and closed it
        assert time.monotonic() - start < 5
        stalled.close()
        assert ended.acquire(timeout=5) and ended.acquire(timeout=5)  # both requests' threads are done
        assert errors == [] and err.getvalue() == ""


# -------------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def page(server):
    reason = browser.missing()
    if reason:
        pytest.skip(reason)
    session = browser.start()
    session.set_script_timeout(30)
    try:
        session.get(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.call(session, "await window.betaVAE.ready;")
        yield session
    finally:
        session.quit()


def canvas_pixels(page, element_id):
    return np.array(
        browser.call(
            page,
            f"const c = document.getElementById('{element_id}');"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
            ".filter((_, i) => i % 4 === 0);",
        ),
        np.uint8,
    )


def test_the_page_loads_without_console_errors(page):
    assert browser.console_errors(page) == []
    info = browser.call(page, "const b = window.betaVAE; return [b.latentDim, b.points, b.dims.map(x => x.index)];")
    assert info == [4, POINTS, [1, 3, 2, 0]]
    assert page.find_element("id", "scatter").get_attribute("data-points") == str(POINTS)


def test_decode_equals_onnxruntime_in_python(page, kl_exported):
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32) * np.float32(1.5)
    z[0] = 0
    got = np.array(browser.call(page, "return Array.from(await window.betaVAE.decode(args[0]));", z.ravel().tolist()))
    assert got.shape == (5 * 784,)
    assert np.max(np.abs(got - decode(kl_exported, z).ravel())) <= 1e-5


def test_encode_equals_onnxruntime_in_python(page, kl_exported):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 784)).astype(np.float32) / np.float32(255)
    got = browser.call(
        page,
        "const r = await window.betaVAE.encode(args[0]);return [Array.from(r.mu), Array.from(r.logvar)];",
        pixels.ravel().tolist(),
    )
    mu, logvar = encode(kl_exported, pixels)
    assert np.max(np.abs(np.array(got[0]) - mu.ravel())) <= 1e-5
    assert np.max(np.abs(np.array(got[1]) - logvar.ravel())) <= 1e-5


@pytest.mark.parametrize(
    "call, reason",
    [
        ("decode([1, 2, 3])", "RangeError: z must be a flat array of n \\* 4 numbers"),
        ("decode([0, NaN, 0, 0])", "RangeError: z must hold finite numbers only"),
        ("decode([0, 1e39, 0, 0])", "RangeError: z must hold finite numbers only"),  # beyond float32
        ("decode('1234')", "TypeError: z must be an Array or a typed array"),
        ("decode({length: 4, 0: 1, 1: 1, 2: 1, 3: 1})", "TypeError: z must be an Array or a typed array"),
        ("decode(['1', '2', '3', '4'])", "TypeError: z must hold numbers only"),
        ("decode([1, , 3, 4])", "RangeError: z must hold finite numbers only"),  # a hole
        ("decode(new BigInt64Array(4))", "TypeError: z must be an Array or a typed array"),
        ("decode([3e38, 3e38, -3e38, 3e38])", "RangeError: the decoder returned values that are not finite numbers"),
        ("encode(new Array(784).fill(1e30))", "RangeError: pixels must hold finite numbers only, from 0 to 1"),
        ("encode(new Array(784).fill(-0.5))", "RangeError: pixels must hold finite numbers only, from 0 to 1"),
        ("encode('x'.repeat(784))", "TypeError: pixels must be an Array or a typed array"),
    ],
)
def test_bad_calls_are_rejected_with_a_reason(page, call, reason):
    with pytest.raises(browser.PageError, match=reason):
        browser.call(page, f"return await window.betaVAE.{call};")


def test_typed_arrays_and_arrays_of_numbers_are_both_taken(page, kl_exported):
    z = [0.5, -1.0, 0.25, 2.0]
    got = browser.call(
        page,
        "const b = window.betaVAE; return [Array.from(await b.decode(args[0])), "
        "Array.from(await b.decode(new Float64Array(args[0])))];",
        z,
    )
    assert got[0] == got[1] and np.max(np.abs(np.array(got[0]) - decode(kl_exported, z).ravel())) <= 1e-5


def test_moving_a_slider_redraws_the_image_of_the_changed_z(page, kl_exported):
    from selenium.webdriver.common.keys import Keys

    start = np.array([0.25, -1.0, 0.5, 2.0], np.float32)
    browser.call(page, "await window.betaVAE.setLatent(args[0]);", start.tolist())
    slider = page.find_element("css selector", "input[data-dim='1']")  # the largest-KL dimension, shown first
    page.execute_script("arguments[0].focus();", slider)
    slider.send_keys(Keys.ARROW_RIGHT * 3)  # real key presses: input events, as a person's
    browser.call(page, "await window.betaVAE.idle();")
    value = float(slider.get_attribute("value"))
    assert value == pytest.approx(-0.97)
    want_z = start.copy()
    want_z[1] = value
    got_z = np.array(browser.call(page, "return Array.from(window.betaVAE.getLatent());"), np.float32)
    assert np.array_equal(got_z, want_z)
    want = decode(kl_exported, want_z).ravel()
    shown = np.array(browser.call(page, "return Array.from(window.betaVAE.lastImage);"))
    assert np.max(np.abs(shown - want)) <= 1e-5
    on_canvas = canvas_pixels(page, "image").astype(int)
    assert np.max(np.abs(on_canvas - np.round(want * 255))) <= 1
    assert not np.array_equal(on_canvas, np.round(decode(kl_exported, start).ravel() * 255))


def reload(page):
    """The page as it first comes up: no point hovered, nothing drawn on the pad."""
    page.refresh()
    browser.call(page, "await window.betaVAE.ready; await window.betaVAE.idle();")


def wait_for(page, condition):
    """Wait (up to 5 s) until the JavaScript `condition` holds in the page; the caller asserts what it needs."""
    browser.call(page, f"for (let k = 0; k < 200 && !({condition}); k++) await new Promise(r => setTimeout(r, 25));")


def scatter_points(page, site):
    """(positions as fractions of the scatter, posterior means, labels) of the scatter's points."""
    where = np.array(
        browser.call(page, f"return Array.from({{length: {POINTS}}}, (_, i) => window.betaVAE.scatter.position(i));")
    )
    blob = open(os.path.join(site, "points.bin"), "rb").read()
    mu = np.frombuffer(blob[: POINTS * 16], "<f4").reshape(-1, 4)
    return where, mu, np.frombuffer(blob[POINTS * 16 : POINTS * 17], np.uint8)


def loneliest(where):
    """The point farthest from any other: nothing else can be nearer the pointer on it."""
    gaps = np.linalg.norm(where[:, None] - where[None], axis=2) + np.eye(len(where))
    return int(np.argmax(gaps.min(1))), gaps


def marker_pixels(page):
    """How many of the scatter's pixels are near black: the hover marker is the only black drawn there (the points,
    axes, labels and the red cross are lighter, however they overlap)."""
    return browser.call(
        page,
        "const c = document.getElementById('scatter'), d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) n += d[i + 3] > 100 && "
        "Math.max(d[i], d[i + 1], d[i + 2]) < 70;"
        "return n;",
    )


def hover_panel(page):
    """(label, the scatter's data-hover, whether either hover canvas holds anything)"""
    shown = browser.call(
        page,
        "return ['hover-original', 'hover-decoded'].some((id) => { const c = "
        "document.getElementById(id); return c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data.some((v) => v > 0); });",
    )
    return (
        page.find_element("id", "hover-label").text,
        page.find_element("id", "scatter").get_attribute("data-hover"),
        shown,
    )


def hover_point(page, where, i):
    from selenium.webdriver import ActionChains

    canvas = page.find_element("id", "scatter")
    size = np.array([canvas.size["width"], canvas.size["height"]])
    ActionChains(page, duration=20).move_to_element_with_offset(canvas, *((where[i] - 0.5) * size)).perform()
    browser.call(page, "await window.betaVAE.scatter.settled();")
    return size


def test_no_point_is_marked_until_the_pointer_or_a_key_picks_one(page):
    reload(page)
    assert marker_pixels(page) == 0
    assert hover_panel(page) == ("", None, False)


def test_hovering_the_scatter_decodes_the_point_under_the_pointer(page, site, kl_exported):
    where, mu, _ = scatter_points(page, site)
    i, gaps = loneliest(where)
    size = hover_point(page, where, i)
    assert gaps[i].min() * size.min() > 3
    assert page.find_element("id", "hover-label").text.endswith(f"test image {i}")
    assert page.find_element("id", "scatter").get_attribute("data-hover") == str(i)
    assert marker_pixels(page) > 0
    assert (
        np.max(
            np.abs(
                canvas_pixels(page, "hover-decoded").astype(int) - np.round(decode(kl_exported, mu[i]).ravel() * 255)
            )
        )
        <= 1
    )


def test_hiding_a_class_clears_the_marker_and_panel_on_it(page, site):
    where, _, labels = scatter_points(page, site)
    i = loneliest(where)[0]
    hover_point(page, where, i)
    legend = page.find_elements("css selector", "#legend li")
    other = (int(labels[i]) + 1) % 10
    legend[other].click()  # another class: the marker stays
    assert marker_pixels(page) > 0 and page.find_element("id", "hover-label").text.endswith(f"test image {i}")
    legend[labels[i]].click()  # its own class
    assert marker_pixels(page) == 0
    assert hover_panel(page) == ("", None, False)
    for c in (other, labels[i]):  # every class shown again
        legend[c].click()
    assert page.find_elements("css selector", "#legend li.hidden") == []


def step(where, i, key):
    """What the page's arrow keys do: the nearest point within 45 degrees of the arrow's direction, or stay."""
    ux, uy = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[key]
    delta = where - where[i]
    along, across = delta[:, 0] * ux + delta[:, 1] * uy, delta[:, 0] * uy - delta[:, 1] * ux
    ok = (along > 0) & (np.abs(across) <= along)
    return int(np.argmin(np.where(ok, along**2 + across**2, np.inf))) if ok.any() else i


def test_arrow_keys_step_through_the_scatter_and_enter_loads_the_point(page, site):
    from selenium.webdriver.common.keys import Keys

    reload(page)
    where, mu, _ = scatter_points(page, site)
    k = loneliest(where)[0]
    browser.call(page, "await window.betaVAE.setLatent(args[0]);", mu[k].tolist())  # the red cross on point k
    canvas = page.find_element("id", "scatter")
    assert canvas.get_attribute("tabindex") == "0"
    canvas.send_keys(Keys.ARROW_RIGHT)  # the first press picks the point nearest the cross
    browser.call(page, "await window.betaVAE.scatter.settled();")
    assert page.switch_to.active_element == canvas
    assert canvas.get_attribute("data-hover") == str(k) and marker_pixels(page) > 0
    i, seen = k, {k}
    for key in ["right", "right", "up", "left", "down", "down", "left", "up"]:
        canvas.send_keys(getattr(Keys, f"ARROW_{key.upper()}"))
        browser.call(page, "await window.betaVAE.scatter.settled();")
        i = step(where, i, key)
        seen.add(i)
        assert canvas.get_attribute("data-hover") == str(i), key
        assert page.find_element("id", "hover-label").text.endswith(f"test image {i}")
    assert len(seen) > 3  # the walk went somewhere
    canvas.send_keys(Keys.ENTER)
    browser.call(page, "await window.betaVAE.idle();")
    assert np.array_equal(
        np.array(browser.call(page, "return Array.from(window.betaVAE.getLatent());"), np.float32), mu[i]
    )


def test_drawing_jumps_the_sliders_to_the_posterior_mean(page, kl_exported):
    from selenium.webdriver import ActionChains

    pad = page.find_element("id", "pad")
    ActionChains(page, duration=20).move_to_element_with_offset(pad, -50, -60).click_and_hold().move_by_offset(
        30, 90
    ).move_by_offset(50, -20).move_by_offset(10, -60).release().perform()
    browser.call(page, "await window.betaVAE.padIdle(); await window.betaVAE.idle();")
    pixels = np.array(browser.call(page, "return Array.from(window.betaVAE.padPixels());"), np.float32)
    assert pixels.max() > 0.5 and pixels.mean() < 0.5  # a white stroke on black
    mu = encode(kl_exported, pixels)[0].ravel()
    z = np.array(browser.call(page, "return Array.from(window.betaVAE.getLatent());"))
    assert np.max(np.abs(z - mu)) <= 1e-5
    for d in range(4):
        slider = page.find_element("css selector", f"input[data-dim='{d}']")
        assert float(slider.get_attribute("value")) == pytest.approx(np.clip(mu[d], -3, 3), abs=0.006)


def drop_file(page, selector, path):
    """A real drop of the file at `path` on the middle of an element, through Chromium's own drag input (CDP)."""
    x, y = page.execute_script(
        "const e = document.querySelector(arguments[0]); e.scrollIntoView({block: 'center'});"
        "const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + "
        "r.height / 2];",
        selector,
    )
    data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}  # 1: copy
    for kind in ("dragEnter", "dragOver", "drop"):
        page.execute_cdp_cmd("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})


def give_file(page, how, path):
    if how == "file input":  # what choosing it in the "image file…" dialog does
        page.find_element("id", "file").send_keys(str(path))
    else:
        drop_file(page, "#pad", path)


def picture(path):
    """A dark shirt-like shape on a white background, as a photo of one might be: the pad inverts it."""
    img = np.full((60, 50, 3), 250, np.uint8)
    img[10:50, 15:35] = (40, 30, 90)
    img[10:20, 5:45] = (40, 30, 90)
    Image.fromarray(img).save(path)
    return path


def pad_jumped(page, kl_exported):
    """The sliders hold the encoder's posterior mean of what the pad shows, and the pad holds a picture."""
    browser.call(page, "await window.betaVAE.padIdle(); await window.betaVAE.idle();")
    pixels = np.array(browser.call(page, "return Array.from(window.betaVAE.padPixels());"), np.float32)
    z = np.array(browser.call(page, "return Array.from(window.betaVAE.getLatent());"))
    return pixels.max() > 0.5 and np.max(np.abs(z - encode(kl_exported, pixels)[0].ravel())) <= 1e-5


@pytest.mark.parametrize("how", ["file input", "drop on the pad"])
def test_a_file_that_is_not_an_image_says_so_on_the_page(page, kl_exported, tmp_path, how):
    reload(page)
    browser.console_errors(page)  # only what this test causes
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    z = browser.call(page, "return Array.from(window.betaVAE.getLatent());")
    give_file(page, how, notes)
    wait_for(page, "!document.getElementById('problem').hidden")
    problem = page.find_element("id", "problem")
    assert problem.is_displayed()
    assert problem.text == "notes.txt is not an image the browser can read: choose a PNG or JPEG"
    assert browser.console_errors(page) == []  # no uncaught DOMException
    assert browser.call(page, "return Array.from(window.betaVAE.getLatent());") == z  # nothing else moved
    give_file(page, how, picture(tmp_path / "shirt.png"))  # a picture then works, and the line goes
    wait_for(page, "document.getElementById('problem').hidden")
    assert not problem.is_displayed()
    assert pad_jumped(page, kl_exported)
    assert browser.console_errors(page) == []


def test_a_file_dropped_outside_the_pad_goes_to_the_pad_not_to_a_new_page(page, kl_exported, tmp_path):
    reload(page)
    url = page.current_url
    browser.call(
        page,
        "window.dropWatch = {seen: [], stop: new AbortController()};"  # runs after the page's own
        "for (const type of ['dragover', 'drop']) window.addEventListener(type, (e) => "
        "window.dropWatch.seen.push([type, e.defaultPrevented]), "
        "{signal: window.dropWatch.stop.signal});",
    )
    drop_file(page, "header", picture(tmp_path / "shirt.png"))
    wait_for(page, "window.betaVAE.padPixels().some((v) => v > 0.5)")
    seen = browser.call(page, "window.dropWatch.stop.abort(); return window.dropWatch.seen;")
    assert ["drop", True] in seen and all(prevented for _, prevented in seen)  # the browser's own drop is off
    assert page.current_url == url
    assert pad_jumped(page, kl_exported)
    assert browser.console_errors(page) == []


def test_a_screenshot_is_not_blank_and_no_errors_were_logged(page, tmp_path):
    shot = np.asarray(Image.open(io.BytesIO(page.get_screenshot_as_png())).convert("L"), np.float32)
    assert shot.shape[0] > 500 and shot.shape[1] > 1000
    assert shot.std() > 20  # page, images and scatter, not one flat colour
    samples = canvas_pixels(page, "samples")
    assert samples.std() > 10  # decoded samples, not an empty grid
    assert browser.console_errors(page) == []


def test_screenshot_saves_what_headless_chromium_shows(kl_exported, tmp_path):
    reason = browser.missing()
    if reason:
        pytest.skip(reason)
    png = tmp_path / "explorer.png"
    explore.main(["--onnx", kl_exported["decoder"], "--out", str(tmp_path / "site"), "--screenshot", str(png)])
    shot = np.asarray(Image.open(png).convert("L"), np.float32)
    assert shot.shape[1] == 1400 and shot.shape[0] > 1000 and shot.std() > 20


def test_random_draws_for_large_latents_are_made_in_pieces(page):
    # the 8x8 sample grid of a latent of 200 needs 102,400 random bytes; getRandomValues gives 65,536 a call
    stats = browser.call(
        page,
        """
        const {randn} = await import('./vae.js');
        const z = randn(64 * 200);
        let s = 0, s2 = 0;
        for (const v of z) { s += v; s2 += v * v; }
        return [z.length, s / z.length, s2 / z.length, z.every(Number.isFinite)];""",
    )
    assert stats[0] == 12800 and abs(stats[1]) < 0.05 and abs(stats[2] - 1) < 0.05 and stats[3]
