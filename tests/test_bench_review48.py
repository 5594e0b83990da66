"""Review 48: an empty --text (an unset shell variable) is named as such by every command that reads texts."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", [["bench"], ["inspect"], ["calibrate", "--out", "p.json"]])
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_text_option_says_so_before_the_model_loads(command, empty, capsys, tmp_path, monkeypatch):
    # "" was read as the path "." and refused as "text path is a directory, not a file: ."
    from sinkfix.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*command, "--text", empty, "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "--text is empty" in err and "directory" not in err and "nonexistent" not in err, err
    assert list(tmp_path.iterdir()) == []
