"""Central training over pooled data: record-level DP-SGD with Opacus, or the non-private reference.

One *record* is one (shopper, positive item) pair. Its sample carries ``negatives`` items drawn
uniformly from the catalogue (drawn in the DataLoader's ``collate_fn``, which Opacus's Poisson
``DPDataLoader`` keeps), and its loss is the whole record's loss

    BCE(s(u, i+), 1) + Σ_j BCE(s(u, j-), 0) + l2/2 · (|p_u|² + Σ_{rows it touches} |q|²)

so the per-sample gradient that DP-SGD clips to ``max_grad_norm`` is exactly one record's
contribution. Opacus's ghost-clipping criterion (``DPLossFastGradientClipping``) calls the
criterion with ``reduction="none"`` and expects one loss per sample, shape ``[B]``: a ``[B, 1+K]``
loss would make its ``mean(dim=0)`` a vector and its clipping coefficients broadcast against the
wrong axis. :class:`RecordLoss` therefore sums over the ``1 + K`` columns itself.

The model has private user embeddings ``[n_users, dim]`` (discarded after training; serving folds
users in) and the global item table (embeddings initialised from ``init``, biases). Optimiser:
Adam (see :func:`train_central`).

Secure noise (``train_central(..., secure_noise=True)``): Opacus's own ``secure_mode=True`` needs the
``torchcsprng`` package, whose last release (0.2.1, 2021) pins ``torch==1.8.1`` and ships wheels for
CPython 3.6-3.9 only, so it cannot be installed next to torch 2.13. Instead
:class:`NoiseSourcePrivacyEngine` makes Opacus draw from a
:class:`~fedml.privacy.secure_noise.NoiseSource`: the optimiser class Opacus picks for ghost clipping
is subclassed to take its Gaussian noise from the source (:class:`NoiseSourceDPOptimizer`, the same
sum-of-four hardening as ``secure_mode``), and the Poisson sampling of the batches draws its
Bernoulli(q) masks from the source (:class:`NoiseSourcePoissonSampler`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedml.data.interactions import UserItems
from fedml.models.mf import ItemTable
from fedml.privacy.accountant import SubsampledGaussianAccountant, calibrate_noise_multiplier
from fedml.privacy.secure_noise import NoiseSource, SecureNoise
from fedml.privacy.statement import PrivacyStatement

MECHANISM = "dp-sgd (opacus, ghost clipping)"
USER_INIT_SCALE = 0.1

Progress = Callable[[int, float, "float | None"], None]


@dataclass
class CentralTrainingResult:
    table: ItemTable
    statement: PrivacyStatement | None
    losses: list[float]  # mean per-record training loss of each epoch
    noise_multiplier: float | None


class MFModel(nn.Module):
    """score(u, i) = p_u · q_i + b_i, over ``items`` of shape ``[B, 1 + K]``."""

    def __init__(self, n_users: int, init: ItemTable, generator: torch.Generator) -> None:
        super().__init__()
        dim = init.dim
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(init.n_items, dim)
        self.item_bias = nn.Embedding(init.n_items, 1)
        with torch.no_grad():
            self.user.weight.copy_(torch.randn(n_users, dim, generator=generator) * USER_INIT_SCALE)
            self.item.weight.copy_(init.embeddings.float())
            self.item_bias.weight.copy_(init.bias.float().reshape(-1, 1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B, 1 + K]`` and each record's squared norm of the rows it uses ``[B]``."""
        p = self.user(users)  # [B, D]
        q = self.item(items)  # [B, 1+K, D]
        scores = torch.einsum("bd,bkd->bk", p, q) + self.item_bias(items).squeeze(-1)
        sq_norm = p.pow(2).sum(-1) + q.pow(2).sum((-1, -2))
        return scores, sq_norm

    def item_table(self) -> ItemTable:
        return ItemTable(self.item.weight.detach().clone(), self.item_bias.weight.detach().reshape(-1).clone())


class RecordLoss(nn.Module):
    """Per-record loss: BCE-with-logits summed over the positive and its negatives, plus the L2
    penalty; ``reduction`` ("none" -> ``[B]``, "mean", "sum") is over records only."""

    def __init__(self, l2: float, reduction: str = "mean") -> None:
        super().__init__()
        self.l2 = l2
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, labels: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="none")
        per_record = bce.sum(-1) + 0.5 * self.l2 * sq_norm
        if self.reduction == "none":
            return per_record
        if self.reduction == "sum":
            return per_record.sum()
        return per_record.mean()


class RecordDataset(Dataset):
    """The (shopper, positive item) pairs of ``user_items``; one item = one record."""

    def __init__(self, user_items: UserItems) -> None:
        self.users = torch.as_tensor(user_items.users(), dtype=torch.int64)
        self.items = torch.as_tensor(user_items.items, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.users[index], self.items[index]


class WithNegatives:
    """collate_fn: ``(users [B], items [B, 1 + K])``, column 0 the positive, the rest uniform
    negatives drawn from a seeded generator."""

    def __init__(self, n_items: int, negatives: int, generator: torch.Generator) -> None:
        self.n_items, self.negatives, self.generator = n_items, negatives, generator

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        users = torch.stack([u for u, _ in batch]) if batch else torch.zeros(0, dtype=torch.int64)
        positives = torch.stack([i for _, i in batch]) if batch else torch.zeros(0, dtype=torch.int64)
        negs = torch.randint(self.n_items, (len(batch), self.negatives), generator=self.generator, dtype=torch.int64)
        return users, torch.cat([positives.unsqueeze(1), negs], dim=1)


def train_central(
    user_items: UserItems,
    init: ItemTable,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    negatives: int,
    l2: float,
    seed: int,
    private: bool,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    target_epsilon: float = 0.0,
    delta: float = 1e-5,
    accountant: str = "rdp",
    progress: Progress | None = None,
    secure_noise: bool = False,
) -> CentralTrainingResult:
    """Train matrix factorisation on pooled records; return only the item table.

    ``private=False``: plain mini-batch training (shuffled, ``batch_size``), the non-private
    reference. ``private=True``: DP-SGD with Opacus (Poisson sampling with ``q = 1 / ceil(N /
    batch_size)``, flat clipping of each record's gradient to ``max_grad_norm``, Gaussian noise
    ``noise_multiplier · max_grad_norm``, ghost clipping). With ``target_epsilon > 0`` the noise
    multiplier is calibrated so that ε after all steps is at most ``target_epsilon`` at ``delta``.

    The optimiser is Adam with learning rate ``lr`` (it only post-processes the noisy gradient).
    With mean reduction an embedding row's gradient is ~1/batch of its records' gradients, so
    plain SGD needs learning rates in the tens and diverged easily in trials; Adam's
    per-coordinate scaling trained the non-private model well at 0.01–0.05. Under DP noise the
    loss rose again at 0.05 in trials (every row receives noise every step), 0.01 kept falling.
    Deterministic for a given ``seed`` (Opacus secure_mode off; all randomness from seeded
    generators) unless ``secure_noise=True`` (production): then the DP noise and the Poisson batch
    sampling come from the OS CSPRNG (:class:`~fedml.privacy.secure_noise.SecureNoise`) and runs are
    not reproducible. Model initialisation and the negatives stay seeded: they do not depend on the
    data, so the guarantee does not rest on keeping them secret. ``progress(epoch, loss, epsilon)``
    is called after each epoch (``epoch`` counts from 1, ``epsilon`` is None when not private).
    """
    if user_items.n_items != init.n_items:
        raise ValueError(f"init has {init.n_items} items, data has {user_items.n_items}")
    if user_items.nnz == 0:
        raise ValueError("no training records")
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    gens = _generators(seed)
    model = MFModel(user_items.n_users, init, gens["model"])
    loader = DataLoader(
        RecordDataset(user_items),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=WithNegatives(user_items.n_items, negatives, gens["negatives"]),
        generator=gens["sampling"],
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if not private:
        report = None if progress is None else (lambda epoch, loss: progress(epoch, loss, None))
        losses = _fit(model, loader, optimizer, RecordLoss(l2), epochs, negatives, report)
        return CentralTrainingResult(model.item_table(), None, losses, None)
    return _train_private(
        model, loader, optimizer, l2=l2, epochs=epochs, negatives=negatives,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        target_epsilon=target_epsilon, delta=delta, accountant=accountant,
        noise=SecureNoise() if secure_noise else gens["noise"], progress=progress,
    )  # fmt: skip


def poisson_schedule(n_records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, total steps) that Opacus's DPDataLoader will use for these settings.

    Opacus sets ``q = 1 / len(loader)`` and ``int(1 / q)`` steps per epoch; the latter is one
    less than ``len(loader)`` for some lengths (floating point), which is why steps are derived
    from Opacus's own sampler rather than assumed.
    """
    q = 1 / math.ceil(n_records / batch_size)
    per_epoch = len(UniformWithReplacementSampler(num_samples=n_records, sample_rate=q))
    return q, per_epoch * epochs


def _train_private(
    model: MFModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    l2: float,
    epochs: int,
    negatives: int,
    noise_multiplier: float,
    max_grad_norm: float,
    target_epsilon: float,
    delta: float,
    accountant: str,
    noise: torch.Generator | NoiseSource,
    progress: Progress | None,
) -> CentralTrainingResult:
    q, total_steps = poisson_schedule(len(loader.dataset), loader.batch_size, epochs)
    if target_epsilon > 0:
        # calibrated on the exact step count: make_private_with_epsilon uses int(epochs / q),
        # which floating point can make one step short of what the loader then runs
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, q, total_steps, delta, accountant)
    ledger = SubsampledGaussianAccountant(noise_multiplier, q, accountant)  # type: ignore[arg-type]
    with _quiet_opacus():
        if isinstance(noise, NoiseSource):
            engine, noise_generator = NoiseSourcePrivacyEngine(noise, accountant=accountant), None
        else:
            engine, noise_generator = PrivacyEngine(accountant=accountant), noise
        dp_model, dp_optimizer, dp_criterion, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=RecordLoss(l2),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            grad_sample_mode="ghost",
            noise_generator=noise_generator,
        )
        sample_rate = dp_loader.batch_sampler.sample_rate
        if not math.isclose(sample_rate, q):
            raise RuntimeError(f"Opacus samples at q={sample_rate}, expected {q}")

        def report(epoch: int, loss: float) -> None:
            if progress is not None:
                progress(epoch, loss, _engine_epsilon(engine, ledger, delta))

        losses = _fit(dp_model, dp_loader, dp_optimizer, dp_criterion, epochs, negatives, report)
    epsilon = _engine_epsilon(engine, ledger, delta)
    if ledger.steps != total_steps:
        raise RuntimeError(f"Opacus took {ledger.steps} noisy steps, expected {total_steps}")
    statement = PrivacyStatement(
        epsilon=epsilon,
        delta=delta,
        unit="record",
        mechanism=MECHANISM,
        accountant=f"{accountant} (opacus)",
        sampling=f"poisson q={q:.4g}",
        noise_multiplier=float(noise_multiplier),
        sample_rate=q,
        steps=ledger.steps,
    )
    return CentralTrainingResult(model.item_table(), statement, losses, float(noise_multiplier))


class NoiseSourceDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's ghost-clipping DP optimiser with its Gaussian noise drawn from a :class:`NoiseSource`
    (the only change: ``add_noise``; clipping, scaling and the accountant hook are Opacus 1.6's)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: NoiseSource, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.noise_source = noise_source

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + N(0, (noise_multiplier · max_grad_norm)²)`` for every parameter."""
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)  # as Opacus does
        std = multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            noise = self.noise_source.gaussian(summed.shape, std, dtype=summed.dtype, device=summed.device)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class NoiseSourcePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler (each record in each of ``steps`` batches independently with
    probability ``sample_rate``) with its Bernoulli masks drawn from a :class:`NoiseSource`."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, noise_source: NoiseSource) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.noise_source = noise_source

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(self.noise_source.uniform(self.num_samples) < self.sample_rate).tolist()


class NoiseSourcePrivacyEngine(PrivacyEngine):
    """A ``PrivacyEngine`` whose noise and Poisson sampling come from ``noise_source`` (e.g.
    :class:`~fedml.privacy.secure_noise.SecureNoise`) instead of ``torch.Generator``s; the clipping
    and the accountant are Opacus's. Supports what this module uses: flat ghost clipping, one
    process, Poisson sampling."""

    def __init__(self, noise_source: NoiseSource, *, accountant: str = "prv") -> None:
        super().__init__(accountant=accountant, secure_mode=False)
        self.noise_source = noise_source

    def _prepare_optimizer(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: str = "hooks",
        **kwargs,
    ) -> DPOptimizer:
        if (clipping, distributed, grad_sample_mode) != ("flat", False, "ghost"):
            raise ValueError(
                "NoiseSourcePrivacyEngine supports clipping='flat', grad_sample_mode='ghost' on one process; got "
                f"clipping={clipping!r}, grad_sample_mode={grad_sample_mode!r}, distributed={distributed}"
            )
        if noise_generator is not None:
            raise ValueError("noise_generator cannot be combined with a noise source")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        return NoiseSourceDPOptimizer(
            optimizer,
            noise_source=self.noise_source,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            **kwargs,
        )

    def _prepare_data_loader(
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        distributed: bool,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ) -> DataLoader:
        if not poisson_sampling or distributed:
            raise ValueError("NoiseSourcePrivacyEngine supports Poisson sampling on one process only")
        # Opacus's DPDataLoader supplies q, the step count and the empty-batch-aware collate_fn
        dp_loader = super()._prepare_data_loader(
            data_loader, poisson_sampling=True, distributed=False, batch_first=batch_first, rand_on_empty=rand_on_empty
        )
        opacus_sampler = dp_loader.batch_sampler
        sampler = NoiseSourcePoissonSampler(
            num_samples=opacus_sampler.num_samples,
            sample_rate=opacus_sampler.sample_rate,
            steps=opacus_sampler.steps,
            noise_source=self.noise_source,
        )
        return DataLoader(
            dataset=dp_loader.dataset,
            batch_sampler=sampler,
            num_workers=dp_loader.num_workers,
            collate_fn=dp_loader.collate_fn,
            pin_memory=dp_loader.pin_memory,
            timeout=dp_loader.timeout,
            worker_init_fn=dp_loader.worker_init_fn,
            multiprocessing_context=dp_loader.multiprocessing_context,
            prefetch_factor=dp_loader.prefetch_factor,
            persistent_workers=dp_loader.persistent_workers,
        )


class _quiet_opacus(warnings.catch_warnings):
    """Hide two harmless Opacus/torch notices: backward hooks on integer (index) inputs, and
    secure_mode off (these runs are seeded and reproducible on purpose)."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the")


def _engine_epsilon(engine: PrivacyEngine, ledger: SubsampledGaussianAccountant, delta: float) -> float:
    """ε of the steps the engine's accountant has recorded.

    RDP: ``engine.get_epsilon``. PRV: the same history through the guarded wrapper (Opacus's PRV
    can stall on huge-ε histories); for a constant (σ, q) both give the same number.
    """
    history = engine.accountant.history
    if any((s, r) != (ledger.noise_multiplier, ledger.sample_rate) for s, r, _ in history):
        raise RuntimeError(f"unexpected accountant history {history}")
    ledger.step(sum(n for _, _, n in history) - ledger.steps)
    if ledger.accountant == "rdp" and history:
        with _quiet_opacus():
            return float(engine.get_epsilon(delta))
    return ledger.epsilon(delta)


def _fit(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    epochs: int,
    negatives: int,
    on_epoch: Callable[[int, float], None] | None,
) -> list[float]:
    """The training loop shared by both modes; returns each epoch's mean per-record loss."""
    losses = []
    model.train()
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for users, items in loader:
            if len(users) == 0:  # an empty Poisson batch: still a noisy step
                _empty_step(model, optimizer)
                continue
            items = items.reshape(len(users), 1 + negatives)
            labels = torch.zeros(items.shape, dtype=torch.float32)
            labels[:, 0] = 1.0
            scores, sq_norm = model(users, items)
            loss = criterion(scores, labels, sq_norm)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(users)
            count += len(users)
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses


def _empty_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DP-SGD step on an empty batch: zero clipped sum, so the update is the noise alone (and the
    accountant counts it). Opacus's ghost-clipping norm for nn.Embedding cannot take a 0-row batch."""
    optimizer.zero_grad()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()


def _generators(seed: int) -> dict[str, torch.Generator]:
    """Independent seeded generators for model init, record sampling, negatives and DP noise."""
    seeds = np.random.SeedSequence(seed).generate_state(4)
    names = ("model", "sampling", "negatives", "noise")
    return {name: torch.Generator().manual_seed(int(s)) for name, s in zip(names, seeds)}


__all__ = [
    "MECHANISM",
    "CentralTrainingResult",
    "MFModel",
    "NoiseSourceDPOptimizer",
    "NoiseSourcePoissonSampler",
    "NoiseSourcePrivacyEngine",
    "RecordDataset",
    "RecordLoss",
    "WithNegatives",
    "poisson_schedule",
    "train_central",
]
