"""One client's local training: the code a shopper's device runs in a round.

The device receives the global item table, trains its private user vector and the item rows it
touches for a few local epochs on its own positives (logistic loss, negatives sampled uniformly
from the items it has not interacted with),
and uploads only the change of those item rows. The user vector stays on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedml.federated.randomness import LocalDraws
from fedml.models.ease import KIND as EASE
from fedml.models.ease import gram_rows
from fedml.models.mf import ItemTable, fold_in

#: fold-in steps (a cap) for a first-time client's starting vector: the exact Newton step from ``p = 0``
#: and one BFGS step; local SGD refines the vector, while evaluation and serving fold in to convergence.
#: (The Newton step alone cost about 0.005 HR@10 on the default run; two steps cost none.)
CLIENT_INIT_ITERATIONS = 2


@dataclass(frozen=True)
class LocalTraining:
    """Hyper-parameters of the local update (the same for every client of a round)."""

    epochs: int
    lr: float
    batch_size: int
    negatives: int
    l2: float
    fold_in_l2: float = 1.0
    init_iterations: int = CLIENT_INIT_ITERATIONS  # fold-in steps (a cap) for a first-time client's start
    model: Literal["mf", "ease"] = "mf"  # ease: no local training, the device uploads its co-occurrences


@dataclass
class ClientUpdate:
    """What a client uploads: deltas of the item rows it touched, and its example count n_k."""

    rows: torch.Tensor  # int64 [r]: item indices touched
    delta_embeddings: torch.Tensor  # [r, dim]
    delta_bias: torch.Tensor  # [r]
    num_examples: int
    loss: float

    def norm(self) -> float:
        """L2 norm of the whole update (all touched rows, embeddings and biases)."""
        return float(torch.sqrt(self.delta_embeddings.double().pow(2).sum() + self.delta_bias.double().pow(2).sum()))


def client_update(
    table: ItemTable,
    positives: np.ndarray,
    user_vector: torch.Tensor | None,
    config: LocalTraining,
    draws: LocalDraws,
) -> tuple[ClientUpdate, torch.Tensor]:
    """Run local training for one client; returns its upload and its new (private) user vector.

    ``positives`` are the client's sorted item indices; ``draws`` its mini-batch orders and
    negatives for this round (:func:`fedml.federated.randomness.draw_round`). A client seen for the
    first time starts from the fold-in of its history under the current global items (at most
    ``config.init_iterations`` steps of it). Gradients are
    written out by hand (the model is two embedding lookups and a dot product), which keeps one
    client update cheap.

    With ``config.model == "ease"`` there is nothing to train: the upload is :func:`gram_update` and the
    user vector stays as it was (zeros for a first-time client).
    """
    if config.model == EASE:
        if user_vector is None:
            user_vector = torch.zeros(table.dim, dtype=table.embeddings.dtype, device=table.embeddings.device)
        return gram_update(positives, table.n_items), user_vector
    positives = np.asarray(positives, dtype=np.int64)
    if user_vector is None:
        user_vector = fold_in(
            table, [positives], negatives=config.negatives, l2=config.fold_in_l2, iterations=config.init_iterations
        )[0]
    p = user_vector.clone().to(table.embeddings.dtype)

    order, negatives = draws.order, draws.negatives
    rows, local = np.unique(np.concatenate([positives, negatives.ravel()]), return_inverse=True)
    local_pos = local[: len(positives)]
    local_neg = local[len(positives) :].reshape(negatives.shape)

    rows_t = torch.as_tensor(rows, device=table.embeddings.device)
    q0 = table.embeddings[rows_t]
    b0 = table.bias[rows_t]
    q, b = q0.clone(), b0.clone()
    total_loss, steps = 0.0, 0
    for epoch in range(config.epochs):
        for start in range(0, len(positives), config.batch_size):
            idx = order[epoch, start : start + config.batch_size]
            pos = torch.as_tensor(local_pos[idx], device=q.device)
            neg = torch.as_tensor(local_neg[epoch, idx], device=q.device)
            loss = _sgd_step(q, b, p, pos, neg, config)
            total_loss += loss
            steps += 1
    update = ClientUpdate(
        rows=rows_t,
        delta_embeddings=q - q0,
        delta_bias=b - b0,
        num_examples=int(len(positives)),
        loss=total_loss / max(steps, 1),
    )
    return update, p


def gram_update(positives: np.ndarray, n_items: int) -> ClientUpdate:
    """An EASE device's upload: its history's co-occurrences ``x^T x / n`` (see :mod:`fedml.models.ease`)."""
    rows, block, counts = gram_rows(positives, n_items)
    return ClientUpdate(rows=rows, delta_embeddings=block, delta_bias=counts, num_examples=len(rows), loss=0.0)


class GramUploads(Sequence[ClientUpdate]):
    """The EASE uploads of some clients, each built when read: a whole round's ``[n, n_items]`` blocks
    would not fit in memory at once, one client's does."""

    def __init__(self, positives: Sequence[np.ndarray], n_items: int) -> None:
        self.positives, self.n_items = positives, n_items

    def __len__(self) -> int:
        return len(self.positives)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return gram_update(self.positives[index], self.n_items)


def _sgd_step(
    q: torch.Tensor, b: torch.Tensor, p: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, config: LocalTraining
) -> float:
    """One SGD step in place on (q, b, p) for a batch of positives with their negatives.

    Loss per positive: -log s(p.q_i + b_i) - sum_j log(1 - s(p.q_j + b_j)), averaged over the batch,
    plus l2/2 times the squared norm of the rows and the user vector used.
    """
    batch = pos.shape[0]
    q_pos, q_neg = q[pos], q[neg]  # [B, d], [B, k, d]
    s_pos = q_pos @ p + b[pos]
    s_neg = q_neg @ p + b[neg]
    g_pos = (torch.sigmoid(s_pos) - 1.0) / batch  # d loss / d score
    g_neg = torch.sigmoid(s_neg) / batch
    loss = float((torch.nn.functional.softplus(-s_pos).sum() + torch.nn.functional.softplus(s_neg).sum()) / batch)

    grad_p = g_pos @ q_pos + torch.einsum("bk,bkd->d", g_neg, q_neg) + config.l2 * p
    flat_rows = torch.cat([pos, neg.reshape(-1)])
    flat_g = torch.cat([g_pos, g_neg.reshape(-1)])
    grad_q = torch.zeros_like(q).index_add_(0, flat_rows, flat_g[:, None] * p[None, :])
    grad_b = torch.zeros_like(b).index_add_(0, flat_rows, flat_g)
    touched = torch.zeros_like(b).index_fill_(0, flat_rows, 1.0)
    grad_q += config.l2 * touched[:, None] * q

    q -= config.lr * grad_q
    b -= config.lr * grad_b
    p -= config.lr * grad_p
    return loss
