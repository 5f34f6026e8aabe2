"""Secure (OS CSPRNG) and seeded noise sources, and the mechanisms that draw from them.

The secure draws are unseeded, so every statistical check here is a band of 5 standard errors
(two-sided false-alarm probability 5.7e-7 per check) or a goodness-of-fit test at p > 1e-6.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader

from fedml.federated.aggregation import DPFedAvg
from fedml.federated.client import ClientUpdate
from fedml.models.mf import init_item_table
from fedml.privacy.dpsgd import (
    MFModel,
    NoiseSourceDPOptimizer,
    NoiseSourcePoissonSampler,
    NoiseSourcePrivacyEngine,
    RecordDataset,
    RecordLoss,
    WithNegatives,
    poisson_schedule,
    train_central,
)
from fedml.privacy.local_dp import (
    discrete_laplace_moments,
    flip_probability,
    laplace_ratings,
    randomized_response,
)
from fedml.privacy.secure_noise import NoiseSource, SecureNoise, SeededNoise, as_noise_source
from tests.test_local_dp import _dense, _random_user_items

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing"),
    pytest.mark.usefixtures("one_torch_thread"),
]

SE = 5.0  # width of every statistical band, in standard errors
P_MIN = 1e-6  # smallest p-value a goodness-of-fit test may give


def _within(value: float, expected: float, standard_error: float) -> bool:
    return abs(value - expected) <= SE * standard_error


# --- the secure source itself -------------------------------------------------------------------


def test_secure_uniform_is_uniform_on_the_open_interval_with_53_bits():
    n = 200_000
    u = SecureNoise().uniform(n)
    assert u.shape == (n,) and u.dtype == np.float64
    assert u.min() > 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    k = u * 2.0**53  # every value is an exact multiple of 2^-53 ...
    assert np.array_equal(k, np.round(k))
    lowest_bit = k.astype(np.int64) & 1  # ... and even the 53rd bit is a fair coin
    assert _within(lowest_bit.mean(), 0.5, 0.5 / math.sqrt(n))
    assert SecureNoise().uniform((3, 4)).shape == (3, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_secure_gaussian_has_the_stated_std_and_mean_zero(dtype):
    std, shape = 0.7, (2000, 200)
    noise = SecureNoise().gaussian(shape, std, dtype=dtype)
    assert noise.shape == shape and noise.dtype == dtype and noise.device.type == "cpu"
    x = noise.double().numpy().ravel()
    n = x.size
    # sample std of n normals: standard error std / sqrt(2n); sample mean: std / sqrt(n)
    assert _within(x.std(), std, std / math.sqrt(2 * n))
    assert _within(x.mean(), 0.0, std / math.sqrt(n))
    assert stats.kstest(x, "norm", args=(0, std)).pvalue > P_MIN
    assert not SecureNoise().gaussian(shape, 0.0).any()


def test_secure_gaussian_is_the_sum_of_four_draws_halved(monkeypatch):
    """The Opacus secure-mode construction: each output is (z1 + z2 + z3 + z4) · std / 2."""
    drawn = []

    def fake_normal(self, n):
        values = np.arange(len(drawn), len(drawn) + n, dtype=np.float64)
        drawn.extend(values)
        return values

    monkeypatch.setattr(SecureNoise, "_standard_normal", fake_normal)
    out = SecureNoise().gaussian((5, 3), 2.0).numpy().ravel()
    assert len(drawn) == 4 * 15
    expected = np.arange(60, dtype=np.float64).reshape(4, 15).sum(0) * 2.0 / 2
    assert np.array_equal(out, expected)


def test_secure_box_muller_draws_are_standard_normal():
    z = SecureNoise()._standard_normal(100_000)  # r·cos θ of 50,000 pairs, then r·sin θ of the same
    assert stats.kstest(z, "norm").pvalue > P_MIN
    half = 50_000  # the two outputs of a pair are uncorrelated
    assert _within(np.corrcoef(z[:half], z[half:])[0, 1], 0.0, 1 / math.sqrt(half))
    assert SecureNoise()._standard_normal(7).shape == (7,)


def test_secure_draws_differ_and_survive_pickling():
    source = SecureNoise()
    assert isinstance(source, NoiseSource) and source.secure and not SeededNoise().secure
    assert as_noise_source(source) is source and isinstance(as_noise_source(np.random.default_rng()), SeededNoise)
    a, b = source.gaussian((1000,), 1.0), source.gaussian((1000,), 1.0)
    assert not torch.equal(a, b)
    assert not np.array_equal(source.uniform(100), source.uniform(100))
    copy = pickle.loads(pickle.dumps(source))  # shard workers receive the aggregator pickled
    assert not torch.equal(copy.gaussian((1000,), 1.0), a)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8])
def test_secure_geometric_matches_its_pmf(p):
    n = 200_000
    g = SecureNoise().geometric(p, n)
    assert g.dtype == np.int64 and g.min() >= 1
    # each of the likeliest values k: frequency vs (1-p)^(k-1) p
    for k in range(1, 6):
        pk = (1 - p) ** (k - 1) * p
        assert _within((g == k).mean(), pk, math.sqrt(pk * (1 - pk) / n))
    assert _within(g.mean(), 1 / p, math.sqrt((1 - p) / p**2 / n))
    assert np.array_equal(SecureNoise().geometric(1.0, 4), np.ones(4))
    with pytest.raises(ValueError):
        SecureNoise().geometric(0.0, 3)


def test_secure_binomial_matches_its_pmf():
    n_draws, trials, p = 100_000, 20, 0.27
    x = SecureNoise().binomial(np.full(n_draws, trials), p)
    assert x.dtype == np.int64 and x.min() >= 0 and x.max() <= trials
    observed = np.bincount(x, minlength=trials + 1)
    expected = stats.binom.pmf(np.arange(trials + 1), trials, p) * n_draws
    big = expected > 5  # chi-square over the cells with enough expected mass, the rest pooled
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(obs, exp).pvalue > P_MIN
    mixed = SecureNoise().binomial(np.array([0, 1, 50_000]), 0.5)
    assert mixed[0] == 0 and mixed[1] in (0, 1) and _within(mixed[2], 25_000, math.sqrt(12_500))


@pytest.mark.parametrize("k", [2, 4])  # 4 of 6 takes the complement branch
def test_secure_choice_without_replacement_is_a_uniform_subset(k):
    population, draws = 6, 6000
    subsets = [tuple(SecureNoise().choice_without_replacement(population, k)) for _ in range(draws)]
    assert all(len(set(s)) == k and min(s) >= 0 and max(s) < population for s in subsets)
    counts = np.array(list({s: subsets.count(s) for s in set(subsets)}.values()))
    assert len(counts) == math.comb(population, k)  # every subset occurs ...
    assert stats.chisquare(counts).pvalue > P_MIN  # ... equally often


def test_secure_choice_edges_and_large_populations():
    source = SecureNoise()
    assert source.choice_without_replacement(10, 0).size == 0
    assert np.array_equal(source.choice_without_replacement(10, 10), np.arange(10))
    big = source.choice_without_replacement(50_000, 13_000)
    assert np.unique(big).size == 13_000 and big.min() >= 0 and big.max() < 50_000
    with pytest.raises(ValueError):
        source.choice_without_replacement(3, 4)


def test_secure_integers_are_uniform_below_a_non_power_of_two():
    n = 90_000
    x = SecureNoise().integers(3, n)
    assert x.min() == 0 and x.max() == 2
    assert stats.chisquare(np.bincount(x)).pvalue > P_MIN


# --- the seeded path is unchanged ---------------------------------------------------------------


def test_seeded_source_makes_the_same_calls_as_before():
    """SeededNoise is a pass-through: same draws as the raw generators the mechanisms used."""
    seeded, raw = SeededNoise(np.random.default_rng(5)), np.random.default_rng(5)
    assert np.array_equal(seeded.uniform(7), raw.random(7))
    assert np.array_equal(seeded.geometric(0.2, (3, 2)), raw.geometric(0.2, size=(3, 2)))
    assert np.array_equal(seeded.binomial(np.array([5, 50]), 0.3), raw.binomial(np.array([5, 50]), 0.3))
    assert np.array_equal(seeded.choice_without_replacement(40, 9), raw.choice(40, size=9, replace=False))
    gaussian = SeededNoise(generator=torch.Generator().manual_seed(9)).gaussian((4, 3), 1.5)
    assert torch.equal(
        gaussian, torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 1.5
    )
    with pytest.raises(ValueError, match="torch.Generator"):
        SeededNoise(np.random.default_rng(0)).gaussian((2,), 1.0)
    with pytest.raises(ValueError, match="numpy Generator"):
        SeededNoise(generator=torch.Generator()).uniform(2)
    with pytest.raises(TypeError):
        as_noise_source(42)  # type: ignore[arg-type]


def test_seeded_laplace_ratings_are_the_discrete_laplace_of_the_generator():
    low, high, res, eps = 1.0, 5.0, 0.5, 0.8
    ratings = np.array([1.0, 2.2, 5.0, np.nan, 3.7, 0.3, 9.0] * 50)
    out = laplace_ratings(ratings, eps, low, high, np.random.default_rng(21), resolution=res)
    # the pre-NoiseSource computation, written out: k + G1 - G2 on the 8-step grid, clamped
    present = ~np.isnan(ratings)
    rng, steps = np.random.default_rng(21), 8
    p = -math.expm1(-eps / steps)
    k = np.rint((np.clip(ratings[present], low, high) - low) / res).astype(np.int64)
    z = rng.geometric(p, size=k.shape) - rng.geometric(p, size=k.shape)
    assert np.array_equal(out[present], low + np.clip(k + z, 0, steps) * res)
    assert np.isnan(out[~present]).all()
    via_source = laplace_ratings(ratings, eps, low, high, SeededNoise(np.random.default_rng(21)), resolution=res)
    assert np.array_equal(out, via_source, equal_nan=True)


def test_seeded_randomized_response_follows_the_generator():
    ui = _random_user_items(60, 80, 6, seed=4)
    epsilon, seed = 0.7, 31
    noisy = randomized_response(ui, epsilon, np.random.default_rng(seed))
    # replay the draws: keep mask, number added per shopper, then each shopper's ranks among absent items
    rng, p = np.random.default_rng(seed), flip_probability(epsilon)
    keep = rng.random(ui.nnz) >= p
    n_added = rng.binomial(ui.n_items - ui.counts(), p)
    for user in range(ui.n_users):
        history = ui.of(user)
        kept = history[keep[ui.indptr[user] : ui.indptr[user + 1]]]
        absent = np.setdiff1d(np.arange(ui.n_items), history)
        added = absent[rng.choice(absent.size, size=n_added[user], replace=False)] if n_added[user] else []
        assert np.array_equal(noisy.of(user), np.sort(np.concatenate([kept, added]).astype(np.int64)))


def test_seeded_dp_fedavg_noise_is_the_generators_randn():
    n_items, dim, sigma, clip, expected = 40, 5, 1.2, 0.3, 2.5
    agg = DPFedAvg(clip, sigma, 10.0, expected, torch.Generator().manual_seed(17)).aggregate([], n_items, dim)
    g = torch.Generator().manual_seed(17)
    emb = torch.randn(n_items, dim, dtype=torch.float64, generator=g) * (sigma * clip) / expected
    bias = torch.randn(n_items, dtype=torch.float64, generator=g) * (sigma * clip) / expected
    assert torch.allclose(agg.delta_embeddings, emb, rtol=1e-15, atol=0)
    assert torch.allclose(agg.delta_bias, bias, rtol=1e-15, atol=0)


# --- DP-FedAvg with the secure source -----------------------------------------------------------


def _updates(n: int, dim: int, seed: int) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            torch.as_tensor(np.sort(rng.choice(300, 6, replace=False))),
            torch.as_tensor(rng.normal(0, 0.2, (6, dim)), dtype=torch.float32),
            torch.as_tensor(rng.normal(0, 0.2, 6), dtype=torch.float32),
            int(rng.integers(1, 30)),
            0.0,
        )
        for _ in range(n)
    ]


def test_dp_fedavg_with_secure_noise_adds_noise_of_the_stated_scale():
    n_items, dim = 2000, 50
    sigma, clip, cap, expected = 1.3, 0.4, 20.0, 25.0
    updates = _updates(30, dim, seed=0)
    secure = DPFedAvg.for_population(
        np.full(100, 25), 0.25, clip_norm=clip, noise_multiplier=sigma, weight_cap=cap, generator=SecureNoise()
    )
    assert secure.secure_noise and secure.expected_weight == pytest.approx(expected)
    noiseless = DPFedAvg(clip, 0.0, cap, expected, torch.Generator())
    signal = noiseless.aggregate(updates, n_items, dim)
    noisy = secure.aggregate(updates, n_items, dim)
    std = sigma * clip / expected
    for got, clean in ((noisy.delta_embeddings, signal.delta_embeddings), (noisy.delta_bias, signal.delta_bias)):
        residual = (got - clean).numpy().ravel()
        n = residual.size
        assert _within(residual.std(), std, std / math.sqrt(2 * n))
        assert _within(residual.mean(), 0.0, std / math.sqrt(n))
    assert noisy.num_clients == 30 and noisy.clipped_fraction == signal.clipped_fraction
    again = secure.aggregate(updates, n_items, dim)
    assert not torch.equal(noisy.delta_embeddings, again.delta_embeddings)
    # the aggregator travels to shard workers pickled, its noise stays secure
    assert pickle.loads(pickle.dumps(secure)).secure_noise
    assert not DPFedAvg(clip, sigma, cap, expected, torch.Generator()).secure_noise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dp_fedavg_secure_noise_on_cuda():
    agg = DPFedAvg(0.5, 1.0, 5.0, 2.0, SecureNoise()).aggregate([], 500, 40, device="cuda")
    assert agg.delta_embeddings.device.type == "cuda"
    assert agg.delta_embeddings.std().item() == pytest.approx(0.25, rel=SE / math.sqrt(2 * 20_000))


# --- DP-SGD (Opacus) with the secure source -----------------------------------------------------


def _private(model, data, noise_multiplier, engine, batch_size=50):
    loader = DataLoader(
        RecordDataset(data), batch_size=batch_size, collate_fn=WithNegatives(data.n_items, 3, torch.Generator())
    )
    return engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        criterion=RecordLoss(1e-4), noise_multiplier=noise_multiplier, max_grad_norm=1.0, grad_sample_mode="ghost",
    )  # fmt: skip


def test_dp_sgd_step_gets_secure_noise_of_the_stated_scale():
    """One ghost-clipped step on a fixed batch, with and without noise: the difference of the two
    updates is the noise, std = σ·C / expected batch size per coordinate (SGD, lr 1, mean loss)."""
    from opacus import PrivacyEngine

    data = _random_user_items(100, 2000, 10, seed=1)  # 1000 records, batch 50: q = 0.05, expected batch 50
    init = init_item_table(data.n_items, 16, 0.1, seed=0)
    sigma = 2.0
    models = [MFModel(data.n_users, init, torch.Generator().manual_seed(3)) for _ in range(2)]
    engine = NoiseSourcePrivacyEngine(SecureNoise(), accountant="rdp")
    noisy_model, noisy_opt, noisy_crit, noisy_loader = _private(models[0], data, sigma, engine)
    clean_model, clean_opt, clean_crit, _ = _private(models[1], data, 0.0, PrivacyEngine(accountant="rdp"))
    assert isinstance(noisy_opt, NoiseSourceDPOptimizer) and noisy_opt.expected_batch_size == 50
    assert isinstance(noisy_loader.batch_sampler, NoiseSourcePoissonSampler)
    negatives = WithNegatives(data.n_items, 3, torch.Generator().manual_seed(0))
    users, items = next(iter(DataLoader(RecordDataset(data), batch_size=64, collate_fn=negatives)))
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1.0
    before = [p.detach().clone() for p in models[0].parameters()]
    for model, opt, crit in ((noisy_model, noisy_opt, noisy_crit), (clean_model, clean_opt, clean_crit)):
        scores, sq_norm = model(users, items)
        loss = crit(scores, labels, sq_norm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert engine.accountant.history == [(sigma, 0.05, 1)]
    std = sigma * 1.0 / 50
    for noisy, clean, start in zip(models[0].parameters(), models[1].parameters(), before):
        assert not torch.equal(clean, start)  # the clipped gradient itself moved the clean model
        diff = (clean - noisy).detach().double().numpy().ravel()  # = noise / 50
        n = diff.size
        assert _within(diff.std(), std, std / math.sqrt(2 * n))
        assert _within(diff.mean(), 0.0, std / math.sqrt(n))


def test_secure_poisson_sampler_samples_each_record_at_rate_q():
    n, q, steps = 1000, 0.05, 20
    sampler = NoiseSourcePoissonSampler(num_samples=n, sample_rate=q, steps=steps, noise_source=SecureNoise())
    assert len(sampler) == steps
    batches = [b for _ in range(20) for b in sampler]  # 400 batches
    assert len(batches) == 400
    assert all(len(set(b)) == len(b) and min(b, default=0) >= 0 and max(b, default=0) < n for b in batches)
    sizes = np.array([len(b) for b in batches])
    assert _within(sizes.mean(), n * q, math.sqrt(n * q * (1 - q) / len(batches)))
    per_record = np.bincount(np.concatenate([np.asarray(b, dtype=np.int64) for b in batches]), minlength=n)
    assert stats.chisquare(per_record).pvalue > P_MIN  # no record favoured
    assert batches[:20] != batches[20:40]  # unseeded


def test_noise_source_engine_refuses_what_it_does_not_support():
    data = _random_user_items(10, 30, 3, seed=2)
    model = MFModel(10, init_item_table(30, 4, 0.1, seed=0), torch.Generator().manual_seed(0))
    loader = DataLoader(RecordDataset(data), batch_size=5, collate_fn=WithNegatives(30, 1, torch.Generator()))
    with pytest.raises(ValueError, match="grad_sample_mode='ghost'"):
        NoiseSourcePrivacyEngine(SecureNoise()).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks",
        )  # fmt: skip


def test_train_central_with_secure_noise_is_private_and_not_reproducible():
    data = _random_user_items(120, 60, 8, seed=3)
    init = init_item_table(data.n_items, 8, 0.1, seed=0)
    args = dict(epochs=2, batch_size=64, lr=0.02, negatives=3, l2=1e-4, seed=5, private=True, noise_multiplier=1.0)
    a = train_central(data, init, secure_noise=True, **args)
    b = train_central(data, init, secure_noise=True, **args)
    seeded = train_central(data, init, **args)
    q, steps = poisson_schedule(data.nnz, 64, 2)
    assert a.statement == b.statement == seeded.statement  # same mechanism, same accounting
    assert a.statement.steps == steps and a.statement.sample_rate == q
    assert not torch.equal(a.table.embeddings, b.table.embeddings)  # the seed does not fix the noise
    assert all(np.isfinite(a.losses)) and torch.isfinite(a.table.embeddings).all()


# --- local DP with the secure source ------------------------------------------------------------


@pytest.mark.parametrize("resolution", [0.5, 0.01])
def test_secure_laplace_ratings_keep_the_stated_scale(resolution):
    # widen the range far beyond the noise so nothing is clamped, epsilon scaled to keep b = 4 / 2
    epsilon, widen, n = 2.0, 200.0, 200_000
    low, high = 1.0 - widen, 5.0 + widen
    eps_wide = epsilon * (high - low) / 4.0
    noise = laplace_ratings(np.full(n, 3.0), eps_wide, low, high, SecureNoise(), resolution=resolution) - 3.0
    mean_abs, var = discrete_laplace_moments(eps_wide, low, high, resolution)
    assert np.allclose(noise / resolution, np.round(noise / resolution))  # stays on the grid
    # standard errors: sd(|Z|) <= sqrt(var); sd(Z²) estimated from the sample's fourth moment
    assert _within(np.abs(noise).mean(), mean_abs, math.sqrt(var / n))
    assert _within(noise.var(), var, math.sqrt(np.var(noise**2) / n))
    assert _within(noise.mean(), 0.0, math.sqrt(var / n))
    r = math.exp(-eps_wide / round((high - low) / resolution))
    p_zero = (1 - r) / (1 + r)  # P(Z = 0) of the discrete Laplace
    assert _within((noise == 0).mean(), p_zero, math.sqrt(p_zero * (1 - p_zero) / n))


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_secure_randomized_response_keeps_the_flip_rates(epsilon):
    ui = _random_user_items(400, 300, 20, seed=0)
    noisy = randomized_response(ui, epsilon, SecureNoise())
    truth, out = _dense(ui), _dense(noisy)
    p = flip_probability(epsilon)
    for bits in (truth, ~truth):  # ones flip to zero and zeros to one at the same rate
        n = bits.sum()
        assert _within((truth[bits] != out[bits]).mean(), p, math.sqrt(p * (1 - p) / n))
    # per item, additions ~ Binomial(#shoppers without it, p) independently: chi-square over items
    absent, added = (~truth).sum(0), (out & ~truth).sum(0)
    z = (added - absent * p) / np.sqrt(absent * p * (1 - p))
    assert stats.chi2.sf((z**2).sum(), df=ui.n_items) > P_MIN
    for u in range(noisy.n_users):
        row = noisy.of(u)
        assert np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < ui.n_items))
