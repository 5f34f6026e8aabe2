"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO[str]], None]) -> Path:
    """Write a text file via a temporary sibling and ``os.replace``: readers never see a partial file."""

    def text(fd: int) -> None:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    return _replace(Path(path), text, 0o644)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` whole or not at all (as :func:`atomic_write`), with permissions ``mode``."""

    def binary(fd: int) -> None:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return _replace(Path(path), binary, mode)


def _replace(path: Path, write: Callable[[int], None], mode: int) -> Path:
    """Write through ``write(fd)`` into a temporary sibling, then ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        write(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a string."""
    return atomic_write(path, lambda handle: handle.write(text))
