"""The shoppers' devices' private state in simulation: each client's user vector.

The aggregator and the published model never read it, as on a real device. Vectors of a round's
clients move as one ``[clients, dim]`` tensor (:class:`UserVectors`), never as one tensor object
per client: at thousands of clients per round, per-client tensors cost more than the round's
arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class UserVectors:
    """Some clients' user vectors: row ``i`` is client ``i``'s own vector where ``known[i]``;
    a client without one (first round) starts from the fold-in of its history."""

    values: torch.Tensor  # [C, dim]; rows of unknown clients are zeros
    known: np.ndarray  # bool [C]

    def __len__(self) -> int:
        return len(self.known)

    def get(self, i: int) -> torch.Tensor | None:
        return self.values[i] if self.known[i] else None

    def __getitem__(self, part: slice) -> UserVectors:
        return UserVectors(self.values[part], self.known[part])

    @classmethod
    def of(
        cls, vectors: Sequence[torch.Tensor | None], dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> UserVectors:
        """From one optional vector per client."""
        values = torch.zeros(len(vectors), dim, dtype=dtype, device=device)
        known = np.array([v is not None for v in vectors], dtype=bool)
        if known.any():
            own = torch.stack([v for v in vectors if v is not None]).to(device=device, dtype=dtype)
            values[torch.as_tensor(np.flatnonzero(known), device=device)] = own
        return cls(values, known)


class DeviceStore:
    """Every client's user vector after its last round, in one growing tensor (a slot per client
    seen so far: memory grows with the clients that trained, not with the population)."""

    def __init__(self) -> None:
        self._slot: dict[int, int] = {}
        self._values: torch.Tensor | None = None  # [capacity, dim]

    def __len__(self) -> int:
        return len(self._slot)

    def get_many(self, clients: Sequence[int], dim: int, dtype: torch.dtype, device: torch.device | str) -> UserVectors:
        """The clients' vectors (zeros and ``known`` false for a client never stored)."""
        slots = np.fromiter((self._slot.get(c, -1) for c in clients), dtype=np.int64, count=len(clients))
        known = slots >= 0
        values = torch.zeros(len(clients), dim, dtype=dtype, device=device)
        if self._values is not None and known.any():
            rows = torch.as_tensor(slots[known], device=self._values.device)
            values[torch.as_tensor(np.flatnonzero(known), device=device)] = self._values.index_select(0, rows).to(
                device=device, dtype=dtype
            )
        return UserVectors(values, known)

    def put_many(self, clients: Sequence[int], vectors: torch.Tensor) -> None:
        """Store each client's new vector (row ``i`` of ``vectors`` is ``clients[i]``'s)."""
        vectors = vectors.detach()
        for client in clients:
            if client not in self._slot:
                self._slot[client] = len(self._slot)
        needed = len(self._slot)
        if self._values is None or needed > len(self._values):
            capacity = max(needed, 2 * (0 if self._values is None else len(self._values)), 1024)
            grown = torch.zeros(capacity, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
            if self._values is not None:
                grown[: len(self._values)] = self._values
            self._values = grown
        slots = np.fromiter((self._slot[c] for c in clients), dtype=np.int64, count=len(clients))
        self._values.index_copy_(0, torch.as_tensor(slots, device=self._values.device), vectors.to(self._values))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stored client and its vector (CPU tensors), for checkpoints of a simulation."""
        clients = torch.empty(len(self._slot), dtype=torch.int64)
        for client, slot in self._slot.items():
            clients[slot] = client
        values = torch.zeros(0, 0) if self._values is None else self._values[: len(self._slot)].cpu().clone()
        return {"clients": clients, "values": values}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> DeviceStore:
        """The store a :meth:`state_dict` describes, its vectors on ``device``."""
        store = cls()
        if len(state["clients"]):
            store.put_many(state["clients"].tolist(), state["values"].to(device))
        return store

    def get(self, client: int) -> torch.Tensor | None:
        """One client's vector (a copy), or None."""
        slot = self._slot.get(client)
        return None if slot is None or self._values is None else self._values[slot].clone()

    def put(self, client: int, vector: torch.Tensor) -> None:
        self.put_many([client], vector[None, :])
