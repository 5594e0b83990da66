"""A content-mode profile whose content part corrects no head (what `sinkfix calibrate --sinks
hidden|combined` writes when the identity or the positional rule wins) patches the positional path
alone: `inspect` and `stream` refused it as content-dependent (found by a review), `monitor run` and
`bench` served it."""

from __future__ import annotations

import json

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.policy import ContentSinks
from sinkfix.profile import ModelIdentity, Profile

from .conftest import text_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROSE = "the cat sat on the mat and the dog sat on the log. " * 40


def _content_profile(path, hidden_sink_scale=1.0, heads=None):
    model = tiny_model("llama", seed=3)
    beta = torch.linspace(0.5, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    content = ContentSinks(threshold=0.1, hidden_sink_scale=hidden_sink_scale, heads=heads)
    return Profile(ModelIdentity.of(model), beta, content_sinks=content).save(path)


@pytest.mark.parametrize("content", [{"hidden_sink_scale": 1.0}, {"hidden_sink_scale": 0.5, "heads": False}])
def test_inspect_measures_a_profile_whose_content_part_corrects_no_head(loaded_tiny, tmp_path, capsys, content):
    path = _content_profile(tmp_path / "c.json", **content)
    files = text_args(tmp_path, {"prose": PROSE})
    rc = cli.main(["inspect", *files, "--no-figures", "--seq-len", "64", "--profile", str(path),
                   "--out", str(tmp_path / "i")])
    assert rc == 0, capsys.readouterr().err
    # the same numbers as the positional profile alone
    positional = Profile.load(path)
    data = json.loads(path.read_text())
    data["version"], data["policy"] = 3, {k: v for k, v in data["policy"].items() if k not in ("mode", "content_sinks")}
    (tmp_path / "p.json").write_text(json.dumps(data))
    rc = cli.main(["inspect", *files, "--no-figures", "--seq-len", "64", "--profile", str(tmp_path / "p.json"),
                   "--out", str(tmp_path / "j")])
    assert rc == 0
    with_content = json.loads((tmp_path / "i" / "report.json").read_text())
    alone = json.loads((tmp_path / "j" / "report.json").read_text())
    assert with_content["domains"] == alone["domains"]
    assert positional.content_sinks.is_identity


def test_stream_accepts_it_and_still_refuses_a_correcting_one(load_reached, tmp_path, capsys):
    idle = _content_profile(tmp_path / "idle.json")
    rc = cli.main(["stream", "--profile", str(idle), "--out", str(tmp_path / "s"), "--no-figures"])
    err = capsys.readouterr().err
    assert rc == 2 and "reached the model load" in err, err
    correcting = _content_profile(tmp_path / "on.json", hidden_sink_scale=0.5)
    rc = cli.main(["stream", "--profile", str(correcting), "--out", str(tmp_path / "s"), "--no-figures"])
    err = capsys.readouterr().err
    assert rc == 2 and "content-mode profile" in err and "reached" not in err, err


def test_patched_it_is_the_positional_profile_bit_for_bit():
    model = tiny_model("llama", seed=3)
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    beta = torch.linspace(0.5, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    with torch.no_grad():
        with sinkfix.patch(model, sinkfix.Policy(sink_scale=beta,
                                                 content_sinks=ContentSinks(threshold=0.1, hidden_sink_scale=1.0))):
            idle = model(input_ids=ids).logits
        with sinkfix.patch(model, sinkfix.Policy(sink_scale=beta)):
            positional = model(input_ids=ids).logits
    assert torch.equal(idle, positional)
