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


def _write(path: Path, text: str) -> None:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_shell_text_reads_the_shell_scripts_among_the_programs(tmp_path, monkeypatch):
    bin_dir, sbin_dir = tmp_path / "bin", tmp_path / "sbin"
    bin_dir.mkdir(), sbin_dir.mkdir()
    _write(bin_dir / "b-sh", "#!/bin/sh\necho b\n")
    _write(bin_dir / "a-bash", "#! /usr/bin/env bash\necho a\n")
    _write(bin_dir / "c-perl", "#!/usr/bin/perl\nprint 1;\n")            # another language: left out
    _write(bin_dir / "d-shfoo", "#!/bin/shfoo\nnot a shell\n")          # only sh, bash and dash count
    (bin_dir / "e-elf").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))  # a program, not a script
    _write(bin_dir / "f-dash", "#!/bin/dash -e\n" + "x" * 100)
    (bin_dir / "g-link").symlink_to(bin_dir / "b-sh")                  # read once, not twice
    _write(sbin_dir / "z-sh", "#!/bin/sh\necho z\n")
    monkeypatch.setattr(unseen_kind, "SCRIPT_ROOTS", (bin_dir, sbin_dir))
    text, used = unseen_kind.shell_text(chars_per_file=30, total_chars=10_000)
    assert [Path(p).name for p in used] == ["a-bash", "b-sh", "f-dash", "z-sh"]
    assert text.split("\n\n")[2] == ("#!/bin/dash -e\n" + "x" * 100)[:30]  # the head of each file
    _, first_two = unseen_kind.shell_text(chars_per_file=30, total_chars=40)
    assert [Path(p).name for p in first_two] == ["a-bash", "b-sh"]
    monkeypatch.setattr(unseen_kind, "SCRIPT_ROOTS", (tmp_path / "missing",))
    with pytest.raises(SystemExit, match="no shell scripts"):
        unseen_kind.shell_text(chars_per_file=30, total_chars=100)


def test_man_text_starts_each_page_at_its_title_and_skips_redirections(tmp_path, monkeypatch):
    man1, man8 = tmp_path / "man1", tmp_path / "man8"
    man1.mkdir(), man8.mkdir()
    preamble = '.\\" Automatically generated\n.de Sp\n.sp\n..\n'  # the same block opens many generated pages
    _write(man1 / "a.1.gz", preamble + ".TH A 1\n.SH NAME\na \\- does a\n")
    _write(man1 / "b.1.gz", ".so man1/a.1\n")                          # a redirection, not a page
    _write(man1 / "c.1", ".SH NAME\nc \\- no title line\n")           # no .TH: kept from its start
    (man1 / "d.1.gz").symlink_to(man1 / "a.1.gz")
    _write(man8 / "e.8.gz", ".TH E 8\n.SH NAME\ne \\- does e\n")
    monkeypatch.setattr(unseen_kind, "MAN_ROOTS", (man1, man8))
    text, used = unseen_kind.man_text(chars_per_file=1000, total_chars=10_000)
    assert [Path(p).name for p in used] == ["a.1.gz", "c.1", "e.8.gz"]
    assert text.startswith(".TH A 1\n") and "Automatically generated" not in text
    assert ".SH NAME\nc \\- no title line" in text and ".TH E 8" in text
    monkeypatch.setattr(unseen_kind, "MAN_ROOTS", (tmp_path / "missing",))
    with pytest.raises(SystemExit, match="none installed"):
        unseen_kind.man_text(chars_per_file=30, total_chars=100)
