"""Client sampling for a round."""

from __future__ import annotations

import numpy as np


def poisson_sample(n_clients: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each client joins independently with probability ``rate`` (what the DP accountant assumes)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"client sampling rate must be in (0, 1], got {rate}")
    return np.flatnonzero(rng.random(n_clients) < rate)
