"""Atomic output files: complete or untouched, never half-written, and one clear error on failure."""

from __future__ import annotations

import os
import stat

import pytest

from sinkfix.errors import SinkfixError
from sinkfix.files import LineLog, OutputError, atomic_write, atomic_write_text, check_writable


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_text_and_bytes_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "line 1\nline 2\n") == target
    assert target.read_bytes() == b"line 1\nline 2\n"  # newline="": no translation on any platform
    with atomic_write(tmp_path / "a" / "blob.bin", "wb") as fh:
        fh.write(b"\x00\xff")
    assert (tmp_path / "a" / "blob.bin").read_bytes() == b"\x00\xff"
    assert _names(tmp_path / "a") == ["b", "blob.bin"]


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and _names(tmp_path) == ["out.txt"]


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = atomic_write_text(tmp_path / "fresh.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    atomic_write_text(kept, "y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_folder_under_a_regular_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    target = blocker / "sub" / "out.json"
    with pytest.raises(OutputError, match="is a file, not a folder") as info:
        atomic_write_text(target, "{}")
    assert str(target) in str(info.value) and info.value.path == target
    assert isinstance(info.value, SinkfixError) and isinstance(info.value, OSError)
    assert blocker.read_text() == "x"


def test_existing_directory_as_target(tmp_path):
    with pytest.raises(OutputError, match="it is a directory"):
        atomic_write_text(tmp_path, "x")
    assert _names(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("write", [lambda path: atomic_write_text(path, "x"), check_writable],
                         ids=["atomic_write_text", "check_writable"])
def test_read_only_folder(tmp_path, write):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="(?i)permission denied"):
            write(folder / "out.txt")
    finally:
        folder.chmod(0o700)


def test_refused_temporary_is_an_output_error_for_every_user(tmp_path, monkeypatch):
    """The read-only case above, where the test cannot make a folder unwritable (root writes
    anywhere): the operating system's refusal is simulated where the temporary is created."""
    import errno
    import tempfile

    target = tmp_path / "out.txt"
    target.write_text("old contents")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="Permission denied") as info:
        atomic_write_text(target, "new contents")
    assert str(target) in str(info.value) and info.value.path == target
    assert isinstance(info.value.__cause__, PermissionError)
    assert target.read_text() == "old contents" and _names(tmp_path) == ["out.txt"]


def test_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old contents")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target) as fh:
            fh.write("half of the new")
            1 / 0
    assert target.read_text() == "old contents"
    assert _names(tmp_path) == ["results.json"]


def test_disk_error_during_write_is_an_output_error(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old contents")
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device") as info:
        with atomic_write(target) as fh:
            fh.write("partial")
            raise OSError(28, "No space left on device")
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_text() == "old contents" and _names(tmp_path) == ["results.json"]


def test_failing_replace_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "p.json"
    atomic_write_text(target, "old")

    def failing_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="Input/output error"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and _names(tmp_path) == ["p.json"]


def test_unknown_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_profile_writer_still_reports_profile_errors(tmp_path):
    from sinkfix.errors import ProfileError
    from sinkfix.profile import atomic_write_text as profile_write

    with pytest.raises(ProfileError, match="directory") as info:
        profile_write(tmp_path, "x")
    assert isinstance(info.value.__cause__, OutputError)


def test_bench_output_into_a_file_is_one_output_error(tmp_path):
    from sinkfix.bench.report import write_outputs

    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="not a folder"):
        write_outputs(blocker, {"schema": "x", "variants": []})


def test_a_named_pipe_is_refused_not_renamed_over(tmp_path):
    """An atomic write renames a new file over its path: a FIFO there was replaced by a regular file
    (its reader left waiting for ever), and as root `--out /dev/null` replaced the device node."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for write in (check_writable, lambda p: atomic_write_text(p, "{}")):
        with pytest.raises(OutputError, match=r"it is a named pipe, not a regular file"):
            write(pipe)
        assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary file left


def test_a_log_appended_in_place_may_be_a_named_pipe(tmp_path):
    """A LineLog appends in place: `sinkfix monitor run --out FIFO` served a reader until the check
    for atomic writes refused every FIFO (review 47)."""
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert check_writable(pipe, append=True) == pipe
    received = []
    reader = threading.Thread(target=lambda: received.append(open(pipe).read()))
    reader.start()
    log = LineLog(pipe)
    log.append('{"a": 1}')
    log.close()
    reader.join(timeout=10)
    assert received == ['{"a": 1}\n']
