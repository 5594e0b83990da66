"""Command-line options that were accepted and did nothing, and empty names read as the working folder:
the defects a review of every option of every subcommand found, each pinned by a test that failed before
its fix."""

from __future__ import annotations

import contextlib

import pytest

from sinkfix import cli
from sinkfix.commands.bench import config_from_args

from .test_calibrate_review39 import THREE, _no_bos_profile
from .test_cli_input_checks import _error
from .conftest import text_args

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_bench_refuses_decode_repeats_when_no_decode_is_timed(tmp_path, capsys):
    # it was recorded in the results' config next to a decode that never ran, without a word
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--decode-tokens", "0", "--decode-repeats", "3", "--out", str(out)])
    err = _error(capsys)
    assert rc == 2 and "--decode-repeats 3 has no effect with --decode-tokens 0" in err, err
    assert not out.exists()
    parser = cli.build_parser(["bench"])
    # either one alone is fine, and the default number of rounds is still the config's
    assert config_from_args(parser.parse_args(["bench", "--decode-tokens", "0"])).decode_repeats == 3
    assert config_from_args(parser.parse_args(["bench", "--decode-repeats", "5"])).decode_repeats == 5


def _subcommand_help(command: str, capsys) -> str:
    """What `sinkfix COMMAND --help` prints, its lines joined (argparse wraps them to the terminal)."""
    with contextlib.suppress(SystemExit):
        cli.main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_bench_help_says_decode_repeats_needs_a_decode(capsys):
    assert "not with --decode-tokens 0" in _subcommand_help("bench", capsys)


def test_monitor_ranges_says_an_override_that_overrides_nothing(loaded_tiny, tmp_path, capsys):
    path = _no_bos_profile(loaded_tiny, tmp_path)
    out = tmp_path / "r.json"
    rc = cli.main(["monitor", "ranges", "--profile", path, *text_args(tmp_path, THREE), "--out", str(out),
                   "--override-protocol"])
    err = capsys.readouterr().err
    assert rc == 0 and "--override-protocol changes nothing" in err, err
    # the profile's own value given explicitly is nothing to override either
    assert cli.main(["monitor", "ranges", "--profile", path, *text_args(tmp_path, THREE), "--out", str(out),
                     "--override-protocol", "--seq-len", "64"]) == 0
    assert "--override-protocol changes nothing" in capsys.readouterr().err
    # an option that differs is what it permits: no such note
    assert cli.main(["monitor", "ranges", "--profile", path, *text_args(tmp_path, THREE), "--out", str(out),
                     "--override-protocol", "--bos"]) == 0
    assert "changes nothing" not in capsys.readouterr().err


def test_monitor_ranges_names_the_one_count_that_is_wrong(tmp_path, capsys):
    rc = cli.main(["monitor", "ranges", "--profile", str(tmp_path / "p.json"), "--out", str(tmp_path / "r.json"),
                   "--min-rows", "0"])
    err = _error(capsys)
    assert rc == 2 and "--min-rows must be >= 1, got 0" in err and "None" not in err, err


def test_stream_names_every_file_it_writes_in_its_help(capsys):
    # stream_tokens.pt (every variant's per-token NLL) was written next to stream.json unmentioned
    text = _subcommand_help("stream", capsys)
    assert "stream.json, stream_tokens.pt" in text and "stream.png" in text, text


@pytest.mark.parametrize("argv, option", [
    (["inspect", "--model", ""], "--model"),
    (["bench", "--model", " "], "--model"),
    (["monitor", "run", "--requests", "", "--out", "OUT"], "--requests"),
])
def test_an_empty_name_is_refused_as_empty_not_read_as_the_working_folder(argv, option, tmp_path, capsys,
                                                                          monkeypatch):
    # `--requests ""` said "request file . is a directory", `--model ""` ". has no config.json"
    monkeypatch.chdir(tmp_path)
    rc = cli.main(argv)
    err = _error(capsys)
    assert rc == 2 and f"{option} is empty" in err and "'.'" not in err and " . " not in err, err
    assert list(tmp_path.iterdir()) == []
