"""All clients of a round trained together as one batched computation (the simulation's fast path).

It computes what :func:`fedml.federated.client.client_update` computes for each client, one at a
time, from the same random draws (:func:`fedml.federated.randomness.draw_round`). Only the
arithmetic is batched:

* every client gets a private copy of the item rows it touches; the copies of all clients sit in one
  ``[sum_r, dim]`` tensor (client by client, rows sorted by item within a client: the row order of
  the reference's ``np.unique``), so clients never see each other's steps;
* SGD step ``s`` of every client runs at once (a client's steps are its epochs' mini-batches in
  order; a client with fewer steps has finished and sits out the later ones). Each step works on the
  step's touched rows only and accumulates every row's gradient in the reference's order (the
  batch's positives, then its negatives);
* update norms, losses and clipping factors are segment sums over the clients' rows.

First-time clients are folded in together (:func:`fedml.models.mf.fold_in` of all their histories).
Results agree with the one-client-at-a-time reference to
float rounding (matrix products summed in another order), not bit for bit.

The reference path stays the definition (and what a real device runs); this module is for
simulating many clients per round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedml.federated.client import ClientUpdate, LocalTraining
from fedml.federated.randomness import LocalDraws
from fedml.models.mf import ItemTable, fold_in


@dataclass
class BatchedUpdate:
    """The uploads of all clients of a round, row-concatenated.

    Client ``i`` owns rows ``offsets[i]:offsets[i + 1]`` (``owner`` says the same per row); its
    :meth:`client` view is exactly the :class:`ClientUpdate` the reference would upload.
    """

    rows: torch.Tensor  # int64 [R]: item index of each row
    owner: torch.Tensor  # int64 [R]: position of the row's client in the round
    offsets: np.ndarray  # int64 [C + 1]
    delta_embeddings: torch.Tensor  # [R, dim]
    delta_bias: torch.Tensor  # [R]
    num_examples: np.ndarray  # int64 [C]
    losses: np.ndarray  # float64 [C]

    def __len__(self) -> int:
        return len(self.num_examples)

    def norms(self) -> torch.Tensor:
        """float64 ``[C]``: each client's update norm (all its rows, embeddings and biases)."""
        per_row = self.delta_embeddings.double().pow(2).sum(1) + self.delta_bias.double().pow(2)
        squares = torch.zeros(len(self), dtype=torch.float64, device=per_row.device)
        return squares.index_add_(0, self.owner, per_row).sqrt()

    def client(self, i: int) -> ClientUpdate:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return ClientUpdate(
            rows=self.rows[start:stop],
            delta_embeddings=self.delta_embeddings[start:stop],
            delta_bias=self.delta_bias[start:stop],
            num_examples=int(self.num_examples[i]),
            loss=float(self.losses[i]),
        )

    def clients(self) -> list[ClientUpdate]:
        return [self.client(i) for i in range(len(self))]


@dataclass
class _Step:
    """Index tensors of one SGD step of all clients still training (views into shared buffers)."""

    active: torch.Tensor  # [A]: client positions taking this step
    batch_size: torch.Tensor  # [A] float: each active client's mini-batch size
    rows: torch.Tensor  # [U]: the rows touched in this step (into the [R] copies)
    example_client: torch.Tensor  # [N(1 + k)]: per entry of `flat`, position in `active`
    example_size: torch.Tensor  # [N] float: the mini-batch size of each positive's client
    flat: torch.Tensor  # [N(1 + k)]: positives then negatives, as positions in `rows`
    n: int  # positives in this step


def batched_client_updates(
    table: ItemTable,
    clients: Sequence[np.ndarray],
    user_vectors: Sequence[torch.Tensor | None],
    config: LocalTraining,
    draws: Sequence[LocalDraws],
) -> tuple[BatchedUpdate, list[torch.Tensor]]:
    """Local training of all ``clients`` (their positives, in round order) at once.

    Equivalent to ``[client_update(table, clients[i], user_vectors[i], config, draws[i]) for i ...]``:
    it returns the same uploads (as one :class:`BatchedUpdate`) and the same new user vectors, up
    to float rounding. Tensors live on the item table's device.
    """
    if not len(clients) == len(user_vectors) == len(draws):
        raise ValueError(f"{len(clients)} clients, {len(user_vectors)} user vectors and {len(draws)} draws")
    device, dtype = table.embeddings.device, table.embeddings.dtype
    positives = [np.asarray(p, dtype=np.int64) for p in clients]
    vectors = _initial_vectors(table, positives, user_vectors, config)

    orders = [d.order for d in draws]
    negatives = [d.negatives for d in draws]

    plan = _plan(positives, orders, negatives, table.n_items, config, device)
    n_clients = len(positives)
    p = (
        torch.stack([v.to(device=device, dtype=dtype) for v in vectors])
        if n_clients
        else torch.zeros(0, table.dim, dtype=dtype, device=device)
    )
    q0 = table.embeddings[plan.rows]
    b0 = table.bias[plan.rows]
    q, b = q0.clone(), b0.clone()
    loss_sums = torch.zeros(n_clients, dtype=torch.float64, device=device)
    for step in plan.steps:
        _batched_sgd_step(q, b, p, loss_sums, step, config)

    num_examples = np.array([len(pos) for pos in positives], dtype=np.int64)
    losses = loss_sums.cpu().numpy() / np.maximum(plan.steps_per_client, 1)
    update = BatchedUpdate(
        rows=plan.rows,
        owner=plan.owner,
        offsets=plan.offsets,
        delta_embeddings=q - q0,
        delta_bias=b - b0,
        num_examples=num_examples,
        losses=losses,
    )
    return update, list(p.unbind(0))


def _initial_vectors(
    table: ItemTable, positives: list[np.ndarray], user_vectors: Sequence[torch.Tensor | None], config: LocalTraining
) -> list[torch.Tensor]:
    """Each client's starting vector: its own, or for a first-time client the fold-in of its history.

    All first-time clients are folded in by one call (fold-in is deterministic and draws nothing).
    """
    new = [i for i, v in enumerate(user_vectors) if v is None]
    vectors = list(user_vectors)
    if new:
        folded = fold_in(
            table,
            [positives[i] for i in new],
            negatives=config.negatives,
            l2=config.fold_in_l2,
            iterations=config.fold_in_iterations,
        )
        for i, vector in zip(new, folded):
            vectors[i] = vector
    return vectors  # type: ignore[return-value]


@dataclass
class _Plan:
    rows: torch.Tensor  # [R]: item of each private row copy
    owner: torch.Tensor  # [R]
    offsets: np.ndarray  # [C + 1]
    steps_per_client: np.ndarray  # [C]
    steps: list[_Step]


def _plan(
    positives: list[np.ndarray],
    orders: list[np.ndarray],
    negatives: list[np.ndarray],
    n_items: int,
    config: LocalTraining,
    device: torch.device,
) -> _Plan:
    """Turn the draws into row copies and per-step index tensors (numpy, then one transfer each)."""
    k, epochs, bs = config.negatives, config.epochs, config.batch_size
    n_clients = len(positives)
    n = np.array([len(pos) for pos in positives], dtype=np.int64)

    # Private row copies: unique (client, item) keys; sorted, so client-major and item-sorted within
    # a client, as the reference's np.unique orders one client's rows.
    touched = n * (1 + epochs * k)  # entries of concat(positives, negatives.ravel()) per client
    touched_start = np.concatenate([[0], np.cumsum(touched)])
    items = np.concatenate(
        [np.concatenate([pos, neg.ravel()]) for pos, neg in zip(positives, negatives)] or [np.zeros(0, np.int64)]
    )
    keys = np.repeat(np.arange(n_clients, dtype=np.int64), touched) * n_items + items.astype(np.int64)
    unique_keys, row_of = np.unique(keys, return_inverse=True)
    row_owner, row_item = np.divmod(unique_keys, n_items)
    offsets = np.searchsorted(row_owner, np.arange(n_clients + 1)).astype(np.int64)

    # Every training example (client c, epoch e, position i of the epoch's permutation) ...
    per_client = epochs * n
    owner = np.repeat(np.arange(n_clients, dtype=np.int64), per_client)
    t = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(per_client) - per_client, per_client)
    n_ex = n[owner]
    epoch, position = np.divmod(t, np.maximum(n_ex, 1))
    j = np.concatenate([o.ravel() for o in orders] or [np.zeros(0, np.int64)]).astype(np.int64)
    base = touched_start[:-1][owner]
    pos_row = row_of[base + j]
    neg_row = row_of[(base + n_ex + (epoch * n_ex + j) * k)[:, None] + np.arange(k)]
    # ... belongs to step epoch * batches + position // batch_size of its client
    batches = -(-n // bs)
    batch_index = position // bs
    step = epoch * batches[owner] + batch_index
    size = np.minimum(bs, n_ex - batch_index * bs)
    steps_per_client = epochs * batches

    by_step = np.argsort(step, kind="stable")  # stable: clients in order, a batch in its order
    owner, pos_row, neg_row, size, step = (a[by_step] for a in (owner, pos_row, neg_row, size, step))
    n_steps = int(steps_per_client.max()) if n_clients else 0
    bounds = np.searchsorted(step, np.arange(n_steps + 1))

    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("active", "bsize", "rows", "client", "size", "flat")}
    for s in range(n_steps):
        lo, hi = bounds[s], bounds[s + 1]
        ex_owner = owner[lo:hi]
        active, ex_client = np.unique(ex_owner, return_inverse=True)
        step_rows, flat = np.unique(np.concatenate([pos_row[lo:hi], neg_row[lo:hi].ravel()]), return_inverse=True)
        first = np.searchsorted(ex_owner, active)  # all of a client's examples share its batch size
        parts["active"].append(active)
        parts["bsize"].append(size[lo:hi][first])
        parts["rows"].append(step_rows)
        parts["client"].append(np.concatenate([ex_client, np.repeat(ex_client, k)]))
        parts["size"].append(size[lo:hi])
        parts["flat"].append(flat)

    def upload(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
        arrays = parts[name]
        if not arrays:
            return []
        whole = torch.as_tensor(np.concatenate(arrays)).to(device=device, dtype=dtype)
        return list(torch.split(whole, [len(a) for a in arrays]))

    float_dtype = torch.float32
    columns = zip(
        upload("active", torch.int64),
        upload("bsize", float_dtype),
        upload("rows", torch.int64),
        upload("client", torch.int64),
        upload("size", float_dtype),
        upload("flat", torch.int64),
    )
    steps = [
        _Step(active=a, batch_size=bsz, rows=r, example_client=c, example_size=sz, flat=f, n=len(sz))
        for a, bsz, r, c, sz, f in columns
    ]
    return _Plan(
        rows=torch.as_tensor(row_item, dtype=torch.int64).to(device),
        owner=torch.as_tensor(row_owner, dtype=torch.int64).to(device),
        offsets=offsets,
        steps_per_client=steps_per_client,
        steps=steps,
    )


def _batched_sgd_step(
    q: torch.Tensor, b: torch.Tensor, p: torch.Tensor, loss_sums: torch.Tensor, step: _Step, config: LocalTraining
) -> None:
    """:func:`fedml.federated.client._sgd_step` for every active client at once, in place.

    ``q``/``b`` are all clients' private row copies, ``p`` all clients' user vectors. Per client it
    is the reference's step: gradients from the old values, each touched row's gradient summed over
    the batch's positives and then its negatives, ``l2`` once per touched row, then one SGD update.
    """
    n, k = step.n, config.negatives
    size = step.example_size.to(q.dtype)
    p_active = p[step.active]
    q_step, b_step = q[step.rows], b[step.rows]
    p_flat = p_active[step.example_client]  # [N(1 + k), d]: the user vector of each entry's client
    q_flat = q_step[step.flat]
    scores = (q_flat * p_flat).sum(1) + b_step[step.flat]
    s_pos, s_neg = scores[:n], scores[n:].view(n, k)
    g_pos = (torch.sigmoid(s_pos) - 1.0) / size
    g_neg = torch.sigmoid(s_neg) / size[:, None]
    example_loss = torch.nn.functional.softplus(-s_pos) + torch.nn.functional.softplus(s_neg).sum(1)
    client_loss = torch.zeros(len(step.active), dtype=q.dtype, device=q.device)
    client_loss.index_add_(0, step.example_client[:n], example_loss)
    loss_sums.index_add_(0, step.active, (client_loss / step.batch_size.to(q.dtype)).double())

    flat_g = torch.cat([g_pos, g_neg.reshape(-1)])
    weighted = flat_g[:, None] * q_flat  # d loss / d p, per entry
    grad_p = torch.zeros_like(p_active).index_add_(0, step.example_client, weighted) + config.l2 * p_active
    grad_q = torch.zeros_like(q_step).index_add_(0, step.flat, flat_g[:, None] * p_flat)
    grad_b = torch.zeros_like(b_step).index_add_(0, step.flat, flat_g)
    grad_q += config.l2 * q_step  # every row of step.rows is touched

    q.index_copy_(0, step.rows, q_step - config.lr * grad_q)
    b.index_copy_(0, step.rows, b_step - config.lr * grad_b)
    p.index_copy_(0, step.active, p_active - config.lr * grad_p)
