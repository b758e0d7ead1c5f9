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
ENABLE = ("apt-get install -y chromium chromium-driver && pip install -r requirements.txt && npm ci --prefix web "
          "(bash .ci/run does all three)")


def find():
    """(chromium path, chromedriver path), or None for what is missing."""
    return next(filter(None, map(shutil.which, CHROMIUM)), None), shutil.which("chromedriver")


def missing():
    """What is missing for the browser tests and bench section, or None when all is there."""
    chromium, driver = find()
    needs = [name for name, ok in (("Chromium", chromium), ("chromedriver", driver),
                                   ("selenium", importlib.util.find_spec("selenium")),
                                   ("onnxruntime-web", os.path.isdir(os.path.join(
                                       os.path.dirname(os.path.abspath(__file__)), "web", "node_modules",
                                       "onnxruntime-web")))) if not ok]
    return f"needs {', '.join(needs)}: {ENABLE}" if needs else None


def start(width=1400, height=1500):
    """A headless Chromium session that keeps the page's console log. Quit it (driver.quit()) when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium, driver = find()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="explorer-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=opts)
    quit_ = session.quit

    def quit_and_clean():
        quit_()
        shutil.rmtree(profile, ignore_errors=True)

    session.quit = quit_and_clean
    return session


def console_errors(session):
    """The page's console messages of level SEVERE since the last call."""
    return [entry["message"] for entry in session.get_log("browser") if entry["level"] == "SEVERE"]


class PageError(Exception):
    pass


def call(session, script, *args):
    """Run `script` (the body of an async JS function of `args`) in the page; its result, or PageError if it threw."""
    result = session.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
        ".then(value => done({value}), e => done({error: String(e)}));", *args)
    if "error" in result:
        raise PageError(result["error"])
    return result.get("value")
