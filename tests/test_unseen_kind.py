"""The changelog text of benchmarks/unseen_kind.py: which packages, in what order, how much of each,
and a clear stop where there are none (it is a Debian-only measurement)."""

import gzip
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "unseen_kind", Path(__file__).resolve().parents[1] / "benchmarks" / "unseen_kind.py")
unseen_kind = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(unseen_kind)


def _package(root: Path, name: str, file: str, text: str) -> None:
    (root / name).mkdir()
    with gzip.open(root / name / file, "wt", encoding="utf-8") as handle:
        handle.write(text)


def test_changelog_text_takes_each_package_head_in_name_order_until_enough(tmp_path):
    _package(tmp_path, "zlib", "changelog.Debian.gz", "z" * 50)
    _package(tmp_path, "apt", "changelog.gz", "a" * 50)  # no Debian changelog: the upstream one
    _package(tmp_path, "bash", "changelog.Debian.gz", "b" * 50)
    (tmp_path / "bash" / "changelog.gz").write_bytes(b"not read: the Debian changelog comes first")
    (tmp_path / "docs-only").mkdir()  # no changelog at all: skipped
    text, packages = unseen_kind.changelog_text(tmp_path, chars_per_package=10, total_chars=15)
    assert packages == ["apt", "bash"]  # name order, and it stopped once 15 characters were there
    assert text == "a" * 10 + "\n\n" + "b" * 10 + "\n"
    _, every = unseen_kind.changelog_text(tmp_path, chars_per_package=10, total_chars=10_000)
    assert every == ["apt", "bash", "zlib"]


def test_changelog_text_without_changelogs_says_what_it_needs(tmp_path):
    for root in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit, match="needs a Debian-based system"):
            unseen_kind.changelog_text(root, chars_per_package=10, total_chars=100)
