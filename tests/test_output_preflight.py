"""Outputs that cannot be written fail before the work, not after it (check_writable)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sinkfix
import sinkfix.models
from sinkfix import cli
from sinkfix.files import OutputError, check_writable

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "benchmarks" / "results" / "calibration_lodo" / "lr-0.5" / "profile-smollm2-135m-bos.json"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the check itself --------------------------------------------------------------------------
def test_writable_targets_pass_and_nothing_is_created(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper" / "p.json") == tmp_path / "new" / "deeper" / "p.json"
    assert check_writable(tmp_path / "out", folder=True) == tmp_path / "out"
    (tmp_path / "old.json").write_text("old")
    check_writable(tmp_path / "old.json")  # an existing file is replaced atomically later
    check_writable(tmp_path, folder=True)  # an existing folder
    assert _names(tmp_path) == ["old.json"] and (tmp_path / "old.json").read_text() == "old"


def test_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file.txt is a file, not a folder") as info:
        check_writable(blocker / "sub" / "p.json")
    assert info.value.path == blocker / "sub" / "p.json"
    with pytest.raises(OutputError, match="it is a file, not a folder"):
        check_writable(blocker, folder=True)
    with pytest.raises(OutputError, match="file.txt is a file, not a folder"):
        check_writable(blocker / "out", folder=True)
    assert blocker.read_text() == "x" and _names(tmp_path) == ["file.txt"]


def test_a_folder_where_a_file_goes(tmp_path):
    with pytest.raises(OutputError, match="it is a directory"):
        check_writable(tmp_path)


def test_no_permission_in_the_nearest_existing_folder(tmp_path, monkeypatch):
    asked = []

    def refuse(path, mode):
        asked.append((Path(path), mode))
        return False

    monkeypatch.setattr(os, "access", refuse)
    with pytest.raises(OutputError, match=f"permission denied: {tmp_path} cannot be written"):
        check_writable(tmp_path / "a" / "b" / "p.json")
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]  # the folder the missing ones would be created in


def test_a_folder_that_refuses_new_files_although_access_says_yes(tmp_path):
    # as root, os.access says yes for /proc; only creating an entry shows that nothing can be written there
    if os.access("/proc", os.W_OK | os.X_OK):
        with pytest.raises(OutputError, match="/proc refuses new files"):
            check_writable("/proc/sinkfix-profile.json")
    else:
        with pytest.raises(OutputError, match="permission denied: /proc cannot be written"):
            check_writable("/proc/sinkfix-profile.json")


def test_the_probe_leaves_nothing_behind(tmp_path):
    (tmp_path / "old.json").write_text("x")
    check_writable(tmp_path / "old.json")
    check_writable(tmp_path / "new", folder=True)
    assert _names(tmp_path) == ["old.json"]


# -- every command that writes after long work checks first --------------------------------------
def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded although the output cannot be written")


COMMANDS = {  # id: (arguments, what the error says)
    "calibrate": (["calibrate", "--out", "{blocked}/p.json"], "{blocked} is a file, not a folder"),
    "inspect": (["inspect", "--out", "{blocked}/report"], "{blocked} is a file, not a folder"),
    "bench": (["bench", "--out", "{blocked}/results"], "{blocked} is a file, not a folder"),
    "stream": (["stream", "--out", "{blocked}"], "it is a file, not a folder"),
    "kvquant": (["kvquant", "--out", "{folder}"], "it is a directory"),
    "eval": (["eval", "--out", "{blocked}/e.json"], "{blocked} is a file, not a folder"),
    "bb": (["bb", "--out", "{blocked}/bb"], "{blocked} is a file, not a folder"),
    "monitor-run": (["monitor", "run", "--requests", "{requests}", "--out", "{blocked}/log.jsonl"],
                    "{blocked} is a file, not a folder"),
    "monitor-ranges": (["monitor", "ranges", "--profile", str(PROFILE), "--out", "{blocked}/p.json"],
                       "{blocked} is a file, not a folder"),
}


@pytest.mark.parametrize("argv, message", list(COMMANDS.values()), ids=list(COMMANDS))
def test_commands_refuse_an_unwritable_output_before_loading_anything(argv, message, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "Hello"}\n')
    monkeypatch.setattr(sinkfix, "load_model", _no_model)
    monkeypatch.setattr(sinkfix.models, "load_model", _no_model)
    fill = {"blocked": str(blocked), "folder": str(folder), "requests": str(requests)}
    rc = cli.main([arg.format(**fill) for arg in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "cannot write" in err and message.format(**fill) in err
    assert blocked.read_text() == "keep me" and _names(folder) == []
