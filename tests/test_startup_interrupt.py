"""Ctrl-C while the `sinkfix` command is still loading its package (torch, transformers: the first
seconds) ends as an interrupt once a command runs does: one line, status 130. It printed Python's
traceback and ended with status 1."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# delivers SIGINT while `import sinkfix` imports torch, as a Ctrl-C in the first seconds does
SCRIPT = textwrap.dedent("""
    import builtins, os, signal, sys
    sys.argv[0] = {argv0!r}
    signal.signal(signal.SIGINT, {handler})
    real = builtins.__import__
    def importing(name, *args, **kwargs):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
        return real(name, *args, **kwargs)
    builtins.__import__ = importing
    import sinkfix
    print("imported", signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
""")


def _run(argv0: str, handler: str = "signal.default_int_handler") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(argv0=argv0, handler=handler)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv0", ["/usr/local/bin/sinkfix", "sinkfix"])
def test_ctrl_c_while_the_command_loads_is_one_line_and_status_130(argv0):
    done = _run(argv0)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == "sinkfix: interrupted\n" and done.stdout == ""


def test_another_program_importing_sinkfix_keeps_pythons_interrupt():
    done = _run("/usr/bin/my-tool")
    assert done.returncode != 130 and "KeyboardInterrupt" in done.stderr


def test_a_command_that_ignores_sigint_keeps_ignoring_it_while_loading():
    """A background job of a shell inherits SIGINT ignored: the command keeps it so."""
    done = _run("/usr/local/bin/sinkfix", handler="signal.SIG_IGN")
    assert done.returncode == 0 and done.stdout.strip() == "imported True", done.stderr[-2000:]
