"""Build a static site for exploring a trained β-VAE in the browser, decoded there by onnxruntime-web (torch-free).

$ python explore.py --onnx decoder.onnx --encoder encoder.onnx --data-dir data --serve   # builds site/, serves it
$ python explore.py --onnx decoder.onnx --out site      # then host site/ on any static web server

The page: a slider per latent dimension, largest KL first, random draws, samples, interpolations; with --encoder a
drawing pad and image drop; with --data-dir a scatter of test images' posterior means that decodes what the pointer is
on (docs/explorer.md). The site holds all it needs (page, models, model.json, the pinned runtime from web/node_modules)
and works with no network; opened as a file:// URL the browser refuses its JavaScript module: serve it.
"""

import http.server
import json
import os
import sys
import threading
import urllib.parse

import numpy as np

import data
from plumbing import browser, onnx_check
from plumbing.cli import ArgumentParser, UsageError, check_int, fail, safe_streams, shown
from plumbing.files import NotReadable, atomic_write, clashes, clean_stale_temps_for, read_regular, replace_dir

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
PAGE = ("index.html", "explorer.js", "vae.js", "style.css")
RUNTIME = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")  # the smallest onnxruntime-web that runs: wasm
SITE_FILES = (*PAGE, "model.json", "decoder.onnx", "encoder.onnx", "points.bin", *(f"ort/{n}" for n in RUNTIME))
SITE_FORMAT, INSTALL = "beta-vae-explorer", "npm ci --prefix web"
MODEL_KEYS = ("beta", "objective", "epochs", "seed", "kl_epoch", "format_version", "checkpoint_sha256", "trained_on")
LAYOUT = "mu float32 [count, latent_dim], labels uint8 [count], images uint8 [count, 28, 28], one after another"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}
TYPES |= {".json": "application/json", ".wasm": "application/wasm", ".png": "image/png"}
CONSOLE = "see the browser console with --serve"


def parse_args(argv=None):
    p = ArgumentParser(description="Build (and serve) a static latent-space explorer for decoder.onnx.")
    p.add_argument("--onnx", default="decoder.onnx", help="decoder written by export_onnx.py (default decoder.onnx)")
    p.add_argument("--encoder", help="encoder from export_onnx.py: adds a drawing pad and image drop (default none)")
    p.add_argument("--data-dir", "--data_dir", help="folder holding FashionMNIST/raw: adds a scatter (needs --encoder)")
    p.add_argument("--points", type=int, default=2000, help="test images in the scatter, 1-10000 (default 2000)")
    p.add_argument("--out", default="site", help="folder to write the site into, replaced as a whole (default site)")
    p.add_argument("--serve", action="store_true", help="then serve it on 127.0.0.1 and print the URL (default off)")
    p.add_argument("--port", type=int, default=8000, help="port for --serve, 0 for any free one (default 8000)")
    p.add_argument("--screenshot", help="also save a PNG of the page as headless Chromium shows it (default none)")
    return p.parse_args(argv)


def check_args(args):
    check_int("--points", args.points, 1, 10000)
    check_int("--port", args.port, 0, 65535)
    if args.data_dir is not None and args.encoder is None:
        raise UsageError("--data-dir draws the test images where the encoder puts them: add --encoder encoder.onnx")
    inputs = {"--onnx": args.onnx, "--encoder": args.encoder, "--data-dir": args.data_dir}
    clash = clashes(inputs, {"--out": args.out, "--screenshot": args.screenshot})
    out = os.path.realpath(args.out)
    inside = [f for f, p in inputs.items() if p is not None and os.path.realpath(p).startswith(out + os.sep)]
    if clash or inside:
        why = "the site folder is replaced as a whole, so it must not hold the inputs; choose another --out"
        raise UsageError(f"{clash or f'{inside[0]} {inputs[inside[0]]} is inside --out {args.out}'}: {why}")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"--out {args.out}: its parent folder does not exist; create it or choose another path")
    shot = args.screenshot or ""
    bad = os.path.realpath(shot).startswith(out + os.sep) or not os.path.isdir(os.path.dirname(os.path.abspath(shot)))
    if args.screenshot and (bad or not shot.lower().endswith(".png")):
        raise UsageError(f"--screenshot {shot} must be a .png in an existing folder outside --out {args.out}")
    if args.screenshot and browser.missing():
        raise UsageError(f"--screenshot {browser.missing()}")
    extra = foreign_names(out) if os.path.lexists(out) else []
    if extra is None:
        why = "so it is left alone: choose another --out, or remove it yourself"
        raise UsageError(f"--out {args.out} exists and is not a site explore.py wrote, {why}")
    if extra:  # a hosted copy may hold .git, CNAME, notes: replacing the folder would delete them
        raise UsageError(
            f"--out {args.out} holds files explore.py did not write ({', '.join(map(shown, extra[:3]))}"
            f"{f' and {len(extra) - 3} more' if len(extra) > 3 else ''}) that replacing the site would "
            "delete: move them out, or build into a new --out and copy the site over yours"
        )


def foreign_names(folder):
    """What `folder` holds that explore.py never writes there, or None if it is not a site (its model.json says so)
    nor empty. A folder is replaced as a whole only when this is empty: nothing else is ever deleted."""
    try:
        names = sorted(os.listdir(folder))
        meta = json.loads(read_regular(os.path.join(folder, "model.json"), 2**24)) if names else {"format": SITE_FORMAT}
        if os.path.islink(folder) or meta.get("format") != SITE_FORMAT:
            return None
    except (OSError, NotReadable, ValueError, AttributeError, RecursionError):  # OSError: not a folder
        return None
    ort = os.path.join(folder, "ort")
    if os.path.isdir(ort) and not os.path.islink(ort):
        names = sorted([n for n in names if n != "ort"] + [f"ort/{n}" for n in os.listdir(ort)])
    return [n for n in names if n not in SITE_FILES or os.path.isdir(os.path.join(folder, n))]


def runtime():
    """(version, {site name: path}) of the onnxruntime-web that web/package.json pins, or UsageError saying how."""
    dist = os.path.join(WEB, "node_modules", "onnxruntime-web")
    try:
        pinned = json.loads(read_regular(os.path.join(WEB, "package.json"), 2**20))["dependencies"]["onnxruntime-web"]
        installed = json.loads(read_regular(os.path.join(dist, "package.json"), 2**20))["version"]
    except (NotReadable, ValueError, KeyError, TypeError):
        why = f"run `{INSTALL}` (needs node and npm)"
        raise UsageError(f"onnxruntime-web is not installed in web/node_modules: {why}") from None
    files = {f"ort/{name}": os.path.join(dist, "dist", name) for name in RUNTIME}
    if installed != pinned or not all(os.path.isfile(p) for p in files.values()):
        why = f"not the pinned {pinned}, or lacks its wasm files: run `{INSTALL}`"
        raise UsageError(f"web/node_modules holds onnxruntime-web {installed}, {why}")
    return installed, files


def load_models(args):
    """The checked decoder and encoder (or None), and the encoder's session: what cannot run never reaches the page."""
    dec = onnx_check.load(args.onnx, "decoder")
    enc = onnx_check.load(args.encoder, "encoder") if args.encoder else None
    if enc is not None and len({(m.latent, m.image_shape, m.meta.get("checkpoint_sha256")) for m in (dec, enc)}) > 1:
        why = "export both at once with export_onnx.py --out decoder.onnx --encoder encoder.onnx"
        raise UsageError(f"{args.encoder} and {args.onnx} come from different checkpoints: {why}")
    onnx_check.run(dec, onnx_check.session(dec), np.zeros((1, dec.latent), np.float32))
    return dec, enc, enc and onnx_check.session(enc)


def scatter_points(args, enc, sess):
    """(posterior means (N, d) float32, labels (N,) uint8, images (N, 28, 28) uint8) of the first test images."""
    try:
        images, labels = data.read_split(args.data_dir, "test")
    except data.DataError as e:
        raise UsageError(f"{e}, or pass the --data-dir that train.py used") from None
    if enc.image_shape != (1, 28, 28):
        raise UsageError(f"{args.encoder} takes images of shape {enc.image_shape}, not Fashion-MNIST's (1, 28, 28)")
    images, labels = images[: args.points], labels[: args.points]
    x = images[:, None].astype(np.float32) * np.float32(2 / 255) - np.float32(1)  # [-1, 1], as in training
    return onnx_check.run(enc, sess, x)[0], labels, images


def site_meta(dec, enc, points, version):
    """model.json: what the page needs, and no paths. In KL order the dimensions not in use come last."""
    order, unused = onnx_check.kl_order(dec.kl, dec.latent)
    meta = {"format": SITE_FORMAT, "version": 1, "onnxruntime_web": version, "latent_dim": dec.latent}
    meta |= {"image_shape": list(dec.image_shape), "kl_known": dec.kl is not None, "unused_kl": onnx_check.ACTIVE_KL}
    meta |= {"dims": [{"index": d, "kl": dec.kl and dec.kl[d], "unused": d in unused} for d in order]}
    meta |= {"decoder": "decoder.onnx", "encoder": "encoder.onnx" if enc else None, "points": None}
    meta["model"] = {k: dec.meta[k] for k in MODEL_KEYS if k in dec.meta}
    if points is not None:
        meta["points"] = {"file": "points.bin", "count": len(points[1]), "classes": list(data.CLASSES)}
        meta["points"] |= {"axes": (order * 2)[:2], "layout": LAYOUT}
    return meta


def build(args):
    """Check everything, then write the site folder in one piece. Returns model.json's content."""
    version, sources = runtime()
    dec, enc, enc_session = load_models(args)
    points = scatter_points(args, enc, enc_session) if args.data_dir else None
    meta = site_meta(dec, enc, points, version)
    files = {}
    for name, path in (sources | {name: os.path.join(WEB, name) for name in PAGE}).items():
        try:  # read first: a write error is then ours
            files[name] = read_regular(path, 2**26)
        except NotReadable as e:
            raise UsageError(f"cannot read {path} ({e}): restore web/ (git) and run `{INSTALL}`") from None
    files |= {f"{m.kind}.onnx": m.data for m in (dec, enc) if m is not None}  # the bytes checked, not the path again
    if points is not None:
        files["points.bin"] = points[0].astype("<f4").tobytes() + points[1].tobytes() + points[2].tobytes()
    files["model.json"] = json.dumps(meta, indent=1).encode()

    def write(folder):
        os.mkdir(os.path.join(folder, "ort"))
        for name, content in files.items():
            with open(os.path.join(folder, *name.split("/")), "wb") as f:
                f.write(content)

    clean_stale_temps_for([args.out])
    try:
        replace_dir(args.out, write)
    except OSError as e:  # name the destination: the folder being built is a temporary one beside it
        why = f"({e.strerror or e}); nothing was changed: free some space or choose another --out"
        raise UsageError(f"cannot write the site {args.out} {why}") from None
    return meta


def site_file(root, request_path):
    """The file under `root` that a request path names, or None: no `..`, no hidden names, nothing outside root."""
    try:
        path = urllib.parse.unquote(urllib.parse.urlsplit(request_path).path, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    parts = path.split("/")
    if not path.startswith("/") or "\\" in path or "\0" in path or any(p.startswith(".") for p in parts[1:]):
        return None
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, *([p for p in parts[1:] if p] or ["index.html"])))
    return full if full.startswith(root + os.sep) and os.path.isfile(full) else None


class SiteHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the site's files and nothing else; 404 for any path that leaves the folder."""

    timeout = 10  # seconds a client may take over a request before its thread gives up on it

    def do_GET(self, body=True):
        port = self.server.server_address[1]
        target = site_file(self.server.root, self.path)
        if self.headers.get("Host") not in (f"127.0.0.1:{port}", f"localhost:{port}") or target is None:
            self.send_error(404, "not found")  # a foreign Host is DNS rebinding: answer it as nothing here
            return
        with open(target, "rb") as f:
            content = f.read()
        self.send_response(200)
        self.send_header("Content-Type", TYPES.get(os.path.splitext(target)[1], "application/octet-stream"))
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if body:
            self.wfile.write(content)

    do_HEAD = lambda self: self.do_GET(body=False)
    log_message = lambda self, *args: None  # a quiet server: the URL line is all the terminal needs


class Server(http.server.ThreadingHTTPServer):  # its request threads are daemons: Ctrl-C never waits for a client
    def handle_error(self, request, client_address):
        """A browser that drops a connection mid-download, or never finishes a request, is normal: no traceback."""
        e = sys.exc_info()[1]
        if not isinstance(e, (ConnectionError, TimeoutError)):
            print(f"warning: a request failed ({type(e).__name__}: {shown(e, 100)})", file=sys.stderr)


def make_server(folder, port):
    """A server for `folder` on 127.0.0.1 only (not yet serving); port 0 picks a free one."""
    server = Server(("127.0.0.1", port), SiteHandler)
    server.root = os.path.abspath(folder)
    return server


def screenshot(folder, path):
    """Serve `folder` on a free port, open it in headless Chromium, save what it shows once the first image is drawn."""
    server = make_server(folder, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    session = browser.start()
    try:
        session.set_script_timeout(60)
        session.get(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.call(session, "await window.betaVAE.ready; await window.betaVAE.idle();")
        errors = browser.console_errors(session)
        png = session.get_screenshot_as_png()
    except browser.PageError as e:
        raise UsageError(f"the page failed in Chromium ({e}): {CONSOLE}") from None
    finally:
        session.quit()
        server.shutdown()
        server.server_close()
    if errors:
        raise UsageError(f"the page logged errors in Chromium ({errors[0][:200]}): {CONSOLE}")
    clean_stale_temps_for([path])  # half-written screenshots of a process that was killed
    try:
        atomic_write(path, lambda f: f.write(png))
    except OSError as e:
        why = f"({e.strerror or e}): free some space or choose another path"
        raise UsageError(f"cannot write --screenshot {path} {why}") from None


def trained_to(path):
    """The last epoch in metrics.jsonl beside an exported file (its run folder), or None."""
    try:
        lines = read_regular(os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl"), 2**24).split(b"\n")
        return max(int(json.loads(line)["epoch"]) for line in lines if line.strip())
    except (NotReadable, ValueError, KeyError, TypeError, RecursionError):
        return None


def main(argv=None):
    safe_streams()
    args, server = parse_args(argv), None
    try:
        check_args(args)
        if args.serve:  # take the port first: a taken port is known before anything is built
            try:
                server = make_server(args.out, args.port)
            except OSError as e:
                why = f"({e.strerror or e}): pass another --port, or --port 0 for any free one"
                raise UsageError(f"cannot serve on 127.0.0.1:{args.port} {why}") from None
        meta = build(args)
        if args.screenshot:
            screenshot(args.out, args.screenshot)
    except (UsageError, OSError, KeyboardInterrupt) as e:
        if server is not None:
            server.server_close()
        if isinstance(e, KeyboardInterrupt):
            fail("interrupted; the site was not written (a site already there is as it was)", 130)
        if isinstance(e, OSError):
            e = f"cannot write {e.filename or args.out} ({e.strerror or e}): choose another --out or --screenshot"
        fail(e)
    epochs, latest = meta["model"].get("epochs", ""), trained_to(args.onnx)
    if latest is not None and epochs.isdigit() and latest > int(epochs):
        again = "export it again to explore the latest model"
        print(f"note: {args.onnx} is from epoch {epochs}, but its run has trained to epoch {latest}: {again}")
    used, count = sum(not d["unused"] for d in meta["dims"]), meta["points"]["count"] if meta["points"] else 0
    print(
        f"wrote {args.out}/: {meta['latent_dim']} latent dims ({used} in use, KL > {onnx_check.ACTIVE_KL:g} nats), "
        f"{'encoder, ' if meta['encoder'] else ''}{count} scatter points, onnxruntime-web {meta['onnxruntime_web']}"
        + (f"; {args.screenshot}" if args.screenshot else "")
    )
    if server is None:
        print(f"serve it:  python explore.py ... --serve   or   python -m http.server -d {args.out} -b 127.0.0.1")
        return
    print(f"serving {args.out}/ at http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
