"""Subcommands of the ``sinkfix`` CLI. Each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.

``SUMMARIES`` holds each command's one-line help, so that ``sinkfix --help`` can list every command
without importing any of them (each imports what its work needs: torch, transformers, matplotlib).
"""

import argparse
from pathlib import Path

SUMMARIES: dict[str, str] = {
    "bench": "benchmark quality, extreme tokens, speed and memory: stock vs patched",
    "inspect": "report attention sinks, value drains, residual peaks and dormant heads",
    "calibrate": "fit per-head sink scaling to next-token NLL and save a profile",
    "monitor": "live extreme-token telemetry: replay requests, report on the log",
    "bb": "train toy models on the Bigram-Backcopy task and measure sinks, drains and peaks",
    "eval": "downstream tasks through lm-eval: stock vs corrected on the same items, with paired statistics",
    "stream": "streaming perplexity: sink cache vs window-only cache vs recomputation",
    "kvquant": "KV-cache quantization: full vs quantized vs sink-protected perplexity",
}

#: rich's ``print`` arguments for a line that names written files: no markup (a folder named
#: ``out[/x]`` raised rich's MarkupError after the work was done), no highlighting, and no wrapping at
#: the console's width (80 columns when the output is not a terminal: a long path was cut in two
#: and could not be copied from a log).
PATH_LINE = {"markup": False, "highlight": False, "soft_wrap": True}

#: Rows of a printed table of heads active on one domain and dormant on another (`inspect`,
#: `monitor report`); their report.json holds every one.
MAX_FLIPS_PRINTED = 30


def set_threads(threads: int | None) -> None:
    """Apply a command's ``--threads`` (None: torch's own choice). A count below 1 is refused with a
    UsageError: torch would ignore 0 here and fail on -1 with an error that does not name the option."""
    if threads is None:
        return
    if threads < 1:
        from sinkfix.errors import UsageError

        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def bos_for_profile(flag: bool | None, correction, path: str | None) -> tuple[bool, str | None]:
    """``--bos`` / ``--no-bos`` when given, else the BOS protocol the correction (a profile read from
    ``path``) was calibrated with, else a BOS; with a note where a profile is measured otherwise than it
    was calibrated (a flag against its protocol) or where its protocol replaced the default (no BOS). A
    no-BOS profile inspected with BOS windows was measured on text it was not fitted for, unsaid
    (SmolLM2's BOS profile: python +7% perplexity without a BOS, -13% with one)."""
    from sinkfix.profile import bos_choice  # the rule bench and stream use: flag, then profile

    name = None if path is None else Path(path).name
    bos, source, note = bos_choice(flag, getattr(correction, "recorded_bos", None), name)  # a policy records none
    if source == "profile" and not bos:
        note = f"--profile {name}: no BOS, as the profile was calibrated (--bos to measure with one)"
    return (True if bos is None else bos), note  # no flag, no recorded protocol: a BOS


class StoreOnce(argparse.Action):
    """An option that may be given once: argparse keeps the last of two silently, and a second
    ``--profile`` replaced the first, unsaid (``--policy`` is the repeatable one). For options whose
    default is None."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} is given twice ({getattr(namespace, self.dest)}, then {values}): give it once")
        setattr(namespace, self.dest, values)
