"""lm-eval's own command line with the ``sinkfix`` model type registered and the built-in tasks on the
include path:

    python -m sinkfix.lmeval run --model sinkfix --model_args pretrained=smollm2-135m,policy=sink_scale=0.9 \\
        --tasks sinkfix_prose,sinkfix_cloze

lm-eval 0.4.x discovers model types only among its own modules (there is no plugin entry point), so
the plain ``lm_eval --model sinkfix`` cannot find this one; this wrapper imports it first.
"""

from __future__ import annotations

import sys

from sinkfix.lmeval.builtin import TASKS_DIR


def main() -> None:
    import sinkfix.lmeval.model  # noqa: F401 - registers the "sinkfix" model type
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:]
    if "--include_path" not in args and len(args) > 1 and args[0] not in ("-h", "--help"):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
