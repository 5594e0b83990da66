"""Option checks of four benchmark scripts (bench_decode, bench_patch_overhead, bench_content_sinks,
act_perplexity): a bad option ends the script with exit status 2 and one ``error:`` line naming the
option and its value, no traceback, before the expensive work (the model load where the option is
known without the model; otherwise right after it, before anything is measured).

Refusals before the load run in one child interpreter (each script run as ``__main__`` with its own
argv, as ``python SCRIPT ...`` would, its exit status, stdout and stderr kept apart): a child per case
cost about 2 s each for importing torch. They name a model folder that does not exist, so a check that
came after the load would end in the load's error, which names ``--model``, not the option. Refusals
after the load, and one real run, are separate subprocesses on the tiny random Llama of
tests/test_bench.py (max_position_embeddings 128, a byte-level tokenizer). Every child runs on one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench import MAX_POS, _save_tiny

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NO_MODEL = "/nonexistent/sinkfix-test-model"


def _env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return environ


def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *argv], capture_output=True, text=True,
                          env=_env(), timeout=180, cwd=BENCHMARKS.parent)


def _assert_refused(code, stderr: str, stdout: str, *names: str) -> str:
    """Exit 2, no traceback, the last line of stderr the one error line, naming each of ``names``."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, (code, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


# -- refused before the model loads (or, for bench_content_sinks, before any attention call) ------------------
# (case id, script, argv, what the error line must name, what stdout must not show: the work began)
_BEFORE = [
    ("decode-modes-typo", "bench_decode", ["--modes", "eagr"], ["--modes", "eagr"], "stock"),
    ("decode-modes-empty", "bench_decode", ["--modes", "eager,"], ["--modes"], "stock"),
    ("decode-prompt-0", "bench_decode", ["--prompt", "0"], ["--prompt", "0"], "stock"),
    ("decode-threads-0", "bench_decode", ["--threads", "0"], ["--threads", "0"], "stock"),
    ("decode-threads-word", "bench_decode", ["--threads", "1,x"], ["--threads", "1,x"], "stock"),
    ("decode-profile-missing", "bench_decode", ["--profile", "/nonexistent/missing.json"],
     ["--profile", "/nonexistent/missing.json"], "stock"),
    ("decode-json-folder", "bench_decode", ["--json", "{folder}"], ["--json", "{folder}"], "stock"),
    ("decode-json-under-a-file", "bench_decode", ["--json", "{file}/x.json"], ["--json", "{file}/x.json"], "stock"),
    ("overhead-seq-len-negative", "bench_patch_overhead", ["--seq-len", "-5"], ["--seq-len", "-5"], "ABBA"),
    ("overhead-seq-len-0", "bench_patch_overhead", ["--seq-len", "0"], ["--seq-len", "0"], "ABBA"),
    ("overhead-repeats-0", "bench_patch_overhead", ["--repeats", "0"], ["--repeats", "0"], "ABBA"),
    ("overhead-mem-rounds-0", "bench_patch_overhead", ["--mem-rounds", "0"], ["--mem-rounds", "0"], "ABBA"),
    ("overhead-threads-0", "bench_patch_overhead", ["--threads", "0"], ["--threads", "0"], "ABBA"),
    ("content-repeats-0", "bench_content_sinks", ["--repeats", "0"], ["--repeats", "0"], "| call |"),
    ("content-lengths-0", "bench_content_sinks", ["--lengths", "8", "0"], ["--lengths", "0"], "| call |"),
    # no CUDA and no TRITON_INTERPRET=1 (skipped where CUDA is there)
    ("content-triton-on-cpu", "bench_content_sinks", ["--backend", "triton", "--lengths", "8", "--repeats", "1"],
     ["--backend", "triton"], "| call |"),
    ("act-windows-0", "act_perplexity", ["--windows", "0"], ["--windows", "0"], "| policy |"),
    # enough without a BOS, too short with one: refused before the no-BOS half of the table runs
    ("act-seq-len-2", "act_perplexity", ["--seq-len", "2"], ["--seq-len", "2"], "| policy |"),
]

_PROBE = r"""
import contextlib, io, json, runpy, sys, traceback
out = []
for path, argv in json.loads(sys.argv[1]):
    sys.argv = [path, *argv]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exited:
            code = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
            if not isinstance(exited.code, (int, type(None))):
                print(exited.code, file=sys.stderr)
        except BaseException:
            code = 1
            traceback.print_exc()
    out.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def refused_before(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("bench_options_before")
    (root / "file").write_text("x")
    fill = {"{folder}": str(root), "{file}": str(root / "file")}

    def filled(arg: str) -> str:
        for key, value in fill.items():
            arg = arg.replace(key, value)
        return arg

    runs = []
    for _, script, argv, _, _ in _BEFORE:
        model = [] if script == "bench_content_sinks" else ["--model", NO_MODEL]
        runs.append([str(BENCHMARKS / f"{script}.py"), [*model, *map(filled, argv)]])
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(runs)], capture_output=True, text=True, env=_env(),
                          timeout=240, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {case[0]: {**result, "names": [filled(n) for n in case[3]], "not_out": case[4]}
            for case, result in zip(_BEFORE, results)}


@pytest.mark.parametrize("case", [case[0] for case in _BEFORE])
def test_refused_before_the_expensive_work(case, refused_before):
    if case == "content-triton-on-cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device runs the Triton backend")
    got = refused_before[case]
    _assert_refused(got["code"], got["stderr"], got["stdout"], *got["names"])
    assert got["not_out"] not in got["stdout"]


# -- refused after the load, before anything is measured; and one real run -------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    import torch

    import sinkfix
    from sinkfix.profile import ModelIdentity
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("bench_options")
    folder = _save_tiny(root / "tiny", seed=0)
    model, _ = sinkfix.load_model(str(folder))
    other = tiny_model("llama")  # another Llama: hidden size 64, vocabulary 97
    beta = torch.full((2, 4), 0.9, dtype=torch.float64)
    own = sinkfix.Profile(ModelIdentity.of(model), beta, calibration={"note": "test"}).save(root / "own.json")
    foreign = sinkfix.Profile(ModelIdentity.of(other), beta, calibration={"note": "test"}).save(root / "other.json")
    return {"model": folder, "profile": own, "other_profile": foreign}


_DECODE_FAST = ["--modes", "eager", "--rounds", "1", "--prefills", "1", "--new-tokens", "3", "--prompt", "8",
                "--threads", "1"]


def test_bench_decode_refuses_a_profile_of_another_model(tiny):
    done = _run("bench_decode", "--model", str(tiny["model"]), *_DECODE_FAST, "--profile", str(tiny["other_profile"]))
    _assert_refused(done.returncode, done.stderr, done.stdout, "--profile", str(tiny["other_profile"]))
    assert "stock" not in done.stdout  # nothing was measured


def test_bench_decode_refuses_a_prompt_beyond_the_positions(tiny):
    done = _run("bench_decode", "--model", str(tiny["model"]), *_DECODE_FAST, "--prompt", str(MAX_POS))
    _assert_refused(done.returncode, done.stderr, done.stdout, "--prompt", str(MAX_POS), str(MAX_POS + 3))
    assert "stock" not in done.stdout


def test_bench_decode_json_info_names_model_profile_and_skip(tiny, tmp_path):
    out = tmp_path / "decode.json"
    done = _run("bench_decode", "--model", str(tiny["model"]), *_DECODE_FAST, "--profile", str(tiny["profile"]),
                "--skip", "1", "--json", str(out))
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a target missed on a shared machine
    info = json.loads(out.read_text(encoding="utf-8"))["info"]
    assert info["model"] == str(tiny["model"])
    assert info["profile"] == str(tiny["profile"])
    assert info["skip"] == 1
    assert info["versions"]["sinkfix"] and "transformers" in info["versions"]
    assert " profile " in done.stdout  # the profile variant was measured


def test_patch_overhead_refuses_a_model_that_does_not_load():
    done = _run("bench_patch_overhead", "--model", "nosuch", "--skip-memory")
    _assert_refused(done.returncode, done.stderr, done.stdout, "--model", "nosuch")


def test_patch_overhead_refuses_a_seq_len_beyond_the_positions(tiny):
    done = _run("bench_patch_overhead", "--model", str(tiny["model"]), "--skip-memory", "--repeats", "1",
                "--warmup", "0", "--seq-len", str(MAX_POS + 1))
    _assert_refused(done.returncode, done.stderr, done.stdout, "--seq-len", str(MAX_POS + 1))
    assert "ABBA rounds" not in done.stdout  # nothing was timed
