"""Profiles, `sinkfix monitor report`, `sinkfix stream`, the Triton backend's dtypes and residual-clip
messages: the defects black-box reviews found, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sinkfix import cli
from sinkfix.errors import ProfileError
from sinkfix.profile import ModelIdentity, Profile, ProfileStatistics

from .conftest import require_triton_kernels, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# -- profiles: the window protocol `monitor ranges` measures with is checked when the file loads --------
def _profile_dict(with_logits: bool = True) -> dict:
    model = tiny_model("llama")
    beta = torch.linspace(0.5, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    logits = torch.full((2, 4), -3.0, dtype=torch.float64) if with_logits else None
    stats = ProfileStatistics(low=torch.full((2, 4), 0.2, dtype=torch.float64),
                              high=torch.full((2, 4), 0.6, dtype=torch.float64), windows=4, min_rows=16,
                              protocol={"seq_len": 64, "bos": True, "max_tokens": None, "windows_per_text": 2})
    profile = Profile(ModelIdentity.of(model), beta, logits,
                      calibration={"rule": "robust", "protocol": {"seq_len": 64, "bos": True},
                                   "hyper": {"max_tokens": 512}}).with_statistics(stats)
    return profile.to_dict()


def _load(tmp_path, data: dict) -> Profile:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return Profile.load(path)


def test_a_well_formed_protocol_loads(tmp_path):
    loaded = _load(tmp_path, _profile_dict())
    assert loaded.statistics.protocol["windows_per_text"] == 2 and loaded.calibration["hyper"]["max_tokens"] == 512


@pytest.mark.parametrize("where, key, value", [
    ("calibration.protocol", "seq_len", "64"),      # a TypeError traceback in `monitor ranges`
    ("calibration.protocol", "seq_len", 0),
    ("calibration.hyper", "max_tokens", 10.5),      # a TypeError traceback on slicing
    ("calibration.hyper", "max_tokens", True),
    ("statistics.protocol", "windows_per_text", "2"),
    ("statistics.protocol", "windows_per_text", 0),
    ("statistics.protocol", "windows_per_text", -1),  # measured each text's first 15 of 16 windows, unsaid
    ("statistics.protocol", "seq_len", 2.5),
])
def test_window_counts_a_profile_records_are_checked(tmp_path, where, key, value):
    data = _profile_dict()
    entry = data
    for part in where.split("."):
        entry = entry[part]
    entry[key] = value
    with pytest.raises(ProfileError, match=re.escape(f"{where}.{key} must be an integer >= 1")):
        _load(tmp_path, data)


def test_numpy_counts_and_nulls_are_recorded_protocols_not_errors(tmp_path):
    """Guards against over-refusal: ``calibrate`` takes numpy integers (the check raised at the end of the
    fit and the profile was lost), and a protocol made in code may leave a count null (not recorded)."""
    import numpy as np

    data = _profile_dict()
    data["statistics"]["protocol"].update(windows_per_text=None, seq_len=None)
    assert _load(tmp_path, data).statistics.protocol["windows_per_text"] is None
    model = tiny_model("llama")
    beta = torch.full((2, 4), 0.9, dtype=torch.float64)
    profile = Profile(ModelIdentity.of(model), beta, calibration={"protocol": {"seq_len": np.int64(48)},
                                                                  "hyper": {"max_tokens": np.int32(512)}})
    assert profile.calibration["protocol"]["seq_len"] == 48


def test_monitor_ranges_refuses_such_a_profile_in_one_line(tmp_path, capsys):
    data = _profile_dict()
    data["statistics"]["protocol"]["windows_per_text"] = -1
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    rc = cli.main(["monitor", "ranges", "--model", "smollm2-135m", "--profile", str(path), "--text", str(text),
                   "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "windows_per_text must be an integer >= 1" in err, err
    assert not (tmp_path / "out.json").exists()


# -- profiles: keys an old version cannot have are refused, not ignored --------------------------------
def test_a_version_1_file_saying_false_for_the_sink_row_is_refused(tmp_path):
    data = _profile_dict()
    data["version"] = 1
    data["policy"]["virtual_logit_on_sink_rows"] = False  # loaded as true before: patched other numbers
    with pytest.raises(ProfileError, match="version-1 profile's policy cannot have 'virtual_logit_on_sink_rows'"):
        _load(tmp_path, data)
    data["policy"]["virtual_logit_on_sink_rows"] = True  # what version 1 means: read
    assert _load(tmp_path, data).virtual_logit_on_sink_rows is True
    without_logits = _profile_dict(with_logits=False)  # the flag changes nothing without virtual logits
    without_logits["version"] = 1
    without_logits["policy"]["virtual_logit_on_sink_rows"] = False
    assert _load(tmp_path, without_logits).virtual_sink_logit is None


@pytest.mark.parametrize("version", [1, 2])
def test_domains_in_a_file_older_than_version_3_are_refused(tmp_path, version):
    data = _profile_dict()
    data["version"] = version
    data["policy"]["virtual_logit_on_sink_rows"] = True
    data["domains"] = {"pydoc": {"sink_scale": data["policy"]["sink_scale"], "virtual_sink_logit": None}}
    with pytest.raises(ProfileError, match=f"version-{version} profile cannot have 'domains'"):
        _load(tmp_path, data)  # were dropped before
    data["domains"] = None
    assert _load(tmp_path, data).domain_parameters is None


# -- `sinkfix monitor report`: values no monitor writes are refused, naming the line ----------------------
def _record(**change) -> dict:
    record = {"schema": "sinkfix-telemetry", "version": 1, "domain": "a", "model": "m", "tokens": 10,
              "rows": [9, 9], "sink_share": [[0.3, 0.3], [0.3, 0.3]], "dormancy": [[0.1, 0.1], [0.1, 0.7]],
              "dormant_heads": 1, "residual_peak": [2.0, 50.0], "hidden_sinks": [[0, 1], [0, 0]], "guard": None}
    return {**record, **change}


def _report(capsys, tmp_path, *records: dict) -> tuple[int, str]:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    rc = cli.main(["monitor", "report", str(log), "--out", str(tmp_path / "report")])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("change, message", [
    # read as they were: -3.0 on every head listed 98 heads as flipping between domains on SmolLM2's
    # shape; above 2 no monitor's estimate goes (up to 2 is read as 1, the test below)
    ({"dormancy": [[0.1, 0.1], [0.1, 2.5]]}, r"\"dormancy\" must lie in \[0, 1\] .*got 2.5 at layer 1, head 1"),
    ({"dormancy": [[-3.0, 0.1], [0.1, 0.1]]}, r"\"dormancy\" must lie in \[0, 1\] .*got -3.0 at layer 0, head 0"),
    ({"residual_peak": [2.0, -5.0]}, r"\"residual_peak\" must be a list of one number >= 0"),  # was averaged in
    ({"domain": ""}, r"the domain '' is empty"),  # reported as a domain named ""
    ({"domain": "none"}, r"the domain 'none' is reserved"),  # merged with the requests without a domain
    ({"domain": " code"}, r"starts or ends with whitespace"),
])
def test_report_refuses_values_no_monitor_writes(capsys, tmp_path, change, message):
    rc, err = _report(capsys, tmp_path, _record(domain="b"), _record(**change))
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "line 2: " in err and re.search(message, err), err
    assert not (tmp_path / "report").exists()


def test_report_reads_an_unclamped_dormancy_estimate_as_one(capsys, tmp_path):
    """Monitors before this fix logged a long prompt's dormancy estimate unclamped (1.0034 where every
    row is exactly 1): such a log is reported, the value read as 1, not refused."""
    rc, err = _report(capsys, tmp_path, _record(dormancy=[[0.1, 0.1], [0.1, 1.0034]]),
                      _record(domain="b", dormancy=[[0.1, 0.1], [0.1, 1.0]]))
    assert rc == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["domains"]["a"]["dormancy"][1][1] == report["domains"]["b"]["dormancy"][1][1] == 1.0


def test_report_accepts_nulls_and_draws_a_log_without_residual_peaks(capsys, tmp_path):
    """A log whose peaks are all null raised matplotlib's "cannot be log-scaled" instead of a figure."""
    pytest.importorskip("matplotlib")
    rc, err = _report(capsys, tmp_path, _record(residual_peak=[None, None], dormancy=[[None, 0.1], [0.1, 1.0]]),
                      _record(domain=None, residual_peak=[None, None]))
    assert rc == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["domains"]) == {"a", "none"}
    figure = tmp_path / "report" / "sink_share_by_layer.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- `sinkfix stream`: the refusal of a stream too short names the length that is enough ----------------
def test_stream_length_refusal_names_the_minimum_it_accepts():
    """The message listed a warm-up of 257 and a segment of 1024: 1281 tokens, which it refused too
    (the first token is not scored)."""
    from sinkfix.analysis.streaming import check_stream_arguments
    from sinkfix.errors import UsageError

    with pytest.raises(UsageError, match=r"needs at least 1282 \(the first token"):
        check_stream_arguments(1281, 4, 252, 32, 1024, 64)
    check_stream_arguments(1282, 4, 252, 32, 1024, 64)


# -- the Triton backend takes fp16 / bf16 / fp32: a float64 model is refused at patch(), not mid-forward --
def test_triton_backend_refuses_a_float64_model_at_patch(monkeypatch):
    require_triton_kernels()
    import sinkfix
    from sinkfix.errors import BackendUnavailableError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model("llama").double()
    with pytest.raises(BackendUnavailableError, match=r"runs float16, bfloat16 and float32 models, this one is "
                                                       r"torch\.float64; use backend='torch'"):
        sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5), backend="triton")
    assert sinkfix.PatchHandle.of(model) is None  # left as it was found
    model(torch.randint(3, 90, (2, 6)))  # stock, no kernel met


def test_auto_backend_picks_the_torch_path_for_a_float64_model(monkeypatch):
    require_triton_kernels()
    from sinkfix.ops.attention import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton counts as usable without a GPU

    cuda = torch.device("cuda")  # only its type is read: no GPU is needed to resolve
    assert resolve_backend("auto", cuda, torch.float64) == "torch"
    assert resolve_backend("auto", cuda, None) == resolve_backend("auto", cuda, torch.float32) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


# -- residual clip: what inf means differs between a threshold and a sink norm ---------------------------
def test_a_bad_sink_norm_is_told_what_inf_means_for_it():
    from sinkfix.errors import PolicyError
    from sinkfix.policy import ResidualClip

    with pytest.raises(PolicyError, match=r"residual_clip\.sink_norm must be > 0 \(inf leaves a layer's sinks "
                                          r"unclipped\)"):
        ResidualClip(4.0, sink_norm=0.0)
    with pytest.raises(PolicyError, match=r"residual_clip\.threshold must be > 0 \(inf disables a layer\)"):
        ResidualClip(-1.0)


# -- `sinkfix kvquant --out`: never its own --text -------------------------------------------------------
def test_kvquant_refuses_to_write_its_result_over_its_text(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    spelled_otherwise = tmp_path / "sub" / ".." / "t.txt"
    (tmp_path / "sub").mkdir()
    rc = cli.main(["kvquant", "--text", str(text), "--out", str(spelled_otherwise), "--seq-len", "64",
                   "--chunk", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is the text" in err and "(--text)" in err, err
    assert text.read_text() == "the cat sat on the mat. " * 40  # was replaced by the JSON result, exit status 0


# -- `python -m sinkfix.lmeval` without lm-eval: the one-line hint, as `sinkfix eval` gives it ------------
def test_python_m_sinkfix_lmeval_without_lm_eval_says_what_to_install(monkeypatch, capsys):
    import sys

    from sinkfix.lmeval.__main__ import main

    monkeypatch.setitem(sys.modules, "lm_eval.api.registry", None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, "sinkfix.lmeval.model", raising=False)
    with pytest.raises(SystemExit) as ended:
        main()  # an 11-line traceback before
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m sinkfix.lmeval: error: downstream evaluation needs lm-evaluation-harness: "
                          "pip install 'sinkfix[eval]'"), err


# -- paths and names with brackets are printed as written, on one line -----------------------------------
def test_commands_print_bracketed_names_as_written_and_unwrapped(loaded_tiny, tmp_path, capsys):
    """`[/x]` in a path is a closing tag rich cannot match: `inspect --out out[/x]` and `monitor run
    --out l[/x].jsonl` raised rich's MarkupError after their work was done. And a path longer than 80
    columns was cut in two where the output is not a terminal."""
    deep = tmp_path / ("d" * 90) / "out[" / "x]"  # the path holds "[/x]"
    text = tmp_path / "t[" / "x].txt"
    text.parent.mkdir()
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 30)
    assert cli.main(["inspect", "--text", str(text), "--out", str(deep), "--no-figures", "--seq-len", "64",
                     "--max-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {deep / 'report.json'}\n" in out, out[-600:]
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "abc def", "domain": "a[/b]"}\n{"prompt": "ghi jkl", "domain": "[i]"}\n')
    log = tmp_path / ("e" * 90) / "l[" / "x].jsonl"
    log.parent.mkdir(parents=True)
    assert cli.main(["monitor", "run", "--model", "m[/x]", "--requests", str(requests), "--out", str(log),
                     "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert f"appended 2 records to {log}\n" in out and "loading m[/x] ..." in out, out[-600:]
    assert "a[/b]" in out and "[i]" in out  # the summary table's domains: "[i]" was read as italic, and vanished
    assert cli.main(["monitor", "report", str(log), "--out", str(deep / "report"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {deep / 'report' / 'report.json'}\n" in out and "a[/b]" in out and "[i]" in out, out
