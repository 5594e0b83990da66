"""Calibration and profiles in the cases review 39 found: a profile calibrated on a compiled model
that refused that model, `monitor ranges` measuring with its own window protocol, `--out` over a
calibration text, hand-edited profiles loaded with a field dropped, NaN in leave-one-domain-out JSON,
the guard tripping on its own calibration windows, the identity's row of a pruned selection, and a
deeply nested profile file."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.analysis.calibration import calibration_windows
from sinkfix.analysis.lodo import ChangeInterval, WindowScores, change_intervals
from sinkfix.analysis.robust import candidates, select
from sinkfix.errors import ProfileError
from sinkfix.profile import ModelIdentity, Profile
from sinkfix.telemetry import calibration_statistics

from .conftest import CharTokenizer, benchmark_script, text_args, tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

THREE = {"prose": "the cat sat on the mat and the dog sat on the log. " * 30,
         "code": "for i in range(10):\n    total += i * i\n" * 40,
         "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40}


def _profile(model, **calibration) -> Profile:
    """A profile of ``model`` with per-head parameters, per-domain fits and ``calibration`` as its record."""
    g = torch.Generator().manual_seed(0)
    beta = 0.6 + 0.3 * torch.rand(2, 4, generator=g, dtype=torch.float64)
    logit = torch.full((2, 4), -3.0, dtype=torch.float64)
    return Profile(ModelIdentity.of(model), beta, logit, calibration=calibration,
                   domain_parameters={"a": (beta, logit), "b": (beta, None)})


# -- 1. a compiled model is identified as the model inside it --------------------------------------
def test_the_identity_of_a_compiled_model_is_the_models_own():
    model = tiny_model("llama", seed=3)
    compiled = torch.compile(model, backend="eager")  # no forward: nothing is compiled
    plain = ModelIdentity.of(model)
    assert plain.architecture == "LlamaForCausalLM"
    assert ModelIdentity.of(compiled) == plain
    # a profile of the plain model fits the compiled one, as patch() checks it, and the other way round
    profile = _profile(model)
    profile.check(compiled)
    Profile(ModelIdentity.of(compiled), profile.sink_scale).check(model)


@pytest.mark.slow
def test_a_profile_calibrated_on_a_compiled_model_applies_to_the_model_compiled_or_not():
    model = tiny_model("llama", seed=3)
    compiled = torch.compile(model, backend="eager")
    profile = sinkfix.calibrate(compiled, CharTokenizer(), THREE, seq_len=64, max_tokens=512, steps=6, progress=False)
    assert profile.model.architecture == "LlamaForCausalLM"
    assert profile.model.fingerprint == ModelIdentity.of(model).fingerprint
    for target in (model, compiled):
        with sinkfix.patch(target, profile) as handle:
            assert handle.active


# -- 2. monitor ranges measures with the profile's window protocol ----------------------------------
def _no_bos_profile(model, tmp_path) -> str:
    profile = _profile(model, protocol={"seq_len": 64, "bos": False, "stride": 64, "windows": "non-overlapping"},
                       hyper={"max_tokens": 512})
    return str(profile.save(tmp_path / "nobos.json"))


def test_monitor_ranges_takes_the_window_protocol_from_the_profile(loaded_tiny, tmp_path, capsys):
    path = _no_bos_profile(loaded_tiny, tmp_path)
    out = tmp_path / "r.json"
    rc = cli.main(["monitor", "ranges", "--profile", path, *text_args(tmp_path, THREE), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    protocol = json.loads(out.read_text())["statistics"]["protocol"]
    assert (protocol["seq_len"], protocol["bos"], protocol["max_tokens"], protocol["windows_per_text"]) == \
        (64, False, 512, 8)
    assert "overrides" not in protocol
    # the ranges are those of the no-BOS windows
    texts = {name: (tmp_path / f"{name}.txt").read_text() for name in THREE}
    windows = [w for t in texts.values() for w in calibration_windows(CharTokenizer(), t, seq_len=64, bos=False,
                                                                        max_tokens=512)[:8]]
    profile = Profile.load(path)
    with sinkfix.patch(loaded_tiny, profile):
        expected = calibration_statistics(loaded_tiny, windows, min_rows=32)
    torch.testing.assert_close(Profile.load(out).statistics.low, expected.low)


def test_monitor_ranges_measures_on_the_domains_the_profile_was_calibrated_on(loaded_tiny, tmp_path, capsys):
    # review 85: a profile fitted on pydoc + python got ranges from all five built-in domains, up to 0.15
    # wider on Gemma3 (the guard's whole margin), and the guard stopped tripping where it had, unsaid
    profile = _profile(loaded_tiny, protocol={"seq_len": 64, "bos": False, "stride": 64, "windows": "non-overlapping"},
                       hyper={"max_tokens": 256}, texts={"pydoc": {"calib_windows": 4}, "python": {"calib_windows": 4}})
    path = str(profile.save(tmp_path / "two.json"))
    out = tmp_path / "r.json"
    assert cli.main(["monitor", "ranges", "--profile", path, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "measuring on the domains the profile was calibrated on (pydoc, python)" in captured.err
    protocol = json.loads(out.read_text())["statistics"]["protocol"]
    assert protocol["texts"] == ["pydoc", "python"] and "overrides" not in protocol
    # another choice is the user's to make: warned of, and recorded
    other = tmp_path / "r2.json"
    assert cli.main(["monitor", "ranges", "--profile", path, "--domain", "legal", "--out", str(other)]) == 0
    assert ("measuring on the built-in domains legal; the profile was calibrated on the built-in domains pydoc, "
            "python") in capsys.readouterr().err
    protocol = json.loads(other.read_text())["statistics"]["protocol"]
    assert protocol["texts"] == ["legal"]
    assert protocol["overrides"]["--domain"] == {"recorded": ["pydoc", "python"], "used": ["legal"]}
    # files named like the built-in domains are not those domains: warned of, recorded under --text
    files = text_args(tmp_path, {"pydoc": THREE["prose"], "python": THREE["code"]})
    assert cli.main(["monitor", "ranges", "--profile", path, *files, "--out", str(tmp_path / "r4.json")]) == 0
    assert "measuring on the files pydoc.txt, python.txt; the profile was calibrated on the built-in" in \
        capsys.readouterr().err
    overrides = json.loads((tmp_path / "r4.json").read_text())["statistics"]["protocol"]["overrides"]
    assert overrides == {"--text": {"recorded": ["pydoc", "python"], "used": ["pydoc", "python"]}}
    # the same domains in another order are no other choice
    assert cli.main(["monitor", "ranges", "--profile", path, "--domain", "python", "--domain", "pydoc",
                     "--out", str(tmp_path / "r3.json")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_monitor_ranges_of_a_profile_calibrated_on_files_needs_them(loaded_tiny, tmp_path, capsys):
    """Review 87: without --text it measured on the five built-in domains (ranges up to 0.25 off the
    profile's own) with a note only; given its own files it warned that they were other texts."""
    profile = _profile(loaded_tiny, protocol={"seq_len": 64, "bos": False, "stride": 64, "windows": "non-overlapping"},
                       hyper={"max_tokens": 256}, texts={"prose": {}, "code": {}})
    path = str(profile.save(tmp_path / "files.json"))
    out = tmp_path / "r.json"
    assert cli.main(["monitor", "ranges", "--profile", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "calibrated on texts that are not built-in domains (prose, code): pass those files with --text" in err
    assert not out.exists()
    own = text_args(tmp_path, {"code": THREE["code"], "prose": THREE["prose"]})  # its own files, in another order
    assert cli.main(["monitor", "ranges", "--profile", path, *own, "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "overrides" not in json.loads(out.read_text())["statistics"]["protocol"]
    other = text_args(tmp_path, {"list": THREE["list"]})
    assert cli.main(["monitor", "ranges", "--profile", path, *other, "--out", str(tmp_path / "o.json")]) == 0
    assert "measuring on the files list.txt; the profile was calibrated on the texts prose, code" in capsys.readouterr().err
    overrides = json.loads((tmp_path / "o.json").read_text())["statistics"]["protocol"]["overrides"]
    assert overrides == {"--text": {"recorded": ["prose", "code"], "used": ["list"]}}


def test_monitor_ranges_refuses_a_contradicting_option_unless_asked_knowingly(loaded_tiny, tmp_path, capsys):
    path = _no_bos_profile(loaded_tiny, tmp_path)
    out = tmp_path / "r.json"
    args = ["monitor", "ranges", "--profile", path, *text_args(tmp_path, THREE), "--out", str(out), "--bos"]
    rc = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--bos on (the profile's: off)" in err and "--override-protocol" in err, err
    assert not out.exists()
    # the profile's own value, given explicitly, is no contradiction
    assert cli.main([*args[:-1], "--no-bos", "--seq-len", "64"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--override-protocol"]) == 0
    err = capsys.readouterr().err
    assert "warning: measuring with another window protocol" in err and "--bos on" in err
    protocol = json.loads(out.read_text())["statistics"]["protocol"]
    assert protocol["bos"] is True and protocol["overrides"] == {"--bos": {"recorded": False, "used": True}}


# -- 3. --out never replaces a calibration text or any other file that is not a profile --------------
def test_calibrate_refuses_an_out_that_is_one_of_its_texts(no_model, tmp_path, capsys):
    args = text_args(tmp_path, THREE)
    target = tmp_path / "code.txt"
    spelled = str(tmp_path / "." / "code.txt")  # another spelling of the same file
    rc = cli.main(["calibrate", *args, "--seq-len", "64", "--steps", "6", "--no-statistics", "--out", spelled])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"is the text {target}" in err, err
    assert target.read_text() == THREE["code"]


def test_calibrate_refuses_to_replace_a_file_that_is_not_a_profile(no_model, tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    for content, found in (('{"mine": 1}', 'JSON without "format"'), ("my notes", "not JSON")):
        notes.write_text(content)
        rc = cli.main(["calibrate", *text_args(tmp_path, THREE), "--seq-len", "64", "--steps", "6", "--no-statistics",
                       "--out", str(notes)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "exists and is not a sinkfix profile" in err and found in err, err
        assert notes.read_text() == content


def test_calibrate_still_replaces_an_existing_profile(loaded_tiny, tmp_path, capsys):
    out = tmp_path / "p.json"
    old = _profile(loaded_tiny).save(out)
    before = out.read_text()
    rc = cli.main(["calibrate", *text_args(tmp_path, THREE), "--seq-len", "64", "--steps", "6", "--no-statistics",
                   "--max-tokens", "512", "--out", str(old)])
    assert rc == 0, capsys.readouterr().err
    assert out.read_text() != before and Profile.load(out).calibration["rule"] == "robust"


def test_monitor_ranges_refuses_an_out_that_is_a_text_or_not_a_profile(no_model, tmp_path, capsys):
    path = _no_bos_profile(tiny_model("llama", seed=3), tmp_path)
    args = text_args(tmp_path, THREE)
    for out, message in ((tmp_path / "prose.txt", "is the text"), (tmp_path / "list.txt", "is the text")):
        rc = cli.main(["monitor", "ranges", "--profile", path, *args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and message in err, err
    other = tmp_path / "log.jsonl"
    other.write_text('{"schema": "sinkfix-telemetry"}\n')
    rc = cli.main(["monitor", "ranges", "--profile", path, *args, "--out", str(other)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "exists and is not a sinkfix profile" in err, err
    assert (tmp_path / "prose.txt").read_text() == THREE["prose"] and other.read_text().startswith('{"schema"')


# -- 4. hand-edited profiles: a missing virtual_sink_logit, unknown keys --------------------------------
@pytest.fixture
def saved(tmp_path):
    path = _profile(tiny_model("llama", seed=3), rule="robust").save(tmp_path / "base.json")
    return json.loads(path.read_text())


def _load_edited(tmp_path, data) -> Profile:
    path = tmp_path / "ed.json"
    path.write_text(json.dumps(data))
    return Profile.load(path)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_policy_without_virtual_sink_logit_is_refused(saved, tmp_path, version):
    saved["version"] = version
    saved["policy"]["virtual_sink_logits"] = saved["policy"].pop("virtual_sink_logit")  # misspelt
    with pytest.raises(ProfileError, match="unknown key.*'virtual_sink_logits'"):
        _load_edited(tmp_path, saved)
    del saved["policy"]["virtual_sink_logits"]
    with pytest.raises(ProfileError, match=r"ed\.json: profile policy has no 'virtual_sink_logit'"):
        _load_edited(tmp_path, saved)


def test_a_domain_without_virtual_sink_logit_or_with_an_unknown_key_is_refused(saved, tmp_path):
    assert saved["domains"]["b"]["virtual_sink_logit"] is None  # what the writer writes for "none"
    entry = saved["domains"]["a"]
    entry["virtual_sink_logits"] = entry.pop("virtual_sink_logit")
    with pytest.raises(ProfileError, match="domain 'a' has no 'virtual_sink_logit'"):
        _load_edited(tmp_path, saved)
    entry["virtual_sink_logit"] = entry.pop("virtual_sink_logits")
    entry["shrink"] = 0.5
    with pytest.raises(ProfileError, match="domain 'a' has unknown key.*'shrink'"):
        _load_edited(tmp_path, saved)


@pytest.mark.parametrize("key, value", [("n_sinks", 4), ("residual_clips", [2.0, 2.0])])
def test_a_misspelt_policy_key_is_refused(saved, tmp_path, key, value):
    saved["policy"][key] = value
    with pytest.raises(ProfileError, match=f"policy has unknown key\\(s\\) '{key}'; it takes .*n_sink"):
        _load_edited(tmp_path, saved)


def test_the_unedited_profile_still_loads_with_its_parameters(saved, tmp_path):
    loaded = _load_edited(tmp_path, saved)
    assert loaded.virtual_sink_logit is not None and float(loaded.virtual_sink_logit[0, 0]) == -3.0
    assert loaded.domain_parameters["a"][1] is not None and loaded.domain_parameters["b"][1] is None


# -- 5. a sink set the policy refuses is refused at load, with the path ---------------------------------
def test_extra_sink_positions_inside_the_first_n_sink_are_refused_at_load(saved, tmp_path):
    saved["policy"]["extra_sink_positions"] = [0]
    with pytest.raises(ProfileError, match=r"ed\.json: profile does not describe a valid policy: "
                                           r"extra_sink_positions 0 already in the sink set"):
        _load_edited(tmp_path, saved)


def test_inspect_refuses_it_before_the_model_loads(saved, tmp_path, no_model, capsys):
    saved["policy"]["n_sink"], saved["policy"]["extra_sink_positions"] = 2, [1, 5]
    path = tmp_path / "ed.json"
    path.write_text(json.dumps(saved))
    rc = cli.main(["inspect", *text_args(tmp_path, {"t": THREE["prose"]}), "--profile", str(path), "--no-figures",
                   "--out", str(tmp_path / "insp")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{path}: profile does not describe a valid policy: extra_sink_positions 1" in err, err


# -- 6. a calibration entry that is not an object -------------------------------------------------------
@pytest.mark.parametrize("value", [[], False, "", 5])
def test_a_calibration_entry_that_is_not_an_object_is_refused(saved, tmp_path, value):
    saved["calibration"] = value
    with pytest.raises(ProfileError, match="profile 'calibration' entry must be an object"):
        _load_edited(tmp_path, saved)


def test_a_null_calibration_entry_is_no_record(saved, tmp_path):
    saved["calibration"] = None
    profile = _load_edited(tmp_path, saved)
    assert profile.robustness() == "not domain-robust: not calibrated by sinkfix (no calibration record)"
    assert not profile.domain_robust


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_profile_without_a_record_says_it_is_not_domain_robust(saved, tmp_path, version):
    """docs: every version 1 / 2 profile is described as not domain-robust; one whose calibration was
    null said only "not calibrated by sinkfix", also after being saved again as the current version."""
    saved["version"], saved["calibration"] = version, None
    saved.pop("domains", None)
    saved["policy"].pop("mode", None)
    if version == 1:  # version 2 added it; version 1 always meant true
        saved["policy"].pop("virtual_logit_on_sink_rows", None)
    profile = _load_edited(tmp_path, saved)
    assert "not domain-robust" in profile.describe()
    again = profile.save(tmp_path / "again.json")
    assert "not domain-robust" in type(profile).load(again).describe()


# -- 7. one-window intervals are null in JSON ---------------------------------------------------------
def test_a_one_window_interval_is_written_as_null():
    one = change_intervals(WindowScores({"stock": [10.0], "without": [9.9], "with": [9.8]}, [50]),
                           reference="stock", baselines=[], compared=["without", "with"])
    found = one["without"]["change"].to_dict()
    assert found["low"] is None and found["high"] is None and found["value"] == pytest.approx(math.expm1(-0.1 / 50))
    json.dumps(found, allow_nan=False)
    assert ChangeInterval(0.5, -0.1, 0.2).to_dict() == {"value": 0.5, "low": -0.1, "high": 0.2}


def test_the_lodo_benchmark_writes_strict_json(tmp_path):
    bench = benchmark_script("calibration_lodo", "calibration_lodo_39")
    path = tmp_path / "r.json"
    bench._save_json(path, {"rows": [{"with_change": math.nan, "x": [1.0, math.inf]}], "interval": ChangeInterval(
        0.1, math.nan, math.nan).to_dict()})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["rows"][0] == {"with_change": None, "x": [1.0, None]} and data["interval"]["low"] is None
    # the Markdown of a row without an interval, as read back
    assert bench._with_interval(data["interval"]) == "+10.00% [n/a: one window]" and bench._pct(None) == "-"


# -- 8. the guard does not trip on the windows its ranges were measured on -----------------------------
def test_the_guard_with_margin_0_keeps_its_own_calibration_windows_in(loaded_tiny):
    model = loaded_tiny
    profile = _profile(model)
    windows = [w for t in THREE.values()
               for w in calibration_windows(CharTokenizer(), t, seq_len=64, bos=True, max_tokens=1024)[:8]]
    with sinkfix.patch(model, profile):
        profile = profile.with_statistics(calibration_statistics(model, windows, min_rows=32))
        records = []
        with sinkfix.monitor(model, guard=profile, guard_margin=0.0, callback=records.append) as monitor:
            for ids in windows:
                with monitor.request(), torch.no_grad():
                    model(input_ids=ids[None], use_cache=False)
    assert len(records) == len(windows) == 24
    tripped = [r["guard"]["worst"] for r in records if r["guard"]["tripped"]]
    assert tripped == []
    # and every window's worst head sits at (within rounding of) its range's edge, not far inside it
    assert max(r["guard"]["worst"]["excess"] for r in records) > -1e-6


def test_a_trip_never_records_an_excess_of_0():
    from sinkfix.profile import ProfileStatistics
    from sinkfix.telemetry import Guard

    guard = Guard(ProfileStatistics(torch.full((1, 1), 0.25, dtype=torch.float64),
                                    torch.full((1, 1), 0.5, dtype=torch.float64), 1, 1), margin=0.0)
    # 4.2e-7 past the range (float32), past the tolerance (4 eps x 0.5 = 2.4e-7): a trip whose excess
    # rounded to 6 places was printed as 0.0
    decision = guard.decide(torch.tensor([[[[0.5 + 4e-7, 1.0]]]], dtype=torch.float32))
    row = decision.rows[0]
    assert row["tripped"] and 1e-7 < row["worst"]["excess"] < 3e-7, row
    inside = guard.decide(torch.tensor([[[[0.5 + 1e-8, 1.0]]]], dtype=torch.float32)).rows[0]
    assert not inside["tripped"] and inside["worst"]["excess"] < 0


# -- 9. the identity's row of a pruned selection ----------------------------------------------------------
def test_the_identity_is_scored_in_full_under_worst_pruning():
    fits = {d: (torch.full((2, 4), 0.9), None) for d in ("a", "b", "c")}
    calls = []

    def change(params, domain):  # every correction helps a little, each domain differently
        calls.append(domain)
        return -0.01 * (1 + "abc".index(domain)) * float(1 - params[0].mean())

    selection = select(candidates(), fits, (2, 4), change, rule="worst")
    assert selection.changes["identity"] == {"a": 0.0, "b": 0.0, "c": 0.0}
    record = selection.to_dict()
    assert "identity" not in record.get("not_scored", {})
    assert selection.chosen.name != "identity"


def test_the_printed_selection_table_shows_the_identity_row_in_full():
    from rich.console import Console

    from sinkfix.commands.calibrate import _selection_table

    fits = {d: (torch.full((2, 4), 0.9), None) for d in ("a", "b", "c")}
    selection = select(candidates(), fits, (2, 4),
                       lambda params, d: -0.01 * (1 + "abc".index(d)) * float(1 - params[0].mean()), rule="worst")
    console = Console(width=300, record=True)
    console.print(_selection_table({"selection": selection.to_dict(), "texts": {"a": {}, "b": {}, "c": {}}}))
    row = next(line for line in console.export_text().splitlines() if "identity" in line)
    assert row.count("+0.00%") == 5 and ">=" not in row and " - " not in row, row


# -- 10. a deeply nested profile file -------------------------------------------------------------------
def test_a_deeply_nested_profile_is_a_profile_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ProfileError, match=r"deep\.json is corrupted \(JSON nested too deeply"):
        Profile.load(path)


def test_the_cli_says_so_in_one_line(tmp_path, no_model, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    rc = cli.main(["inspect", *text_args(tmp_path, {"t": THREE["prose"]}), "--profile", str(path), "--no-figures",
                   "--out", str(tmp_path / "insp")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "is corrupted" in err, err


def test_calibrate_out_over_a_deeply_nested_file_is_refused_in_one_line(tmp_path, no_model, capsys):
    out = tmp_path / "deep.json"
    out.write_text("[" * 200_000 + "]" * 200_000)
    rc = cli.main(["calibrate", *text_args(tmp_path, THREE), "--seq-len", "64", "--steps", "6", "--no-statistics",
                   "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "not a sinkfix profile (not JSON)" in err, err


def test_monitor_ranges_refuses_windows_longer_than_the_models_positions(loaded_tiny, tmp_path, capsys):
    """A profile made in code records no protocol, and ranges falls back to calibrate's 512-token
    windows: on a model of 256 positions they were measured unchecked, where calibrate refuses them."""
    path = tmp_path / "code.json"
    Profile(ModelIdentity.of(loaded_tiny), torch.full((2, 4), 0.8, dtype=torch.float64)).save(path)
    out = tmp_path / "r.json"
    rc = cli.main(["monitor", "ranges", "--profile", str(path), *text_args(tmp_path, THREE), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--seq-len" in err[-1] and "512" in err[-1], err
    assert not out.exists()
