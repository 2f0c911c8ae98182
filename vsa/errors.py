"""User-facing errors.

Every problem caused by the user's input (a missing file, a malformed line, an
unknown option value) is raised as :class:`VsaError`.  The CLI prints it as one
line on stderr and exits with code 2; library users can catch it.
"""

from __future__ import annotations

import contextlib
import errno
import os


class VsaError(Exception):
    """An error in the user's input; ``str(err)`` is a complete one-line message."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = None if path is None else os.fspath(path)
        self.line = line
        # always one line: messages quoted from libraries (pickle, zipfile, csv) may hold newlines
        message = " ".join(str(message).split("\n")).replace("\r", " ")
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(f"{where}{message}")


# "no space left on device" and "disk quota exceeded": both mean the output does not fit
DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def disk_full(exc: BaseException | None) -> OSError | None:
    """The disk-full ``OSError`` (:data:`DISK_FULL`) behind ``exc``: ``exc`` itself or one it was raised from
    or while handling (torch's zip writer reports a failed write as ``RuntimeError: unexpected pos``, the
    ``OSError`` only in its context); None when there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def name_disk_full(exc: BaseException, path, temp=None) -> None:
    """Name ``path`` in the disk-full error behind ``exc`` when that error names no file, or names ``temp``
    (the temporary file ``path`` is written through): a failed ``write()`` carries no file name."""
    full = disk_full(exc)
    if full is not None and (full.filename is None or (temp is not None and full.filename == os.fspath(temp))):
        full.filename = os.fspath(path)


def disk_full_message(full: OSError) -> str:
    """``<file>: disk full (<reason>)``, one line: the file being written when the device or quota ran out."""
    reason = full.strerror or os.strerror(full.errno)
    where = f"{os.fsdecode(full.filename)}: " if full.filename is not None else ""
    return " ".join(f"{where}disk full ({reason}); free some space and rerun".split())


@contextlib.contextmanager
def writing(path):
    """While the block writes ``path`` (an append, a lock file), a disk-full error names it (:func:`name_disk_full`)."""
    try:
        yield
    except BaseException as e:
        name_disk_full(e, path)
        raise
