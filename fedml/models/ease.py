"""EASE (Steck 2019) as a federated model: item-item weights, no user parameters at all.

score(u, ·) = x_u B, where x_u is the shopper's history as a 0/1 row over the catalogue and

    B = I - P diag(1 / diag P),   P = (G + lambda I)^-1,   G = sum_u x_u^T x_u   (diag B = 0).

EASE needs the data only through the item Gram matrix ``G``, a sum over shoppers, so FedAvg recovers it:
each device uploads its own co-occurrences ``x_u^T x_u / n_u`` (the rows of its history's items, each a
dense row over the catalogue; :func:`gram_rows`), the server averages them with the usual aggregator
(FedAvg weights n_u, so the mean is ``G / sum n_u``; DP-FedAvg clips, weights and noises it like any
update) and the global table accumulates them. The weights ``B`` are a post-processing of that table
(:func:`ease_table`), so they cost no privacy beyond the aggregate's. ``lambda`` is relative:
``l2`` times the table's mean diagonal (a mean item count), which makes ``B`` independent of the
table's scale (the aggregator's denominator, the server rate, the number of rounds).

As an :class:`~fedml.models.mf.ItemTable`: while training, ``embeddings`` is the ``[n_items, n_items]``
Gram estimate and ``bias`` the item counts (its diagonal, which the canary audit reads); published,
``embeddings`` is ``B^T``, ``bias`` zero and ``kind`` ``"ease"``, so that ``score_all(table, history_vectors(...))``
is ``x_u B`` (what :class:`~fedml.serving.recommender.Recommender` does for such a table).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedml.data.interactions import UserItems
from fedml.data.ragged import Ragged
from fedml.models.mf import ItemTable

#: the configuration's name of this model (``model.kind``)
KIND = "ease"


def init_gram_table(n_items: int) -> ItemTable:
    """The empty Gram table training starts from (it owes nothing to any seed)."""
    return ItemTable(torch.zeros(n_items, n_items), torch.zeros(n_items))


def gram_rows(positives: np.ndarray, n_items: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """One shopper's contribution ``x^T x / n`` to the Gram table, as the rows it touches.

    Returns ``(rows, block, counts)``: the history's item indices (sorted, distinct), their rows of
    ``x^T x / n`` (``[n, n_items]``: ``1 / n`` at the history's columns) and the diagonal ``x / n``
    restricted to them (``[n]``). Its Frobenius norm is ``sqrt(1 + 1/n)`` whatever the history.
    """
    rows = np.unique(np.asarray(positives, dtype=np.int64))
    n = len(rows)
    block = torch.zeros(n, n_items, dtype=dtype)
    if n:
        block[:, torch.as_tensor(rows)] = 1.0 / n
    return torch.as_tensor(rows), block, torch.full((n,), 1.0 / max(n, 1), dtype=dtype)


def ease_weights(gram: torch.Tensor, l2: float) -> torch.Tensor:
    """``B`` (float64 ``[n, n]``, zero diagonal) from a Gram matrix, with ``lambda = l2 * mean(diag gram)``.

    ``gram`` may be any positive multiple of ``G`` (and noisy): it is symmetrised first.
    """
    if l2 <= 0:
        raise ValueError(f"model.ease_l2 must be positive, got {l2}")
    g = gram.detach().to("cpu", torch.float64)
    g = (g + g.T) / 2
    scale = float(g.diagonal().mean())
    if not scale > 0:
        raise ValueError("the Gram table is empty (no shopper contributed): cannot compute EASE weights")
    g.diagonal().add_(l2 * scale)
    p = torch.linalg.inv(g)
    b = -p / p.diagonal()[None, :]
    b.fill_diagonal_(0.0)
    return b


def ease_table(gram_table: ItemTable, l2: float) -> ItemTable:
    """The published table of a trained Gram table: ``embeddings = B^T`` (float32), ``bias = 0``.

    A table cut to its first rows (:func:`fedml.privacy.audit.strip_canaries` drops the canary items) keeps
    as many columns: the Gram matrix of those items.
    """
    b = ease_weights(gram_table.embeddings[:, : gram_table.n_items], l2)
    return ItemTable(b.T.contiguous().float(), torch.zeros(gram_table.n_items), KIND)


def gram_of(data: UserItems) -> ItemTable:
    """The Gram table of pooled data, ``sum_u x_u^T x_u`` (the centralised reference), in one product."""
    x = history_vectors(Ragged(data.items, data.indptr), data.n_items).double()
    gram = x.T @ x
    return ItemTable(gram.float(), gram.diagonal().float().clone())


def history_vectors(histories: Sequence[np.ndarray], n_items: int) -> torch.Tensor:
    """float32 ``[len(histories), n_items]``: each history as a 0/1 row (EASE's "user vector")."""
    rows = Ragged.of(histories)
    x = torch.zeros(len(rows.sizes), n_items)
    users = np.repeat(np.arange(len(rows.sizes)), rows.sizes)
    x[torch.as_tensor(users), torch.as_tensor(rows.flat, dtype=torch.int64)] = 1.0
    return x
