"""The ``sinkfix`` console script: ``sinkfix bench | inspect | calibrate | monitor | bb | eval | stream | kvquant``.

Every command turns expected failures (unknown model, unreadable file, bad policy, profile for
another model) into a one-line error on stderr and exit code 2, never a traceback. Expected
failures are the project's own errors (:class:`~sinkfix.errors.SinkfixError` and its subclasses,
raised where the problem is found, file errors included); anything else is a bug and surfaces
with its traceback and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from sinkfix.commands import SUMMARIES
from sinkfix.errors import SinkfixError
from sinkfix.files import note_interrupt, pending_interrupt

COMMANDS = tuple(SUMMARIES)


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's own errors (a value that is not a number, an unknown choice) as one line, like
    every other expected failure: argparse printed the whole usage block (6-7 lines) before them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The ``sinkfix`` parser. Only the subcommands in ``commands`` are built in full (importing
    their modules); the others are listed with their one-line help, so ``sinkfix --help`` and
    ``sinkfix bench ...`` import no command module they do not run."""
    from sinkfix import __version__

    parser = _OneLineErrors(
        prog="sinkfix",
        description="Measure and correct attention sinks, value drains and residual peaks in transformer LMs.",
    )
    parser.add_argument("--version", action="version", version=f"sinkfix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    full = set(commands)
    for name, summary in SUMMARIES.items():
        if name in full:
            importlib.import_module(f"sinkfix.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


class _ReaderGuard:
    """``sys.stdout`` while a command runs: when its reader stops reading (``| head``, a pager quit
    early), what is still printed goes to the null device and the command goes on to write its files.
    Without it a closed pipe ended calibrate, inspect, stream, kvquant and monitor run at their next
    printed line: rich exits with code 1 and no word, ``print`` raised BrokenPipeError, and a profile
    being fitted behind ``| head -3`` was lost. The rest is delegated to the real stream."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        # the descriptor itself points at the null device, so that the text still buffered and the
        # interpreter's own flush at exit do not fail on the closed pipe again
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _saved(out) -> str:
    """What a command that ran to its end left, for the message after a closed standard output."""
    if not isinstance(out, (str, Path)) or not str(out):
        return "nothing was saved (no --out)"
    return f"the files under {out} were written" if Path(out).is_dir() else f"{out} was written"


def _command_in(argv: Sequence[str]) -> str | None:
    # the top-level parser has only flags (--help, --version), so the first word is the command
    return next((word for word in argv if not word.startswith("-")), None)


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a CI cancel, a service stop) as an exception in the main thread,
    so that it unwinds as Ctrl-C does: a half-written output is rolled back or removed (an atomic write's
    temporary file, `bench`'s folder), where the signal's default action ended the process between two
    files and left a folder that mixed two runs."""


def _terminate(signum, frame) -> None:
    note_interrupt(_Terminated)  # in case the exception is lost (raised inside a destructor)
    raise _Terminated


def _interrupt(signum, frame) -> None:
    """Ctrl-C as Python's own handler does it, recorded too: an exception raised while a destructor
    runs is dropped by Python, and the run went on to write its files (sinkfix.files.note_interrupt)."""
    note_interrupt(KeyboardInterrupt)
    raise KeyboardInterrupt


#: Options naming a file, folder or model, refused when given empty (blank), with what they name
#: (an empty --profile is refused where profiles are read: "empty profile path").
_NAMED_BY_OPTION = {"out": "the output", "model": "a model", "requests": "a request file"}


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class _WarningsAsNotes:
    """Warnings printed while a command runs, one line each: ``sinkfix CMD: warning: MESSAGE``.
    Python's own format adds the warning's class and the source line that raised it (``--domain
    prose`` printed ``.../sinkfix/texts.py:413: FutureWarning: ...`` and then that line of code),
    which tells a command-line user nothing. A warning raised outside sinkfix (transformers, torch)
    keeps its class and place in brackets, which a user reporting it needs. Only the format is
    replaced, not ``showwarning``: warnings recorded by ``catch_warnings(record=True)`` (pytest's
    among them) stay recorded."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.previous = None

    def format(self, message, category, filename, lineno, line=None) -> str:
        where = "" if str(filename).startswith(_PACKAGE_DIR) else f" [{category.__name__}, {filename}:{lineno}]"
        # a library warning that names its sender ("sinkfix.monitor: closed during request ...") needs no
        # second name after the command's
        text = re.sub(r"^sinkfix[\w.]*: ", "", str(message))
        return f"sinkfix {self.label}: warning: {text}{where}\n"

    def __enter__(self) -> "_WarningsAsNotes":
        self.previous, warnings.formatwarning = warnings.formatwarning, self.format
        return self

    def __exit__(self, *exc) -> None:
        warnings.formatwarning = self.previous


def _label(args: argparse.Namespace) -> str:
    """The command as typed, for messages: ``monitor ranges``, not ``monitor``."""
    return " ".join(filter(None, (args.command, getattr(args, "action", None))))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    # a caller that ignores SIGINT (a background job of a shell) keeps it ignored; any other handler (Python's
    # own, or one a library installed before: the test suite has one) is replaced while the command runs
    previous_int = signal.getsignal(signal.SIGINT) if in_main_thread else None
    replace_int = previous_int not in (None, signal.SIG_IGN)
    if replace_int:
        signal.signal(signal.SIGINT, _interrupt)
    # with descriptor 1 closed (`>&-`) Python has no sys.stdout at all (None): what a command prints
    # goes to the null device (rich's consoles failed on None: `calibrate >&-` ended in an AttributeError)
    no_stdout = None if sys.stdout is not None else open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    guard = _ReaderGuard(sys.stdout if no_stdout is None else no_stdout)
    try:
        # the command's modules (torch, transformers) are imported here: Ctrl-C while they load is one
        # line too, not a 20-line traceback
        parser = build_parser([command] if command in SUMMARIES else [])
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        command = _label(args)
        # an unset shell variable (--out "$DIR"): bench and eval ran their whole work and saved nothing,
        # inspect and stream wrote into the working folder; an empty --model or --requests was read as
        # the working folder ("request file . is a directory")
        for option, what in _NAMED_BY_OPTION.items():
            value = getattr(args, option, None)
            if isinstance(value, str) and not value.strip():
                print(f"sinkfix {command}: error: --{option} is empty: name {what} (see sinkfix {command} --help)",
                      file=sys.stderr)
                return 2
        sys.stdout = guard
        with _WarningsAsNotes(command):
            code = int(args.run(args) or 0)
        lost = pending_interrupt()
        if lost is not None:  # its exception was dropped on the way; no file was replaced after it
            raise lost
        if guard.reader_gone and code == 0:
            print(f"sinkfix {command}: error: standard output was closed by its reader before everything was "
                  f"printed; {_saved(getattr(args, 'out', None))}", file=sys.stderr)  # a default the run resolved
            return 2
        return code
    except SinkfixError as exc:
        print(f"sinkfix {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sinkfix{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"sinkfix{' ' + command if command else ''}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if sys.stdout is guard:
            sys.stdout = None if no_stdout is not None else guard.stream
        if no_stdout is not None:
            no_stdout.close()
        if in_main_thread:  # None: the handler before was not set from Python (the default action)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            if replace_int:
                signal.signal(signal.SIGINT, previous_int)
        note_interrupt(None)


if __name__ == "__main__":
    sys.exit(main())
