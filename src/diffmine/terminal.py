"""Text for the terminal. Labels, file names and problems come from the data a user received:
a newline or an ANSI escape in a label must not forge a line or repaint the screen."""

from __future__ import annotations

import contextlib
import shlex
import sys


def printable(text: str) -> str:
    """``text`` with every non-printable character (newline, tab, ESC, ...) shown as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


class PrintableOutput:
    """A text stream (the commands' stdout) that writes every line :func:`printable`: tables of
    labels (``classify``, ``evaluate``, ``query``, ...) show an ESC in a label as ``\\x1b``, never
    pass it on to drive the terminal. Newlines are kept: they end the lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write("\n".join(printable(line) for line in text.split("\n")))
        return len(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding ...: the stream's own
        return getattr(self.stream, name)


def shell_word(value) -> str:
    """``value`` as one word of a command a message tells the user to run: a run folder with a space
    stays one argument, and a received run's recorded text (a model name with ``; rm ...``) runs nothing."""
    return shlex.quote(str(value))


def counted(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def size_text(n: int) -> str:
    """512 MiB, 1.3 GiB, 64 KiB, 100 bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def print_problems(problems, run_path, limit: int = 10) -> None:
    """One line per bad input (``Problem``: image_id, path, problem), the first ``limit`` of them."""
    for p in problems[:limit]:
        print(printable(f"skipped {p.path or p.image_id}: {p.problem}"))
    if len(problems) > limit:
        print(f"... and {len(problems) - limit} more (see `diffmine status --run {shell_word(run_path)}`)")


def json_alone(as_json: bool):
    """With ``--json``, stdout carries the JSON document alone: what the step prints meanwhile (the
    images it skipped, a kept precision, ...) goes to stderr, where a pipe to ``jq`` leaves it (printable,
    as stdout is: a label or a received record's text never drives the terminal)."""
    return contextlib.redirect_stdout(PrintableOutput(sys.stderr)) if as_json else contextlib.nullcontext()
