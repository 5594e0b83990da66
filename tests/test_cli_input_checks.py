"""Bad input to `sinkfix monitor run | report | ranges`, `sinkfix inspect` and `sinkfix.monitor`:
refused with a one-line error (exit code 2 on the command line), and where the input is a file or
a flag, before the model loads. A tiny model with a character tokenizer stands in for the model."""

from __future__ import annotations

import json

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.errors import MonitorError
from sinkfix.patch import PatchHandle
from sinkfix.profile import ModelIdentity, Profile
from sinkfix.telemetry.report import read_log, summarise

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def tiny(loaded_tiny):
    return loaded_tiny


def _requests(tmp_path, name="requests.jsonl"):
    path = tmp_path / name
    lines = [{"prompt": "def area(r):\n    return 3.14159 * r * r\n", "domain": "code"},
             {"prompt": "The river ran quietly past the old mill at dusk.", "domain": "prose"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _run(requests, out, *extra):
    return cli.main(["monitor", "run", "--requests", str(requests), "--out", str(out), "--max-new-tokens", "1",
                     *extra])


# -- 1. `monitor run --out` is only ever a telemetry log ---------------------------------------------
def test_out_that_is_the_request_file_is_refused_before_the_model_loads(no_model, tmp_path, capsys):
    requests = _requests(tmp_path)
    before = requests.read_text()
    assert _run(requests, requests) == 2
    assert "is the request file" in _error(capsys)
    # the same file under another spelling, and through a link
    (tmp_path / "sub").mkdir()
    assert _run(requests, tmp_path / "sub" / ".." / requests.name) == 2
    assert "is the request file" in _error(capsys)
    link = tmp_path / "link.jsonl"
    link.symlink_to(requests)
    assert _run(requests, link) == 2
    assert "is the request file" in _error(capsys)
    assert requests.read_text() == before


@pytest.mark.parametrize("content", [
    "some notes\n",
    '{"prompt": "a request file by another name"}\n',
    '{"format": "sinkfix-monitor-report", "version": 1}\n',
    "\n\nnot a log after blank lines\n",
    "\x00\xff binary",
])
def test_out_that_is_another_file_is_refused_before_the_model_loads(no_model, tmp_path, capsys, content):
    other = tmp_path / "notes.txt"
    other.write_bytes(content.encode("latin-1"))
    assert _run(_requests(tmp_path), other) == 2
    message = _error(capsys)
    assert message.startswith("sinkfix monitor run: error:") and "is not a sinkfix telemetry log" in message
    assert other.read_bytes() == content.encode("latin-1")


def test_a_telemetry_log_or_an_empty_file_is_appended_to(tiny, tmp_path):
    requests = _requests(tmp_path)
    log = tmp_path / "t.jsonl"
    log.write_text("")  # an empty file (touched beforehand) is fine
    assert _run(requests, log) == 0
    assert _run(requests, log) == 0  # appended to the log the first run wrote
    assert len(read_log(log)) == 4


def test_the_library_refuses_a_log_that_is_another_file(tmp_path):
    from sinkfix.telemetry.outputs import check_log_file

    assert check_log_file(tmp_path / "missing.jsonl") == tmp_path / "missing.jsonl"
    assert check_log_file("/dev/null").name == "null"  # not a regular file: not read
    model = tiny_model("llama")
    other = tmp_path / "requests.jsonl"
    other.write_text('{"prompt": "x"}\n')
    with pytest.raises(MonitorError, match="not a sinkfix telemetry log"):
        sinkfix.monitor(model, log=other)
    assert PatchHandle.of(model) is None  # the identity patch it made was removed again
    assert other.read_text() == '{"prompt": "x"}\n'


# -- 2. out-of-range arguments ------------------------------------------------------------------------
def _record(domain, dormancy):
    return {"schema": "sinkfix-telemetry", "version": 1, "domain": domain, "model": "m", "tokens": 10, "rows": [9],
            "sink_share": [[0.3, 0.3]], "dormancy": dormancy, "dormant_heads": 0, "residual_peak": [2.0],
            "hidden_sinks": [[0, 0]], "guard": None}


@pytest.mark.parametrize("margin", [-1, -0.01, 0.5, 2, float("nan"), True])
def test_report_refuses_a_margin_that_means_nothing(tmp_path, capsys, margin):
    # a head never dormant (0.1, 0.2 on both domains) would be listed as a flip with margin -1
    records = [_record("a", [[0.1, 0.6]]), _record("b", [[0.2, 0.1]])]
    with pytest.raises(MonitorError, match="margin must be a number in \\[0, 0.5\\)"):
        summarise(records, margin=margin)
    if isinstance(margin, bool):
        return
    log = tmp_path / "t.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert cli.main(["monitor", "report", str(log), "--margin", str(margin), "--no-figures"]) == 2
    assert "--margin must be a number in [0, 0.5)" in _error(capsys)


def test_report_margins_in_range_still_work():
    records = [_record("a", [[0.1, 0.6]]), _record("b", [[0.2, 0.1]])]
    assert [(f["layer"], f["head"]) for f in summarise(records, margin=0).flips] == [(0, 1)]
    assert summarise(records, margin=0.49).flips == []


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "32", None])
def test_monitor_refuses_sample_rows_that_are_not_a_positive_integer(value):
    model = tiny_model("llama")
    with pytest.raises(MonitorError, match="sample_rows must be an integer >= 1"):
        sinkfix.monitor(model, sample_rows=value)
    assert PatchHandle.of(model) is None  # refused before the model was patched
    with sinkfix.monitor(model, sample_rows=1) as monitor:  # the smallest count is fine
        assert monitor.sample_rows == 1


@pytest.mark.parametrize("value", [0, 1, 2, -0.1, float("nan"), float("inf"), True, None])
def test_monitor_refuses_a_hidden_sink_threshold_outside_0_1(value):
    model = tiny_model("llama")
    with pytest.raises(MonitorError, match=r"hidden_sink_threshold must be a number in \(0, 1\)"):
        sinkfix.monitor(model, hidden_sink_threshold=value)
    assert PatchHandle.of(model) is None


@pytest.mark.parametrize("value", ["0", "-5"])
def test_sample_rows_flag_is_checked_before_the_model_loads(no_model, tmp_path, capsys, value):
    assert _run(_requests(tmp_path), tmp_path / "t.jsonl", "--sample-rows", value) == 2
    assert f"--sample-rows must be an integer >= 1, got {value}" in _error(capsys)
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("value", ["2", "1", "0", "-0.5", "nan"])
def test_inspect_refuses_a_hidden_sink_threshold_outside_0_1(no_model, tmp_path, capsys, value):
    text = tmp_path / "a.txt"
    text.write_text("a sentence of prose. " * 10)
    assert cli.main(["inspect", "--text", str(text), "--out", str(tmp_path / "out"),
                     "--hidden-sink-threshold", value]) == 2
    assert "--hidden-sink-threshold must be a number in (0, 1)" in _error(capsys)


# -- 3. profile files are read before the model loads ------------------------------------------------
@pytest.fixture(params=["corrupt", "not a profile", "missing"])
def bad_profile(request, tmp_path):
    path = tmp_path / "p.json"
    if request.param == "corrupt":
        path.write_text('{"format": "sinkfix-profile", "version": ')
        return path, "corrupted"
    if request.param == "not a profile":
        path.write_text('{"format": "sinkfix-monitor-report", "version": 1}')
        return path, "not a sinkfix profile"
    return tmp_path / "missing.json", "not found"


def _inspect(tmp_path, *extra):
    text = tmp_path / "a.txt"
    text.write_text("a sentence of prose. " * 10)
    return cli.main(["inspect", "--text", str(text), "--out", str(tmp_path / "out"), "--seq-len", "40", *extra])


def test_inspect_reads_the_profile_before_the_model(no_model, tmp_path, capsys, bad_profile):
    path, message = bad_profile
    assert _inspect(tmp_path, "--profile", str(path)) == 2
    assert message in _error(capsys)


_MONITOR_RUN = ["monitor", "run", "--requests", "builtin", "--out", "t.jsonl"]


@pytest.mark.parametrize("command, option, message", [
    *[(command, "--policy", "empty policy spec") for command in (["bench"], ["eval"], ["inspect"], _MONITOR_RUN)],
    *[(command, "--profile", "empty profile path")
      for command in (["bench"], ["eval"], ["inspect"], ["stream"], _MONITOR_RUN)],
])
def test_an_empty_policy_or_profile_is_refused_not_read_as_none(no_model, tmp_path, capsys, monkeypatch, command,
                                                                 option, message):
    """`--policy ""` (an unset shell variable) ran the identity; `--profile ""` read as "cannot read
    profile ." or as no profile."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command, option, ""]) == 2
    assert message in _error(capsys)


def test_inspect_parses_the_policy_before_the_model(no_model, tmp_path, capsys):
    assert _inspect(tmp_path, "--policy", "sink_scale=7") == 2
    assert "sinkfix inspect: error:" in _error(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--max-tokens", "-5"], "--max-tokens must be an integer >= 2 (the text tokens used per text; a window needs 2), "
                             "got -5"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 2"),
    (["--max-tokens", "1"], "--max-tokens must be an integer >= 2"),
    (["--seq-len", "2"], "--seq-len must be an integer >= 3 (the BOS token and 2 text tokens; 2 with --no-bos), got 2"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 3"),
    (["--seq-len", "1", "--no-bos"], "--seq-len must be an integer >= 2 (2 text tokens), got 1"),
])
def test_inspect_window_flags_are_checked_before_the_model_loads(no_model, tmp_path, capsys, extra, message):
    assert _inspect(tmp_path, *extra) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_inspect_runs_at_the_smallest_window_flags(tiny, tmp_path, capsys):
    assert _inspect(tmp_path, "--seq-len", "2", "--no-bos", "--max-tokens", "2", "--no-figures") == 0
    protocol = json.loads((tmp_path / "out" / "report.json").read_text())["protocol"]
    assert protocol["seq_len"] == 2 and protocol["max_tokens"] == 2 and protocol["bos"] is False


def test_monitor_run_reads_the_profile_before_the_model(no_model, tmp_path, capsys, bad_profile):
    path, message = bad_profile
    assert _run(_requests(tmp_path), tmp_path / "t.jsonl", "--profile", str(path)) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "t.jsonl").exists()


def test_monitor_ranges_reads_the_profile_before_the_model(no_model, tmp_path, capsys, bad_profile):
    path, message = bad_profile
    text = tmp_path / "a.txt"
    text.write_text("a sentence of prose. " * 10)
    assert cli.main(["monitor", "ranges", "--text", str(text), "--profile", str(path),
                     "--out", str(tmp_path / "ranged.json")]) == 2
    assert message in _error(capsys)


def _profile_of(model, path) -> str:
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    Profile(ModelIdentity.of(model), torch.full((layers, heads), 0.9)).save(path)
    return str(path)


def test_guard_without_statistics_is_refused_before_the_model(no_model, tmp_path, capsys):
    profile = _profile_of(tiny_model("llama", seed=3), tmp_path / "p.json")  # no calibration statistics
    assert _run(_requests(tmp_path), tmp_path / "t.jsonl", "--profile", profile, "--guard") == 2
    assert "carries calibration statistics" in _error(capsys)


def test_a_profile_for_another_model_is_still_refused_after_loading(tiny, tmp_path, capsys):
    other = _profile_of(tiny_model("gpt2"), tmp_path / "other.json")
    assert _inspect(tmp_path, "--profile", other) == 2
    assert "sinkfix inspect: error:" in _error(capsys)
    assert _run(_requests(tmp_path), tmp_path / "t.jsonl", "--profile", other) == 2
    assert "sinkfix monitor run: error:" in _error(capsys)
    assert PatchHandle.of(tiny) is None
    # and a profile of this model works on both commands
    mine = _profile_of(tiny, tmp_path / "mine.json")
    assert _run(_requests(tmp_path), tmp_path / "t.jsonl", "--profile", mine) == 0
    assert _inspect(tmp_path, "--profile", mine, "--no-figures") == 0


# -- the hidden-sink threshold, everywhere a user gives it ---------------------------------------------
@pytest.mark.parametrize("bad", [0.0, 1.0, 2.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_the_hidden_sink_threshold_is_checked_in_the_api_and_bench(bad, llama):
    from sinkfix.analysis.inspection import inspect
    from sinkfix.bench.config import BenchConfig
    from sinkfix.errors import SinkfixError, UsageError

    with pytest.raises(UsageError, match="hidden_sink_threshold must be a number in"):
        inspect(llama, None, "some text", hidden_sink_threshold=bad, progress=False)
    with pytest.raises(SinkfixError, match="hidden_sink_threshold must be a number in"):
        BenchConfig(hidden_sink_threshold=bad).validate()
    BenchConfig(hidden_sink_threshold=None).validate()  # None: no hidden-sink pass, as documented


# -- --threads and --guard-margin: refused, never ignored --------------------------------------------
@pytest.mark.parametrize("threads", ["0", "-1"])
@pytest.mark.parametrize("command", ["inspect", "monitor run", "monitor ranges", "calibrate", "stream", "kvquant"])
def test_threads_below_one_are_refused_before_the_model_loads(no_model, tmp_path, capsys, command, threads):
    args = {"inspect": ["inspect", "--text", str(_requests(tmp_path))],
            "monitor run": ["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(tmp_path / "o.jsonl")],
            "monitor ranges": ["monitor", "ranges", "--profile", str(tmp_path / "p.json"), "--out",
                               str(tmp_path / "q.json")],
            "calibrate": ["calibrate", "--out", str(tmp_path / "p.json")],
            "stream": ["stream", "--out", str(tmp_path / "s")],
            "kvquant": ["kvquant"]}[command]
    if command == "monitor ranges":  # a profile it can read, so that the threads are what it refuses
        tiny_profile = Profile(ModelIdentity("LlamaForCausalLM", 2, (4, 4), 2, 64, 97, "ab" * 16),
                               torch.full((2, 4), 0.9, dtype=torch.float64))
        tiny_profile.save(tmp_path / "p.json")
    assert cli.main([*args, "--threads", threads]) != 0
    assert f"--threads must be >= 1, got {threads}" in _error(capsys)


def test_guard_margin_without_a_guard_is_refused(no_model, tmp_path, capsys):
    assert _run(_requests(tmp_path), tmp_path / "log.jsonl", "--guard-margin", "0.2") != 0
    assert "--guard-margin sets the guard's margin: give it together with --guard" in _error(capsys)


def test_warnings_of_a_command_are_one_line_notes_and_stay_recordable():
    """Python's format printed the class and the source line that raised a warning (`--domain prose`:
    `.../sinkfix/texts.py:413: FutureWarning: ...` and the code line); a command prints one line.
    A warning from another package keeps its class and place; recording (pytest's) still works."""
    import warnings

    notes = cli._WarningsAsNotes("monitor ranges")
    ours = notes.format("old name", FutureWarning, cli.__file__, 12, "the code line")
    assert ours == "sinkfix monitor ranges: warning: old name\n"
    named = notes.format("sinkfix.monitor: closed during request 3", UserWarning, cli.__file__, 1)
    assert named == "sinkfix monitor ranges: warning: closed during request 3\n"
    theirs = notes.format("deprecated", FutureWarning, "/x/site-packages/transformers/a.py", 7, "line")
    assert theirs == "sinkfix monitor ranges: warning: deprecated [FutureWarning, /x/site-packages/transformers/a.py:7]\n"
    before = warnings.formatwarning
    with notes, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("recorded", UserWarning)
    assert [str(w.message) for w in seen] == ["recorded"] and warnings.formatwarning is before


def test_errors_name_the_monitor_action(capsys, tmp_path):
    """Errors of `monitor ranges` were headed `sinkfix monitor: error:`, where argparse's own errors of
    the same action say `sinkfix monitor ranges: error:`."""
    assert cli.main(["monitor", "ranges", "--profile", str(tmp_path / "missing.json"),
                     "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.startswith("sinkfix monitor ranges: error: profile file not found")
