"""All clients of a round trained together as one batched computation (the simulation's fast path).

It computes what :func:`fedml.federated.client.client_update` computes for each client, one at a
time, from the same random draws (:func:`fedml.federated.randomness.draw_round`). Only the
arithmetic is batched:

* every client gets a private copy of the item rows it touches; the copies of all clients sit in one
  ``[sum_r, dim]`` tensor (client by client, rows sorted by item within a client: the row order of
  the reference's ``np.unique``), so clients never see each other's steps;
* SGD step ``s`` of every client runs at once, in batches of :data:`CLIENT_GROUP` clients that keep
  the working set in cache (a client's steps are its epochs' mini-batches in order; a client with
  fewer steps has finished and sits out the later ones). Each step works on the step's touched rows
  only. A row copy belongs to one client, so a row's gradient is the sum of its entries' score
  gradients (the batch's positives, then its negatives) times the client's vector;
* update norms, losses and clipping factors are segment sums over the clients' rows.

First-time clients are folded in together (:func:`fedml.models.mf.fold_in` of all their histories,
``config.init_iterations`` steps at most).
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

from fedml.data.ragged import Ragged
from fedml.federated.client import ClientUpdate, LocalTraining
from fedml.federated.devices import UserVectors
from fedml.federated.randomness import LocalDraws, RoundDraws
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
        """float64 ``[C]``: each client's update norm (all its rows, embeddings and biases).

        A row's norm is taken in the deltas' dtype (one rounding, relative 1e-7 in float32), the sums
        over a client's rows in float64.
        """
        per_row = torch.linalg.vector_norm(self.delta_embeddings, dim=1).double().square_()
        per_row += self.delta_bias.double().square()
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
    row_client: torch.Tensor  # [U]: the position in `active` of each row's client (a row copy has one client)
    flat: torch.Tensor  # [N(1 + k)]: positives then negatives, as positions in `rows`
    n: int  # positives in this step


def batched_client_updates(
    table: ItemTable,
    clients: Sequence[np.ndarray],
    user_vectors: UserVectors | Sequence[torch.Tensor | None],
    config: LocalTraining,
    draws: Sequence[LocalDraws],
) -> tuple[BatchedUpdate, torch.Tensor]:
    """Local training of all ``clients`` (their positives, in round order) at once.

    Equivalent to ``[client_update(table, clients[i], user_vectors[i], config, draws[i]) for i ...]``:
    it returns the same uploads (as one :class:`BatchedUpdate`) and the same new user vectors (row
    ``i``: client ``i``'s), up to float rounding. Tensors live on the item table's device.
    """
    if not len(clients) == len(user_vectors) == len(draws):
        raise ValueError(f"{len(clients)} clients, {len(user_vectors)} user vectors and {len(draws)} draws")
    device = table.embeddings.device
    if not isinstance(user_vectors, UserVectors):
        user_vectors = UserVectors.of(user_vectors, table.dim, table.embeddings.dtype, device)
    positives = Ragged.of(clients)
    p = _initial_vectors(table, positives, user_vectors, config)
    plan = _plan(positives, RoundDraws.of(draws, config.epochs, config.negatives), table.n_items, config, device)
    n_clients = len(positives)
    q0 = table.embeddings.index_select(0, plan.rows)  # index_select: several times faster than t[rows] on CPU
    b0 = table.bias.index_select(0, plan.rows)
    q, b = q0.clone(), b0.clone()
    loss_sums = torch.zeros(n_clients, dtype=torch.float64, device=device)
    for step in plan.steps:
        _batched_sgd_step(q, b, p, loss_sums, step, config)

    num_examples = positives.sizes
    losses = loss_sums.cpu().numpy() / np.maximum(plan.steps_per_client, 1)
    update = BatchedUpdate(
        rows=plan.rows,
        owner=plan.owner,
        offsets=plan.offsets,
        delta_embeddings=q.sub_(q0),
        delta_bias=b.sub_(b0),
        num_examples=num_examples,
        losses=losses,
    )
    return update, p


def _initial_vectors(
    table: ItemTable, positives: Ragged, user_vectors: UserVectors, config: LocalTraining
) -> torch.Tensor:
    """``[C, dim]``: each client's starting vector, its own or for a first-time client the fold-in of its history.

    All first-time clients are folded in by one call (fold-in is deterministic and draws nothing).
    """
    device, dtype = table.embeddings.device, table.embeddings.dtype
    p = user_vectors.values.to(device=device, dtype=dtype, copy=True)
    new = np.flatnonzero(~user_vectors.known).tolist()
    if new:
        folded = fold_in(
            table,
            positives.take(new),
            negatives=config.negatives,
            l2=config.fold_in_l2,
            iterations=config.init_iterations,
        )
        p.index_copy_(0, torch.as_tensor(new, device=device), folded.to(dtype))
    return p


#: clients per batch of one SGD step (see ``_plan``)
CLIENT_GROUP = 256


@dataclass
class _Plan:
    rows: torch.Tensor  # [R]: item of each private row copy
    owner: torch.Tensor  # [R]
    offsets: np.ndarray  # [C + 1]
    steps_per_client: np.ndarray  # [C]
    steps: list[_Step]


def _plan(
    positives: Ragged,
    draws: RoundDraws,
    n_items: int,
    config: LocalTraining,
    device: torch.device,
) -> _Plan:
    """Turn the draws into row copies and per-step index tensors (numpy, then one transfer each)."""
    k, epochs, bs = config.negatives, config.epochs, config.batch_size
    n_clients = len(positives)
    n = positives.sizes
    clients = np.arange(n_clients, dtype=np.int64)

    # Private row copies: unique (client, item) keys over all positives, then all negatives; sorted,
    # so client-major and item-sorted within a client, as the reference's np.unique orders one
    # client's rows.
    pos_items = positives.flat
    neg_items = draws.negatives
    pos_start, neg_start = np.cumsum(n) - n, np.cumsum(n * epochs * k) - n * epochs * k
    keys = np.concatenate(
        [np.repeat(clients, n) * n_items + pos_items, np.repeat(clients, n * epochs * k) * n_items + neg_items]
    )
    unique_keys, row_of = np.unique(keys, return_inverse=True)
    row_owner, row_item = np.divmod(unique_keys, n_items)
    offsets = np.searchsorted(row_owner, np.arange(n_clients + 1)).astype(np.int64)

    # Every training example (client c, epoch e, position i of the epoch's permutation) ...
    per_client = epochs * n
    owner = np.repeat(clients, per_client)
    t = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(per_client) - per_client, per_client)
    n_ex = n[owner]
    epoch, position = np.divmod(t, np.maximum(n_ex, 1))
    j = draws.orders  # the positive it trains on
    pos_row = row_of[pos_start[owner] + j]
    neg_row = row_of[len(pos_items) + (neg_start[owner] + (epoch * n_ex + j) * k)[:, None] + np.arange(k)]
    # ... belongs to step epoch * batches + position // batch_size of its client
    batches = -(-n // bs)
    batch_index = position // bs
    step = epoch * batches[owner] + batch_index
    size = np.minimum(bs, n_ex - batch_index * bs)
    steps_per_client = epochs * batches

    # Clients are independent, so a step may run as several batches of clients: groups of
    # CLIENT_GROUP clients keep each batch's working set small (in cache). Sorted by (step, group).
    n_groups = -(-n_clients // CLIENT_GROUP)
    batch_key = step * n_groups + owner // CLIENT_GROUP
    by_batch = np.argsort(batch_key, kind="stable")  # stable: clients in order, a batch in its order
    owner, pos_row, neg_row, size, batch_key = (a[by_batch] for a in (owner, pos_row, neg_row, size, batch_key))
    bounds = np.flatnonzero(np.diff(batch_key, prepend=-1, append=-1))  # where a (step, group) batch starts

    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("active", "bsize", "rows", "row_client", "flat")}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ex_owner = owner[lo:hi]  # sorted: clients in order
        first = np.flatnonzero(np.diff(ex_owner, prepend=-1))
        active = ex_owner[first]
        # the batch's rows, sorted and deduplicated, without a sort: its clients own rows first_row:last_row
        first_row, last_row = offsets[active[0]], offsets[active[-1] + 1]
        entries = np.concatenate([pos_row[lo:hi], neg_row[lo:hi].ravel()]) - first_row
        touched = np.zeros(last_row - first_row, dtype=bool)
        touched[entries] = True
        step_rows = np.flatnonzero(touched) + first_row
        flat = (np.cumsum(touched) - 1)[entries]
        parts["active"].append(active)
        parts["bsize"].append(size[lo:hi][first])  # all of a client's examples share its batch size
        parts["rows"].append(step_rows)
        parts["row_client"].append(np.searchsorted(active, row_owner[step_rows]))
        parts["flat"].append(flat)

    def upload(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
        arrays = parts[name]
        if not arrays:
            return []
        whole = torch.as_tensor(np.concatenate(arrays)).to(device=device, dtype=dtype)
        return list(torch.split(whole, [len(a) for a in arrays]))

    columns = zip(
        upload("active", torch.int64),
        upload("bsize", torch.float32),
        upload("rows", torch.int64),
        upload("row_client", torch.int64),
        upload("flat", torch.int64),
    )
    steps = [
        _Step(active=a, batch_size=bsz, rows=r, row_client=rc, flat=f, n=(len(f) // (1 + k)))
        for a, bsz, r, rc, f in columns
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
    is the reference's step: gradients from the old values, ``l2`` once per touched row, then one SGD
    update. A row copy belongs to one client, so each score is its row's score under the client's
    vector, and the row's gradient is the sum of its entries' score gradients times that vector.
    """
    n, k = step.n, config.negatives
    # rows are gathered by index_select (several times faster than advanced indexing on CPU)
    p_active = p.index_select(0, step.active)
    q_step, b_step = q.index_select(0, step.rows), b.index_select(0, step.rows)
    p_rows = p_active.index_select(0, step.row_client)  # [U, d]: each row's client's vector
    work = torch.mul(q_step, p_rows)  # [U, d] scratch, reused below (fewer large allocations)
    scores = (work.sum(1) + b_step).index_select(0, step.flat)
    pos_client = step.row_client.index_select(0, step.flat[:n])  # [N]: each positive's client
    size = step.batch_size.index_select(0, pos_client).to(q.dtype)
    s_pos, s_neg = scores[:n], scores[n:].view(n, k)
    g_pos = (torch.sigmoid(s_pos) - 1.0) / size  # d loss / d score
    g_neg = torch.sigmoid(s_neg) / size[:, None]
    example_loss = torch.nn.functional.softplus(-s_pos) + torch.nn.functional.softplus(s_neg).sum(1)
    client_loss = torch.zeros(len(step.active), dtype=q.dtype, device=q.device).index_add_(0, pos_client, example_loss)
    loss_sums.index_add_(0, step.active, (client_loss / step.batch_size.to(q.dtype)).double())

    grad_b = torch.zeros_like(b_step).index_add_(0, step.flat, torch.cat([g_pos, g_neg.reshape(-1)]))
    grad_p = torch.zeros_like(p_active).index_add_(0, step.row_client, torch.mul(q_step, grad_b[:, None], out=work))
    grad_p += config.l2 * p_active
    grad_q = torch.mul(q_step, config.l2, out=work).addcmul_(
        grad_b[:, None], p_rows
    )  # every row of step.rows is touched

    q.index_copy_(0, step.rows, q_step.sub_(grad_q, alpha=config.lr))
    b.index_copy_(0, step.rows, b_step - config.lr * grad_b)
    p.index_copy_(0, step.active, p_active - config.lr * grad_p)
