"""Central DP-SGD trainer: learning, per-record clipping, reported ε, calibration, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from fedml.data.interactions import UserItems
from fedml.models.mf import fold_in, init_item_table, score_all
from fedml.privacy.accountant import SubsampledGaussianAccountant, gaussian_epsilon
from fedml.privacy.dpsgd import MECHANISM, MFModel, RecordDataset, RecordLoss, WithNegatives, train_central

N_USERS, N_ITEMS, CLUSTERS, PER_USER = 200, 100, 5, 15
DIM, NEG, BATCH = 16, 4, 64
DELTA = 1e-5

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def data() -> UserItems:
    """200 shoppers in 5 taste clusters; each buys 15 of the 20 items of their cluster."""
    rng = np.random.default_rng(0)
    cluster_of_user = rng.integers(CLUSTERS, size=N_USERS)
    users, items = [], []
    for u in range(N_USERS):
        pool = np.flatnonzero(np.arange(N_ITEMS) % CLUSTERS == cluster_of_user[u])
        users += [u] * PER_USER
        items += list(rng.choice(pool, size=PER_USER, replace=False))
    return UserItems.from_pairs(np.array(users), np.array(items), N_USERS, N_ITEMS)


@pytest.fixture(scope="module")
def init():
    return init_item_table(N_ITEMS, DIM, 0.1, seed=0)


def _train(data, init, **kwargs):
    args = dict(epochs=3, batch_size=BATCH, lr=0.02, negatives=NEG, l2=1e-4, seed=0, private=True)
    args.update(kwargs)
    return train_central(data, init, **args)


def _held_in_auc(table, data: UserItems) -> float:
    """Mean per-shopper AUC of their own items vs all others, users folded in from history."""
    vectors = fold_in(table, [data.of(u) for u in range(data.n_users)], negatives=NEG, l2=1.0)
    scores = score_all(table, vectors).numpy()
    positive = np.zeros(scores.shape, dtype=bool)
    positive[data.users(), data.items] = True
    return float(np.mean([
        (scores[u, positive[u]][:, None] > scores[u, ~positive[u]][None, :]).mean()
        for u in range(data.n_users)
    ]))  # fmt: skip


def test_non_private_training_learns(data, init):
    seen = []
    result = _train(data, init, private=False, epochs=5, lr=0.05, progress=lambda *a: seen.append(a))
    assert result.statement is None and result.noise_multiplier is None
    assert len(result.losses) == 5 and [s[0] for s in seen] == [1, 2, 3, 4, 5]
    assert all(s[2] is None for s in seen) and [s[1] for s in seen] == result.losses
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.losses[0] < (1 + NEG) * math.log(2) + 0.1  # starts near chance
    assert result.table.embeddings.shape == (N_ITEMS, DIM) and result.table.bias.shape == (N_ITEMS,)
    before, after = _held_in_auc(init, data), _held_in_auc(result.table, data)
    assert after > 0.95 and after > before + 0.1
    # init is not modified in place
    assert torch.equal(init.embeddings, init_item_table(N_ITEMS, DIM, 0.1, seed=0).embeddings)


def test_private_training_reports_independently_recomputed_epsilon(data, init):
    seen = []
    result = _train(data, init, noise_multiplier=1.0, progress=lambda *a: seen.append(a))
    s = result.statement
    n_batches = math.ceil(data.nnz / BATCH)  # 3000 records / 64 -> 47 (Opacus: q = 1 / len(loader))
    q, steps = 1 / n_batches, 3 * n_batches
    assert s.unit == "record" and s.mechanism == MECHANISM and s.accountant == "rdp (opacus)"
    assert s.sampling == f"poisson q={q:.4g}" and s.delta == DELTA
    assert (s.noise_multiplier, s.sample_rate, s.steps) == (1.0, q, steps)
    assert s.epsilon == pytest.approx(gaussian_epsilon(1.0, q, steps, DELTA), rel=1e-12)
    independent = SubsampledGaussianAccountant(1.0, q)
    epsilons = []
    for _epoch in range(3):
        independent.step(n_batches)
        epsilons.append(independent.epsilon(DELTA))
    assert [e for _, _, e in seen] == pytest.approx(epsilons, rel=1e-12)
    # and Opacus's own engine, fed the same steps, agrees
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [(1.0, q, steps)]
    assert s.epsilon == pytest.approx(engine.get_epsilon(DELTA), rel=1e-12)
    assert all(np.isfinite(result.losses))
    tags = s.to_tags()
    assert tags["privacy.unit"] == "record" and tags["privacy.steps"] == str(steps)
    assert float(tags["privacy.epsilon"]) == s.epsilon and tags["privacy.noise_multiplier"] == "1.0"
    assert s.describe() == (
        f"ε = {s.epsilon:.3g} (δ = 1e-05) per record, {MECHANISM}, RDP accountant (Opacus), "
        f"Poisson sampling q = {q:.4g}, σ = 1, {steps} steps"
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_is_met(data, init, accountant):
    result = _train(data, init, epochs=2, target_epsilon=2.0, accountant=accountant)
    s = result.statement
    assert s.accountant == f"{accountant} (opacus)"
    assert 2.0 - 0.02 <= s.epsilon <= 2.0
    assert s.epsilon == pytest.approx(
        gaussian_epsilon(result.noise_multiplier, s.sample_rate, s.steps, DELTA, accountant), rel=1e-9
    )
    if accountant == "prv":  # PRV is tighter, so it affords less noise for the same budget
        assert result.noise_multiplier < _train(data, init, epochs=2, target_epsilon=2.0).noise_multiplier


def test_deterministic_given_seed(data, init):
    a = _train(data, init, epochs=1, seed=3)
    b = _train(data, init, epochs=1, seed=3)
    c = _train(data, init, epochs=1, seed=4)
    assert torch.equal(a.table.embeddings, b.table.embeddings) and torch.equal(a.table.bias, b.table.bias)
    assert a.losses == b.losses and a.statement == b.statement
    assert not torch.equal(a.table.embeddings, c.table.embeddings)


def test_ghost_clipping_clips_each_whole_record():
    """One DP step without noise equals the mean of each record's own clipped gradient, where
    a record's loss covers its positive and all its negatives (duplicates included)."""
    data = UserItems.from_pairs(np.array([0, 0, 1, 2, 2, 3]), np.array([1, 2, 3, 4, 5, 0]), 4, 7)
    init = init_item_table(7, 3, 0.5, seed=0)
    users = torch.tensor([0, 0, 1, 2, 2, 3])
    items = torch.tensor([[1, 3, 3], [2, 2, 0], [3, 1, 6], [4, 4, 4], [5, 0, 1], [0, 6, 2]])
    labels = torch.zeros(6, 3)
    labels[:, 0] = 1.0
    clip, l2 = 0.3, 0.1
    model = MFModel(4, init, torch.Generator().manual_seed(1))
    reference = MFModel(4, init, torch.Generator().manual_seed(1))
    loader = DataLoader(RecordDataset(data), batch_size=6, collate_fn=WithNegatives(7, 2, torch.Generator()))
    dp_model, dp_opt, dp_crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        criterion=RecordLoss(l2), noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode="ghost",
    )  # fmt: skip
    scores, sq_norm = dp_model(users, items)
    loss = dp_crit(scores, labels, sq_norm)
    dp_opt.zero_grad()
    loss.backward()
    dp_opt.step()

    params = list(reference.parameters())
    expected = [p.detach().clone() for p in params]
    per_record = RecordLoss(l2, reduction="none")
    norms = []
    for r in range(6):
        s, n = reference(users[r : r + 1], items[r : r + 1])
        grads = torch.autograd.grad(per_record(s, labels[r : r + 1], n).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
        norms.append(norm)
        for e, g in zip(expected, grads):
            e -= min(1.0, clip / (norm + 1e-6)) * g / 6  # mean over the expected batch of 6
    assert max(norms) > clip > min(norms) * 0.1  # clipping is active
    for e, p in zip(expected, model.parameters()):
        assert torch.allclose(e, p, atol=1e-6)


def test_empty_poisson_batches_are_noisy_steps(init):
    # 3 records, batch 1: q = 1/3, each batch is empty with probability 8/27 (with seed 0 the
    # very first one is, which also exercises Opacus's first-batch-empty fallback)
    data = UserItems.from_pairs(np.array([0, 1, 2]), np.array([5, 6, 7]), 3, N_ITEMS)
    result = _train(data, init, epochs=4, batch_size=1, noise_multiplier=2.0)
    assert result.statement.steps == 12
    assert result.statement.epsilon == pytest.approx(gaussian_epsilon(2.0, 1 / 3, 12, DELTA), rel=1e-12)
    assert torch.isfinite(result.table.embeddings).all()
