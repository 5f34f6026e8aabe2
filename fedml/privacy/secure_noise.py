"""Where the privacy mechanisms get their randomness: seeded (reproducible) or from the OS CSPRNG.

:class:`NoiseSource` is the small interface every mechanism draws through (uniforms, geometric,
binomial, a uniform k-subset, Gaussian tensors). Two implementations:

* :class:`SeededNoise` wraps a seeded ``numpy.random.Generator`` and/or ``torch.Generator`` and makes
  exactly the calls the mechanisms made before it existed, so seeded runs reproduce bit for bit.
* :class:`SecureNoise` draws every bit from ``os.urandom`` (Linux: the kernel's ChaCha20-based CSPRNG,
  reseeded from hardware entropy). It has no seed and cannot be replayed, on purpose: with a seeded
  generator, whoever learns the seed (a config file, a log, the run's parameters) can subtract the
  noise and sample membership again, and the DP guarantee is gone. Production runs use it.

The secure Gaussian is hardened against floating-point attacks the way Opacus's ``secure_mode`` does it
(``opacus/optimizers/optimizer.py::_generate_noise``): each output is the sum of four independent
Gaussian draws of the target std, divided by 2 (Holohan & Braghin 2021, "Secure random sampling in
differential privacy", https://arxiv.org/abs/2107.10138, section 5.1; n = 2 there). A single Box-Muller
draw can be inverted to its uniforms, which exposes the noise; reconstructing a sum of four costs an
attacker about 2^(53·3) work. Each draw is Box-Muller on 53-bit uniforms in (0, 1), in float64.

Cost (2 shared cores, measured): about 0.4 µs per secure Gaussian coordinate, so the noise for a
50,000 x 32 item table takes roughly 0.5-0.8 s; the seeded path is ``torch.randn``.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

Shape = int | tuple[int, ...] | torch.Size

_MANTISSA_BITS = 53
_CHUNK = 1 << 18  # Gaussian coordinates per chunk: 4 draws each, 8 MiB of OS random bytes


class NoiseSource(ABC):
    """The random draws the privacy mechanisms need; ``secure`` says whether they come from a CSPRNG."""

    secure: ClassVar[bool]

    @abstractmethod
    def uniform(self, size: Shape) -> np.ndarray:
        """float64 uniforms on [0, 1) (seeded) or (0, 1) (secure)."""

    @abstractmethod
    def geometric(self, p: float, size: Shape) -> np.ndarray:
        """int64 draws of the number of Bernoulli(p) trials up to the first success (support 1, 2, ...)."""

    @abstractmethod
    def binomial(self, n: int | np.ndarray, p: float) -> np.ndarray:
        """int64 Binomial(n, p) draws, one per entry of ``n``."""

    @abstractmethod
    def choice_without_replacement(self, population: int, k: int) -> np.ndarray:
        """A uniformly random set of ``k`` distinct integers from ``range(population)`` (int64, any order)."""

    @abstractmethod
    def gaussian(
        self, shape: Shape, std: float, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A tensor of i.i.d. N(0, std²) noise."""


class SeededNoise(NoiseSource):
    """Reproducible noise from seeded generators (the behaviour before :class:`SecureNoise` existed).

    ``rng`` serves the numpy draws (local DP), ``generator`` the Gaussian tensors (DP-FedAvg); a draw
    whose generator was not given raises.
    """

    secure = False

    def __init__(self, rng: np.random.Generator | None = None, generator: torch.Generator | None = None) -> None:
        self.rng = rng
        self.generator = generator

    def uniform(self, size: Shape) -> np.ndarray:
        return self._numpy().random(size)

    def geometric(self, p: float, size: Shape) -> np.ndarray:
        return self._numpy().geometric(p, size=size)

    def binomial(self, n: int | np.ndarray, p: float) -> np.ndarray:
        return self._numpy().binomial(n, p)

    def choice_without_replacement(self, population: int, k: int) -> np.ndarray:
        return self._numpy().choice(population, size=k, replace=False)

    def gaussian(
        self, shape: Shape, std: float, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        if self.generator is None:
            raise ValueError("SeededNoise.gaussian needs a torch.Generator (SeededNoise(generator=...))")
        noise = torch.randn(_shape(shape), dtype=torch.float64, generator=self.generator)
        return (noise * std).to(device=device, dtype=dtype)

    def _numpy(self) -> np.random.Generator:
        if self.rng is None:
            raise ValueError("this SeededNoise has no numpy Generator (SeededNoise(rng=...))")
        return self.rng


class SecureNoise(NoiseSource):
    """Noise from the operating system's CSPRNG (``os.urandom``); unseeded and not reproducible.

    Stateless, so it pickles to shard workers and every process draws independently.
    """

    secure = True

    def uniform(self, size: Shape) -> np.ndarray:
        """Uniform on ``{1, ..., 2^53 - 1} / 2^53``: 53 random bits, never 0 or 1, every value exact."""
        shape = _shape(size)
        n = math.prod(shape)
        k = _mantissas(n)
        while (zero := np.flatnonzero(k == 0)).size:  # probability 2^-53 each: redraw
            k[zero] = _mantissas(zero.size)
        return (k.astype(np.float64) * 2.0**-_MANTISSA_BITS).reshape(shape)

    def geometric(self, p: float, size: Shape) -> np.ndarray:
        """Inversion: ``ceil(ln U / ln(1 - p))``. Like numpy's sampler the probabilities are exact only up
        to float64 rounding; the support is all of 1, 2, ... up to the 2^-53 tail."""
        if not 0 < p <= 1:
            raise ValueError(f"geometric p must be in (0, 1], got {p}")
        if p == 1:
            return np.ones(_shape(size), dtype=np.int64)
        draws = np.ceil(np.log(self.uniform(size)) / math.log1p(-p))
        return np.maximum(draws, 1).astype(np.int64)

    def binomial(self, n: int | np.ndarray, p: float) -> np.ndarray:
        """Inversion of the exact binomial CDF (scipy) at a secure uniform."""
        from scipy.stats import binom  # heavy import, only on this path

        if not 0 <= p <= 1:
            raise ValueError(f"binomial p must be in [0, 1], got {p}")
        n = np.asarray(n, dtype=np.int64)
        if (n < 0).any():
            raise ValueError("binomial n must be >= 0")
        return binom.ppf(self.uniform(n.shape), n, p).astype(np.int64)

    def choice_without_replacement(self, population: int, k: int) -> np.ndarray:
        """The first ``k`` distinct values of a stream of i.i.d. uniform integers (a uniform k-subset by
        symmetry); for ``k > population / 2`` the complement of such a subset. Returned sorted."""
        if not 0 <= k <= population:
            raise ValueError(f"cannot choose {k} distinct values out of {population}")
        if 2 * k <= population:
            return np.sort(self._distinct(population, k))
        keep = np.ones(population, dtype=bool)
        keep[self._distinct(population, population - k)] = False
        return np.flatnonzero(keep).astype(np.int64)

    def gaussian(
        self, shape: Shape, std: float, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Opacus secure-mode noise: ``(sum of 4 draws of N(0, std²)) / 2``, which is N(0, std²)."""
        shape = _shape(shape)
        n = math.prod(shape)
        out = np.zeros(n, dtype=np.float64)
        if std != 0:
            for start in range(0, n, _CHUNK):
                m = min(_CHUNK, n - start)
                draws = self._standard_normal(4 * m).reshape(4, m) * std
                out[start : start + m] = draws.sum(axis=0) / 2
        return torch.from_numpy(out).reshape(shape).to(device=device, dtype=dtype)

    def integers(self, high: int, size: int) -> np.ndarray:
        """int64 uniform on ``range(high)``, exact (rejection of the top partial block of 2^64)."""
        if not 0 < high <= 2**63:
            raise ValueError(f"high must be in [1, 2^63], got {high}")
        limit = np.uint64(2**64 - 2**64 % high - 1)  # accept words <= limit: a whole number of blocks
        words = _words(size)
        while (rejected := np.flatnonzero(words > limit)).size:
            words[rejected] = _words(rejected.size)
        return (words % np.uint64(high)).astype(np.int64)

    def _standard_normal(self, n: int) -> np.ndarray:
        """Box-Muller on secure uniforms; both outputs of each pair are used."""
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = (2.0 * math.pi) * u[half:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def _distinct(self, population: int, k: int) -> np.ndarray:
        """The first ``k`` distinct values, in order of first appearance, of i.i.d. uniform draws."""
        seen = np.zeros(0, dtype=np.int64)
        while seen.size < k:
            need = k - seen.size
            candidates = np.concatenate([seen, self.integers(population, need + need // 4 + 8)])
            _, first = np.unique(candidates, return_index=True)
            seen = candidates[np.sort(first)]
        return seen[:k]


def as_noise_source(source: NoiseSource | np.random.Generator | torch.Generator) -> NoiseSource:
    """A seeded generator (numpy or torch) wrapped as :class:`SeededNoise`; a :class:`NoiseSource` as is."""
    if isinstance(source, NoiseSource):
        return source
    if isinstance(source, np.random.Generator):
        return SeededNoise(rng=source)
    if isinstance(source, torch.Generator):
        return SeededNoise(generator=source)
    raise TypeError(f"expected a NoiseSource, numpy Generator or torch Generator, got {type(source).__name__}")


def _words(n: int) -> np.ndarray:
    """``n`` uniform uint64 words from the OS CSPRNG (writable)."""
    return np.frombuffer(bytearray(os.urandom(8 * n)), dtype=np.uint64)


def _mantissas(n: int) -> np.ndarray:
    """``n`` uniform integers in ``[0, 2^53)``: the top 53 bits of OS random words."""
    return _words(n) >> np.uint64(64 - _MANTISSA_BITS)


def _shape(size: Shape) -> tuple[int, ...]:
    return (int(size),) if isinstance(size, int | np.integer) else tuple(int(s) for s in size)


__all__ = ["NoiseSource", "SecureNoise", "SeededNoise", "as_noise_source"]
