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

from vsa.errors import VsaError, name_disk_full, writing

STDIO = "-"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Windows editors write one): skipped


def is_number(v) -> bool:
    """A finite JSON number (not a bool, which Python counts as an int): what a record's score, box or setting
    must be."""
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_stdio(path) -> bool:
    return path is None or os.fspath(path) == STDIO


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
    except BaseException as e:
        name_disk_full(e, path, tmp)  # a failed write() names no file: the user's is the one to name
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


# ----------------------------------------------------------------------------- one writer per output


def lock_path(out) -> Path:
    """``<out>.lock``: the lock file of an output (:func:`output_lock`)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _holder(text: str) -> tuple[int | None, str, str]:
    """``(pid, host, command)`` written in a lock file by :func:`output_lock` (pid None when unreadable)."""
    parts = text.strip().split(" ", 2)
    try:
        return int(parts[0]), parts[1], parts[2] if len(parts) > 2 else "vsa"
    except (ValueError, IndexError):
        return None, "", "vsa"


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive advisory lock on ``fd`` without waiting: True, False when another process holds it,
    None when this system or file system has no such locks."""
    try:
        import fcntl
    except ImportError:
        return None
    import errno

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP (some network file systems)


def _refuse(lock: Path, out: Path, command: str, text: str):
    pid, host, who = _holder(text)
    by = f"another `{who}` (pid {pid} on {host})" if pid is not None else "another vsa run"
    return VsaError(f"locked: {by} is writing {out}; wait for it to finish or pick another output "
                    f"(a lock left by a crash on another machine can be deleted)", lock)


_held_locks: dict[str, int] = {}  # lock files this process holds -> the thread holding each


@contextlib.contextmanager
def output_lock(out, command: str) -> Iterator[Path]:
    """One writer per output: hold ``<out>.lock`` while the block writes ``out`` (and its parts, checkpoints, ...).

    A second writer of the same output is refused at once with a one-line VsaError naming the lock file and the
    holder (``command``, e.g. ``"vsa embed"``, its pid and host). The lock is an advisory ``flock`` on the file, which
    the system drops when its process dies however it dies: a lock file left by a killed run is simply taken over.
    Where there are no such locks (Windows, some network file systems) the file itself is the lock: created
    exclusively, and taken over when the pid it names is no longer alive on this host. The file is removed when the
    block ends. Within the thread that holds it, taking it again is a no-op (a command locks its output early, and
    the library function it calls locks it again).
    """
    import socket
    import threading

    out = Path(out)
    lock = lock_path(out)
    key = os.path.abspath(lock)
    if _held_locks.get(key) == threading.get_ident():  # the same run, one level down (CLI, then library): held
        yield lock
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()} {socket.gethostname()} {command}\n".encode()
    for _ in range(20):  # the holder may remove the file between our open and our lock: then try the new one
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise VsaError(f"cannot create the lock file ({e.strerror})", lock) from None
        got = _try_flock(fd)
        if got is None:
            os.close(fd)
            with _exclusive_file_lock(lock, out, command, me):
                _held_locks[key] = threading.get_ident()
                try:
                    yield lock
                finally:
                    _held_locks.pop(key, None)
            return
        if not got:
            try:
                text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            finally:
                os.close(fd)
            raise _refuse(lock, out, command, text)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if not same:  # locked a file its holder had just removed: the lock is the file now at that path
            os.close(fd)
            continue
        try:
            with writing(lock):  # a full disk names the lock file
                os.ftruncate(fd, 0)
                os.pwrite(fd, me, 0)
            _held_locks[key] = threading.get_ident()
            yield lock
        finally:
            _held_locks.pop(key, None)
            with contextlib.suppress(OSError):
                os.unlink(lock)  # before unlocking, so no one locks the file once it is gone from the folder
            os.close(fd)
        return
    raise VsaError("cannot take the lock (it keeps changing hands)", lock)


@contextlib.contextmanager
def _exclusive_file_lock(lock: Path, out: Path, command: str, me: bytes) -> Iterator[None]:
    """:func:`output_lock` without advisory locks: the lock file exists while its writer runs."""
    import socket

    for _ in range(20):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                text = lock.read_text("utf-8", "replace")
            except FileNotFoundError:
                continue
            pid, host, _ = _holder(text)
            if pid is not None and (host != socket.gethostname() or _pid_alive(pid)):
                raise _refuse(lock, out, command, text) from None
            # the run that left it is gone (or it was never written): take it over
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            continue
        except OSError as e:
            raise VsaError(f"cannot create the lock file ({e.strerror})", lock) from None
        try:
            os.write(fd, me)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        return
    raise VsaError("cannot take the lock (it keeps changing hands)", lock)


@contextlib.contextmanager
def open_output(path, binary: bool = True) -> Iterator[IO]:
    """Stdout for ``None``/``"-"``, else an atomic file."""
    if is_stdio(path):
        stream = data_stdout().buffer if binary else data_stdout()
        with writing("<stdout>"):
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


def _json_default(o):
    """numpy values for the stdlib encoder of :func:`dumps` (orjson serialises them itself)."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"Type is not JSON serializable: {type(o).__name__}")


def dumps(obj: Any, indent: bool = False) -> bytes:
    """``obj`` as UTF-8 JSON. A string holding surrogate escapes (a file name that is not valid UTF-8, as
    ``os.fsdecode`` gives it) cannot be UTF-8: it is written with JSON ``\\udcXX`` escapes, which
    :func:`loads` (and Python's ``json``) read back as the same string, so ``os.fsencode`` gives the
    original bytes."""
    opt = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    try:
        return orjson.dumps(obj, option=opt)
    except TypeError as e:
        if "surrogates" not in str(e):
            raise
    import json
    import re

    text = json.dumps(obj, ensure_ascii=False, default=_json_default, indent=2 if indent else None,
                      separators=(",", ": ") if indent else (",", ":"))
    # json's own text is ASCII: the only surrogates are those inside strings
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


def loads(data: bytes | str) -> Any:
    """Parse JSON (orjson); JSON text with ``\\udcXX`` escapes (a non-UTF-8 file name written by
    :func:`dumps`), which orjson refuses, is read by Python's ``json`` into the surrogate-escaped string.
    Raises ``orjson.JSONDecodeError``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        if "surrogate" not in e.msg:
            raise
        import json

        try:
            return json.loads(data)
        except ValueError:
            raise e from None


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
        return loads(data)
    except orjson.JSONDecodeError as e:
        line = data[: e.pos].count(b"\n") + 1 if e.pos is not None else None
        raise VsaError(f"invalid JSON ({e.msg})", _display(path), line) from None


def write_json(path, obj: Any, indent: bool = False) -> None:
    with open_output(path) as fh:
        fh.write(dumps(obj, indent))
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
                obj = loads(line)
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
    """Write ``records`` as JSONL to ``path`` (``"-"`` or None: stdout) with :class:`JsonlWriter`; their count."""
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


# Compressed members inflating more than this many times, to more than NPZ_BOMB_BYTES together, are refused as a
# zip bomb: vsa writes its NPZ files uncompressed, and real arrays (features, boxes, strings) deflate a few times.
NPZ_BOMB_RATIO = 100
NPZ_BOMB_BYTES = 256 << 20


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux ``MemAvailable``, else free physical pages); None when
    unknown."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


class NpyMember:
    """One array of an NPZ as its zip entry and ``.npy`` header declare it, read without reading its data.

    ``name`` (without ``.npy``), ``shape``, ``dtype``, ``nbytes`` (the data the header declares), ``stored``
    (uncompressed, so it can be memory-mapped at ``data_offset`` of the file), ``compressed`` (bytes in the file)."""

    def __init__(self, name, shape, dtype, fortran, nbytes, stored, data_offset, compressed):
        self.name, self.shape, self.dtype, self.fortran = name, shape, dtype, fortran
        self.nbytes, self.stored, self.data_offset, self.compressed = nbytes, stored, data_offset, compressed


def _npy_header(fh, where, name):
    """``(shape, fortran, dtype, header length)`` of the ``.npy`` stream ``fh``; a one-line VsaError otherwise."""
    import numpy as np

    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        elif version == (3, 0) and hasattr(fmt, "_read_array_header"):
            shape, fortran, dtype = fmt._read_array_header(fh, version)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, fortran, dtype, fh.tell()
    except VsaError:
        raise
    except Exception as e:  # ValueError, EOFError, zlib.error, BadZipFile...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VsaError(f"member {name!r}: not a readable .npy array ({msg})", where) from None


def _stored_start(path, info) -> int:
    """Where the bytes of the zip entry ``info`` begin in the file (after its local header)."""
    import struct

    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError("bad local file header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def npz_members(path, max_bytes: int | None = None, mapped: Iterable[str] = ()) -> dict[str, NpyMember]:
    """Every array of the NPZ at ``path`` as its headers declare it, checked before any data is read.

    Refused, each with a one-line VsaError naming the file and the member: a member name that appears twice (numpy
    would silently read one of them), a member that is not a ``.npy`` array, object (pickled) arrays, negative
    dimensions, a zip entry whose size differs from what its ``.npy`` header declares (header + shape x itemsize),
    a stored member whose data lies past the end of the file, and compressed members that inflate more than
    :data:`NPZ_BOMB_RATIO` times to more than :data:`NPZ_BOMB_BYTES` together (a zip bomb). The arrays that would be
    read into memory (all but those named in ``mapped`` that are stored uncompressed, which are memory-mapped) must
    together fit in ``max_bytes`` (default: :func:`available_memory`).
    """
    import zipfile

    p = Path(path)
    if not p.exists():
        raise VsaError("no such file", p)
    if p.is_dir():
        raise VsaError("is a folder, expected a file", p)
    mapped = set(mapped)
    try:
        file_size = p.stat().st_size
        zf = zipfile.ZipFile(p)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise VsaError(f"not a readable NPZ file ({type(e).__name__}: {e})", p) from None
    out: dict[str, NpyMember] = {}
    in_memory = inflated = 0  # bytes to hold once read; bytes of members deflated over NPZ_BOMB_RATIO times
    with zf:
        seen: set[str] = set()
        for info in zf.infolist():
            if info.filename in seen:
                raise VsaError(f"member {info.filename!r} appears twice in the zip (which one is meant?)", p)
            seen.add(info.filename)
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise VsaError(f"member {info.filename!r} is not a .npy array", p)
            name = info.filename[:-4]
            if info.header_offset < 0 or info.header_offset + 30 > file_size:
                raise VsaError(f"member {name!r}: its zip entry lies outside the file (offset {info.header_offset})", p)
            stored = info.compress_type == zipfile.ZIP_STORED
            try:
                with zf.open(info) as fh:
                    shape, fortran, dtype, header = _npy_header(fh, p, name)
                data_offset = _stored_start(p, info) + header if stored else None
            except VsaError:
                raise
            except Exception as e:
                raise VsaError(f"member {name!r}: not readable ({type(e).__name__}: {e})", p) from None
            if dtype.hasobject:
                raise VsaError(f"not a readable NPZ file (member {name!r} holds Python objects, which only a pickle "
                               "can load; vsa reads with allow_pickle=False)", p)
            if any(int(d) < 0 for d in shape):
                raise VsaError(f"member {name!r} has a negative dimension {tuple(shape)}", p)
            count = 1
            for d in shape:
                count *= int(d)
            nbytes = count * dtype.itemsize
            if info.file_size != header + nbytes:
                raise VsaError(f"member {name!r}: its zip entry holds {info.file_size} bytes but its .npy header "
                               f"declares {header + nbytes} ({dtype.str} {tuple(shape)}); corrupt or forged", p)
            if stored:
                if info.compress_size != info.file_size or data_offset + nbytes > file_size:
                    raise VsaError(f"member {name!r}: its data ({nbytes} bytes) runs past the end of the file", p)
            elif nbytes > NPZ_BOMB_RATIO * max(info.compress_size, 1):
                inflated += nbytes
                if inflated > NPZ_BOMB_BYTES:
                    raise VsaError(f"member {name!r}: {info.compress_size} compressed bytes inflate to {nbytes} "
                                   f"(over {NPZ_BOMB_RATIO}x; a zip bomb?)", p)
            if not (stored and name in mapped):
                in_memory += nbytes
            out[name] = NpyMember(name, tuple(int(d) for d in shape), dtype, fortran, nbytes, stored, data_offset,
                                  info.compress_size)
    limit = available_memory() if max_bytes is None else int(max_bytes)
    if limit is not None and in_memory > limit:
        raise VsaError(f"its arrays need {in_memory / 2**30:.2f} GiB in memory, more than the "
                       f"{limit / 2**30:.2f} GiB available", p)
    return out


def read_npz_members(path, names: Iterable[str]) -> dict[str, Any]:
    """The arrays ``names`` of an NPZ already checked by :func:`npz_members` (``allow_pickle=False``)."""
    import numpy as np

    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in names}
    except (ValueError, OSError, EOFError) as e:
        raise VsaError(f"not a readable NPZ file ({e})", p) from None
    except Exception as e:  # zipfile.BadZipFile, zlib.error and friends
        raise VsaError(f"not a readable NPZ file ({type(e).__name__}: {e})", p) from None


def load_npz(path, required: Iterable[str] = (), mmap: bool = False, max_bytes: int | None = None) -> dict[str, Any]:
    """Load every array of an NPZ into a dict (``allow_pickle=False``), once :func:`npz_members` has checked
    every member against its declared size and the memory ``max_bytes`` (default: what is available).

    ``required`` names keys that must be present; a missing one is a VsaError.
    """
    p = Path(path)
    members = npz_members(p, max_bytes)
    missing = [k for k in required if k not in members]
    if missing:
        raise VsaError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(members)) or 'none'})", p)
    return read_npz_members(p, members)


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
