"""Telemetry in the cases review 40 found wrong: assisted decoding recorded with its draft tokens (F1),
a null dormancy pooled as 0 by `monitor report` (F2), `monitor run` counting records that never
reached the log (F3), two monitors on a stock model (F4), ``request_id=`` through ``Monitor.forward``
/ ``Monitor.generate`` (F5), an all-undefined residual peak printed as 0.0 (F6), a log of another
model or a foreign file at a rotated path appended to (F7), and ``--max-prompt-tokens`` one past its
value (F8). Tiny models, one thread."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from transformers import GenerationConfig

import sinkfix
from sinkfix import cli
from sinkfix.errors import MonitorError, OutputError
from sinkfix.patch import PatchHandle
from sinkfix.telemetry.monitor import LogWriteWarning
from sinkfix.telemetry.outputs import JsonlLog
from sinkfix.telemetry.records import SCHEMA, VERSION
from sinkfix.telemetry.report import summarise

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def _layer_calls(model) -> list[int]:
    """A counter of the first decoder layer's forwards (whether anything ran)."""
    calls = [0]
    model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _requests(tmp_path, prompts=("def area(r):\n    return 3.14159 * r * r\n",
                                 "The river ran quietly past the old mill at dusk.",
                                 "She wrote the letter twice before she sent it.")):
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "domain": "d"}) + "\n" for p in prompts))
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


# -- F1: assisted (speculative) decoding is refused before anything runs ---------------------------
@pytest.mark.parametrize("how", ["prompt_lookup keyword", "assistant_model", "config keyword", "config positional",
                                 "model's config", "model's config under a passed config"])
def test_assisted_decoding_is_refused_before_anything_runs(how):
    """Prompt lookup with 4 drafts on a 42-token prompt was logged as a 46-token prompt with 13 decoded
    tokens where 11 were kept, sink shares 0.0049 off the greedy record of the same tokens."""
    model = tiny_model("llama")
    base = _ids(12)
    prompt = torch.cat([base, base, base], dim=1)  # repetitive: prompt lookup finds candidates
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    args, kwargs = (prompt,), dict(common)
    if how == "prompt_lookup keyword":
        kwargs["prompt_lookup_num_tokens"] = 4
    elif how == "assistant_model":
        kwargs["assistant_model"] = tiny_model("llama", seed=1)
    elif how == "config keyword":
        kwargs["generation_config"] = GenerationConfig(prompt_lookup_num_tokens=3, **common)
        kwargs = {"generation_config": kwargs["generation_config"]}
    elif how == "config positional":
        args, kwargs = (prompt, GenerationConfig(prompt_lookup_num_tokens=3, **common)), {}
    elif how == "model's config":
        model.generation_config.prompt_lookup_num_tokens = 2
    else:  # transformers fills the passed config's unset fields from the model's: prompt lookup runs
        model.generation_config.prompt_lookup_num_tokens = 2
        args, kwargs = (prompt,), {"generation_config": GenerationConfig(**common)}
    calls = _layer_calls(model)
    with torch.no_grad(), sinkfix.monitor(model) as monitor:
        calls[0] = 0  # (creating the monitor may run the model once)
        with pytest.raises(MonitorError, match=r"assisted \(speculative\) decoding .*cannot be monitored: .*draft "
                                               r"tokens .*no record would describe the sequence"):
            monitor.generate(*args, **kwargs)
        assert calls[0] == 0 and monitor.records == []
        model.generation_config.prompt_lookup_num_tokens = None
        out = monitor.generate(prompt, **common)  # the monitor is still usable: greedy is recorded
    assert monitor.records[0]["prompt_tokens"] == 36 and monitor.records[0]["decoded_tokens"] == 3
    assert out.shape[1] == 40


# -- F2: each pooled quantity weighted by its own validity mask ------------------------------------
def _record(domain, rows, share, dormancy, peak=(1.5, 2.0), tokens=10):
    dormant = sum(1 for layer in dormancy for x in layer if x is not None and x >= 0.5)
    return {"schema": SCHEMA, "version": VERSION, "model": "M", "domain": domain, "tokens": tokens, "rows": rows,
            "sink_share": share, "dormancy": dormancy, "dormant_heads": dormant, "residual_peak": list(peak),
            "hidden_sinks": [[0, 0], [0, 0]]}


def test_report_pools_dormancy_and_share_each_by_its_own_mask():
    """Before, the dormancy was weighted by the sink share's mask: A's null dormancy counted as 0 (the
    only defined dormancy, 0.8, pooled to 0.4: active, and a flip against y), and C's defined dormancy
    with a null share was dropped."""
    a = _record("x", [10, 10], [[0.1, 0.2], [0.3, 0.4]], [[None, None], [None, None]])
    b = _record("x", [10, 10], [[0.3, 0.4], [0.5, 0.6]], [[0.8, 0.2], [0.8, 0.2]])
    c = _record("x", [30, 30], [[None, None], [None, None]], [[0.6, 0.6], [0.6, 0.6]])
    y = _record("y", [10, 10], [[0.3, 0.3], [0.3, 0.3]], [[0.8, 0.8], [0.8, 0.8]])
    report = summarise([a, b, c, y])
    x = report.domains["x"]
    torch.testing.assert_close(x.dormancy, torch.tensor([[0.65, 0.5], [0.65, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(x.sink_share, torch.tensor([[0.2, 0.3], [0.4, 0.5]], dtype=torch.float64))
    assert report.flips == []  # dormant (0.65 and 0.8) on both domains: no flip
    # the dormant-head count is a mean over the requests that define a dormancy (B: 2, C: 4), not over A too
    assert x.dormant_heads == 3.0
    assert x.to_dict()["dormancy"] == [[0.65, 0.5], [0.65, 0.5]]
    only_null = summarise([a]).domains["x"]
    assert torch.isnan(only_null.dormancy).all() and only_null.to_dict()["dormant_heads_mean"] is None


def test_report_pools_live_records_with_a_null_dormancy():
    """The review's live case: a 20-token prompt whose sink position 22 is reached while decoding (its
    dormancy null) and a 40-token prompt that holds it, one domain; the pooled dormancy is the long
    prompt's own, not that times 43/68."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    short, long = torch.randint(2, 97, (1, 20), generator=g), torch.randint(2, 97, (1, 40), generator=g)
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None, domain="x")
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(n_sink=0, extra_sink_positions=(22,))), \
            sinkfix.monitor(model) as monitor:
        monitor.generate(input_ids=long, max_new_tokens=4, **common)
        b = monitor.records[0]
        monitor.generate(input_ids=short, max_new_tokens=6, **common)
        a = monitor.records[0]
    assert all(x is None for layer in a["dormancy"] for x in layer) and a["sink_share"][1][0] is not None
    pooled = summarise([a, b]).domains["x"].dormancy
    torch.testing.assert_close(pooled, torch.tensor(b["dormancy"], dtype=torch.float64))


# -- F3: `monitor run` counts the records that reached the log -------------------------------------
def test_monitor_run_counts_only_records_written_and_exits_2(loaded_tiny, tmp_path, capsys, monkeypatch):
    """A log whose writes fail after the first (a full disk): the run said "appended 3 records" and
    exited 0 with 1 record in the file."""
    original, writes = JsonlLog.write, [0]

    def write(self, record):
        writes[0] += 1
        if writes[0] > 1:
            raise OutputError(f"cannot write {self.path}: File too large")
        original(self, record)

    monkeypatch.setattr(JsonlLog, "write", write)
    log = tmp_path / "t.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log),
                       "--max-new-tokens", "2"])
    assert rc == 2
    assert len(_lines(log)) == 1
    assert sum(issubclass(w.category, LogWriteWarning) for w in caught) == 2  # the warnings stay
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not line.startswith("monitor run:")]  # tqdm's
    assert len(err) == 1 and err[0].startswith("sinkfix monitor run: error: appended 1 of 3 records to ")
    assert "2 could not be written" in err[0] and "File too large" in err[0]
    assert "appended 3 records" not in captured.out and "telemetry by domain" in captured.out


def test_the_monitor_counts_log_writes(tmp_path, monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad(), sinkfix.monitor(model, log=tmp_path / "t.jsonl") as monitor:
        monitor.forward(input_ids=_ids(6))
        monkeypatch.setattr(JsonlLog, "write", lambda self, record: (_ for _ in ()).throw(OSError(28, "No space")))
        with pytest.warns(LogWriteWarning, match="No space"):
            monitor.forward(input_ids=torch.cat([_ids(6), _ids(6, 2)]))
    assert (monitor.records_logged, monitor.records_not_logged) == (1, 2)
    assert "No space" in monitor.last_log_error


# -- F4: the identity patch of a stock model is shared by the monitors that rely on it --------------
def test_two_monitors_on_a_stock_model_share_its_identity_patch():
    model = tiny_model("llama")
    ids = _ids(10)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    first, second = sinkfix.monitor(model), sinkfix.monitor(model)
    handle = PatchHandle.of(model)
    first.close()
    assert PatchHandle.of(model) is handle and handle.active  # still in force for the second
    with torch.no_grad():
        second.forward(input_ids=ids, request_id="after")  # before: "the model's patch was removed ..."
    assert second.records[0]["request"] == "after" and second.records[0]["tokens"] == 10
    third = sinkfix.monitor(model)  # a monitor made meanwhile relies on it too
    second.close()
    assert PatchHandle.of(model) is handle
    third.close()
    assert PatchHandle.of(model) is None  # the last one removed it: stock again, bit-identical
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, stock)
    other = tiny_model("llama", seed=2)  # per model: another model's monitor does not keep this one's patch
    kept = sinkfix.monitor(other)
    again = sinkfix.monitor(model)
    again.close()
    assert PatchHandle.of(model) is None and PatchHandle.of(other) is not None
    kept.close()
    assert PatchHandle.of(other) is None


def test_a_monitor_whose_patch_was_removed_says_the_model_is_stock():
    model = tiny_model("llama")
    monitor = sinkfix.monitor(model)
    PatchHandle.of(model).remove()
    with pytest.raises(MonitorError, match=r"patch was removed from the model .*which runs stock now: create a "
                                           r"new monitor") as caught:
        monitor.forward(input_ids=_ids(4))
    assert "new patch" not in str(caught.value)
    monitor.close()
    assert PatchHandle.of(model) is None


# -- F5: request_id through Monitor.forward / Monitor.generate --------------------------------------
def test_forward_and_generate_take_request_id():
    model = tiny_model("llama")
    ids = torch.cat([_ids(8), _ids(8, 2)])
    with torch.no_grad(), sinkfix.monitor(model) as monitor:
        monitor.forward(input_ids=ids, request_id="abc", domain="d")
        assert [r["request"] for r in monitor.records] == ["abc", "abc"]
        assert [r["domain"] for r in monitor.records] == ["d", "d"]
        out = monitor.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                               eos_token_id=None, request_id=["r1", None])
        assert out.shape == (2, 10)
        assert monitor.records[0]["request"] == "r1"
        assert monitor.records[1]["request"] == f"{monitor.session}-1"  # None: the monitor's own id
        with pytest.raises(MonitorError, match="request_id labels must be strings"):
            monitor.forward(input_ids=ids, request_id=[1, 2])


# -- F6: an undefined residual peak is printed as "-" -----------------------------------------------
def test_report_prints_a_dash_for_a_domain_without_residual_peaks(tmp_path, capsys):
    empty = _record("empty", [0, 0], [[None, None], [None, None]], [[None, None], [None, None]], peak=(None, None),
                    tokens=0)
    full = _record("full", [10, 10], [[0.3, 0.4], [0.5, 0.6]], [[0.1, 0.2], [0.1, 0.2]], peak=(1.5, 2.25))
    log = tmp_path / "np.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (empty, full)))
    assert cli.main(["monitor", "report", str(log)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│ empty") or line.startswith("│ full")}
    assert rows["empty"][5] == "-" and rows["empty"][2] == "- / -" and rows["empty"][3] == "-"
    assert rows["full"][5] == "2.2 (layer 1)" or rows["full"][5] == "2.3 (layer 1)"
    assert "0.0 (layer 0)" not in out


# -- F7: a log of another model, or a foreign file at a rotated path, is not appended to -------------
def _one_record(model, tmp_path) -> dict:
    with torch.no_grad(), sinkfix.monitor(model, log=tmp_path / "own.jsonl") as monitor:
        monitor.forward(input_ids=_ids(6))
    return _lines(tmp_path / "own.jsonl")[0]


@pytest.mark.parametrize("change", ["layers", "heads"])
def test_a_log_of_another_model_is_refused_at_creation(tmp_path, change):
    model = tiny_model("llama")
    record = _one_record(model, tmp_path)
    name = record["model"]
    if change == "layers":
        for key in ("sink_share", "dormancy", "hidden_sinks"):
            record[key].append(record[key][-1])
        wanted = rf"another model, {name} \(3 layers, 4 heads per layer\).* is {name} \(2 layers"
    else:
        for key in ("sink_share", "dormancy", "hidden_sinks"):
            record[key] = [heads[:2] for heads in record[key]]
        wanted = rf"another model, {name} \(2 layers, 2 heads per layer\).* is {name} \(2 layers, 4 heads"
    log = tmp_path / "mixed.jsonl"
    log.write_text(json.dumps(record) + "\n")
    before = log.read_bytes()
    with pytest.raises(MonitorError, match=wanted):
        sinkfix.monitor(model, log=log)
    assert log.read_bytes() == before and PatchHandle.of(model) is None


def test_a_log_of_the_same_model_under_another_name_is_appended_to(tmp_path):
    """The model's name is the one it was loaded by: one local folder given as m, ./m or its absolute
    path is one model, and a log of it under one spelling was refused as "another model" under the
    next (the report reads such a log as any other)."""
    model = tiny_model("llama")
    record = dict(_one_record(model, tmp_path), model="./" + "same-folder")
    log = tmp_path / "named.jsonl"
    log.write_text(json.dumps(record) + "\n")
    with torch.no_grad(), sinkfix.monitor(model, log=log) as monitor:
        monitor.forward(input_ids=_ids(6))
    assert len(_lines(log)) == 2 and monitor.records_logged == 1


def test_monitor_run_refuses_a_log_of_another_model(loaded_tiny, tmp_path, capsys):
    record = _one_record(tiny_model("llama"), tmp_path)
    record["model"] = "SomeOtherModel-3L"
    for key in ("sink_share", "dormancy", "hidden_sinks"):  # and a third layer: another shape
        record[key].append(record[key][-1])
    log = tmp_path / "mixed.jsonl"
    log.write_text(json.dumps(record) + "\n")
    before = log.read_bytes()
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log),
                     "--max-new-tokens", "1"]) == 2
    message = _stderr_line(capsys)
    assert message.startswith("sinkfix monitor run: error: the telemetry log") and "SomeOtherModel-3L" in message
    assert log.read_bytes() == before


def test_a_foreign_file_at_a_rotated_log_path_is_not_appended_to(tmp_path):
    model = tiny_model("llama")
    log = tmp_path / "logs" / "t.jsonl"
    with torch.no_grad(), sinkfix.monitor(model, log=log) as monitor:
        monitor.forward(input_ids=_ids(6))
        os.rename(log, tmp_path / "t.jsonl.1")  # rotated, and another file put at the path
        log.write_text("hello, not a log\n")
        with pytest.warns(LogWriteWarning, match=r"a file was put at its path .*is not a sinkfix telemetry log"):
            monitor.forward(input_ids=_ids(6, 2))
        assert log.read_text() == "hello, not a log\n"
        other = dict(_lines(tmp_path / "t.jsonl.1")[0], model="SomeOtherModel-3L")  # another model's log
        for key in ("sink_share", "dormancy", "hidden_sinks"):  # of another shape (three layers)
            other[key] = other[key] + [other[key][-1]]
        log.write_text(json.dumps(other) + "\n")
        with pytest.warns(LogWriteWarning, match="records of another model, SomeOtherModel-3L"):
            monitor.forward(input_ids=_ids(6, 3))
        assert len(_lines(log)) == 1
        log.unlink()  # gone: created again, as before
        monitor.forward(input_ids=_ids(6, 4))
        assert len(_lines(log)) == 1
        shutil.rmtree(tmp_path / "logs")  # its folder removed: made again, as creation does
        with warnings.catch_warnings():
            warnings.simplefilter("error", LogWriteWarning)
            monitor.forward(input_ids=_ids(6, 5))
        assert [r["request"] for r in _lines(log)] == [monitor.records[0]["request"]]
    assert monitor.records_logged == 3 and monitor.records_not_logged == 2


# -- F8: --max-prompt-tokens counts the BOS --------------------------------------------------------
def test_max_prompt_tokens_counts_the_bos(loaded_tiny, tmp_path):
    log = tmp_path / "t.jsonl"
    requests = _requests(tmp_path, ["x" * 300])
    assert cli.main(["monitor", "run", "--requests", str(requests), "--out", str(log), "--max-new-tokens", "0",
                     "--max-prompt-tokens", "50"]) == 0
    assert cli.main(["monitor", "run", "--requests", str(requests), "--out", str(log), "--max-new-tokens", "0",
                     "--max-prompt-tokens", "50", "--no-bos"]) == 0
    assert [r["prompt_tokens"] for r in _lines(log)] == [50, 50]  # was 51 with the BOS


@pytest.mark.parametrize("flags, least", [([], 2), (["--no-bos"], 1)])
def test_max_prompt_tokens_without_room_for_a_prompt_is_refused(no_model, tmp_path, capsys, flags, least):
    n = str(least - 1)
    assert cli.main(["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(tmp_path / "t.jsonl"),
                     "--max-prompt-tokens", n, *flags]) == 2
    message = _stderr_line(capsys)
    assert message.startswith("sinkfix monitor run: error: --")
    assert f"must be >= {least}" in message
    if not flags:
        assert message.startswith(f"sinkfix monitor run: error: --max-prompt-tokens {n} leaves no room") \
            and "the BOS token and one token of the prompt" in message


def test_max_prompt_tokens_help_says_the_bos_is_included(capsys):
    with pytest.raises(SystemExit):
        cli.main(["monitor", "run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "at most N tokens, the BOS token included" in help_text


def test_deeply_nested_json_in_a_request_file_or_a_log_is_a_one_line_error(tmp_path):
    """json's decoder recurses once per nesting level: a line of 200,000 '[' raised a RecursionError
    traceback from the request reader, the log reader and the log check instead of a MonitorError."""
    from sinkfix.errors import MonitorError
    from sinkfix.telemetry.outputs import check_log_file
    from sinkfix.telemetry.report import read_log
    from sinkfix.telemetry.requests import read_requests

    deep = "[" * 200_000 + "]" * 200_000 + "\n"
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "a"}\n' + deep)
    with pytest.raises(MonitorError, match="line 2: .*nested too deeply"):
        read_requests(requests)
    log = tmp_path / "log.jsonl"
    log.write_text(deep)
    with pytest.raises(MonitorError, match="line 1: .*nested too deeply"):
        read_log(log)
    with pytest.raises(MonitorError, match="is not a sinkfix telemetry log"):
        check_log_file(log)


def test_beam_search_the_models_config_asks_for_is_refused_under_a_passed_config():
    """transformers fills a passed generation config's unset num_beams from the model's: with the
    model's num_beams=3 and GenerationConfig(max_new_tokens=3), beam search ran and one request was
    written as 3 records."""
    model = tiny_model("llama")
    model.generation_config.num_beams = 3
    config = GenerationConfig(max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    calls = _layer_calls(model)
    with torch.no_grad(), sinkfix.monitor(model) as monitor:
        calls[0] = 0
        with pytest.raises(MonitorError, match=r"beam search \(num_beams=3\) cannot be monitored"):
            monitor.generate(_ids(10), generation_config=config)
        assert calls[0] == 0 and monitor.records == []
        monitor.generate(_ids(10), generation_config=config, num_beams=1)  # the call's argument wins
    assert len(monitor.records) == 1 and monitor.records[0]["decoded_tokens"] == 2


def test_the_models_eos_counts_under_a_passed_generation_config():
    """transformers fills a passed config's unset eos_token_id from the model's and stops the row; the
    monitor read only the passed config, and counted the finished row's padding steps (18 tokens
    instead of 14, sink share 0.147 instead of 0.174)."""
    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    ids = torch.cat([_ids(14), _ids(14, 7)])
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=1, do_sample=False)[:, -1]
    assert int(first[0]) != int(first[1])
    model.generation_config.eos_token_id = int(first[0])  # row 0 ends at its first new token
    records = []
    for kwargs in ({"max_new_tokens": 5}, {"generation_config": GenerationConfig(max_new_tokens=5, do_sample=False)}):
        with torch.no_grad(), sinkfix.monitor(model) as monitor:
            monitor.generate(ids, **kwargs)
        records.append(monitor.records)
    assert [r["tokens"] for r in records[1]] == [r["tokens"] for r in records[0]] and records[1][0]["tokens"] == 14
    assert records[1][0]["sink_share"] == records[0][0]["sink_share"]


def test_beam_search_asked_for_with_a_tensor_is_refused():
    model = tiny_model("llama")
    with torch.no_grad(), sinkfix.monitor(model) as monitor:
        with pytest.raises(MonitorError, match=r"beam search \(num_beams=3\) cannot be monitored"):
            monitor.generate(_ids(10), max_new_tokens=2, num_beams=torch.tensor(3), pad_token_id=0)
