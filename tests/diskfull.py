"""A full disk for tests: files under one folder open for writing, and every write fails with
ENOSPC, as on a real full file system (opening and renaming need no data blocks)."""

from __future__ import annotations

import builtins
import errno
import io
import os
from typing import Any


class _NoSpace:
    """A file opened for writing whose writes all fail."""

    def __init__(self, f: Any):
        self._f = f

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _NoSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def fill_disk(monkeypatch: Any, under: str | os.PathLike) -> None:
    """From now on (until ``monkeypatch`` undoes it), every ``open`` for writing of a path below
    ``under`` returns a file whose ``write`` raises ``OSError(ENOSPC)`` without a file name."""
    real = builtins.open
    root = os.path.abspath(under) + os.sep

    def open_on_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            if os.path.abspath(file).startswith(root):
                return _NoSpace(f)
        return f

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(io, "open", open_on_full_disk)
