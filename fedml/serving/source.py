"""Where the served model comes from, and how a new one replaces it without a restart.

A :class:`ModelSource` answers two questions: which version is current (cheap, asked often) and
"load that version" (slow, asked only when the answer changes). :class:`ModelSlot` holds the loaded
model; :meth:`ModelSlot.refresh` asks the source, loads a new version off to the side and swaps it
in with one assignment, so a request sees either the old model or the new one, never half of each.
When loading fails the old model keeps serving and the error is kept for ``/version``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from fedml.redaction import redact_text
from fedml.serving.recommender import Recommender, ServingIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One model version ready to serve: the recommender, its hot-path index and what it is."""

    name: str
    version: str
    recommender: Recommender
    index: ServingIndex
    tags: dict[str, str] = field(default_factory=dict)
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def build(
        cls, name: str, version: str, recommender: Recommender, tags: dict[str, str] | None = None
    ) -> LoadedModel:
        return cls(name=name, version=version, recommender=recommender, index=recommender.serving, tags=tags or {})


class ModelSource(Protocol):
    """A model store: ``current_version`` is cheap and polled; ``load`` is called when it changes."""

    name: str

    def current_version(self) -> str | None:
        """The version that should be served now, or None when there is none yet."""
        ...

    def load(self, version: str) -> LoadedModel:
        """Load ``version`` (raises when it cannot)."""
        ...


class StaticSource:
    """An in-memory recommender, or a settable sequence of them (tests, demos)."""

    def __init__(self, recommender: Recommender | None, name: str = "in-memory", version: str = "1",
                 tags: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.versions: dict[str, Recommender] = {} if recommender is None else {version: recommender}
        self.version: str | None = None if recommender is None else version
        self.tags = tags or {}

    def publish(self, version: str, recommender: Recommender) -> None:
        """Make ``recommender`` the current version (what a registry's alias move does)."""
        self.versions[version] = recommender
        self.version = version

    def current_version(self) -> str | None:
        return self.version

    def load(self, version: str) -> LoadedModel:
        return LoadedModel.build(self.name, version, self.versions[version], self.tags)


class DirectorySource:
    """A recommender saved with :meth:`Recommender.save`; its version is the settings file's mtime."""

    def __init__(self, directory: str | Path, name: str | None = None) -> None:
        self.directory = Path(directory)
        self.name = name or self.directory.name

    def current_version(self) -> str | None:
        settings = self.directory / "recommender.json"
        return f"file-{settings.stat().st_mtime_ns}" if settings.exists() else None

    def load(self, version: str) -> LoadedModel:
        return LoadedModel.build(self.name, version, Recommender.load(self.directory), {"source": str(self.directory)})


class ModelSlot:
    """The model being served; refreshed from its source, at most one load at a time."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.model: LoadedModel | None = None
        self.last_error: str | None = None
        self.last_check: float | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the source's current version if it is not the one served; True when it swapped.

        Never raises: a failure is logged and kept in ``last_error``, and the old model stays.
        """
        if not self._lock.acquire(blocking=False):
            return False  # a refresh is already running
        try:
            self.last_check = time.time()
            version = self.source.current_version()
            if version is None or (self.model is not None and self.model.version == version):
                self.last_error = None
                return False
            loaded = self.source.load(version)
            self.model = loaded  # the swap: one reference assignment
            self.last_error = None
            logger.info("serving %s version %s", loaded.name, loaded.version)
            return True
        except Exception as exc:  # any failure keeps the old model serving
            self.last_error = redact_text(f"{type(exc).__name__}: {exc}")  # MLflow's errors hold the URL
            logger.warning("model refresh failed, still serving %s: %s", self.served_version, self.last_error)
            return False
        finally:
            self._lock.release()

    @property
    def served_version(self) -> str | None:
        return None if self.model is None else self.model.version
