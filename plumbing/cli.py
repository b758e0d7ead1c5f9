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

    def parse_args(self, args=None, namespace=None):
        """argparse's, refusing an empty value: `--out-dir ""` names no folder, and `x or default` would quietly
        use the default (or the current folder) instead."""
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None) if action.option_strings else None
            if value == "" or (isinstance(value, list) and "" in value):
                self.error(f"argument {'/'.join(action.option_strings)}: an empty value names nothing: give one, or "
                           "leave the flag out for its default")
        return parsed


# The ranges of the run flags every script that takes them checks alike (train.py, and sweep.py before passing them
# on); the model's own are vae.LIMITS.
RANGES = {"batch_size": (1, 1_000_000), "epochs": (1, 1_000_000), "seed": (0, 2**32 - 1), "lr": (1e-12, 10.0),
          "iwae_k": (1, 100_000)}


def check_range(name, value):
    """value within RANGES[name], named as its flag (--batch-size) in the message."""
    low, high = RANGES[name]
    (check_int if isinstance(low, int) else check_float)("--" + name.replace("_", "-"), value, low, high)


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
