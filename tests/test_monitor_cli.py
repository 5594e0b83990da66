"""`sinkfix monitor run | report | ranges | requests`, request files, telemetry logs, and the
line-by-line log writer, on a tiny model with a character tokenizer."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.commands.calibrate import STATISTICS_WINDOWS
from sinkfix.errors import MonitorError, OutputError
from sinkfix.files import LineLog
from sinkfix.telemetry.report import read_log, summarise
from sinkfix.telemetry.requests import builtin_requests, read_requests


pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def tiny(loaded_tiny):
    return loaded_tiny


def _requests(tmp_path):
    path = tmp_path / "requests.jsonl"
    lines = [{"prompt": "def area(r):\n    return 3.14159 * r * r\n", "domain": "code"},
             {"prompt": "for i in range(10):\n    print(i * i)\n", "domain": "code", "id": "c2"},
             {"prompt": "The river ran quietly past the old mill at dusk.", "domain": "prose"},
             {"prompt": "She wrote the letter twice before she sent it.", "domain": "prose", "id": 4}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def test_run_then_report(tiny, tmp_path, capsys):
    log = tmp_path / "out" / "telemetry.jsonl"
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log),
                     "--max-new-tokens", "3", "--batch-size", "2", "--policy", "sink_scale=0.8"]) == 0
    records = read_log(log)
    assert [r["domain"] for r in records] == ["code", "code", "prose", "prose"]
    # the request file's ids reach their rows in a batch too (they were dropped for batches of two)
    assert [r["request"] for r in records[1::2]] == ["c2", "4"]
    assert records[0]["request"].startswith(records[0]["session"] + "-")  # no id in the file: the monitor's own
    assert all(r["decoded_tokens"] == 2 and r["policy"] == "sink_scale=0.8" for r in records)
    # the batch of two prompts of different lengths was left-padded: real tokens only
    assert [r["prompt_tokens"] for r in records[:2]] == [1 + len("def area(r):\n    return 3.14159 * r * r\n"),
                                                          1 + len("for i in range(10):\n    print(i * i)\n")]
    assert "appended 4 records" in capsys.readouterr().out
    out = tmp_path / "report"
    assert cli.main(["monitor", "report", str(log), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "telemetry by domain" in printed and "per layer" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["domains"]["code"]["requests"] == 2 and report["domains"]["prose"]["tokens"] > 0
    assert (out / "sink_share_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    # a second run appends to the same log
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log),
                     "--max-new-tokens", "0"]) == 0
    assert len(read_log(log)) == 8


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, port):
    monkeypatch.setattr(sinkfix, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(tmp_path / "t.jsonl"),
                     "--prometheus-port", port]) == 2
    assert "--prometheus-port must be an integer in [0, 65535]" in capsys.readouterr().err


def test_a_busy_port_and_an_unwritable_report_folder_are_refused_first(tiny, tmp_path, monkeypatch, capsys):
    import socket

    log = tmp_path / "t.jsonl"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(sinkfix, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log),
                         "--prometheus-port", str(port)]) == 2
        assert "the port is already in use" in capsys.readouterr().err
        with pytest.raises(MonitorError, match="already in use"):
            sinkfix.monitor(tiny, log=log, prometheus_port=port)
    assert not log.exists()  # the endpoint is bound before the log is opened: no empty log left
    log.write_text(json.dumps(_record("a", [[0.1, 0.1], [0.1, 0.1]])) + "\n")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert cli.main(["monitor", "report", str(log), "--out", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert "is a file, not a folder" in captured.err and "telemetry by domain" not in captured.out


def _two_texts(tmp_path):
    """A prose file and a code file, long enough for a few 64-token windows each."""
    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    texts[0].write_text("All happy families are alike; each unhappy family is unhappy in its own way. " * 8)
    texts[1].write_text("def f(x):\n    return [i * x for i in range(x)]\n" * 12)
    return texts


def test_run_with_a_profile_and_the_guard(tiny, tmp_path):
    profile = tmp_path / "p.json"
    texts = _two_texts(tmp_path)
    assert cli.main(["calibrate", "--text", str(texts[0]), "--text", str(texts[1]), "--out", str(profile),
                     "--seq-len", "64", "--steps", "2", "--no-virtual-logits"]) == 0
    loaded = sinkfix.Profile.load(profile)
    assert loaded.statistics is not None and loaded.statistics.protocol["seq_len"] == 64
    log = tmp_path / "t.jsonl"
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log), "--profile",
                     str(profile), "--guard", "--max-new-tokens", "2"]) == 0
    guards = [r["guard"] for r in read_log(log)]
    assert all(g is not None and {"checked", "tripped", "layers", "action"} <= set(g) for g in guards)
    # ranges added to a profile made without statistics
    bare = tmp_path / "bare.json"
    assert cli.main(["calibrate", "--text", str(texts[0]), "--rule", "pooled", "--out", str(bare), "--seq-len", "64",
                     "--steps", "1", "--no-statistics"]) == 0
    assert sinkfix.Profile.load(bare).statistics is None
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log), "--profile",
                     str(bare), "--guard"]) == 2
    ranged = tmp_path / "ranged.json"
    assert cli.main(["monitor", "ranges", "--profile", str(bare), "--text", str(texts[0]), "--out", str(ranged),
                     "--seq-len", "64"]) == 0
    assert sinkfix.Profile.load(ranged).statistics.windows >= 1
    # on the profile's own texts, ranges measures what calibrate recorded: the same first windows
    # of each text (it once measured every window of 16384 tokens, ranges a guard was not tuned for)
    again = tmp_path / "again.json"
    assert cli.main(["monitor", "ranges", "--profile", str(profile), "--text", str(texts[0]), "--text",
                     str(texts[1]), "--out", str(again), "--seq-len", "64"]) == 0
    measured, recorded = sinkfix.Profile.load(again).statistics, loaded.statistics
    assert measured.windows == recorded.windows == 2 * STATISTICS_WINDOWS
    assert torch.equal(measured.low, recorded.low) and torch.equal(measured.high, recorded.high)


def test_calibrate_measures_statistics_on_the_first_windows_of_each_text(tiny, tmp_path, capsys):
    texts = _two_texts(tmp_path)
    common = ["calibrate", "--text", str(texts[0]), "--text", str(texts[1]), "--seq-len", "64", "--steps", "2",
              "--no-virtual-logits"]
    profile = tmp_path / "p.json"
    assert cli.main([*common, "--out", str(profile), "--statistics-windows", "2"]) == 0
    stats = sinkfix.Profile.load(profile).statistics
    assert stats.windows == 4 and stats.protocol["windows_per_text"] == 2
    assert cli.main([*common, "--out", str(tmp_path / "zero.json"), "--statistics-windows", "0"]) == 2
    assert "--statistics-windows must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "zero.json").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\nnot json\n', "line 2: not JSON"),
    ('{"prompt": "ok"}\n["a list"]\n', "line 2: expected a JSON object"),
    ('{"promt": "typo"}\n', "line 1: unknown key 'promt'"),
    ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
    ('{"prompt": "x", "domain": 3}\n', "line 1: 'domain' must be a string or null"),
    ('{"prompt": "x", "id": true}\n', "line 1: 'id' must be a string or an integer"),
    ('{"prompt": "x", "domain": "none"}\n', "line 1: the domain 'none' is reserved"),
    ("\n\n", "holds no request"),
])
def test_malformed_request_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    with pytest.raises(MonitorError, match=message):
        read_requests(path)


def test_request_file_errors_on_the_command_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    assert cli.main(["monitor", "run", "--requests", str(bad), "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and err[0].startswith("sinkfix monitor run: error:")
    assert cli.main(["monitor", "run", "--requests", str(tmp_path / "missing.jsonl"), "--out", "x.jsonl"]) == 2
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)),
                     "--out", str(blocker / "t.jsonl")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", "t.jsonl", "--guard"]) == 2
    assert "--guard needs --profile" in capsys.readouterr().err


def test_builtin_requests():
    requests = builtin_requests()
    from sinkfix.texts import DOMAINS

    assert {r.domain for r in requests} == set(DOMAINS) and len(requests) == 4 * len(DOMAINS)
    assert all(800 <= len(r.prompt) <= 2400 for r in requests)
    assert read_requests("builtin") == requests


def test_requests_command_writes_the_builtin_set(tmp_path):
    out = tmp_path / "builtin.jsonl"
    assert cli.main(["monitor", "requests", "--out", str(out)]) == 0
    assert [r.prompt for r in read_requests(out)] == [r.prompt for r in builtin_requests()]


def _record(domain, dormancy, share=0.3):
    return {"schema": "sinkfix-telemetry", "version": 1, "domain": domain, "model": "m", "tokens": 10, "rows": [9, 9],
            "sink_share": [[share, share], [share, share]], "dormancy": dormancy, "dormant_heads": 0,
            "residual_peak": [2.0, 50.0], "hidden_sinks": [[0, 1], [0, 0]], "guard": None}


def test_report_finds_heads_that_flip_between_domains():
    records = [_record("code", [[0.8, 0.1], [0.2, 0.2]]), _record("code", [[0.7, 0.1], [0.2, 0.2]]),
               _record("prose", [[0.1, 0.1], [0.2, 0.9]]), _record(None, [[0.1, 0.1], [0.2, 0.2]])]
    report = summarise(records)
    assert list(report.domains) == ["code", "none", "prose"]
    flips = {(f["layer"], f["head"]): f for f in report.flips}
    assert set(flips) == {(0, 0), (1, 1)}
    assert flips[(0, 0)]["dormant_on"] == ["code"] and flips[(0, 0)]["scores"]["code"] == pytest.approx(0.75)
    assert flips[(1, 1)]["dormant_on"] == ["prose"]
    assert report.domains["code"].hidden_sinks.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("line, message", [
    ("{", "line 2: not JSON"),
    ('{"schema": "other"}', "line 2: not a sinkfix telemetry record"),
    ('{"schema": "sinkfix-telemetry", "version": 99}', "version 99"),
    ('{"schema": "sinkfix-telemetry", "version": 1}', "line 2: record lacks 'domain'"),
])
def test_malformed_logs_name_the_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_record("a", [[0.1, 0.1], [0.1, 0.1]])) + "\n" + line + "\n")
    with pytest.raises(MonitorError, match=message):
        read_log(path)
    with pytest.raises(MonitorError, match="not found"):
        read_log(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("change, message", [
    ({"domain": 5}, '"domain" must be a string or null, got 5'),
    ({"tokens": "abc"}, '"tokens" must be an integer >= 0'),
    ({"dormant_heads": None}, '"dormant_heads" must be an integer >= 0'),
    ({"rows": [9]}, '"rows" must be a list of one integer >= 0 per layer'),
    ({"residual_peak": [2.0, "x"]}, '"residual_peak" must be a list of one number'),
    ({"sink_share": "0.3"}, '"sink_share" must be a non-empty list'),
    ({"dormancy": [[0.1, 0.1], [0.1]]}, '"dormancy" must hold one number'),
    ({"hidden_sinks": [[0, 1], [0, -1]]}, '"hidden_sinks" must hold one integer >= 0 per head'),
    ({"guard": [1]}, '"guard" must be null or an object'),
    ({"guard": {"tripped": "yes"}}, '"guard" must be null or an object'),
], ids=["domain", "tokens", "dormant_heads", "rows", "residual_peak", "sink_share", "dormancy", "hidden_sinks",
        "guard", "guard-tripped"])
def test_records_whose_fields_a_report_cannot_read_name_the_line(tmp_path, change, message):
    """Records that pass the schema line but hold fields of the wrong type or shape (they once gave
    TypeErrors from the arithmetic, or a report over too few layers)."""
    path = tmp_path / "t.jsonl"
    good = _record("a", [[0.1, 0.1], [0.1, 0.1]])
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(MonitorError, match=f"line 2: {re.escape(message)}"):
        read_log(path)


def test_a_log_of_two_models_with_different_head_counts_is_refused():
    narrow = _record("a", [[0.1, 0.1], [0.1, 0.1]])
    wide = {**narrow, "sink_share": [[0.3] * 4] * 2, "dormancy": [[0.1] * 4] * 2, "hidden_sinks": [[0] * 4] * 2}
    with pytest.raises(MonitorError, match=r"different head counts \(2, 4 heads per layer\)"):
        summarise([narrow, wide])


def test_line_log_appends_complete_lines(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    with LineLog(path) as first, LineLog(path) as second:  # two writers, one file
        for i in range(50):
            (first if i % 2 else second).append(json.dumps({"i": i, "pad": "x" * 5000}))
    lines = path.read_text().splitlines()
    assert sorted(json.loads(line)["i"] for line in lines) == list(range(50))
    with pytest.raises(ValueError, match="newline"):
        LineLog(path).append("two\nlines")
    with pytest.raises(OutputError, match="directory"):
        LineLog(tmp_path)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="locked"):
            LineLog(locked / "log.jsonl")


def test_report_output_files_are_checked_first_and_a_stale_figure_removed(tmp_path, capsys):
    log = tmp_path / "t.jsonl"
    log.write_text(json.dumps(_record("a", [[0.1, 0.1], [0.1, 0.1]])) + "\n")
    # before: accepted, and nothing said that the option had nothing to act on
    assert cli.main(["monitor", "report", str(log), "--no-figures"]) == 2
    assert "without --out none is drawn" in capsys.readouterr().err
    out = tmp_path / "report"
    (out / "report.json").mkdir(parents=True)  # a folder where the file goes: refused before the report
    assert cli.main(["monitor", "report", str(log), "--out", str(out), "--no-figures"]) == 2
    captured = capsys.readouterr()
    assert "is a directory" in captured.err and "telemetry by domain" not in captured.out
    (out / "report.json").rmdir()
    figure = out / "sink_share_by_layer.png"
    figure.write_bytes(b"\x89PNG earlier run")
    # before: the earlier run's figure stayed beside the new report.json
    assert cli.main(["monitor", "report", str(log), "--out", str(out), "--no-figures"]) == 0
    assert "removed" in capsys.readouterr().out and not figure.exists()
    assert (out / "report.json").is_file()


def test_a_failed_append_cuts_back_only_its_own_bytes(tmp_path, monkeypatch):
    """A write that fails is cut back to where it began; another writer's line that landed meanwhile
    must survive (before: cut away, 9,129 of 20,000 lines lost between two processes)."""
    import subprocess
    import sys
    import time

    path = tmp_path / "log.jsonl"
    log = LineLog(path)
    log.append(json.dumps({"who": "A", "i": 0}))
    other = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); "
             "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"who\": \"B\"}\\n'); fcntl.flock(fd, fcntl.LOCK_UN)")
    real_write, started = os.write, []

    def half_then_full_disk(fd, data):
        if not started:  # another process appends while this write is under way, then the disk is full
            started.append(subprocess.Popen([sys.executable, "-c", other, str(path)]))
            time.sleep(0.5)
            real_write(fd, bytes(data[:7]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full_disk)
    with pytest.raises(OutputError, match="No space left"):
        log.append(json.dumps({"who": "A", "i": 1}))
    monkeypatch.setattr(os, "write", real_write)
    assert started[0].wait(timeout=30) == 0
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]  # complete lines only
    assert records == [{"who": "A", "i": 0}, {"who": "B"}]


def test_a_cut_flip_table_says_so_and_undefined_shares_stay_undefined(tmp_path, capsys):
    layers, heads = 4, 10
    active, dormant = [[0.1] * heads for _ in range(layers)], [[0.9] * heads for _ in range(layers)]
    shape = dict(rows=[9] * layers, residual_peak=[2.0] * layers, hidden_sinks=[[0] * heads] * layers)
    records = [dict(_record("code", dormant), sink_share=[[0.3] * heads] * layers, **shape),
               dict(_record("prose", active), sink_share=[[0.3] * heads] * layers, **shape),
               dict(_record("empty", active), sink_share=[[None] * heads] * layers, **shape)]
    log = tmp_path / "t.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    assert cli.main(["monitor", "report", str(log)]) == 0
    # before: 30 rows and nothing said about the other 10
    assert "30 of 40 heads shown; --out DIR writes all of them" in capsys.readouterr().out
    log.write_text("".join(json.dumps(r) + "\n" for r in records[::2]))
    assert cli.main(["monitor", "report", str(log)]) == 0
    out = capsys.readouterr().out
    # before: "- / 0.000", a measured maximum for a domain with no defined share
    empty = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("empty"))
    assert "- / -" in empty


def test_a_content_sink_policy_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sinkfix, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for spec in ("hidden_sink_scale=0.4", "act"):
        assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(tmp_path / "t.jsonl"),
                         "--policy", spec]) == 2
        assert "not implemented for content-dependent sinks" in capsys.readouterr().err


def test_the_sample_rows_help_names_the_default_the_monitor_uses():
    from sinkfix.cli import build_parser
    from sinkfix.telemetry import SAMPLE_ROWS

    run = build_parser(["monitor"])._subparsers._group_actions[0].choices["monitor"]
    actions = {a.dest: a for sub in run._subparsers._group_actions[0].choices.values() for a in sub._actions}
    assert f"(default {SAMPLE_ROWS}," in actions["sample_rows"].help


def test_the_report_figure_draws_every_heads_value(tmp_path, monkeypatch):
    """Box plots hid the values beyond their whiskers: a head far below the others (0.20 under a whisker
    ending at 0.37, on a real log) was not on a figure said to show every head's sink share."""
    pytest.importorskip("matplotlib")
    from sinkfix import files
    from sinkfix.telemetry.report import write_figure

    records = [_record("code", [[0.1, 0.1], [0.1, 0.1]], share=s) for s in (0.60, 0.62, 0.61, 0.63, 0.05)]
    drawn = []
    real_save = files.save_figure

    def keep(fig, path, **kw):
        top = fig.axes[0]
        drawn.extend(float(y) for line in top.get_lines() if line.get_marker() == "." for y in line.get_ydata())
        return real_save(fig, path, **kw)

    monkeypatch.setattr(files, "save_figure", keep)
    write_figure(summarise(records), tmp_path / "f.png")
    assert 0.05 in [round(y, 2) for y in drawn]
