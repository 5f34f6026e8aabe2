"""Simulated poisoned clients (tests and benchmarks only): some uploads of each round scaled or sign-flipped.

:class:`PoisonedUploads` wraps an aggregator. Each time a shard's uploads reach ``accumulate`` (or
``accumulate_batched``), it picks ``round(fraction * clients)`` of them, uniformly without replacement,
and replaces each picked upload's deltas (embeddings and bias) by ``factor * delta`` (``scale``: a
boosted update, Bhagoji et al. 2019, arXiv:1811.12470) or ``-factor * delta`` (``sign_flip``: an update
pointing uphill). Example counts are left as reported. The picks come from ``(seed, call number)``, so a
run in one process (the default in-process shard runner) is reproducible; the wrapper keeps a call
counter, so it is not meant for shards run on other processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fedml.federated.client import ClientUpdate

AttackKind = Literal["scale", "sign_flip"]
ATTACKS: tuple[str, ...] = ("scale", "sign_flip")


@dataclass
class PoisonedUploads:
    """An aggregator whose uploads are poisoned before ``inner`` sees them (see the module docstring)."""

    inner: Any  # an aggregator: accumulate, accumulate_batched and finish
    kind: AttackKind
    fraction: float = 0.1
    factor: float = 10.0
    seed: int = 0
    calls: int = field(default=0, init=False)
    #: per call to accumulate, the positions (in that call) of the clients whose uploads were poisoned
    history: list[np.ndarray] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"kind must be one of {ATTACKS}, got {self.kind!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if not self.factor > 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")

    @property
    def multiplier(self) -> float:
        """What a poisoned upload's deltas are multiplied by."""
        return self.factor if self.kind == "scale" else -self.factor

    def attackers(self, n_clients: int) -> np.ndarray:
        """The (sorted) positions poisoned in the next call with ``n_clients`` uploads; advances the counter."""
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        picked = np.sort(rng.choice(n_clients, size=int(round(self.fraction * n_clients)), replace=False))
        self.history.append(picked)
        return picked

    def accumulate(self, updates: list[ClientUpdate], *args, **kwargs):
        picked = set(self.attackers(len(updates)).tolist())
        poisoned = [self._poison(u) if i in picked else u for i, u in enumerate(updates)]
        return self.inner.accumulate(poisoned, *args, **kwargs)

    def accumulate_batched(self, batch, *args, **kwargs):
        picked = self.attackers(len(batch))
        factor = torch.ones(len(batch), dtype=batch.delta_embeddings.dtype, device=batch.owner.device)
        factor[torch.as_tensor(picked, dtype=torch.int64, device=factor.device)] = self.multiplier
        per_row = factor.index_select(0, batch.owner)
        poisoned = dataclasses.replace(
            batch, delta_embeddings=batch.delta_embeddings * per_row[:, None], delta_bias=batch.delta_bias * per_row
        )
        return self.inner.accumulate_batched(poisoned, *args, **kwargs)

    def finish(self, partials, *args, **kwargs):
        return self.inner.finish(partials, *args, **kwargs)

    def _poison(self, update: ClientUpdate) -> ClientUpdate:
        m = self.multiplier
        return dataclasses.replace(
            update, delta_embeddings=update.delta_embeddings * m, delta_bias=update.delta_bias * m
        )
