"""benchmarks/gpu_check.sh's own logic, without a GPU: an interpreter stand-in that says CUDA is
there and runs nothing, so each phase ends at once; what is checked is which phases start, which are
skipped for want of budget, and the exit code."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path: Path, budget: int) -> tuple[int, str, str]:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"fake python $*\"\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / f"out-{budget}"
    env = dict(os.environ, OUT=str(out), PYTHON=str(fake), GPU_CHECK_BUDGET=str(budget))
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, (out / "phases.txt").read_text(), (out / "summary.txt").read_text()


def test_every_phase_runs_within_a_full_budget(tmp_path):
    rc, phases, summary = _run(tmp_path, 540)
    started = [line.split()[1] for line in phases.splitlines() if not line.startswith("skipped")]
    assert [Path(p).name for p in started] == ["model.log", "host-overhead.log", "step-profile.log", "pytest-kernels.txt",
                                               "bench.log",
                                               "content-sinks.md", "audit-native.log", "model-compiled.log"]
    assert rc == 0 and "model check (compiled) exit code: 0" in summary


def test_phases_that_need_more_than_is_left_are_skipped(tmp_path):
    rc, phases, summary = _run(tmp_path, 100)  # the compiled phase needs 200 s left
    assert "skipped: " in phases and "200 s needed" in phases
    assert "model check (compiled) exit code: 125" in summary and rc == 1
    rc, phases, summary = _run(tmp_path, 10)  # nothing has the 20 s the least needy phase needs
    assert phases.count("skipped: ") == 8 and rc == 1
    assert "pytest tests/kernels exit code: 125" in summary
