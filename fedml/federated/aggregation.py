"""Server-side aggregation of client updates: FedAvg and user-level DP-FedAvg.

Both accumulate the clients' *deltas* in float64 and return a dense mean delta that the server
applies to the global item table with its own learning rate.

* :class:`FedAvg` weights client k by n_k / n over the round's clients (McMahan et al. 2017), the
  minimiser of sum_k n_k/n F_k(theta).
* :class:`DPFedAvg` is the fixed-denominator estimator of McMahan et al. 2018 ("Learning
  differentially private recurrent language models"): each update is clipped to L2 norm S, weighted by
  w_k = min(n_k / cap, 1) <= 1, summed, Gaussian noise N(0, sigma^2 S^2) is added to every
  coordinate of the sum, and the sum is divided by the *fixed* expected total weight q * W (not by the
  realised weight of the round). One shopper changes the sum by at most S, so with Poisson client
  sampling of rate q each round is a sampled Gaussian mechanism with noise multiplier sigma at the
  user level. Raw n_k / n weights would let a shopper with many interactions outweigh the bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedml.federated.client import ClientUpdate
from fedml.privacy.secure_noise import NoiseSource, as_noise_source


@dataclass
class RoundAggregate:
    """The round's mean delta (dense, float64) and what the server learnt about the round."""

    delta_embeddings: torch.Tensor
    delta_bias: torch.Tensor
    num_clients: int
    num_examples: int
    mean_update_norm: float = 0.0
    clipped_fraction: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class _Accumulator:
    """A float64 dense sum of sparse row updates."""

    def __init__(self, n_items: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.embeddings = torch.zeros(n_items, dim, dtype=torch.float64, device=device)
        self.bias = torch.zeros(n_items, dtype=torch.float64, device=device)

    def add(self, update: ClientUpdate, scale: float) -> None:
        self.add_rows(update.rows, update.delta_embeddings, update.delta_bias, scale)

    def add_rows(
        self, rows: torch.Tensor, embeddings: torch.Tensor, bias: torch.Tensor, scale: float | torch.Tensor
    ) -> None:
        """Add scaled rows; ``scale`` is one float, or a float64 tensor with one entry per row."""
        column = scale[:, None] if isinstance(scale, torch.Tensor) else scale
        # one float64 copy, scaled in place (a product of the copy would allocate a second tensor)
        self.embeddings.index_add_(0, rows, embeddings.to(torch.float64, copy=True).mul_(column))
        self.bias.index_add_(0, rows, bias.to(torch.float64, copy=True).mul_(scale))


@dataclass
class PartialSum:
    """The weighted delta sum of some of a round's clients (a shard), before the server finishes it."""

    embeddings: torch.Tensor  # float64 [n_items, dim]
    bias: torch.Tensor  # float64 [n_items]
    num_examples: np.ndarray  # int64 [clients]
    norms: np.ndarray  # float64 [clients]
    clipped: int

    def to(self, device: str | torch.device) -> PartialSum:
        return PartialSum(self.embeddings.to(device), self.bias.to(device), self.num_examples, self.norms, self.clipped)


class _WeightedDeltaSum:
    """sum_k scale_k * delta_k, the scales a function of (n_k, |delta_k|); subclasses say which.

    A round is aggregated in two steps so that its clients can be split into shards: each shard
    ``accumulate``s its clients' scaled deltas into a float64 :class:`PartialSum`, and the server
    ``finish``es the sum of the partial sums (normalisation, noise). ``aggregate`` takes the clients'
    updates one by one, ``aggregate_batched`` a whole round's row-concatenated uploads
    (:class:`fedml.federated.batched.BatchedUpdate`) in one ``index_add``.
    """

    def _scales(self, num_examples: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-client scales, and how many clients were clipped."""
        raise NotImplementedError

    def _finish(self, acc: _Accumulator, num_examples: np.ndarray, device: str) -> None:
        """Whatever happens to the round's sum after all clients are in (normalisation, noise)."""

    def accumulate(self, updates: list[ClientUpdate], n_items: int, dim: int, device: str = "cpu") -> PartialSum:
        norms = np.array([u.norm() for u in updates], dtype=np.float64)
        num_examples = np.array([u.num_examples for u in updates], dtype=np.int64)
        scales, clipped = self._scales(num_examples, norms)
        acc = _Accumulator(n_items, dim, device)
        for update, scale in zip(updates, scales.tolist()):
            acc.add(update, scale)
        return PartialSum(acc.embeddings, acc.bias, num_examples, norms, clipped)

    def accumulate_batched(self, batch, n_items: int, dim: int, device: str = "cpu") -> PartialSum:
        norms = batch.norms().cpu().numpy()
        num_examples = np.asarray(batch.num_examples, dtype=np.int64)
        scales, clipped = self._scales(num_examples, norms)
        acc = _Accumulator(n_items, dim, device)
        per_row = torch.as_tensor(scales, dtype=torch.float64, device=batch.owner.device).index_select(0, batch.owner)
        acc.add_rows(batch.rows, batch.delta_embeddings, batch.delta_bias, per_row)
        return PartialSum(acc.embeddings, acc.bias, num_examples, norms, clipped)

    def finish(self, partials: list[PartialSum], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate:
        """Sum the shards' partial sums (in the given order) and finish the round's aggregate."""
        acc = _Accumulator(n_items, dim, device)
        for part in partials:
            acc.embeddings += part.embeddings.to(device)
            acc.bias += part.bias.to(device)
        num_examples = np.concatenate([p.num_examples for p in partials] or [np.zeros(0, np.int64)])
        norms = np.concatenate([p.norms for p in partials] or [np.zeros(0)])
        clipped = sum(p.clipped for p in partials)
        self._finish(acc, num_examples, device)
        n = len(num_examples)
        return RoundAggregate(
            acc.embeddings,
            acc.bias,
            num_clients=n,
            num_examples=int(num_examples.sum()),
            mean_update_norm=float(np.mean(norms)) if n else 0.0,
            clipped_fraction=clipped / n if n else 0.0,
        )

    def aggregate(self, updates: list[ClientUpdate], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate:
        return self.finish([self.accumulate(updates, n_items, dim, device)], n_items, dim, device)

    def aggregate_batched(self, batch, n_items: int, dim: int, device: str = "cpu") -> RoundAggregate:
        return self.finish([self.accumulate_batched(batch, n_items, dim, device)], n_items, dim, device)


class FedAvg(_WeightedDeltaSum):
    """Plain FedAvg over deltas: sum_k n_k * delta_k / sum_k n_k."""

    def _scales(self, num_examples: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, int]:
        return num_examples.astype(np.float64), 0

    def _finish(self, acc: _Accumulator, num_examples: np.ndarray, device: str) -> None:
        total = int(num_examples.sum())
        if total:
            acc.embeddings /= total
            acc.bias /= total


@dataclass
class DPFedAvg(_WeightedDeltaSum):
    """User-level DP-FedAvg: clip to ``clip_norm``, cap weights, noise the sum, fixed denominator.

    ``expected_weight`` is q * W, the expected total weight of a round (W = sum of every shopper's
    capped weight). Like the population size, it is treated as public.

    ``generator`` is where the noise comes from: a seeded ``torch.Generator`` (reproducible runs) or a
    :class:`~fedml.privacy.secure_noise.NoiseSource`, e.g. ``SecureNoise()`` for production, whose
    noise is unseeded and hardened against floating-point attacks.
    """

    clip_norm: float
    noise_multiplier: float
    weight_cap: float
    expected_weight: float
    generator: torch.Generator | NoiseSource

    @classmethod
    def for_population(
        cls,
        counts: np.ndarray,
        client_rate: float,
        *,
        clip_norm: float,
        noise_multiplier: float,
        weight_cap: float,
        generator: torch.Generator | NoiseSource,
    ) -> DPFedAvg:
        """The aggregator for a population with these per-shopper example counts, sampled at ``client_rate``."""
        weights = np.minimum(np.asarray(counts, dtype=np.float64) / weight_cap, 1.0)
        return cls(clip_norm, noise_multiplier, weight_cap, float(client_rate * weights.sum()), generator)

    def client_weight(self, num_examples: int | np.ndarray) -> float | np.ndarray:
        return np.minimum(num_examples / self.weight_cap, 1.0)

    def _scales(self, num_examples: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, int]:
        with np.errstate(divide="ignore"):
            factors = np.where(norms > 0, np.minimum(1.0, self.clip_norm / norms), 1.0)
        return self.client_weight(num_examples) * factors, int((factors < 1.0).sum())

    def _finish(self, acc: _Accumulator, num_examples: np.ndarray, device: str) -> None:
        std = self.noise_multiplier * self.clip_norm
        if std > 0:
            noise = as_noise_source(self.generator)
            acc.embeddings += noise.gaussian(acc.embeddings.shape, std, dtype=torch.float64, device=device)
            acc.bias += noise.gaussian(acc.bias.shape, std, dtype=torch.float64, device=device)
        acc.embeddings /= self.expected_weight
        acc.bias /= self.expected_weight

    @property
    def secure_noise(self) -> bool:
        """Whether the noise comes from a CSPRNG (``SecureNoise``) rather than a seeded generator."""
        return as_noise_source(self.generator).secure
