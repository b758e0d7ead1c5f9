"""Headless Chromium driven by selenium, for the explorer's tests and bench.py's browser section (torch-free).

It uses the system's browser and driver (Debian: `apt-get install -y chromium chromium-driver`): a tool's own
browser download needs a network this project does not assume. Flags: --no-sandbox because CI runs as root; the
--disable-* flags and a fresh profile stop Chromium from calling home, which stalls start-up without a network.
"""

import importlib.util
import os
import shutil
import tempfile

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --no-first-run --disable-background-networking --hide-scrollbars "
    "--disable-component-update --disable-sync --disable-dev-shm-usage"
)
RUNTIME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web/node_modules/onnxruntime-web")
ENABLE = (
    "apt-get install -y chromium chromium-driver && pip install -r requirements.txt && npm ci --prefix web "
    "(bash .ci/run does all three)"
)


def find():
    """(chromium path, chromedriver path), or None for what is missing."""
    return next(filter(None, map(shutil.which, CHROMIUM)), None), shutil.which("chromedriver")


def missing():
    """What is missing for the browser tests and bench section, or None when all is there."""
    found = (*find(), importlib.util.find_spec("selenium"), os.path.isdir(RUNTIME))
    needs = [name for name, ok in zip(("Chromium", "chromedriver", "selenium", "onnxruntime-web"), found) if not ok]
    return f"needs {', '.join(needs)}: {ENABLE}" if needs else None


def start(width=1400, height=1500):
    """A headless Chromium session that keeps the page's console log. Its quit() also removes its fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = find()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="explorer-chromium-")
    for flag in (*FLAGS.split(), f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=opts)
    quit_ = session.quit
    session.quit = lambda: (quit_(), shutil.rmtree(profile, ignore_errors=True))
    return session


def console_errors(session):
    """The page's console messages of level SEVERE since the last call."""
    return [entry["message"] for entry in session.get_log("browser") if entry["level"] == "SEVERE"]


class PageError(Exception):
    """The page's script threw; the message is what it threw."""


def call(session, script, *args):
    """Run `script` (the body of an async JS function of `args`) in the page; its result, or PageError if it threw."""
    result = session.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
        ".then(value => done({value}), e => done({error: String(e)}));",
        *args,
    )
    if "error" in result:
        raise PageError(result["error"])
    return result.get("value")


def measure_explorer(url, loads, moves):
    """Times from the explorer page's own clock: the first image after each of `loads` fresh loads; 200
    betaVAE.decode calls of one image (in 20 blocks of 10: the clock moves in 0.1 ms steps without cross-origin
    isolation); and `moves` slider key presses, each a real input event, from event to new pixels."""
    from selenium.webdriver.common.keys import Keys

    session = start()
    try:
        session.set_script_timeout(120)
        first, ready = [], "const b = window.betaVAE; await b.ready; await b.idle(); return b.timings.firstImageMs;"
        for _ in range(loads):  # a fresh navigation each: wasm compile, model, first image
            session.get(url)
            first.append(call(session, ready))
        blocks = call(
            session,
            """const b = window.betaVAE, z = new Float32Array(b.latentDim), blocks = [];
            for (let i = 0; i < 50; i++) await b.decode(z);
            for (let k = 0; k < 20; k++) {
              const t = performance.now();
              for (let i = 0; i < 10; i++) { z[i % z.length] = (i - 5) / 5; await b.decode(z); }
              blocks.push((performance.now() - t) / 10);
            }
            return blocks;""",
        )
        slider = session.find_element("css selector", "input[data-dim]")
        session.execute_script("arguments[0].focus();", slider)
        for k in range(moves):
            slider.send_keys(Keys.ARROW_RIGHT if k % 40 < 20 else Keys.ARROW_LEFT)
            call(session, "await window.betaVAE.idle();")
        updates = call(session, "return window.betaVAE.timings.updates;")[-moves:]
        found = dict(first_image_ms=first, decode_ms=blocks, calls=200, slider_to_canvas_ms=updates)
        return found | dict(console_errors=console_errors(session), chromium=session.capabilities.get("browserVersion"))
    finally:
        session.quit()
