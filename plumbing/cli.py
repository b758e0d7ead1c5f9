"""What every script shares at its edge (torch-free): flags and the one-line error contract.

Bad input ends with one line, `error: <what is wrong>: <what to do>`, and exit status 2: no traceback, no usage dump.
"""

import argparse
import contextlib
import math
import sys


class UsageError(Exception):
    """Something the user can fix; the message says what and how."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other bad input: one line, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        """argparse's, refusing an empty value: `--out-dir ""` names no folder, and `x or default` would quietly use
        the default (or the current folder) instead."""
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None) if action.option_strings else None
            if value == "" or (isinstance(value, list) and "" in value):
                flag = "/".join(action.option_strings)
                self.error(
                    f"argument {flag}: an empty value names nothing: give one, or leave the flag out for its default"
                )
        return parsed


def add_setting(parser, name, setting, default=argparse.SUPPRESS):
    """The flag of a vae.SETTINGS entry: its type, range and default in the help, all read from the one table."""
    said = "" if setting.default is None else f"{setting.default:g}"  # "": the help says it
    low, high = (f"{v}" if isinstance(v, int) else f"{v:g}" for v in (setting.low, setting.high))
    help = f"{setting.help}, {low} to {high}"
    default = setting.default if default is argparse.SUPPRESS else default
    add(parser, name, help, said, type=int if isinstance(setting.low, int) else float, default=default)


def add(parser, name, help, default_text=None, **kwargs):
    """--name-with-dashes (and the seed's --name_with_underscores), the default stated at the end of its help."""
    flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
    said = default_text if default_text is not None else "off" if kwargs.get("action") else kwargs.get("default")
    parser.add_argument(*flags, dest=name, help=f"{help} (default: {said})" if said != "" else help, **kwargs)


def add_device(parser):
    add(parser, "device", "cuda, mps or cpu, the first there; or cpu, cuda, cuda:N, mps", default="auto")


def check_int(flag, value, low, high):
    if not low <= value <= high:
        raise UsageError(f"{flag} {value} is out of range: use {low} to {high}")


def check_float(flag, value, low, high, hint=""):
    """low <= value <= high and finite; NaN fails (every comparison with NaN is False)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{flag} {value} is out of range: use a number from {low:g} to {high:g}{hint}")


def check_setting(name, value, setting, flag=None):
    """value within a vae.SETTINGS entry's range, named as its flag (--batch-size) in the message."""
    check = check_int if isinstance(setting.low, int) else check_float
    check(flag or "--" + name.replace("_", "-"), value, setting.low, setting.high)


def safe_streams():
    """Print anything, even paths whose bytes are not UTF-8 (Python keeps them as surrogates): escape, never raise."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):  # replaced by a test harness or already closed
            stream.reconfigure(errors="backslashreplace")


def shown(text, limit=200):
    """`text` from a file (or a path) made safe to print or draw: control characters escaped, one short line."""
    text = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit]) + ("…" if len(text) > limit else "")


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
