"""Passwords out of text that is printed, logged or served: ``scheme://user:secret@host`` -> ``user:***@host``.

Tracking URLs may carry credentials (``MLFLOW_TRACKING_URI=https://user:password@host``), and MLflow
puts the URL it called into its error messages, which reach logs and the service's ``/version``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# scheme://user:password@ : the password is whatever runs up to the last "@" before the host part
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):(?P<secret>[^/\s@]+)@")


def redacted(uri: str) -> str:
    """``uri`` without a password (``https://user:secret@host`` -> ``https://user:***@host``), for printing."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in free text (an error message, a log line) with the password as ``***``."""
    return _USERINFO.sub(lambda m: f"{m['head']}:***@", text)


__all__ = ["redacted", "redact_text"]
