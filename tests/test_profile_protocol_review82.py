"""Review 82: `inspect --profile` and `monitor run --profile` follow the BOS protocol the profile was
calibrated with (a no-BOS profile was inspected and guarded on BOS windows, unsaid), and say so where a
flag measures it otherwise; `bench` already did."""

from __future__ import annotations

import json

import pytest

import sinkfix
from sinkfix import cli
from sinkfix.commands import bos_for_profile
from sinkfix.telemetry.report import read_log

from .test_monitor_cli import _requests, _two_texts

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def tiny(loaded_tiny):
    return loaded_tiny


@pytest.fixture
def profiles(tiny, tmp_path):
    """A profile calibrated without a BOS and one with, on the tiny model."""
    texts = _two_texts(tmp_path)
    made = {}
    for bos in (False, True):
        path = tmp_path / f"{'bos' if bos else 'nobos'}.json"
        assert cli.main(["calibrate", "--text", str(texts[0]), "--text", str(texts[1]), "--out", str(path),
                         "--seq-len", "64", "--steps", "2", "--no-virtual-logits",
                         "--bos" if bos else "--no-bos"]) == 0
        assert sinkfix.Profile.load(path).recorded_bos is bos
        made[bos] = path
    return made, texts


def test_the_resolver_follows_the_flag_then_the_profile_then_a_bos(profiles):
    made, _ = profiles
    no_bos, with_bos = (sinkfix.Profile.load(made[b]) for b in (False, True))
    assert bos_for_profile(None, None, None) == (True, None)
    assert bos_for_profile(None, with_bos, "/x/bos.json") == (True, None)
    bos, note = bos_for_profile(None, no_bos, str(made[False]))
    assert bos is False and note == "--profile nobos.json: no BOS, as the profile was calibrated (--bos to measure with one)"
    bos, note = bos_for_profile(True, no_bos, str(made[False]))
    assert bos is True and note.startswith("--profile nobos.json was calibrated without a BOS but is measured with one")
    assert bos_for_profile(False, no_bos, str(made[False])) == (False, None)
    assert bos_for_profile(False, None, None) == (False, None)
    assert bos_for_profile(None, sinkfix.Policy(sink_scale=0.9), None) == (True, None)  # a policy records none


def test_one_mismatch_note_for_bench_and_the_commands():
    """bench and inspect/monitor word the flag-against-profile note alike, each naming what it reports."""
    from sinkfix.bench.config import BenchConfig
    from sinkfix.bench.prepare import choose_bos
    from sinkfix.profile import bos_mismatch_note

    assert bos_mismatch_note(None, True, None) is None and bos_mismatch_note(True, True, "p.json") is None
    assert bos_mismatch_note(True, False, "p.json", "its perplexity changes") == (
        "--profile p.json was calibrated with a BOS but is measured without one (--no-bos): its perplexity "
        "changes need not match the calibration's")

    class Recorded:  # what choose_bos and bos_for_profile read of a profile
        recorded_bos = True
        recorded_seq_len = None

    bench = choose_bos(BenchConfig(model="tiny", profile="/x/p.json", bos=False), Recorded())
    assert (bench.bos, bench.source) == (False, "flag")
    assert bench.note == bos_mismatch_note(True, False, "p.json", "its perplexity changes")
    assert bos_for_profile(False, Recorded(), "/x/p.json") == (False, bos_mismatch_note(True, False, "p.json"))
    assert bos_for_profile(False, Recorded(), "/x/p.json")[1].endswith(": what it changes need not match the calibration's")


@pytest.mark.parametrize("flag, bos, noted", [(None, False, "no BOS, as the profile was calibrated"),
                                              ("--bos", True, "was calibrated without a BOS but is measured with one"),
                                              ("--no-bos", False, None)])
def test_inspect_measures_a_profile_with_its_protocol(profiles, tmp_path, capsys, flag, bos, noted):
    made, texts = profiles
    out = tmp_path / "insp"
    argv = ["inspect", "--profile", str(made[False]), "--text", str(texts[0]), "--seq-len", "64",
            "--max-tokens", "128", "--no-figures", "--out", str(out)] + ([flag] if flag else [])
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert (noted in err) if noted else ("note:" not in err)
    protocol = json.loads((out / "report.json").read_text())["protocol"]
    assert protocol["bos"] is bos
    assert protocol["profile"]["file"] == str(made[False].resolve())  # which profile was inspected
    assert "calibrated on no BOS, 64-token windows" in protocol["profile"]["description"]


@pytest.mark.parametrize("flag, first_is_bos", [(None, False), ("--bos", True)])
def test_monitor_run_serves_a_profile_with_its_protocol(profiles, tmp_path, capsys, flag, first_is_bos):
    made, _ = profiles
    log = tmp_path / "t.jsonl"
    argv = ["monitor", "run", "--requests", str(_requests(tmp_path)), "--out", str(log), "--profile",
            str(made[False]), "--guard", "--max-new-tokens", "0"] + ([flag] if flag else [])
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert ("was calibrated without a BOS but is measured with one" in err) is first_is_bos
    assert ("no BOS, as the profile was calibrated" in err) is (not first_is_bos)
    records = read_log(log)
    # the first prompt's tokens: its characters, plus one BOS when one is put first
    assert records[0]["prompt_tokens"] == len("def area(r):\n    return 3.14159 * r * r\n") + first_is_bos


def test_describe_says_which_windows_the_profile_was_calibrated_on(profiles):
    made, _ = profiles
    assert "calibrated on no BOS, 64-token windows" in sinkfix.Profile.load(made[False]).describe()
    assert "calibrated on BOS + 64-token windows" in sinkfix.Profile.load(made[True]).describe()
