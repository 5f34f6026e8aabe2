"""One client's local update against torch autograd of the documented loss, and what it uploads.

The documented loss of one SGD step on a batch B of positives, each with its k sampled negatives:
``(1/|B|) sum_{i in B} [-log s(p.q_i + b_i) - sum_j log(1 - s(p.q_j + b_j))]
+ l2/2 (|p|^2 + sum_{r used in the batch} |q_r|^2)`` (biases are not regularised).
The reference below builds the same batches from the same draws (the client's mini-batch orders and
negatives, :func:`fedml.federated.randomness.draw_round` or written by hand) and steps with autograd
gradients.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedml.config import FederatedConfig
from fedml.federated.client import CLIENT_INIT_ITERATIONS, ClientUpdate, LocalTraining, client_update
from fedml.federated.randomness import LocalDraws, draw_round
from fedml.models.mf import FOLD_IN_ITERATIONS, ItemTable, fold_in, init_item_table

N_ITEMS, DIM = 40, 6
POSITIVES = np.array([3, 7, 8, 15, 21, 22, 30], dtype=np.int64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(dtype: torch.dtype, seed: int = 0) -> ItemTable:
    table = init_item_table(N_ITEMS, DIM, scale=0.3, seed=seed)
    bias = torch.randn(N_ITEMS, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    return ItemTable(table.embeddings.to(dtype), bias.to(dtype))


def _user_vector(dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(DIM, generator=torch.Generator().manual_seed(5)) * 0.5).to(dtype)


def _draws(config: LocalTraining, seed: int, positives: np.ndarray = POSITIVES, client: int = 0) -> LocalDraws:
    """The client's draws for round 1 of a run with ``seed``."""
    return draw_round(seed, 1, [client], [positives], N_ITEMS, config.epochs, config.negatives)[0]


def _autograd_reference(
    table: ItemTable, positives: np.ndarray, p0: torch.Tensor, config: LocalTraining, draws: LocalDraws
):
    """The same SGD trajectory as client_update, with autograd gradients, in float64."""
    n = len(positives)
    order, negatives = draws.order, draws.negatives
    assert order.shape == (config.epochs, n) and negatives.shape == (config.epochs, n, config.negatives)
    q = table.embeddings.detach().double().clone()
    b = table.bias.detach().double().clone()
    p = p0.detach().double().clone()
    losses = []
    for epoch in range(config.epochs):
        for start in range(0, n, config.batch_size):
            idx = order[epoch, start : start + config.batch_size]
            pos = torch.as_tensor(positives[idx])
            neg = torch.as_tensor(negatives[epoch, idx])  # [B, k]
            qv, bv, pv = (t.clone().requires_grad_(True) for t in (q, b, p))
            s_pos = qv[pos] @ pv + bv[pos]
            s_neg = qv[neg] @ pv + bv[neg]
            data_loss = (-F.logsigmoid(s_pos).sum() - F.logsigmoid(-s_neg).sum()) / len(idx)
            used = torch.unique(torch.cat([pos, neg.reshape(-1)]))
            loss = data_loss + config.l2 / 2 * (pv.pow(2).sum() + qv[used].pow(2).sum())
            gq, gb, gp = torch.autograd.grad(loss, (qv, bv, pv))
            q, b, p = q - config.lr * gq, b - config.lr * gb, p - config.lr * gp
            losses.append(float(data_loss.detach()))
    return q, b, p, negatives, losses


def _hand_made_draws() -> LocalDraws:
    """Two epochs, 3 negatives: epoch 0 in reverse order, epoch 1 interleaved; the same negative
    twice for one positive, shared by positives of one batch and of different batches and epochs,
    and the catalogue's first and last items (duplicates add their gradients)."""
    n = len(POSITIVES)
    order = np.array([np.arange(n)[::-1], [1, 3, 5, 0, 2, 4, 6]], dtype=np.int64)
    negatives = np.array(
        [
            [[0, 0, 1], [39, 2, 0], [4, 4, 4], [5, 6, 9], [10, 11, 12], [13, 14, 16], [2, 39, 1]],
            [[0, 1, 2], [0, 1, 2], [17, 18, 19], [20, 23, 24], [25, 26, 27], [28, 29, 31], [32, 33, 34]],
        ],
        dtype=np.int64,
    )
    assert not np.isin(negatives, POSITIVES).any()
    return LocalDraws(order=order, negatives=negatives)


@pytest.mark.parametrize(
    "dtype,atol,epochs,batch_size,hand_made",
    [
        (torch.float64, 1e-10, 1, len(POSITIVES), False),  # one SGD step on the whole history
        (torch.float64, 1e-10, 3, 3, False),  # several epochs of uneven mini-batches (3, 3, 1)
        (torch.float32, 1e-5, 2, 4, False),
        (torch.float64, 1e-10, 2, 2, True),  # repeated and shared negatives, given orders
        (torch.float32, 1e-5, 2, 3, True),
    ],
)
def test_hand_written_gradients_equal_autograd(dtype, atol, epochs, batch_size, hand_made):
    table = _table(dtype)
    p0 = _user_vector(dtype)
    p0_copy = p0.clone()
    config = LocalTraining(epochs=epochs, lr=0.3, batch_size=batch_size, negatives=3, l2=0.05)
    draws = _hand_made_draws() if hand_made else _draws(config, seed=11)
    order_copy, negatives_copy = draws.order.copy(), draws.negatives.copy()
    update, p_new = client_update(table, POSITIVES, p0, config, draws)
    q_ref, b_ref, p_ref, negatives, losses = _autograd_reference(table, POSITIVES, p0, config, draws)

    rows = update.rows.numpy()
    np.testing.assert_array_equal(rows, np.unique(np.concatenate([POSITIVES, negatives.ravel()])))
    new_q = table.embeddings.double()[update.rows] + update.delta_embeddings.double()
    new_b = table.bias.double()[update.rows] + update.delta_bias.double()
    torch.testing.assert_close(new_q, q_ref[update.rows], atol=atol, rtol=0)
    torch.testing.assert_close(new_b, b_ref[update.rows], atol=atol, rtol=0)
    torch.testing.assert_close(p_new.double(), p_ref, atol=atol, rtol=0)
    # the reference leaves every other row alone, so nothing is missing from the upload
    untouched = np.setdiff1d(np.arange(N_ITEMS), rows)
    torch.testing.assert_close(q_ref[untouched], table.embeddings.double()[untouched], atol=0, rtol=0)
    torch.testing.assert_close(b_ref[untouched], table.bias.double()[untouched], atol=0, rtol=0)
    # reported loss: the mean data loss of the steps, before each step
    assert update.loss == pytest.approx(float(np.mean(losses)), abs=max(atol, 1e-12) * 10)
    assert update.num_examples == len(POSITIVES)
    # the caller's vector and draws are not modified in place; the returned vector trained
    assert torch.equal(p0, p0_copy)
    assert np.array_equal(draws.order, order_copy) and np.array_equal(draws.negatives, negatives_copy)
    assert not torch.allclose(p_new, p0)


def test_the_update_is_a_function_of_the_draws():
    """No hidden randomness: the same draws give the same update; other draws another one."""
    table = _table(torch.float64)
    config = LocalTraining(epochs=2, lr=0.3, batch_size=3, negatives=3, l2=0.05)
    first = client_update(table, POSITIVES, _user_vector(torch.float64), config, _draws(config, seed=4))
    again = client_update(table, POSITIVES, _user_vector(torch.float64), config, _draws(config, seed=4))
    assert torch.equal(first[0].rows, again[0].rows)
    assert torch.equal(first[0].delta_embeddings, again[0].delta_embeddings) and torch.equal(first[1], again[1])
    assert first[0].loss == again[0].loss
    # the same negatives in another order: same rows, another trajectory
    draws = _draws(config, seed=4)
    reordered = LocalDraws(order=draws.order[::-1].copy(), negatives=draws.negatives)
    other_order = client_update(table, POSITIVES, _user_vector(torch.float64), config, reordered)
    assert torch.equal(other_order[0].rows, first[0].rows)
    assert not torch.allclose(other_order[0].delta_embeddings, first[0].delta_embeddings)
    # another round's draws: other negatives, another update
    other = draw_round(4, 2, [0], [POSITIVES], N_ITEMS, config.epochs, config.negatives)[0]
    assert not np.array_equal(other.negatives, draws.negatives)
    other_round = client_update(table, POSITIVES, _user_vector(torch.float64), config, other)
    assert not torch.allclose(_dense(other_round[0]), _dense(first[0]))


def _dense(update: ClientUpdate) -> torch.Tensor:
    return torch.zeros(N_ITEMS, DIM, dtype=torch.float64).index_add_(0, update.rows, update.delta_embeddings.double())


def test_upload_has_touched_rows_only_and_no_user_vector():
    table = _table(torch.float32)
    config = LocalTraining(epochs=2, lr=0.2, batch_size=4, negatives=2, l2=1e-3)
    p0 = _user_vector(torch.float32)
    draws = _draws(config, seed=3)
    update, p_new = client_update(table, POSITIVES, p0, config, draws)

    # touched = positives + the client's negatives, nothing else
    negatives = draws.negatives
    assert not np.isin(negatives, POSITIVES).any()
    touched = np.unique(np.concatenate([POSITIVES, negatives.ravel()]))
    np.testing.assert_array_equal(update.rows.numpy(), touched)
    assert len(touched) < N_ITEMS  # a real subset of the catalogue
    assert update.rows.dtype == torch.int64
    assert update.delta_embeddings.shape == (len(touched), DIM)
    assert update.delta_bias.shape == (len(touched),)
    # every positive row moved (it is pushed up by its own term)
    pos_local = np.searchsorted(touched, POSITIVES)
    assert (update.delta_embeddings[pos_local].abs().sum(1) > 0).all()

    # the upload's fields are the row deltas, the count and the loss: no user vector anywhere
    assert {f.name for f in dataclasses.fields(ClientUpdate)} == {
        "rows", "delta_embeddings", "delta_bias", "num_examples", "loss"
    }  # fmt: skip
    assert isinstance(update, ClientUpdate)
    assert not torch.allclose(p_new, p0)  # the private vector trained ...
    for value in vars(update).values():  # ... and is in no uploaded tensor
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            flat = value.reshape(-1, value.shape[-1]) if value.dim() > 1 else value.reshape(1, -1)
            for vec in (p_new, p0):
                if flat.shape[1] == vec.shape[0]:
                    assert not any(torch.allclose(row, vec) for row in flat)
    assert update.norm() == pytest.approx(
        float(torch.sqrt(update.delta_embeddings.double().pow(2).sum() + update.delta_bias.double().pow(2).sum()))
    )


@pytest.mark.parametrize("init_iterations", [1, 3, FOLD_IN_ITERATIONS])
def test_first_time_client_starts_from_fold_in(init_iterations):
    """A first-time client starts from ``init_iterations`` fold-in steps (1 by default: the Newton step)."""
    table = _table(torch.float32)
    config = LocalTraining(epochs=1, lr=0.2, batch_size=4, negatives=2, l2=1e-3, fold_in_l2=0.5,
                           init_iterations=init_iterations)  # fmt: skip
    start = fold_in(table, [POSITIVES], negatives=config.negatives, l2=config.fold_in_l2, iterations=init_iterations)[0]
    fresh, p_fresh = client_update(table, POSITIVES, None, config, _draws(config, seed=9))
    given, p_given = client_update(table, POSITIVES, start, config, _draws(config, seed=9))
    torch.testing.assert_close(p_fresh, p_given)
    torch.testing.assert_close(fresh.delta_embeddings, given.delta_embeddings)
    assert not torch.allclose(p_fresh, start)


def test_the_configs_client_start_is_the_library_default():
    config = LocalTraining(epochs=1, lr=0.2, batch_size=4, negatives=2, l2=1e-3)
    assert config.init_iterations == CLIENT_INIT_ITERATIONS == FederatedConfig().client_init_iterations


def test_the_clients_negatives_are_its_complement():
    """What the client trains against (draw_round, tested in depth in test_randomness): never one of
    its positives, and every other item of the catalogue can be drawn."""
    config = LocalTraining(epochs=4, lr=0.1, batch_size=4, negatives=5, l2=0.0)
    negatives = _draws(config, seed=0).negatives
    assert negatives.shape == (4, len(POSITIVES), 5)
    assert negatives.min() >= 0 and negatives.max() < N_ITEMS
    assert not np.isin(negatives, POSITIVES).any()
    # over many rounds (3,000 x 7 x 4 x 5 draws) every non-positive item is drawn
    seen = np.concatenate(
        [draw_round(0, r, [0], [POSITIVES], N_ITEMS, 4, 5)[0].negatives.ravel() for r in range(1, 31)]
    )
    assert set(seen.tolist()) == set(range(N_ITEMS)) - set(POSITIVES.tolist())


def test_a_shopper_with_every_item_still_trains():
    """Nothing left to sample from: negatives are uniform over the whole catalogue (they include
    positives), and the update is well defined."""
    everything = np.arange(N_ITEMS, dtype=np.int64)
    config = LocalTraining(epochs=1, lr=0.2, batch_size=16, negatives=2, l2=1e-3)
    draws = _draws(config, seed=1, positives=everything)
    update, p_new = client_update(_table(torch.float32), everything, _user_vector(torch.float32), config, draws)
    np.testing.assert_array_equal(update.rows.numpy(), everything)
    assert torch.isfinite(update.delta_embeddings).all() and torch.isfinite(p_new).all()


def test_a_client_without_positives_uploads_nothing():
    empty = np.array([], dtype=np.int64)
    config = LocalTraining(epochs=2, lr=0.2, batch_size=4, negatives=2, l2=1e-3)
    draws = _draws(config, seed=0, positives=empty)
    p0 = _user_vector(torch.float32)
    update, p_new = client_update(_table(torch.float32), empty, p0, config, draws)
    assert update.rows.numel() == 0 and update.num_examples == 0 and update.loss == 0.0
    assert update.delta_embeddings.shape == (0, DIM) and update.norm() == 0.0
    torch.testing.assert_close(p_new, p0, atol=0, rtol=0)
