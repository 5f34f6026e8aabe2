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
        self.embeddings.index_add_(0, update.rows, update.delta_embeddings.double() * scale)
        self.bias.index_add_(0, update.rows, update.delta_bias.double() * scale)


class FedAvg:
    """Plain FedAvg over deltas: sum_k n_k * delta_k / sum_k n_k."""

    def aggregate(self, updates: list[ClientUpdate], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate:
        acc = _Accumulator(n_items, dim, device)
        total = sum(u.num_examples for u in updates)
        for update in updates:
            acc.add(update, update.num_examples / total if total else 0.0)
        norms = [u.norm() for u in updates]
        return RoundAggregate(
            acc.embeddings,
            acc.bias,
            num_clients=len(updates),
            num_examples=total,
            mean_update_norm=float(np.mean(norms)) if norms else 0.0,
        )


@dataclass
class DPFedAvg:
    """User-level DP-FedAvg: clip to ``clip_norm``, cap weights, noise the sum, fixed denominator.

    ``expected_weight`` is q * W, the expected total weight of a round (W = sum of every shopper's
    capped weight). Like the population size, it is treated as public.
    """

    clip_norm: float
    noise_multiplier: float
    weight_cap: float
    expected_weight: float
    generator: torch.Generator

    def client_weight(self, num_examples: int) -> float:
        return min(num_examples / self.weight_cap, 1.0)

    def aggregate(self, updates: list[ClientUpdate], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate:
        acc = _Accumulator(n_items, dim, device)
        norms, clipped = [], 0
        for update in updates:
            norm = update.norm()
            norms.append(norm)
            factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
            clipped += factor < 1.0
            acc.add(update, self.client_weight(update.num_examples) * factor)
        std = self.noise_multiplier * self.clip_norm
        if std > 0:
            acc.embeddings += _gaussian(acc.embeddings.shape, std, self.generator, device)
            acc.bias += _gaussian(acc.bias.shape, std, self.generator, device)
        acc.embeddings /= self.expected_weight
        acc.bias /= self.expected_weight
        return RoundAggregate(
            acc.embeddings,
            acc.bias,
            num_clients=len(updates),
            num_examples=sum(u.num_examples for u in updates),
            mean_update_norm=float(np.mean(norms)) if norms else 0.0,
            clipped_fraction=clipped / len(updates) if updates else 0.0,
        )


def _gaussian(shape: torch.Size, std: float, generator: torch.Generator, device: str) -> torch.Tensor:
    noise = torch.randn(shape, dtype=torch.float64, generator=generator)
    return (noise * std).to(device)
