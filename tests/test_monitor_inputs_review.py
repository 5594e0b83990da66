"""Inputs and counts of the telemetry a black-box review found wrong (review 12, findings 4, 5, 6, 8
and 9): request files and logs split at "\\n" only, the guard's Prometheus counter and report counts,
the request ids of `monitor run --batch-size N`, the versions and values `monitor report` accepts, and
empty domain labels."""

from __future__ import annotations

import json

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.errors import MonitorError
from sinkfix.telemetry.report import read_log, summarise
from sinkfix.telemetry.requests import read_requests

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _record(domain="a", **change) -> dict:
    """A record as the report reads it (two layers of two heads)."""
    record = {"schema": "sinkfix-telemetry", "version": 1, "domain": domain, "model": "m", "tokens": 10,
              "rows": [9, 9], "sink_share": [[0.3, 0.3], [0.3, 0.3]], "dormancy": [[0.1, 0.1], [0.1, 0.1]],
              "dormant_heads": 0, "residual_peak": [2.0, 50.0], "hidden_sinks": [[0, 1], [0, 0]], "guard": None}
    return {**record, **change}


def _write_log(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _report_error(capsys, path) -> str:
    """`sinkfix monitor report PATH`'s one-line error (exit code 2)."""
    assert cli.main(["monitor", "report", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- 4: lines end at "\n" only ---------------------------------------------------------------------
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_request_lines_are_split_at_newlines_only(tmp_path, separator):
    """JSON allows these raw inside a string (json.dumps(..., ensure_ascii=False) writes them so);
    str.splitlines() broke the line there and refused it as "not JSON", numbering later lines wrong."""
    path = tmp_path / "r.jsonl"
    lines = [json.dumps({"prompt": f"first part{separator}second part", "domain": "prose"}, ensure_ascii=False),
             json.dumps({"prompt": "plain"}),
             "{"]
    path.write_text("\r\n".join(lines[:2]) + "\n" + lines[2] + "\n", encoding="utf-8")  # CRLF and LF alike
    with pytest.raises(MonitorError, match=r"r\.jsonl, line 3: not JSON"):
        read_requests(path)
    path.write_text("\r\n".join(lines[:2]) + "\r\n", encoding="utf-8")
    requests = read_requests(path)
    assert [(r.prompt, r.line) for r in requests] == [(f"first part{separator}second part", 1), ("plain", 2)]


@pytest.mark.parametrize("separator", ["\u001c", "\u001d", "\u001e"])
def test_a_raw_control_character_is_refused_on_its_own_line(tmp_path, separator):
    """JSON refuses these raw in a string; splitlines() broke the line there, and the error blamed an
    unterminated string instead."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "plain"}) + "\n" + '{"prompt": "first' + separator + 'second"}\n',
                    encoding="utf-8")
    with pytest.raises(MonitorError) as caught:
        read_requests(path)
    assert str(caught.value).endswith("r.jsonl, line 2: not JSON (Invalid control character at column 18)")


def test_a_log_line_holding_a_line_separator_is_read(tmp_path):
    """The same split for `monitor report` (a log a tool rewrote with ensure_ascii=False)."""
    # in the model's name: a domain label with one is refused (the monitor never writes such a label)
    path = _write_log(tmp_path / "t.jsonl", json.dumps(_record("a", model="m\u2028n"), ensure_ascii=False),
                      json.dumps(_record("c")), "{")
    with pytest.raises(MonitorError, match=r"t\.jsonl, line 3: not JSON"):
        read_log(path)
    path.write_text(path.read_text(encoding="utf-8").rsplit("{", 1)[0], encoding="utf-8")
    assert [(r["domain"], r["model"]) for r in read_log(path)] == [("a", "m\u2028n"), ("c", "m")]


def test_an_unterminated_string_is_worded_once(tmp_path, capsys):
    """json's message ends with "at" already: it read "starting at at column 12"."""
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "abc\n', encoding="utf-8")
    with pytest.raises(MonitorError) as caught:
        read_requests(requests)
    assert str(caught.value).endswith("line 1: not JSON (Unterminated string starting at column 12)")
    log = _write_log(tmp_path / "t.jsonl", '{"schema": "abc')
    err = _report_error(capsys, log)
    assert err.endswith("line 1: not JSON (Unterminated string starting at column 12)") and "at at" not in err
    with pytest.raises(MonitorError, match=r"line 1: not JSON \(Expecting value at column 1\)"):
        read_requests(_write_log(tmp_path / "v.jsonl", "x"))


# -- 5: the guard's counts -------------------------------------------------------------------------
def _guard_entry(tripped: bool, action: str) -> dict:
    return {"checked": True, "tripped": tripped, "layers": [0, 1] if tripped else [], "action": action,
            "margin": 0.05, "scope": "layers", "worst": None}


def _guarded_records() -> list[dict]:
    """Per domain "d": a trip served with the correction (its cache could not be rolled back), a
    tripped row and the two in-range rows of its batch served by the fallback, and an in-range request."""
    logged = _record("d", guard=_guard_entry(True, "logged only: the KV cache could not be rolled back"),
                     correction={"policy": "p", "identity_layers": [], "moved_share": [0.0, 0.0]})
    rerun = _record("d", guard=_guard_entry(True, "rerun as identity"),
                    correction={"policy": "p", "identity_layers": [0, 1], "moved_share": [0.0, 0.0]})
    other = _record("d", guard=_guard_entry(False, "rerun as identity: another row of the batch tripped"),
                    correction={"policy": "p", "identity_layers": [0, 1], "moved_share": [0.0, 0.0]})
    fine = _record("d", guard=_guard_entry(False, "none"),
                   correction={"policy": "p", "identity_layers": [], "moved_share": [0.0, 0.0]})
    return [logged, rerun, other, dict(other, index=2), fine]


def test_prometheus_counts_requests_served_without_the_correction():
    """`sinkfix_guard_trips_total` ("Requests the guard served without the correction") counted the
    logged-only trip, which was served with it, and missed the batch row served by the fallback."""
    pytest.importorskip("prometheus_client")
    from sinkfix.telemetry.outputs import PrometheusExporter

    exporter = PrometheusExporter(0)
    try:
        for record in _guarded_records():
            exporter.observe(record)
        value = exporter.registry.get_sample_value
        assert value("sinkfix_guard_trips_total", {"domain": "d"}) == 3.0  # the rerun row and its batch mates
        assert value("sinkfix_guard_out_of_range_total", {"domain": "d"}) == 2.0  # logged only, and rerun
        assert value("sinkfix_requests_total", {"domain": "d"}) == 5.0
    finally:
        exporter.close()


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_a_trip_that_could_not_be_rolled_back_is_not_counted_as_served_without_the_correction():
    """End to end (review 12's repro): a Qwen2 whose second layer slides over 5 tokens cannot crop a
    30-token prompt from a cache of 20, so the trip is only logged and served with the correction."""
    pytest.importorskip("prometheus_client")
    import transformers as tf
    from transformers import DynamicCache

    from sinkfix.profile import ProfileStatistics
    from sinkfix.telemetry import Guard

    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, num_key_value_heads=2,
                            use_sliding_window=True, sliding_window=5, max_window_layers=1)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids = [torch.randint(2, 97, (1, n), generator=torch.Generator().manual_seed(s)) for n, s in ((20, 1), (30, 2))]
    guard = Guard(ProfileStatistics(torch.full((2, 4), 0.95), torch.ones(2, 4), 1, 8), 0.05)  # every prompt trips
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(sink_scale=0.8)):
        with sinkfix.monitor(model, guard=guard, prometheus_port=0) as monitor:
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[0], past_key_values=cache)
            with monitor.request(domain="d"):
                model(input_ids=ids[1], past_key_values=cache, position_ids=torch.arange(20, 50)[None])
            record = monitor.records[0]
            value = monitor.exporter.registry.get_sample_value
            assert record["guard"]["action"].startswith("logged only") and record["correction"]["identity_layers"] == []
            assert value("sinkfix_guard_trips_total", {"domain": "d"}) is None  # never incremented
            assert value("sinkfix_guard_out_of_range_total", {"domain": "d"}) == 1.0


def test_the_report_counts_trips_and_requests_served_without_the_correction(tmp_path, capsys):
    log = _write_log(tmp_path / "t.jsonl", *(json.dumps(r) for r in _guarded_records()))
    summary = summarise(read_log(log)).domains["d"]
    assert (summary.guard_trips, summary.served_without_correction) == (2, 3)
    assert summary.to_dict()["guard_trips"] == 2 and summary.to_dict()["served_without_correction"] == 3
    records = _guarded_records()
    assert summarise(records[:1]).domains["d"].served_without_correction == 0  # logged only: with the correction
    assert summarise(records[2:3]).domains["d"].served_without_correction == 1  # the fallback served its batch mate
    out = tmp_path / "report"
    assert cli.main(["monitor", "report", str(log), "--out", str(out), "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "served without" in printed and "outside" in printed
    assert json.loads((out / "report.json").read_text())["domains"]["d"]["served_without_correction"] == 3


# -- 6: each line of a request file is a request -----------------------------------------------------
def test_request_ids_do_not_depend_on_the_batch_size(loaded_tiny, tmp_path):
    """Lines without an `id` in one batch all got the batch's id (told apart by `index` only)."""
    requests = tmp_path / "r.jsonl"
    lines = [{"prompt": "def f(x): return x", "domain": "code"}, {"prompt": "The river ran.", "domain": "prose"},
             {"prompt": "print(1)", "domain": "code", "id": "given"}, {"prompt": "She wrote twice."},
             {"prompt": "x = 1"}]
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ids = {}
    for size in (1, 2, 3):
        log = tmp_path / f"bs{size}.jsonl"
        assert cli.main(["monitor", "run", "--requests", str(requests), "--out", str(log), "--max-new-tokens", "1",
                         "--batch-size", str(size)]) == 0
        records = read_log(log)
        assert len(records) == 5
        ids[size] = [r["request"].replace(r["session"], "SESSION") for r in records]
    assert ids[1] == ["SESSION-0", "SESSION-1", "given", "SESSION-3", "SESSION-4"]
    assert ids[2] == ids[1] and ids[3] == ids[1]


# -- 8: versions and values a report accepts ---------------------------------------------------------
@pytest.mark.parametrize("version", [0, -5, True, "1", 1.0, None, "absent"])
def test_a_record_of_no_known_version_is_refused(tmp_path, capsys, version):
    """Versions sinkfix never wrote were accepted (0, -5, true); a missing or non-integer one was
    told to upgrade sinkfix, which cannot help."""
    record = _record()
    if version == "absent":
        del record["version"]
    else:
        record["version"] = version
    err = _report_error(capsys, _write_log(tmp_path / "t.jsonl", json.dumps(_record()), json.dumps(record)))
    assert "t.jsonl, line 2: not a sinkfix telemetry record of a known version" in err
    assert "upgrade" not in err


def test_a_newer_version_says_upgrade(tmp_path, capsys):
    err = _report_error(capsys, _write_log(tmp_path / "t.jsonl", json.dumps(_record(version=2))))
    assert "line 1: telemetry schema version 2 is newer than this sinkfix reads (up to 1); upgrade sinkfix" in err


@pytest.mark.parametrize("share, where", [(5.0, "5.0 at layer 0, head 0"), (-1.0, "-1.0 at layer 0, head 0")])
def test_sink_shares_outside_0_1_are_refused(tmp_path, capsys, share, where):
    record = _record(sink_share=[[share, 0.3], [0.3, None]])
    err = _report_error(capsys, _write_log(tmp_path / "t.jsonl", json.dumps(record)))
    assert f'line 1: "sink_share" must lie in [0, 1] (or be null), got {where}' in err
    assert read_log(_write_log(tmp_path / "ok.jsonl", json.dumps(_record(sink_share=[[0.0, 1.0], [None, 0.5]]))))


@pytest.mark.parametrize("field, text", [("residual_peak", "[2.0, Infinity]"), ("dormancy", "[[NaN, 0.1], [0.1, 0.1]]"),
                                         ("value_drain", "[[-Infinity], [1.0]]"), ("residual_peak", "[2.0, 1e400]")])
def test_numbers_that_are_not_finite_are_refused(tmp_path, capsys, field, text):
    """Not JSON (the writer uses allow_nan=False), yet json.loads reads them."""
    line = json.dumps(_record(**{field: "HERE"})).replace('"HERE"', text)
    err = _report_error(capsys, _write_log(tmp_path / "t.jsonl", json.dumps(_record()), line))
    assert f'line 2: "{field}"' in err
    if "e400" not in text:
        assert "not finite" in err


# -- 9: empty domain labels --------------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["", "   ", "\t"])
def test_an_empty_domain_label_is_refused(tmp_path, domain, no_model, capsys):
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "abc"}) + "\n" + json.dumps({"prompt": "abc", "domain": domain}) + "\n")
    with pytest.raises(MonitorError, match=r"r\.jsonl, line 2: the domain .* is empty"):
        read_requests(requests)
    assert cli.main(["monitor", "run", "--requests", str(requests), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "line 2: the domain" in capsys.readouterr().err
    model = tiny_model("llama")
    with sinkfix.monitor(model) as monitor:
        for label in (domain, ["code", domain]):
            with pytest.raises(MonitorError, match="is empty"):
                with monitor.request(domain=label):
                    pass
        monitor.forward(input_ids=torch.randint(2, 97, (1, 8)), domain="code")  # still usable
        assert monitor.records[0]["domain"] == "code"
