"""Matrix factorisation for implicit feedback, split into a global and a private part.

score(u, i) = p_u . q_i + b_i

* The **item table** (q_i, b_i for every product) is the global model: it is what the server
  aggregates, what DP protects, and what is published.
* The **user vector** p_u is shopper-specific. It never leaves the device: clients keep it, and the
  server (evaluation, serving) recovers one from a shopper's history alone by *fold-in*, so that a
  shopper the server has never seen gets recommendations too.

Training uses the logistic loss with uniformly sampled negatives: for each positive item of a
shopper, ``negatives`` items drawn uniformly from the catalogue are pushed down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ItemTable:
    """The global model: item embeddings ``[n_items, dim]`` and item biases ``[n_items]``."""

    embeddings: torch.Tensor
    bias: torch.Tensor

    @property
    def n_items(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def clone(self) -> ItemTable:
        return ItemTable(self.embeddings.clone(), self.bias.clone())

    def to(self, device: str | torch.device) -> ItemTable:
        return ItemTable(self.embeddings.to(device), self.bias.to(device))

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {
            "item_embeddings": self.embeddings.detach().cpu().numpy().astype(np.float32),
            "item_bias": self.bias.detach().cpu().numpy().astype(np.float32),
        }

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray]) -> ItemTable:
        return cls(
            torch.as_tensor(np.asarray(arrays["item_embeddings"], dtype=np.float32)),
            torch.as_tensor(np.asarray(arrays["item_bias"], dtype=np.float32)),
        )


def init_item_table(n_items: int, dim: int, scale: float, seed: int) -> ItemTable:
    """Small Gaussian item embeddings and zero biases, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n_items, dim, generator=generator) * scale
    return ItemTable(embeddings, torch.zeros(n_items))


def fold_in(
    table: ItemTable,
    histories: list[np.ndarray],
    *,
    negatives: int,
    l2: float,
    iterations: int = 4,
    chunk_size: int = 512,
) -> torch.Tensor:
    """User vectors for shoppers known only by their histories (item indices), item table frozen.

    Minimises each shopper's *expected* training loss over the uniform negative sampling,
    ``-sum_{i in H} log s(p.q_i + b_i) - c * sum_{j not in H} log(1 - s(p.q_j + b_j)) + l2/2 |p|^2``
    with ``c = negatives * |H| / (n_items - |H|)``, by Newton's method from ``p = 0``. It is
    deterministic (4 iterations reach 1e-6 of the converged vector on the default shop), needs
    nothing but the published item table and the history, and is the same
    computation for evaluation, serving and a new shopper. Returns ``[len(histories), dim]``.
    """
    q, b = table.embeddings.float(), table.bias.float()
    n_items, dim = q.shape
    out = torch.zeros(len(histories), dim, dtype=q.dtype, device=q.device)
    eye = torch.eye(dim, dtype=q.dtype, device=q.device)
    # Hessians as one matrix product: curvature [chunk, n_items] @ outer products [n_items, dim^2]
    outer = (q[:, :, None] * q[:, None, :]).reshape(n_items, dim * dim)
    # keep the [chunk, n_items] intermediates near 64 MiB of floats
    chunk_size = max(1, min(chunk_size, 16_000_000 // max(1, n_items)))
    for start in range(0, len(histories), chunk_size):
        chunk = histories[start : start + chunk_size]
        positive = torch.zeros(len(chunk), n_items, dtype=q.dtype, device=q.device)
        sizes = [len(items) for items in chunk]
        if sum(sizes):
            rows = np.repeat(np.arange(len(chunk)), sizes)
            cols = np.concatenate([np.asarray(items, dtype=np.int64) for items in chunk])
            positive[torch.as_tensor(rows, device=q.device), torch.as_tensor(cols, device=q.device)] = 1.0
        n_pos = positive.sum(1, keepdim=True)
        neg_weight = negatives * n_pos / (n_items - n_pos).clamp(min=1.0)
        weight_neg = (1.0 - positive) * neg_weight  # per-item weight of the negative term
        p = torch.zeros(len(chunk), dim, dtype=q.dtype, device=q.device)
        for _ in range(iterations):
            s = torch.sigmoid(p @ q.T + b)
            residual = positive * (s - 1.0) + weight_neg * s  # d loss / d score
            grad = residual @ q + l2 * p
            curvature = (positive + weight_neg) * s * (1.0 - s)
            hessian = (curvature @ outer).view(-1, dim, dim) + l2 * eye
            p = p - torch.cholesky_solve(grad.unsqueeze(-1), torch.linalg.cholesky(hessian)).squeeze(-1)
        out[start : start + len(chunk)] = p
    return out


def score_all(table: ItemTable, user_vectors: torch.Tensor) -> torch.Tensor:
    """Scores of every catalogue item for each user vector: ``[n_users, n_items]``."""
    return user_vectors @ table.embeddings.T + table.bias
