"""The one exception type the CLI turns into a one-line message."""
from __future__ import annotations

import os


class NfmError(Exception):
    """An expected failure the user can act on: bad input, a missing file, a mismatch.

    ``str(err)`` is a single line that names the file (when there is one) and says what to do.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # one line, always
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message
