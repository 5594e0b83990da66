"""lm-eval's own command line with the ``sinkfix`` model type registered and the built-in tasks on the
include path:

    python -m sinkfix.lmeval run --model sinkfix --model_args pretrained=smollm2-135m,policy=sink_scale=0.9 \\
        --tasks sinkfix_prose,sinkfix_cloze

lm-eval 0.4.x discovers model types only among its own modules (there is no plugin entry point), so
the plain ``lm_eval --model sinkfix`` cannot find this one; this wrapper imports it first.

A folder given with ``--include_path`` (either form, ``--include_path DIR`` or ``--include_path=DIR``,
or in a ``--config`` file) is searched next to the built-in tasks, not instead of them; a task of
the same name in it takes precedence over a built-in one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sinkfix.errors import SinkfixError
from sinkfix.lmeval.builtin import TASKS_DIR


def with_builtin_tasks(include_path: Any) -> list[str]:
    """lm-eval's ``include_path`` (None, one path or a list) with the built-in task folder in front:
    lm-eval indexes the folders in order and a later one overrides an earlier one."""
    if include_path is None:
        given = []
    else:
        given = list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    paths = [str(TASKS_DIR)]
    for path in map(str, given):
        # the built-in folder given again would index every built-in task twice, with a warning each
        if path and Path(path).expanduser().resolve() != TASKS_DIR and path not in paths:
            paths.append(path)
    return paths


def _register_builtin_tasks() -> None:
    """Make every task manager lm-eval's command line builds see the built-in tasks too.

    lm-eval's ``--include_path`` takes one folder, which the command line hands to ``TaskManager``
    as is; the manager itself takes a list. Passing a second ``--include_path`` would replace the
    user's, so the list is made where the manager is built, whichever of lm-eval's subcommands
    (run, ls, validate) or a ``--config`` file the path came from."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_sinkfix_builtin", False):
        return

    class TaskManager(base):
        _sinkfix_builtin = True

        def __init__(self, verbosity: Any = None, include_path: Any = None, *args: Any, **kwargs: Any) -> None:
            super().__init__(verbosity, with_builtin_tasks(include_path), *args, **kwargs)

    TaskManager.__doc__ = base.__doc__
    lm_eval.tasks.TaskManager = TaskManager


def main() -> None:
    try:
        import sinkfix.lmeval.model  # noqa: F401 - registers the "sinkfix" model type
    except SinkfixError as exc:  # lm-eval not installed: its one-line hint, as `sinkfix eval` prints it
        print(f"python -m sinkfix.lmeval: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    _register_builtin_tasks()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *sys.argv[1:]]
    cli_evaluate()


if __name__ == "__main__":
    main()
