"""User-facing errors.

Every problem caused by the user's input (a missing file, a malformed line, an
unknown option value) is raised as :class:`VsaError`.  The CLI prints it as one
line on stderr and exits with code 2; library users can catch it.
"""

from __future__ import annotations

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


class NotImplementedStage(VsaError):
    def __init__(self, stage: str):
        super().__init__(f"'vsa {stage}' is not implemented yet")
