"""One client's local update against torch autograd of the documented loss, and what it uploads.

The documented loss of one SGD step on a batch B of positives, each with its k sampled negatives:
``(1/|B|) sum_{i in B} [-log s(p.q_i + b_i) - sum_j log(1 - s(p.q_j + b_j))]
+ l2/2 (|p|^2 + sum_{r used in the batch} |q_r|^2)`` (biases are not regularised).
The reference below builds the same batches (same permutations and negatives, drawn from a
generator with the same seed, in the same order as ``client_update`` draws them) and steps with
autograd gradients.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedml.federated.client import ClientUpdate, LocalTraining, client_update, sample_negatives
from fedml.models.mf import ItemTable, fold_in, init_item_table

N_ITEMS, DIM = 40, 6
POSITIVES = np.array([3, 7, 8, 15, 21, 22, 30], dtype=np.int64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(dtype: torch.dtype, seed: int = 0) -> ItemTable:
    table = init_item_table(N_ITEMS, DIM, scale=0.3, seed=seed)
    bias = torch.randn(N_ITEMS, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    return ItemTable(table.embeddings.to(dtype), bias.to(dtype))


def _user_vector(dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(DIM, generator=torch.Generator().manual_seed(5)) * 0.5).to(dtype)


def _autograd_reference(table: ItemTable, positives: np.ndarray, p0: torch.Tensor, config: LocalTraining, seed: int):
    """The same SGD trajectory as client_update, with autograd gradients, in float64."""
    rng = np.random.default_rng(seed)
    n = len(positives)
    order = np.stack([rng.permutation(n) for _ in range(config.epochs)])
    negatives = sample_negatives(positives, table.n_items, (config.epochs, n, config.negatives), rng)
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


@pytest.mark.parametrize(
    "dtype,atol,epochs,batch_size",
    [
        (torch.float64, 1e-10, 1, len(POSITIVES)),  # one SGD step on the whole history
        (torch.float64, 1e-10, 3, 3),  # several epochs of uneven mini-batches (3, 3, 1)
        (torch.float32, 1e-5, 2, 4),
    ],
)
def test_hand_written_gradients_equal_autograd(dtype, atol, epochs, batch_size):
    table = _table(dtype)
    p0 = _user_vector(dtype)
    p0_copy = p0.clone()
    config = LocalTraining(epochs=epochs, lr=0.3, batch_size=batch_size, negatives=3, l2=0.05)
    update, p_new = client_update(table, POSITIVES, p0, config, np.random.default_rng(11))
    q_ref, b_ref, p_ref, negatives, losses = _autograd_reference(table, POSITIVES, p0, config, seed=11)

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
    # the caller's vector is not modified in place; the returned one trained
    assert torch.equal(p0, p0_copy)
    assert not torch.allclose(p_new, p0)


def test_upload_has_touched_rows_only_and_no_user_vector():
    table = _table(torch.float32)
    config = LocalTraining(epochs=2, lr=0.2, batch_size=4, negatives=2, l2=1e-3)
    p0 = _user_vector(torch.float32)
    update, p_new = client_update(table, POSITIVES, p0, config, np.random.default_rng(3))

    # the same draws as the client made: touched = positives + sampled negatives, nothing else
    rng = np.random.default_rng(3)
    for _ in range(config.epochs):
        rng.permutation(len(POSITIVES))
    negatives = sample_negatives(POSITIVES, N_ITEMS, (config.epochs, len(POSITIVES), config.negatives), rng)
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


def test_first_time_client_starts_from_fold_in():
    table = _table(torch.float32)
    config = LocalTraining(epochs=1, lr=0.2, batch_size=4, negatives=2, l2=1e-3, fold_in_l2=0.5)
    start = fold_in(table, [POSITIVES], negatives=config.negatives, l2=config.fold_in_l2)[0]
    fresh, p_fresh = client_update(table, POSITIVES, None, config, np.random.default_rng(9))
    given, p_given = client_update(table, POSITIVES, start, config, np.random.default_rng(9))
    torch.testing.assert_close(p_fresh, p_given)
    torch.testing.assert_close(fresh.delta_embeddings, given.delta_embeddings)
    assert not torch.allclose(p_fresh, start)


def test_sample_negatives_excludes_positives():
    rng = np.random.default_rng(0)
    negatives = sample_negatives(POSITIVES, N_ITEMS, (4, len(POSITIVES), 5), rng)
    assert negatives.shape == (4, len(POSITIVES), 5)
    assert negatives.min() >= 0 and negatives.max() < N_ITEMS
    assert not np.isin(negatives, POSITIVES).any()
    # every non-positive item can be drawn
    many = sample_negatives(POSITIVES, N_ITEMS, (20_000,), rng)
    assert set(many.tolist()) == set(range(N_ITEMS)) - set(POSITIVES.tolist())


def test_sample_negatives_for_a_shopper_with_most_of_the_catalogue():
    # 45 of 50 items are positives: 20 re-draws leave ~0.9^21 = 11% hits, which must not survive
    n_items, positives = 50, np.arange(45, dtype=np.int64)
    negatives = sample_negatives(positives[::-1].copy(), n_items, (5000,), np.random.default_rng(1))
    assert not np.isin(negatives, positives).any()
    # still uniform over the five items left: each ~ Binomial(5000, 1/5), sd ~ 28
    counts = np.bincount(negatives, minlength=n_items)[45:]
    assert np.all(np.abs(counts - 1000) < 6 * 28.3)


def test_sample_negatives_without_positives():
    negatives = sample_negatives(np.array([], dtype=np.int64), 10, (3, 2), np.random.default_rng(0))
    assert negatives.shape == (3, 2) and negatives.min() >= 0 and negatives.max() < 10
