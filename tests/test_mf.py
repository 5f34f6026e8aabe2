"""Fold-in against its documented objective, written out with torch autograd in float64.

The objective of one shopper with history H (fedml.models.mf.fold_in):
``-sum_{i in H} log s(p.q_i + b_i) - c sum_{j not in H} log(1 - s(p.q_j + b_j)) + l2/2 |p|^2``,
``c = negatives |H| / (n_items - |H|)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedml.models.mf import ItemTable, fold_in

N_ITEMS, DIM, NEGATIVES, L2 = 80, 6, 4, 0.5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(scale: float = 1.0) -> ItemTable:
    """Item vectors and biases large enough that the optimum is far from p = 0 (several steps)."""
    generator = torch.Generator().manual_seed(3)
    return ItemTable(torch.randn(N_ITEMS, DIM, generator=generator) * scale, torch.randn(N_ITEMS, generator=generator))


def _histories() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [1, 2, 5, 9, 17, 30, 3, 0, 60]  # 60 of 80 items: c > 1, history items get negative net weight
    return [np.sort(rng.choice(N_ITEMS, size, replace=False)).astype(np.int64) for size in sizes]


def _objective(table: ItemTable, history: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    q, b = table.embeddings.double(), table.bias.double()
    scores = q @ p + b
    positive = torch.zeros(N_ITEMS, dtype=torch.bool)
    positive[torch.as_tensor(history, dtype=torch.long)] = True
    c = NEGATIVES * len(history) / (N_ITEMS - len(history))
    return -F.logsigmoid(scores[positive]).sum() - c * F.logsigmoid(-scores[~positive]).sum() + L2 / 2 * p @ p


def _gradient(table: ItemTable, history: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(lambda v: _objective(table, history, v), p.double())


def _hessian(table: ItemTable, history: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda v: _objective(table, history, v), p.double())


def test_fold_in_reaches_the_minimum_of_the_objective():
    table = _table()
    vectors = fold_in(table, _histories(), negatives=NEGATIVES, l2=L2)
    assert vectors.dtype == torch.float32 and vectors.shape == (len(_histories()), DIM)
    for history, p in zip(_histories(), vectors):
        at_zero = _gradient(table, history, torch.zeros(DIM)).norm()
        assert _gradient(table, history, p).norm() <= 1e-4 * max(float(at_zero), 1.0)
        assert float(p.norm()) > 0.3 or len(history) == 0  # not trivially near the start


def test_the_first_step_is_newtons_from_zero():
    table = _table()
    first = fold_in(table, _histories(), negatives=NEGATIVES, l2=L2, iterations=1)
    for history, p in zip(_histories(), first):
        zero = torch.zeros(DIM, dtype=torch.float64)
        newton = -torch.linalg.solve(_hessian(table, history, zero), _gradient(table, history, zero))
        torch.testing.assert_close(p.double(), newton, atol=1e-5, rtol=1e-5)


def test_a_shopper_stops_once_a_step_is_within_the_tolerance():
    table = _table()
    histories = _histories()
    first = fold_in(table, histories, negatives=NEGATIVES, l2=L2, iterations=1)
    # every first step moves some coordinate by less than this: everyone stops after it
    assert torch.equal(fold_in(table, histories, negatives=NEGATIVES, l2=L2, tolerance=1e9), first)
    two = fold_in(table, histories, negatives=NEGATIVES, l2=L2, iterations=2, tolerance=0.0)
    assert not torch.allclose(two, first)


def test_a_shoppers_vector_depends_on_its_history_alone():
    table = _table()
    histories = _histories()
    together = fold_in(table, histories, negatives=NEGATIVES, l2=L2)
    alone = torch.cat([fold_in(table, [h], negatives=NEGATIVES, l2=L2) for h in histories])
    # to float rounding: matrix products of other shapes sum in another order
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # chunked one shopper at a time, or in reverse order: the same vectors, in the callers' order
    chunked = fold_in(table, histories, negatives=NEGATIVES, l2=L2, chunk_size=1)
    torch.testing.assert_close(chunked, together, atol=1e-5, rtol=1e-5)
    reverse = fold_in(table, histories[::-1], negatives=NEGATIVES, l2=L2)
    torch.testing.assert_close(reverse.flip(0), together, atol=1e-5, rtol=1e-5)
    # deterministic
    assert torch.equal(fold_in(table, histories, negatives=NEGATIVES, l2=L2), together)


def test_empty_history_and_no_histories():
    table = _table()
    assert torch.equal(fold_in(table, [np.zeros(0, np.int64)], negatives=NEGATIVES, l2=L2), torch.zeros(1, DIM))
    assert fold_in(table, [], negatives=NEGATIVES, l2=L2).shape == (0, DIM)


def test_fold_in_converges_where_full_steps_cycle(monkeypatch):
    """Regression: large item vectors and biases, histories of one or two items. A full quasi-Newton step
    pushes the history's scores so high that their curvature vanishes and the next step overshoots
    back (the gradient stayed near 8 forever); the line search on the exact history terms ends it."""
    import fedml.models.mf as mf

    n_items, dim = 2000, 8
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, dim, generator=generator)
    cluster = torch.randint(0, 20, (n_items,), generator=generator)
    table = ItemTable(
        (0.8 * centres[cluster] + 0.5 * torch.randn(n_items, dim, generator=generator)) * 1.5,
        (torch.randn(n_items, generator=generator) - 1.0) * 3.0,
    )
    histories = [np.array([i]) for i in range(0, n_items, 10)] + [np.array([i, i + 1]) for i in range(1, 1999, 10)]

    def worst_gradient() -> float:
        vectors = fold_in(table, histories, negatives=NEGATIVES, l2=1.0).double()
        q, b = table.embeddings.double(), table.bias.double()
        worst = 0.0
        for history, p in zip(histories, vectors):
            s = torch.sigmoid(q @ p + b)
            weight = torch.full((n_items,), NEGATIVES * len(history) / (n_items - len(history)), dtype=torch.float64)
            weight[history] = 0.0
            gradient = q[history].T @ (s[history] - 1.0) + q.T @ (weight * s) + p
            worst = max(worst, float(gradient.norm()))
        return worst

    assert worst_gradient() < 1e-3
    monkeypatch.setattr(mf, "_step_length", lambda direction, *args: torch.ones(len(direction), 1))
    assert worst_gradient() > 1.0  # the failure this guards against, still there without the line search
