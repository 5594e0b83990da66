"""Clear errors where a model folder, a device name or a value to save is wrong, and files written
through a symbolic link: load_model, pick_device, Profile.save, strict JSON output, `sinkfix bb`."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.errors import ModelLoadError, ProfileError, UsageError
from sinkfix.files import atomic_write_text, strict_json
from sinkfix.models import load_model, pick_device
from sinkfix.profile import ModelIdentity, Profile

from .conftest import tiny_model


def _save_tiny_folder(folder):
    """A complete local model folder: a 2-layer Llama and a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- load_model: what is wrong with a local folder, named --------------------------------------------
def test_a_complete_local_folder_loads(tmp_path):
    model, tokenizer = load_model(str(_save_tiny_folder(tmp_path / "tiny")))
    assert model.config.num_hidden_layers == 2 and tokenizer("w1 w2")["input_ids"]


@pytest.mark.parametrize("files, message", [
    ({}, "has no config.json: not a transformers model folder"),
    ({"tokenizer.json": "{}"}, "has no config.json"),
    ({"config.json": json.dumps({"model_type": "llama"})}, "has no tokenizer files"),
])
def test_an_incomplete_folder_says_what_is_missing(tmp_path, files, message):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder))


def test_a_folder_transformers_cannot_read_is_a_model_load_error(tmp_path):
    folder = _save_tiny_folder(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
    with pytest.raises(ModelLoadError, match=f"could not load .* from {folder}: ValueError"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)  # corrupt weights
    with pytest.raises(ModelLoadError, match=f"could not load .* from {folder}"):
        load_model(str(folder))


@pytest.mark.parametrize("name", ["/no/such/folder", "./no-such-folder", "../no-such-folder", "a/b/c"])
def test_a_missing_path_is_reported_as_a_missing_folder_not_a_hub_id(name):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(name)


# -- device names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, message", [("banana", "unknown device"), ("meta", "not supported"),
                                           ("mps", "not supported")])
def test_pick_device_refuses_what_sinkfix_cannot_run_on(name, message):
    with pytest.raises(UsageError, match=message):
        pick_device(name)
    assert pick_device("cpu") == torch.device("cpu")


def test_eval_refuses_an_unknown_device_before_the_model_loads(monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(sinkfix, "load_model", no_load)
    monkeypatch.setattr("sinkfix.models.load_model", no_load)
    assert cli.main(["eval", "--tasks", "builtin", "--device", "banana"]) == 2
    assert "unknown device 'banana'" in capsys.readouterr().err


# -- Profile.save: values JSON cannot hold; links -----------------------------------------------------------
def _profile(calibration: dict) -> Profile:
    identity = ModelIdentity("LlamaForCausalLM", 2, (4, 4), 2, 64, 97, "ab" * 16)
    return Profile(identity, torch.full((2, 4), 0.9, dtype=torch.float64), calibration=calibration)


@pytest.mark.parametrize("calibration, where", [
    ({"reg": math.nan}, "calibration.reg is nan"),
    ({"history": [0.1, math.inf]}, r"calibration.history\[1\] is inf"),
    ({"loss": torch.tensor(1.0)}, "calibration.loss is a Tensor"),
])
def test_saving_a_value_json_cannot_hold_is_a_profile_error_and_writes_nothing(tmp_path, calibration, where):
    target = tmp_path / "p.json"
    with pytest.raises(ProfileError, match=where):
        _profile(calibration).save(target)
    assert list(tmp_path.iterdir()) == []


def test_saving_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    target, link = tmp_path / "profile-v2.json", tmp_path / "current.json"
    target.write_text("old")
    link.symlink_to(target.name)
    _profile({"note": "new"}).save(link)
    assert link.is_symlink() and Profile.load(target).calibration == {"note": "new"}
    atomic_write_text(link, "text")  # every atomic write of the project goes the same way
    assert link.is_symlink() and target.read_text() == "text"


# -- strict JSON output -----------------------------------------------------------------------------------
def test_strict_json_writes_non_finite_numbers_as_null():
    text = strict_json({"recovered": math.nan, "rows": [1.5, -math.inf, {"kl": math.inf}], "n": 3})
    assert json.loads(text) == {"recovered": None, "rows": [1.5, None, {"kl": None}], "n": 3}
    assert "NaN" not in text and "Infinity" not in text


# -- sinkfix bb -----------------------------------------------------------------------------------------------
def test_bb_refuses_an_empty_variant_list(capsys):
    assert cli.main(["bb", "--variants", " , "]) == 2
    assert "--variants names no variant" in capsys.readouterr().err
    from sinkfix.bb.report import run_experiment

    with pytest.raises(UsageError, match="no BB variant to train"):
        run_experiment(variants=())
