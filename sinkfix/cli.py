"""The ``sinkfix`` console script: ``sinkfix bench | inspect | calibrate | monitor | bb | eval | stream | kvquant``.

Every command turns expected failures (unknown model, unreadable file, bad policy, profile for
another model) into a one-line error on stderr and exit code 2, never a traceback. Expected
failures are the project's own errors (:class:`~sinkfix.errors.SinkfixError` and its subclasses,
raised where the problem is found, file errors included); anything else is a bug and surfaces
with its traceback and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, Sequence

from sinkfix.commands import SUMMARIES
from sinkfix.errors import SinkfixError

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


def _command_in(argv: Sequence[str]) -> str | None:
    # the top-level parser has only flags (--help, --version), so the first word is the command
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser([command] if command in SUMMARIES else [])
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    out = getattr(args, "out", None)
    if isinstance(out, str) and not out.strip():
        # an unset shell variable (--out "$DIR"): bench and eval ran their whole work and saved nothing,
        # inspect and stream wrote into the working folder
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # monitor run | report...
        print(f"sinkfix {args.command}: error: --out is empty: name the output (see sinkfix {command} --help)",
              file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except SinkfixError as exc:
        print(f"sinkfix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sinkfix {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
