"""The one text loader of bench, inspect and calibrate: files, dataset specs, built-in domains."""

from __future__ import annotations

import argparse
import re
import os
import sys
import types

import pytest

from sinkfix.errors import SinkfixError
from sinkfix.texts import (
    DATASET_DEFAULT_SPLIT,
    DOMAIN_ALIASES,
    DOMAINS,
    QUICK_DOMAINS,
    DatasetSpec,
    TextError,
    TextSource,
    domain_source,
    domain_text,
    load_dataset_text,
    load_texts,
    parse_dataset_spec,
    read_text_file,
    unique_name,
)


# -- files ----------------------------------------------------------------------------------------
def test_files_are_named_by_stem_and_repeats_get_a_suffix(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a" / "notes.txt", tmp_path / "b" / "notes.md", tmp_path / "a" / "code.py",
             tmp_path / "b" / "notes.txt"]
    for i, path in enumerate(paths):
        path.write_text(f"text number {i}\n")
    texts = load_texts(paths)
    assert list(texts) == ["notes", "notes-2", "code", "notes-3"]
    assert texts["notes-2"] == TextSource("text number 1\n", str(paths[1]))
    assert texts["notes-3"].source == str(paths[3])


def test_unique_name_skips_taken_suffixes():
    assert unique_name("a", []) == "a"
    assert unique_name("a", ["a"]) == "a-2"
    assert unique_name("a", ["a", "a-2", "a-3"]) == "a-4"
    assert unique_name("a-2", ["a", "a-2"]) == "a-2-2"


def test_a_single_path_string_is_one_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only file")
    assert list(load_texts(str(path))) == ["one"]


@pytest.mark.parametrize("kind, fragment", [("missing", "not found"), ("empty", "empty"), ("binary", "UTF-8"),
                                            ("directory", "directory")])
def test_bad_files_are_text_errors(tmp_path, kind, fragment):
    path = tmp_path / "bad.txt"
    if kind == "empty":
        path.write_text(" \n")
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81" * 4)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(TextError, match=fragment):
        load_texts([path])
    assert issubclass(TextError, SinkfixError)


def test_files_and_dataset_together_are_an_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("text")
    with pytest.raises(TextError, match="not both"):
        load_texts([path], "wikitext")


# -- built-in defaults ----------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["eval", "calib"])
def test_builtin_domains_by_default(split):
    texts = load_texts(split=split)
    assert tuple(texts) == DOMAINS == ("pydoc", "python", "readme", "legal", "cpp")
    for domain, text in texts.items():
        assert text.text == domain_text(domain, split)
        assert text.source == domain_source(domain, split) and text.source.startswith(f"built-in {domain} (")


def test_default_split_is_eval_and_splits_differ():
    default, calib = load_texts(), load_texts(split="calib")
    assert default["python"].text == domain_text("python", "eval")
    assert default["python"].text != calib["python"].text
    assert "pydoc_data" in default["pydoc"].source and "calib split" in calib["pydoc"].source


@pytest.mark.parametrize("domain", DOMAINS)
def test_calibration_and_evaluation_sources_are_disjoint(domain):
    """No paragraph of a domain's evaluation text occurs in its calibration text (paragraphs of more
    than 200 characters: a short line such as a license's "All rights reserved." may repeat)."""
    calib, held_out = domain_text(domain, "calib"), domain_text(domain, "eval")
    assert len(calib) > 40_000 and len(held_out) > 40_000  # ten windows of 512 tokens and more
    paragraphs = [p for p in re.split(r"\n\s*\n", held_out) if len(p.strip()) > 200]
    assert paragraphs and not [p for p in paragraphs if p.strip() in calib]


def test_provenance_names_its_sources():
    assert "torch" in domain_source("legal", "calib") and "numpy" in domain_source("legal", "eval")
    assert "c10" in domain_source("cpp", "calib") and "numpy" in domain_source("cpp", "eval")
    assert "transformers" in domain_source("readme", "calib") and "rich" in domain_source("readme", "eval")
    assert "argparse" in domain_source("python", "eval")


def test_old_domain_names_still_work_and_warn():
    assert DOMAIN_ALIASES == {"prose": "pydoc", "code": "python"}
    with pytest.warns(FutureWarning, match="now called 'pydoc'"):
        assert domain_text("prose", "calib") == domain_text("pydoc", "calib")
    with pytest.warns(FutureWarning, match="now called 'python'"):
        assert list(load_texts(domains=["code"])) == ["python"]


def test_the_command_line_shows_the_old_domain_names_warning(tmp_path):
    """Python's default filters hide a DeprecationWarning raised outside __main__: a user of
    `--domain prose` would never see it. Run in a fresh interpreter, with those default filters."""
    import json
    import os
    import subprocess
    from pathlib import Path

    script = ("import sys, torch\n"
              "torch.set_num_threads(1)\n"
              "from tests.conftest import CharTokenizer, tiny_model\n"
              "import sinkfix\n"
              "model = tiny_model('llama', seed=3)\n"
              "sinkfix.load_model = lambda name, **kw: (model, CharTokenizer())\n"
              "from sinkfix.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, "inspect", "--domain", "prose", "--domain", "code",
                           "--seq-len", "32", "--max-tokens", "64", "--no-figures", "--threads", "1", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # one line each, without Python's class name and source line (which named sinkfix/texts.py)
    assert "sinkfix inspect: warning: built-in domain 'prose' is now called 'pydoc'\n" in done.stderr
    assert "sinkfix inspect: warning: built-in domain 'code' is now called 'python'\n" in done.stderr
    assert "FutureWarning" not in done.stderr and "resolve_domain" not in done.stderr
    assert set(json.loads((out / "report.json").read_text())["domains"]) == {"pydoc", "python"}


def test_choosing_built_in_domains():
    assert list(load_texts(domains=QUICK_DOMAINS)) == ["pydoc", "python"]
    with pytest.raises(TextError, match="unknown domain 'wiki'; built-in domains: pydoc, python"):
        load_texts(domains=["wiki"])
    with pytest.raises(TextError, match="named twice"):
        load_texts(domains=["pydoc", "pydoc"])
    with pytest.raises(TextError, match="not more than one"):
        load_texts(["x.txt"], domains=["pydoc"])


def test_a_domain_whose_sources_are_missing_is_a_clear_error(monkeypatch):
    from sinkfix import texts

    monkeypatch.setattr(texts, "_README_PACKAGES", {"calib": ["no-such-package"], "eval": []})
    texts._built.cache_clear()
    try:
        with pytest.raises(TextError, match="built-in domain 'readme' .calib split. found no text"):
            domain_text("readme", "calib")
    finally:
        texts._built.cache_clear()


def test_unknown_split_is_an_error():
    with pytest.raises(TextError, match="calib' or 'eval"):
        load_texts(split="train")


# -- dataset specs --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("wikitext", DatasetSpec("wikitext", None, "test")),
    ("wikitext:wikitext-2-raw-v1", DatasetSpec("wikitext", "wikitext-2-raw-v1", "test")),
    ("wikitext@train", DatasetSpec("wikitext", None, "train")),
    ("wikitext:wikitext-2-raw-v1@validation", DatasetSpec("wikitext", "wikitext-2-raw-v1", "validation")),
    ("Salesforce/wikitext:wikitext-103-raw-v1@train[:1000]",
     DatasetSpec("Salesforce/wikitext", "wikitext-103-raw-v1", "train[:1000]")),
    ("  wikitext  ", DatasetSpec("wikitext")),
])
def test_dataset_spec_parsing(spec, expected):
    assert parse_dataset_spec(spec) == expected


def test_dataset_spec_default_split_and_round_trip():
    assert DATASET_DEFAULT_SPLIT == "test"
    assert str(parse_dataset_spec("wikitext:wikitext-2-raw-v1")) == "wikitext:wikitext-2-raw-v1@test"
    assert str(parse_dataset_spec("wikitext@train")) == "wikitext@train"


@pytest.mark.parametrize("spec", ["", " ", ":cfg", "@test", "name:", "name@", "name:@test", "na me", "name:c fg"])
def test_bad_dataset_specs(spec):
    with pytest.raises(TextError, match=r"NAME\[:CONFIG\]\[@SPLIT\]"):
        parse_dataset_spec(spec)


def test_dataset_without_the_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    with pytest.raises(TextError, match="needs the 'datasets' package") as info:
        load_texts(dataset="wikitext:wikitext-2-raw-v1")
    assert "wikitext:wikitext-2-raw-v1@test" in str(info.value) and "--text" in str(info.value)


def test_bad_spec_fails_before_importing_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TextError, match="not NAME"):
        load_texts(dataset="name:")


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)
        self.features = {name: types.SimpleNamespace(dtype="string" if isinstance(values[0], str) else "int64")
                         for name, values in columns.items()}

    def __iter__(self):
        for i in range(len(next(iter(self.columns.values())))):
            yield {name: values[i] for name, values in self.columns.items()}


def _fake_datasets(monkeypatch, data: _FakeDataset) -> list:
    calls: list = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "missing":
            raise FileNotFoundError("Dataset 'missing' doesn't exist on the Hub\nmore detail")
        return data

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_dataset_text_through_a_stand_in_datasets_module(monkeypatch):
    rows = ["first row", "", "second row", "third row"]
    calls = _fake_datasets(monkeypatch, _FakeDataset({"id": [1, 2, 3, 4], "body": rows}))
    texts = load_texts(dataset="owner/set:cfg@validation")
    assert calls == [("owner/set", "cfg", "validation")]
    assert list(texts) == ["owner/set"]
    assert texts["owner/set"].text == "first row\nsecond row\nthird row"  # empty rows skipped
    assert texts["owner/set"].source == "dataset owner/set:cfg@validation, column 'body'"


def test_dataset_text_is_capped(monkeypatch):
    _fake_datasets(monkeypatch, _FakeDataset({"text": ["x" * 10] * 100}))
    capped = load_dataset_text("anything", max_chars=25)
    assert capped.text == "x" * 10 + "\n" + "x" * 10 + "\n" + "xxx"
    assert capped.source.endswith("first 25 characters")
    assert "first" not in load_dataset_text("anything", max_chars=10_000).source


def test_dataset_errors(monkeypatch):
    _fake_datasets(monkeypatch, _FakeDataset({"id": [1, 2]}))
    with pytest.raises(TextError, match="no text column"):
        load_texts(dataset="numbers")
    with pytest.raises(TextError, match="could not load dataset missing@test: Dataset 'missing' doesn't exist"):
        load_texts(dataset="missing")
    _fake_datasets(monkeypatch, _FakeDataset({"text": ["", " "]}))
    with pytest.raises(TextError, match="empty"):
        load_texts(dataset="blank")


def test_real_import_fails_cleanly_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if it were not installed
    with pytest.raises(TextError, match="pip install datasets"):
        load_texts(dataset="wikitext")


# -- the commands share it ------------------------------------------------------------------------
def test_inspect_and_calibrate_options_use_the_loader(tmp_path):
    from sinkfix.commands.inspect import add_common_arguments, texts_from_args

    parser = argparse.ArgumentParser()
    add_common_arguments(parser, default_max_tokens=None)
    path = tmp_path / "x.txt"
    path.write_text("some text")
    args = parser.parse_args(["--text", str(path), "--text", str(path)])
    assert list(texts_from_args(args, "eval")) == ["x", "x-2"]
    assert list(texts_from_args(parser.parse_args([]), "calib")) == list(DOMAINS)
    chosen = parser.parse_args(["--domain", "legal", "--domain", "cpp"])
    assert list(texts_from_args(chosen, "eval")) == ["legal", "cpp"]
    for both in (["--text", str(path), "--dataset", "wikitext"], ["--text", str(path), "--domain", "cpp"]):
        with pytest.raises(SystemExit):  # one source or another, as in bench
            parser.parse_args(both)


def test_read_text_file_still_works(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo", encoding="utf-8")
    assert read_text_file(path) == "héllo"


def test_an_unreachable_hub_switches_datasets_offline_before_it_is_imported(monkeypatch):
    """Without the switches an offline dataset lookup retried for about 23 s, a line per retry."""
    import sinkfix.models
    from sinkfix import texts

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(sinkfix.models, "hub_reachable", lambda timeout=3.0: False)
    assert texts._offline_if_unreachable()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setitem(sys.modules, "datasets", object())  # imported already: too late to switch, left alone
    assert not texts._offline_if_unreachable() and "HF_DATASETS_OFFLINE" not in os.environ


@pytest.mark.parametrize("data, line", [
    (b"prose.txt\x00\x00\x00\x00ustar", 1),  # a tar archive's header: valid UTF-8
    ("echo hi\n".encode("utf-16-le"), 1),  # UTF-16 without a byte-order mark: every other byte NUL
    (b"line one\nline two\x00\n", 2),
])
def test_a_file_holding_a_nul_byte_is_refused_as_binary(tmp_path, data, line):
    """NUL is valid UTF-8, so a tar archive or BOM-less UTF-16 decoded and was calibrated on (its
    padding as validation windows)."""
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    with pytest.raises(TextError, match=rf"holds a NUL byte \(line {line}, byte offset {data.index(0)}\): a binary "
                                        "file or UTF-16 text"):
        read_text_file(path)


def test_a_program_is_refused_as_binary_not_as_text_with_a_bad_byte(tmp_path):
    """An ELF file's first byte that is not UTF-8 comes after its header's NUL bytes: it was refused as
    "byte 0x.. on line 1 is not valid UTF-8", and a text file got the advice to convert it with iconv."""
    from sinkfix.errors import MonitorError
    from sinkfix.telemetry.report import read_log
    from sinkfix.telemetry.requests import read_requests

    path = tmp_path / "tool"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00\x01\x00\x00\x00\xe0\xff")
    binary = r"holds a NUL byte \(line 1, byte offset 7\): a binary file or UTF-16 text, not UTF-8 text"
    with pytest.raises(TextError, match=binary) as refused:
        read_text_file(path)
    assert "iconv" not in str(refused.value)
    for read in (read_log, read_requests):
        with pytest.raises(MonitorError, match=binary):
            read(path)


@pytest.mark.parametrize("data, line, offset", [
    (b"ok\nline two \xe9t\xe9\n", 2, 12),            # Latin-1 text
    (b"\xef\xbb\xbfok\nline two \xe9\n", 2, 15),    # after a byte-order mark: counted in the file's bytes
    (b"\xc3", 1, 0),
])
def test_a_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path, data, line, offset):
    """The README promises the line; only the NUL case gave one ("X is not UTF-8 text"). Request files
    and telemetry logs say the same (a log gave Python's own message, an offset within a block)."""
    from sinkfix.errors import MonitorError
    from sinkfix.telemetry.report import read_log
    from sinkfix.telemetry.requests import read_requests

    path = tmp_path / "f.txt"
    path.write_bytes(data)
    where = rf"is not UTF-8 text: byte 0x{data[offset]:02x} on line {line} \(byte offset {offset}\)"
    with pytest.raises(TextError, match=where):
        read_text_file(path)
    for read in (read_log, read_requests):
        with pytest.raises(MonitorError, match=where):
            read(path)


def test_utf16_with_its_byte_order_mark_is_named(tmp_path):
    """Without its mark UTF-16 is refused for its NUL bytes ("binary file or UTF-16 text"); with it, the
    message named byte 0xff as invalid UTF-8."""
    path = tmp_path / "f.txt"
    path.write_bytes("hello\n".encode("utf-16"))
    with pytest.raises(TextError, match="starts with a UTF-16 .* byte-order mark: UTF-16 text, not UTF-8"):
        read_text_file(path)


def test_special_token_markup_in_a_text_is_text():
    """A literal special token in a calibration or evaluation text stays characters: with
    add_special_tokens=False alone, "<|im_start|>" became SmolLM2's BOS id (the sink) mid-window."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from sinkfix.evaluate import token_ids

    vocab = {"<|bos|>": 0, "<unk>": 1, "a": 2, "b": 3, "<": 4, "|": 5, "bos": 6, ">": 7}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", unk_token="<unk>")
    assert tok("a <|bos|> b", add_special_tokens=False).input_ids == [2, 0, 3]  # what the tokenizer does alone
    assert token_ids(tok, "a <|bos|> b").tolist() == [2, 4, 5, 6, 5, 7, 3]
