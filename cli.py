"""What every script shares at its edge (torch-free): flags, range checks and the one-line error contract.

Bad input ends with one line, `error: <what is wrong>: <what to do>`, and exit status 2: no traceback, no usage dump.
"""
import argparse
import math
import sys


class UsageError(Exception):
    """Something the user can fix; the message says what and how."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other bad input: one line, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def check_int(flag, value, low, high):
    if not low <= value <= high:
        raise UsageError(f"{flag} {value} is out of range: use {low} to {high}")


def check_float(flag, value, low, high, hint=""):
    """low <= value <= high and finite; NaN fails (every comparison with NaN is False)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{flag} {value} is out of range: use a number from {low:g} to {high:g}{hint}")


def safe_streams():
    """Print anything, even paths whose bytes are not UTF-8 (Python keeps them as surrogates): escape, never raise."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # replaced by a test harness or already closed
            pass


def shown(text, limit=200):
    """`text` from a file (or a path) made safe to print or draw: control characters escaped, one short line."""
    text = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit]) + ("…" if len(text) > limit else "")


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
