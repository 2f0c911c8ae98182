"""File I/O shared by every stage: JSONL, JSON, NPZ, atomic writes, stdin/stdout.

Conventions
-----------
* A path of ``"-"`` means stdin (reading) or stdout (writing).  A path of ``None``
  means the same *if* the stream is piped, otherwise it is an error naming the
  missing argument (so ``vsa embed`` typed alone does not hang on the terminal).
* Files are written atomically: into a temporary file in the destination folder,
  then ``os.replace``-d over the target.  An interrupted run never leaves a
  half-written output; the previous version stays intact.
* Every parse error is a :class:`vsa.errors.VsaError` naming the file and, for
  JSONL, the 1-based line number.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import orjson

from vsa.errors import VsaError

STDIO = "-"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Windows editors write one): skipped


def is_stdio(path) -> bool:
    return path is None or os.fspath(path) == STDIO


def stdin_is_piped() -> bool:
    try:
        return not sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def stdout_is_piped() -> bool:
    try:
        return not data_stdout().isatty()
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------- stdout carries data only

_held_stdout = None  # the real stdout while `data_only_stdout` runs; sys.stdout then points at stderr


def data_stdout():
    """The text stream vsa's data goes to: the real stdout, also while :func:`data_only_stdout` has pointed
    ``sys.stdout`` at stderr. Every writer of data (``"-"`` outputs, tables) writes here."""
    return _held_stdout if _held_stdout is not None else sys.stdout


@contextlib.contextmanager
def data_only_stdout() -> Iterator[None]:
    """Hold the real stdout for vsa's writers and point ``sys.stdout`` at stderr while the block runs.

    Whatever a library prints (ultralytics' first-run settings banner and its logger, which binds the
    ``sys.stdout`` of the moment it is imported; pycocoevalcap; stray ``print`` calls) goes to stderr,
    so stdout carries nothing but vsa's JSONL / JSON / tables. Nested use is a no-op.
    """
    global _held_stdout
    if _held_stdout is not None:
        yield
        return
    real = sys.stdout
    _held_stdout = real
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = real
        _held_stdout = None


def resolve_input(path, what: str = "input", flag: str = "INPUT"):
    """Return ``path``, or ``"-"`` when it is omitted and stdin is piped; else raise."""
    if path is None:
        if stdin_is_piped():
            return STDIO
        raise VsaError(f"no {what} given: pass {flag} or pipe it on stdin")
    return path


def _display(path) -> str:
    return "<stdin>" if is_stdio(path) else os.fspath(path)


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on success rename it over ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed
    and ``path`` is left untouched.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # the usual mode (0644 under umask 022), not mkstemp's 0600
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a short critical section (a checkpoint write).

    A signal that arrives meanwhile is only noted; when the block ends the previous handlers come back
    and the signal is re-delivered, so Ctrl-C or SIGTERM stops the program after the file is complete and
    renamed, never inside the write or its cleanup. Outside the main thread this does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            signal.raise_signal(pending[0])


@contextlib.contextmanager
def open_output(path, binary: bool = True) -> Iterator[IO]:
    """Stdout for ``None``/``"-"``, else an atomic file."""
    if is_stdio(path):
        stream = data_stdout().buffer if binary else data_stdout()
        yield stream
        stream.flush()
    else:
        with atomic_write(path, "wb" if binary else "w") as fh:
            yield fh


def _open_input(path) -> IO[bytes]:
    if is_stdio(path):
        return sys.stdin.buffer
    p = Path(path)
    if not p.exists():
        raise VsaError("no such file", p)
    if p.is_dir():
        raise VsaError("is a folder, expected a file", p)
    try:
        return open(p, "rb")
    except OSError as e:
        raise VsaError(f"cannot open ({e.strerror})", p) from None


# ----------------------------------------------------------------------------- JSON / JSONL


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def read_json(path) -> Any:
    fh = _open_input(path)
    try:
        data = fh.read()
    finally:
        if not is_stdio(path):
            fh.close()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        line = data[: e.pos].count(b"\n") + 1 if e.pos is not None else None
        raise VsaError(f"invalid JSON ({e.msg})", _display(path), line) from None


def write_json(path, obj: Any, indent: bool = False) -> None:
    opt = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    with open_output(path) as fh:
        fh.write(orjson.dumps(obj, option=opt))
        fh.write(b"\n")


def iter_jsonl(path, skip_bad: bool = False, warn=None, with_lineno: bool = False) -> Iterator[dict]:
    """Yield one object per non-empty line; errors name the file and line.

    With ``skip_bad`` a malformed line is reported through ``warn`` (if given) and skipped.
    With ``with_lineno`` yield ``(lineno, obj)`` pairs (1-based) instead of objects.
    """
    fh = _open_input(path)
    try:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            line = line.strip()
            if not line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                err = VsaError(f"invalid JSON line ({e.msg})", _display(path), lineno)
                if skip_bad:
                    if warn:
                        warn(str(err))
                    continue
                raise err from None
            if not isinstance(obj, dict):
                err = VsaError("expected a JSON object on each line", _display(path), lineno)
                if skip_bad:
                    if warn:
                        warn(str(err))
                    continue
                raise err
            yield (lineno, obj) if with_lineno else obj
    finally:
        if not is_stdio(path):
            fh.close()


def read_jsonl(path, **kw) -> list[dict]:
    return list(iter_jsonl(path, **kw))


class JsonlWriter:
    """Write JSONL records to stdout or atomically to a file.

    Use as a context manager; records are visible at ``path`` only after a clean exit.
    For resumable stages that must keep partial work, see :func:`append_jsonl`.
    """

    def __init__(self, path=None):
        self.path = path
        self._cm = None
        self._fh = None

    def __enter__(self) -> "JsonlWriter":
        self._cm = open_output(self.path)
        self._fh = self._cm.__enter__()
        return self

    def write(self, obj: Any) -> None:
        self._fh.write(dumps(obj))
        self._fh.write(b"\n")
        if is_stdio(self.path):
            self._fh.flush()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def write_jsonl(path, records: Iterable[Any]) -> int:
    n = 0
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
            n += 1
    return n


def append_jsonl(fh: IO[bytes], obj: Any) -> None:
    """Append one record to an open part file and flush it (for resumable stages)."""
    fh.write(dumps(obj) + b"\n")
    fh.flush()


# ----------------------------------------------------------------------------- NPZ


def save_npz(path, arrays: dict[str, Any], compress: bool = False) -> None:
    """Save arrays to ``path`` atomically. Never pickles: object arrays are refused."""
    import numpy as np

    for k, v in arrays.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            raise TypeError(f"array {k!r} has dtype object; store strings as fixed-width unicode")
    with atomic_write(path) as fh:
        (np.savez_compressed if compress else np.savez)(fh, **arrays)


def load_npz(path, required: Iterable[str] = (), mmap: bool = False) -> dict[str, Any]:
    """Load every array of an NPZ into a dict (``allow_pickle=False``).

    ``required`` names keys that must be present; a missing one is a VsaError.
    """
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise VsaError("no such file", p)
    try:
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise VsaError(f"not a readable NPZ file ({e})", p) from None
    except Exception as e:  # zipfile.BadZipFile and friends
        raise VsaError(f"not a readable NPZ file ({type(e).__name__}: {e})", p) from None
    missing = [k for k in required if k not in out]
    if missing:
        raise VsaError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(out)) or 'none'})", p)
    return out


def numbered_text_lines(path) -> Iterator[tuple[int, str, str]]:
    """Yield ``(line number, line, display name)`` for the non-blank lines of a text file or stdin (``"-"``):
    the line without its line ending, the name as errors show it (``<stdin>`` for stdin)."""
    fh = _open_input(path)
    wrapper = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape")
    where = _display(path)
    try:
        for lineno, line in enumerate(wrapper, 1):
            if lineno == 1:
                line = line.lstrip("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line, where
    finally:
        wrapper.detach()
        if not is_stdio(path):
            fh.close()


def text_stream_lines(path) -> Iterator[str]:
    """Yield the non-blank text lines of a file or stdin, without line endings (used for path lists)."""
    for _, line, _ in numbered_text_lines(path):
        yield line
