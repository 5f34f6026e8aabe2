"""The error every data reader raises for a file it cannot read (kept apart so that readers share it)."""

from __future__ import annotations


class DataSourceError(ValueError):
    """A data file cannot be read at all; the message names the file, and the line and field when known."""


__all__ = ["DataSourceError"]
