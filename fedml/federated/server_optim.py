"""Server optimisers: how the server moves the global item table by a round's aggregate.

The round's aggregate (the mean client delta, or DP-FedAvg's noised one) is the negative of a
pseudo-gradient; the server applies it with an optimiser (Reddi et al. 2021, "Adaptive federated
optimization"):

* ``sgd``: ``x += lr * delta`` (FedAvg with a server learning rate);
* ``momentum``: FedAvgM (Hsu et al. 2019), ``m = beta1 * m + delta``, ``x += lr * m``;
* ``adam``: FedAdam, ``m = beta1 * m + (1 - beta1) * delta``, ``v = beta2 * v + (1 - beta2) * delta^2``,
  ``x += lr * m / (sqrt(v) + tau)`` per coordinate (no bias correction, as in the paper).

An optimiser reads only the aggregate the server already holds, so under DP-FedAvg it is
post-processing of the noised sum and the privacy guarantee is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from fedml.models.mf import ItemTable

ServerOptimizerName = Literal["sgd", "momentum", "adam"]


class ServerOptimizer(Protocol):
    def step(self, table: ItemTable, delta_embeddings: torch.Tensor, delta_bias: torch.Tensor) -> None:
        """Move ``table`` in place by one round's aggregate delta."""

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state (CPU tensors), for checkpoints."""

    def load_state_dict(self, state: dict[str, Any], device: str | torch.device = "cpu") -> None:
        """Continue from a :meth:`state_dict`."""


@dataclass
class ServerSGD:
    lr: float

    def step(self, table: ItemTable, delta_embeddings: torch.Tensor, delta_bias: torch.Tensor) -> None:
        table.embeddings += self.lr * delta_embeddings.to(table.embeddings.dtype)
        table.bias += self.lr * delta_bias.to(table.bias.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: str | torch.device = "cpu") -> None:
        pass


@dataclass
class ServerMomentum:
    lr: float
    beta1: float = 0.9
    _state: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def step(self, table: ItemTable, delta_embeddings: torch.Tensor, delta_bias: torch.Tensor) -> None:
        deltas = (delta_embeddings, delta_bias)
        if not self._state:
            self._state = [torch.zeros_like(d, dtype=torch.float64) for d in deltas]
        for momentum, delta, param in zip(self._state, deltas, (table.embeddings, table.bias)):
            momentum.mul_(self.beta1).add_(delta.to(torch.float64))
            param += self.lr * momentum.to(param.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": [m.cpu().clone() for m in self._state]}

    def load_state_dict(self, state: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self._state = [m.to(device) for m in state["momentum"]]


@dataclass
class ServerAdam:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: the larger, the closer to momentum SGD
    _state: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def step(self, table: ItemTable, delta_embeddings: torch.Tensor, delta_bias: torch.Tensor) -> None:
        deltas = (delta_embeddings, delta_bias)
        if not self._state:
            self._state = [(torch.zeros_like(d, dtype=torch.float64), torch.zeros_like(d, dtype=torch.float64))
                           for d in deltas]  # fmt: skip
        for (m, v), delta, param in zip(self._state, deltas, (table.embeddings, table.bias)):
            delta = delta.to(torch.float64)
            m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(delta, delta, value=1.0 - self.beta2)
            param += (self.lr * m / (v.sqrt() + self.tau)).to(param.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"moments": [(m.cpu().clone(), v.cpu().clone()) for m, v in self._state]}

    def load_state_dict(self, state: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self._state = [(m.to(device), v.to(device)) for m, v in state["moments"]]


def server_optimizer(
    name: ServerOptimizerName, lr: float, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """The optimiser called ``name`` (``federated.server_optimizer``) with its settings."""
    if lr <= 0:
        raise ValueError(f"federated.server_lr must be positive, got {lr}")
    if name == "sgd":
        return ServerSGD(lr)
    if name == "momentum":
        return ServerMomentum(lr, beta1)
    if name == "adam":
        if tau <= 0:
            raise ValueError(f"federated.server_tau must be positive, got {tau}")
        return ServerAdam(lr, beta1, beta2, tau)
    raise ValueError(f"federated.server_optimizer must be one of sgd, momentum, adam; got {name!r}")


__all__ = ["ServerOptimizer", "ServerOptimizerName", "ServerSGD", "ServerMomentum", "ServerAdam", "server_optimizer"]
