"""Writing output files atomically: readers see the old file or the complete new one, never half of it.

Every file sinkfix writes whole (profiles, ``sinkfix inspect`` reports, ``sinkfix bench`` results and
plots) goes through :func:`atomic_write`: the data lands in a temporary file in the target's own folder (same
file system, so the final rename is atomic), is flushed to disk, and only then replaces the target
with ``os.replace``. An exception anywhere on the way removes the temporary file and leaves an
existing target untouched. Problems of the file system (a folder that cannot be created, a target that
is a directory, a full disk, no permission) raise :class:`OutputError`, whose message names the path.

Logs that grow while a program runs (the telemetry of ``sinkfix.monitor``) go through :class:`LineLog`:
appended one complete line at a time, so a reader (or a crash) never sees half a line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from sinkfix.errors import OutputError, UsageError

try:
    import fcntl
except ImportError:  # Windows: LineLog appends are not serialised between processes there
    fcntl = None

__all__ = ["OutputError", "LineLog", "atomic_write", "atomic_write_text", "check_writable", "json_error", "json_lines",
           "same_file", "save_figure", "strict_json", "check_out_is_no_input", "note_interrupt",
           "nul_problem", "pending_interrupt", "utf8_problem", "UTF16_BOMS"]

#: The interrupt (KeyboardInterrupt, or the command line's SIGTERM exception) whose signal arrived
#: while a command ran, set by the command line's signal handlers. Python drops an exception raised
#: inside a destructor ("Exception ignored in: ... Group.__del__"): one Ctrl-C of 17 during `sinkfix
#: bench` was lost that way, the run went on and replaced the results in its --out folder. A write
#: checks it, so a lost interrupt still stops every file from being replaced.
_pending_interrupt: type[BaseException] | None = None


def note_interrupt(kind: type[BaseException] | None) -> None:
    """Record (or, with None, forget) an interrupt that every later :func:`atomic_write` raises."""
    global _pending_interrupt
    _pending_interrupt = kind


def pending_interrupt() -> type[BaseException] | None:
    """The interrupt recorded by :func:`note_interrupt`, or None."""
    return _pending_interrupt


def _output_error(target: Path, reason: str) -> OutputError:
    # One positional argument only: OSError reads two as (errno, strerror) and would then format
    # its own message instead of this one.
    error = OutputError(f"cannot write {target}: {reason}")
    error.path = target
    return error


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _nearest_existing(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included), None when none exists."""
    return next((candidate for candidate in (folder, *folder.parents) if candidate.exists()), None)


def _blocking_file(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    existing = _nearest_existing(folder)
    return None if existing is None or existing.is_dir() else existing


def _open_temporary(target: Path) -> tuple[int, str]:
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        blocker = _blocking_file(folder)
        # mkdir under a regular file reports "File exists" or "Not a directory": say which file is in the way
        reason = f"{blocker} is a file, not a folder" if blocker is not None else _reason(exc)
        raise _output_error(target, reason) from exc


def _final_mode(target: Path) -> int:
    """Permissions for the finished file: those of the file it replaces, else 0o666 less the umask.

    mkstemp creates its file with mode 0o600 so that nobody else can open it while it is written; left
    as it is, every profile and result file would end up readable by its owner only.
    """
    with contextlib.suppress(OSError):
        return stat.S_IMODE(target.stat().st_mode)
    mask = os.umask(0o022)  # reading the umask means setting it; restored on the next line
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open ``path`` for writing (``mode`` "w", UTF-8 text, or "wb") so that it appears only when complete.

    Yields the open file; the target is replaced when the ``with`` block ends without an exception.
    An ``OSError`` raised inside the block (a full disk during ``write``) becomes an
    :class:`OutputError` too, with the original as its ``__cause__``; any other exception passes
    through unchanged. Either way the temporary file is gone and the old target is untouched.
    Text is written as given (``newline=""``): "\\n" stays "\\n" on every platform, as the csv
    module requires. Missing parent folders are created. A symbolic link is followed: the file it
    points to is replaced and the link stays (renaming over the link would replace the link itself
    with a file and leave its target stale).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if _pending_interrupt is not None:  # its exception was lost on the way (see note_interrupt)
        raise _pending_interrupt
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.is_dir():
        raise _output_error(target, "it is a directory")
    _refuse_special(target)
    _refuse_read_only(target)
    fd, tmp = _open_temporary(target)
    options: dict[str, Any] = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, mode, **options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _final_mode(target))
        if _pending_interrupt is not None:  # arrived while writing, its exception lost
            raise _pending_interrupt
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise _output_error(target, _reason(exc)) from exc
        raise


def strict_json(value: Any, **dumps_kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with every NaN or infinity written as ``null``: Python's own output
    for them (``NaN``, ``Infinity``) is not JSON, and strict parsers (``jq``, ``JSON.parse``) refuse
    the whole document."""
    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), allow_nan=False, **dumps_kwargs)


def same_file(path: str | os.PathLike[str], other: str | os.PathLike[str]) -> bool:
    """Whether ``path`` and ``other`` name one existing file (device and inode, as
    ``os.path.samefile``: any spelling of the path, a symbolic or hard link); False when either
    cannot be found or read. What an output must not be: one of its command's own inputs."""
    try:
        return os.path.samefile(path, other)
    except (OSError, ValueError):  # missing, unreadable, or a path with a NUL byte
        return False


def check_out_is_no_input(out: str | os.PathLike[str] | None,
                          inputs: Iterable[tuple[str, str | os.PathLike[str]]], written: str = "the report") -> None:
    """Refuse an ``--out`` that names one of the run's own inputs (``inputs``: what it is, its path),
    compared by :func:`same_file` (device and inode: any spelling of the path, a symbolic or hard
    link), with a :class:`UsageError` that says ``written`` would replace it. The output replaced the
    input silently: ``sinkfix eval --profile p.json --out p.json`` lost a profile that takes 9-13
    minutes to calibrate, ``sinkfix kvquant --text t.txt --out t.txt`` the text it had measured."""
    if not out:
        return
    for what, path in inputs:
        if same_file(out, path):  # an --out not there (yet) is no input
            raise UsageError(f"--out {out} is {what}: {written} would replace it; write {written} to another file")


def _not_a_regular_file(target: Path) -> str | None:
    """What ``target`` is when it exists and is neither a regular file nor a folder (a FIFO, a device,
    a socket), else None. An atomic write renames a new file over its path: as root, ``--out
    /dev/null`` replaced the device node itself with a regular file, and a FIFO's reader was left
    waiting for ever."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def _refuse_special(target: Path) -> None:
    kind = _not_a_regular_file(target)
    if kind is not None:
        raise _output_error(target, f"it is {kind}, not a regular file: the file is written whole and renamed over "
                                    "its path, which would replace it; write to a regular file")


def _refuse_read_only(target: Path) -> None:
    """An existing file this process may not write is refused, as the shell's ``>`` and ``cp`` refuse
    it: the atomic write renames a new file over the path, which only needs the folder's permission,
    so a profile the user had made read-only was replaced with exit status 0."""
    if target.is_file() and not os.access(target, os.W_OK):
        raise _output_error(target, "permission denied: the file is read-only; make it writable, or write to "
                                    "another path")


def check_writable(path: str | os.PathLike[str], *, folder: bool = False, append: bool = False) -> Path:
    """Raise now the :class:`OutputError` that writing ``path`` later would raise, so that a command
    fails before its work, not after it (a default calibration takes 9-13 minutes on two cores).

    ``path`` is a file to be written atomically (a FIFO, a device or a socket there is refused: the
    write renames a new file over it), with ``append=True`` a file to be appended to in place
    (:class:`LineLog`: a FIFO or ``/dev/stdout`` serves), or with ``folder=True`` a folder to write
    files into. Checked, leaving nothing behind: the target is not a folder (a file) or not a file (a
    folder), the nearest existing folder above it is a folder, and this process may create entries
    there: ``os.access`` first (it also sees a read-only file system), then an empty probe file is
    created there and removed at once, because ``os.access`` says yes to root on file systems that
    refuse every new file (``/proc``, ``/sys``). Returns the path. What cannot be known in advance (a
    disk that fills up meanwhile) still fails at the write, as before, with the old file untouched.
    """
    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise _output_error(target, "it is a file, not a folder")
    if not folder and target.is_dir():
        raise _output_error(target, "it is a directory")
    if not folder and not append:
        _refuse_special(target)
    if not folder:
        _refuse_read_only(target)
    existing = _nearest_existing(target if folder else target.parent)
    if existing is None:  # a relative path always has ".", an absolute one "/": reached only if they vanished
        return target
    if not existing.is_dir():
        raise _output_error(target, f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _output_error(target, f"permission denied: {existing} cannot be written")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sinkfix-probe-", dir=existing)
    except OSError as exc:
        raise _output_error(target, f"{existing} refuses new files ({_reason(exc)})") from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path. Failures raise :class:`OutputError`."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 110, bbox_inches: str | None = None) -> Path:
    """Render a matplotlib figure to PNG in memory, write it atomically, and close it (pyplot keeps
    every open figure alive otherwise). Returns the path."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=bbox_inches)
    finally:
        plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def ends_in_partial_line(path: str | os.PathLike[str]) -> bool:
    """Whether the non-empty file ``path`` does not end with a line feed (its last line was cut off).
    Read under a shared ``flock``: a :class:`LineLog` writer's line is whole once its lock is released."""
    with open(path, "rb") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        if handle.seek(0, os.SEEK_END) == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


class LineLog:
    """An append-only text log written one complete line at a time (JSON lines).

    The file is opened when the log is created, so a folder that cannot be written fails there, not
    at the first line. Each :meth:`append` is one ``write`` on a descriptor opened with
    ``O_APPEND`` (the kernel places it at the end of the file, after lines other processes appended);
    a write that fails half way (a full disk) is cut back to the previous end of the file, so the
    file only ever holds complete lines. Each append holds an exclusive ``flock`` on the file while it
    writes and cuts back: without it, a cut made after another process's line had landed deleted that
    line or left half of it (two processes, one of them out of space: 9,129 of 20,000 lines lost). The
    lock serialises sinkfix's writers (and any other program that takes it); where ``fcntl`` does not
    exist (Windows) appends are not serialised. Lines reach the operating system at once (no buffer in this
    process): a crash of the process loses nothing that :meth:`append` returned from. A path removed or
    renamed away while the log is open (log rotation) is created again at the next line, its folders
    made again as at creation; ``before_reopen(path)``, when given, runs first and refuses the file
    found at the path by returning why (an :class:`OutputError` with that reason; the telemetry log
    refuses another program's file put there), or accepts it by returning None.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 before_reopen: Callable[[Path], str | None] | None = None) -> None:
        self.path = Path(path)
        self._before_reopen = before_reopen
        # opened and watched by its absolute path: a relative one named another file once the process
        # changed directory (a server that chdirs after start-up), which the check for a moved log read
        # as the log removed
        try:
            self._file = self.path.absolute()
        except OSError as exc:  # the working directory was removed
            raise _output_error(self.path, _reason(exc)) from exc
        if self.path.is_dir():
            raise _output_error(self.path, "it is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            blocker = _blocking_file(self.path.parent)
            reason = f"{blocker} is a file, not a folder" if blocker is not None else _reason(exc)
            raise _output_error(self.path, reason) from exc

    def append(self, line: str) -> None:
        """Append ``line`` and a newline. ``line`` must not contain a newline itself."""
        if "\n" in line or "\r" in line:
            raise ValueError("a LineLog line must not contain a newline")
        if self._fd is None:
            raise _output_error(self.path, "the log is closed")
        data = (line + "\n").encode("utf-8")
        self._reopen_if_moved()
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(self._fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise _output_error(self.path, _reason(exc)) from exc
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _reopen_if_moved(self) -> None:
        """Open the path again when it no longer names the open file (removed, or renamed away by log
        rotation): the lines went on into the unlinked or renamed file, with no error (one ``stat`` per
        line). A path that cannot be opened again is an :class:`OutputError`."""
        try:
            here, ours = os.stat(self._file), os.fstat(self._fd)
            if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
                return
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _output_error(self.path, _reason(exc)) from exc
        try:
            # a removed log folder is made again, as creation makes it (it failed every later line)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _output_error(self.path, f"it was removed or moved while in use, and its folder cannot be made "
                                           f"again: {_reason(exc)}") from exc
        refused = None if self._before_reopen is None else self._before_reopen(self._file)
        if refused is not None:
            raise _output_error(self.path, refused)
        try:
            fd = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _output_error(self.path, f"it was removed or moved while in use, and cannot be created again: "
                                           f"{_reason(exc)}") from exc
        old, self._fd = self._fd, fd
        with contextlib.suppress(OSError):
            os.close(old)

    def close(self) -> None:
        """Flush to disk and close; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.fsync(fd)
        os.close(fd)

    def __enter__(self) -> "LineLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_unwritten(out_dir: str | os.PathLike[str], names: Iterable[str], written: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Delete the files ``names`` in ``out_dir`` that this run did not write (``written``): an earlier
    run's figure beside this run's report would read as this run's. Returns the paths removed."""
    keep = {Path(p).name for p in written}
    removed = []
    for name in names:
        path = Path(out_dir) / name
        if name not in keep and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def json_lines(text: str) -> list[str]:
    """The lines of a JSON-lines text, split at line feeds only (a trailing carriage return dropped,
    for CRLF text). str.splitlines() also breaks at U+2028, U+2029 and U+0085, which JSON allows raw
    inside a string (json.dumps(..., ensure_ascii=False) writes them so): a valid line was refused as
    "not JSON", and every later line numbered wrong; and at U+001C-U+001E, which JSON refuses raw in a
    string, where the error named the wrong cause and column."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


#: UTF-16's byte-order marks (little- and big-endian; UTF-32's begin the same way)
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def utf8_problem(data: bytes | str | os.PathLike[str]) -> str:
    """Why ``data`` (bytes, or a file's path) is not UTF-8 text, for an error message: the first
    byte that is not, with its line and byte offset, or a UTF-16 byte-order mark. Python's own
    message gives an offset only, from after a byte-order mark and, for a file read as text, within
    the block being decoded, not the file."""
    if not isinstance(data, bytes):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            return f"it could not be read again to say where ({exc.strerror or exc})"
    if data.startswith(UTF16_BOMS):
        return "it starts with a UTF-16 (or UTF-32) byte-order mark: UTF-16 text, not UTF-8"
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        nul = data.find(b"\x00", 0, at)
        if nul >= 0:
            # a program or an archive is not "text with one bad byte": an ELF file's first invalid
            # byte sits after its header's NUL bytes and was reported as a stray byte to convert
            return nul_problem(data, nul)
        line = data.count(b"\n", 0, at) + 1
        return f"byte 0x{data[at]:02x} on line {line} (byte offset {at}) is not valid UTF-8"
    return "it is valid UTF-8 now (it changed while being read)"


def nul_problem(data: bytes, at: int) -> str:
    """What a NUL byte at ``at`` says of a file: valid UTF-8, but no text holds one (git's and
    grep's test for binary files); UTF-16 text without a byte-order mark holds one in every ASCII
    character."""
    line = data.count(b"\n", 0, at) + 1
    return (f"it holds a NUL byte (line {line}, byte offset {at}): a binary file or UTF-16 text, "
            "not UTF-8 text")


def json_error(exc: json.JSONDecodeError) -> str:
    """What a JSON decoder error says, with its column: some of its messages end with "at" already
    ("Unterminated string starting at"), which read "... at at column 12"."""
    return f"{exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"
