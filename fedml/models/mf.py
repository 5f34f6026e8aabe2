"""Matrix factorisation for implicit feedback, split into a global and a private part.

score(u, i) = p_u . q_i + b_i

* The **item table** (q_i, b_i for every product) is the global model: it is what the server
  aggregates, what DP protects, and what is published.
* The **user vector** p_u is shopper-specific. It never leaves the device: clients keep it, and the
  server (evaluation, serving) recovers one from a shopper's history alone by *fold-in*, so that a
  shopper the server has never seen gets recommendations too.

Training uses the logistic loss with uniformly sampled negatives: for each positive item of a
shopper, ``negatives`` items drawn uniformly from the catalogue are pushed down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedml.data.ragged import Ragged


@dataclass
class ItemTable:
    """The global model: item embeddings ``[n_items, dim]`` and item biases ``[n_items]``.

    ``kind`` says how a shopper's scores come from it: ``mf``, fold the history in (:func:`fold_in`);
    ``ease``, the history's 0/1 row times the table (:mod:`fedml.models.ease`; then ``dim == n_items``).
    """

    embeddings: torch.Tensor
    bias: torch.Tensor
    kind: str = "mf"

    @property
    def n_items(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def clone(self) -> ItemTable:
        return ItemTable(self.embeddings.clone(), self.bias.clone(), self.kind)

    def to(self, device: str | torch.device) -> ItemTable:
        return ItemTable(self.embeddings.to(device), self.bias.to(device), self.kind)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The arrays of the table; ``kind`` too unless it is ``mf`` (tables saved before it existed are ``mf``)."""
        arrays = {
            "item_embeddings": self.embeddings.detach().cpu().numpy().astype(np.float32),
            "item_bias": self.bias.detach().cpu().numpy().astype(np.float32),
        }
        if self.kind != "mf":
            arrays["kind"] = np.array(self.kind)
        return arrays

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray]) -> ItemTable:
        return cls(
            torch.as_tensor(np.asarray(arrays["item_embeddings"], dtype=np.float32)),
            torch.as_tensor(np.asarray(arrays["item_bias"], dtype=np.float32)),
            str(arrays["kind"]) if "kind" in arrays else "mf",
        )


def init_item_table(n_items: int, dim: int, scale: float, seed: int) -> ItemTable:
    """Small Gaussian item embeddings and zero biases, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n_items, dim, generator=generator) * scale
    return ItemTable(embeddings, torch.zeros(n_items))


#: default cap on fold-in steps (a shopper usually stops far earlier, see :func:`fold_in`)
FOLD_IN_ITERATIONS = 30
#: fold-in stops for a shopper once a step moves none of its coordinates more than this
FOLD_IN_TOLERANCE = 1e-5


def fold_in(
    table: ItemTable,
    histories: Sequence[np.ndarray],
    *,
    negatives: int,
    l2: float,
    iterations: int = FOLD_IN_ITERATIONS,
    tolerance: float = FOLD_IN_TOLERANCE,
    chunk_size: int = 512,
    catalogue: FoldInCatalogue | None = None,
) -> torch.Tensor:
    """User vectors for shoppers known only by their histories (item indices), item table frozen.

    Minimises each shopper's *expected* training loss over the uniform negative sampling,
    ``-sum_{i in H} log s(p.q_i + b_i) - c * sum_{j not in H} log(1 - s(p.q_j + b_j)) + l2/2 |p|^2``
    with ``c = negatives * |H| / (n_items - |H|)``, from ``p = 0`` by a quasi-Newton method:

    * the first step is Newton's, exact and cheap: at ``p = 0`` an item's curvature ``s(b)(1 - s(b))``
      depends on its bias alone, so the catalogue's share of the Hessian is one ``dim x dim`` matrix
      for all shoppers, corrected by each shopper's history;
    * later steps are structured quasi-Newton steps (Dennis & Martinez): the history's share of the
      Hessian is recomputed exactly at every step (a few items), the catalogue's share is BFGS-updated
      from exact gradients; a step costs two products with the item matrix, not a per-shopper
      ``n_items x dim^2`` Hessian, and takes about as many steps as Newton's method (one more);
    * a shopper stops once a step moves none of its coordinates more than ``tolerance``, or after
      ``iterations`` steps.

    Shoppers are solved in chunks of up to ``chunk_size``, sorted by history length. A shopper's
    vector depends on its history and the item table alone, deterministically; the other histories
    of the call change it by float rounding only (matrix products of other shapes). It is the same
    computation for evaluation, serving and a new shopper. Returns float32 ``[len(histories), dim]``.
    ``catalogue`` is ``FoldInCatalogue.of(table)``, for callers that fold in against one table many
    times (a server): it saves recomputing the shared terms on every call.
    """
    if catalogue is None:
        catalogue = FoldInCatalogue.of(table)
    q = catalogue.q
    n_items, dim = q.shape
    out = torch.zeros(len(histories), dim, dtype=q.dtype, device=q.device)
    rows = Ragged.of(histories)
    sizes, flat = rows.sizes, rows.flat
    starts = np.cumsum(sizes) - sizes  # shopper k's history is flat[starts[k] : starts[k] + sizes[k]]
    order = np.argsort(sizes, kind="stable")  # chunks of similar history lengths: little padding
    # chunks of at most chunk_size shoppers (small working sets stay in cache), [shoppers, n_items] scores
    # at most 64 MiB of floats, padded histories at most 1 Mi entries
    max_rows = max(1, min(chunk_size, 16_000_000 // max(1, n_items)))
    start = 0
    while start < len(order):
        rows = np.arange(1, min(max_rows, len(order) - start) + 1)
        stop = start + max(1, int((rows * sizes[order[start : start + len(rows)]] <= 1 << 20).sum()))
        chunk = order[start:stop]
        hist = _Histories.of(flat, starts[chunk], sizes[chunk], negatives, n_items, q.device)
        out.index_copy_(
            0, torch.as_tensor(chunk, device=q.device), _fold_in_chunk(catalogue, hist, l2, iterations, tolerance)
        )
        start = stop
    return out


@dataclass(frozen=True)
class FoldInCatalogue:
    """The frozen item table (float32), and its fold-in terms at ``p = 0`` shared by all shoppers."""

    q: torch.Tensor  # [n_items, dim]
    b: torch.Tensor  # [n_items]
    hessian0: torch.Tensor  # [dim, dim]: sum_j s(b_j)(1 - s(b_j)) q_j q_j^T
    gradient0: torch.Tensor  # [dim]: sum_j s(b_j) q_j

    @classmethod
    def of(cls, table: ItemTable) -> FoldInCatalogue:
        q, b = table.embeddings.float(), table.bias.float()
        s0 = torch.sigmoid(b)
        return cls(q=q, b=b, hessian0=q.T @ (q * (s0 * (1.0 - s0))[:, None]), gradient0=s0 @ q)


@dataclass
class _Histories:
    """Some shoppers' histories, padded to the longest: row ``k`` is shopper ``k``."""

    items: torch.Tensor  # int64 [n, width]: item indices, 0 where padding
    mask: torch.Tensor  # float32 [n, width]: 1 for a history item, 0 for padding
    weight: torch.Tensor  # float32 [n]: the negative weight c

    @classmethod
    def of(
        cls, flat: np.ndarray, starts: np.ndarray, sizes: np.ndarray, negatives: int, n_items: int, device: torch.device
    ) -> _Histories:
        """The histories ``flat[starts[k] : starts[k] + sizes[k]]``."""
        columns = np.arange(int(sizes.max(initial=0)))
        mask = columns[None, :] < sizes[:, None]
        positions = np.minimum(starts[:, None] + columns, max(len(flat) - 1, 0))  # clipped: padding reads anything
        items = np.where(mask, flat[positions], 0) if len(flat) else np.zeros(mask.shape, dtype=np.int64)
        size = torch.as_tensor(sizes, device=device).float()
        weight = negatives * size / (n_items - size).clamp(min=1.0)
        return cls(torch.as_tensor(items, device=device), torch.as_tensor(mask, device=device).float(), weight)

    def __getitem__(self, rows: torch.Tensor) -> _Histories:
        return _Histories(self.items[rows], self.mask[rows], self.weight[rows])


def _fold_in_chunk(
    catalogue: FoldInCatalogue, hist: _Histories, l2: float, iterations: int, tolerance: float
) -> torch.Tensor:
    """:func:`fold_in` of one chunk of histories: ``[n, dim]``.

    Short histories (at most ``dim`` items, as served requests are) folded in to convergence take
    structured quasi-Newton steps (:func:`_fold_in_chunk_structured`: about 5 passes over the
    catalogue where BFGS needs 7). Otherwise BFGS from the exact Hessian at ``p = 0``
    (:func:`_fold_in_chunk_bfgs`): a long history's exact Hessian at every step would cost as much
    as a pass over the catalogue, and a budget of a step or two (a new client's start in training)
    gains nothing from steps that cost more to need fewer.
    """
    if hist.items.shape[1] <= catalogue.q.shape[1] and iterations > 2:
        try:
            return _fold_in_chunk_structured(catalogue, hist, l2, iterations, tolerance)
        except torch.linalg.LinAlgError:  # a Hessian float32 cannot factor (a table wrecked by an attack, say)
            pass
    return _fold_in_chunk_bfgs(catalogue, hist, l2, iterations, tolerance)


def _fold_in_chunk_structured(
    catalogue: FoldInCatalogue, hist: _Histories, l2: float, iterations: int, tolerance: float
) -> torch.Tensor:
    """:func:`fold_in` of one chunk of histories: ``[n, dim]``.

    Structured quasi-Newton steps for short histories: the objective splits into the history's
    positives (gradient and Hessian exact at every step) and the negatives, every other item with
    weight ``c``, plus the ``l2`` term (exact gradient from one pass over the item matrix; Hessian
    exact at ``p = 0``, then BFGS-updated from the negatives' gradient changes). A step solves with
    their sum and takes the length :func:`_step_length` finds.
    """
    q, b = catalogue.q, catalogue.b
    n, dim = hist.items.shape[0], q.shape[1]
    # index_select rather than q[items]: the same rows, several times faster on CPU
    q_hist = q.index_select(0, hist.items.view(-1)).view(*hist.items.shape, dim)  # [n, width, dim]
    z_hist = b.index_select(0, hist.items.view(-1)).view(hist.items.shape)  # the history's scores at p = 0
    s_hist = torch.sigmoid(z_hist) * hist.mask
    c = hist.weight[:, None]
    # at p = 0 the catalogue's shared terms, less the history's items, which are no negatives
    negatives_gradient = c * (catalogue.gradient0 - _history_sum(s_hist, q_hist))
    gradient = torch.baddbmm(negatives_gradient.unsqueeze(1), (s_hist - hist.mask).unsqueeze(1), q_hist).squeeze(1)
    negatives_hessian = torch.eye(dim, dtype=q.dtype, device=q.device) * l2 + c[:, :, None] * (
        catalogue.hessian0 - _history_gram(s_hist * (1.0 - s_hist), q_hist)
    )
    bfgs = _BFGSHessian(negatives_hessian, l2)

    shoppers = _Moving(n, dim, q)  # the chunk's vectors; gradient, q_hist, ...: the rows of those still moving
    scores = torch.empty(n, q.shape[0], dtype=q.dtype, device=q.device)  # reused by every gradient
    for step_index in range(iterations):
        # the history's Hessian at p, plus the negatives' (s_hist is 0 on padding)
        curvature = torch.addcmul(s_hist, s_hist, s_hist, value=-1.0)  # s (1 - s)
        hessian = torch.baddbmm(bfgs.hessian, (q_hist * curvature.unsqueeze(-1)).transpose(1, 2), q_hist)
        direction = torch.cholesky_solve(gradient.unsqueeze(-1), _cholesky(hessian)).squeeze(-1).neg_()
        step = direction * _step_length(direction, gradient, negatives_gradient, bfgs, q_hist, z_hist, hist.mask)
        if shoppers.take(step, direction.abs().amax(1) <= tolerance) or step_index == iterations - 1:
            break
        if (keep := shoppers.drop_stopped()) is not None:
            step, gradient, negatives_gradient, q_hist = (
                step[keep],
                gradient[keep],
                negatives_gradient[keep],
                q_hist[keep],
            )
            hist, bfgs = hist[keep], bfgs[keep]
        p_active = shoppers.vectors
        s = torch.addmm(b, p_active, q.T, out=scores[: len(p_active)])
        z_hist = s.gather(1, hist.items)
        s_hist = torch.sigmoid(z_hist).mul_(hist.mask)
        s.sigmoid_()
        # c (sum over all items - over the history's) + l2 p
        new_negatives_gradient = torch.baddbmm((s @ q).unsqueeze(1), s_hist.unsqueeze(1), q_hist, alpha=-1.0)
        new_negatives_gradient = new_negatives_gradient.squeeze(1).mul_(hist.weight[:, None]).add_(p_active, alpha=l2)
        new_gradient = torch.baddbmm(
            new_negatives_gradient.unsqueeze(1), (s_hist - hist.mask).unsqueeze(1), q_hist
        ).squeeze(1)
        bfgs.update(step, new_negatives_gradient - negatives_gradient)  # a stopped shopper's zero step: no change
        gradient, negatives_gradient = new_gradient, new_negatives_gradient
    return shoppers.result()


def _fold_in_chunk_bfgs(
    catalogue: FoldInCatalogue, hist: _Histories, l2: float, iterations: int, tolerance: float
) -> torch.Tensor:
    """:func:`fold_in` of one chunk of histories by BFGS from the exact Hessian at ``p = 0``: ``[n, dim]``."""
    q, b = catalogue.q, catalogue.b
    n, dim = hist.items.shape[0], q.shape[1]
    # index_select rather than q[items]: the same rows, several times faster on CPU
    q_hist = q.index_select(0, hist.items.view(-1)).view(*hist.items.shape, dim)  # [n, width, dim]
    # at p = 0: the catalogue's shared gradient and Hessian, times c, corrected for the history's items
    s_hist = torch.sigmoid(b.index_select(0, hist.items.view(-1)).view(hist.items.shape))
    side = (1.0 - hist.weight)[:, None] * hist.mask  # a history item counts as a positive (1), not as a negative (c)
    gradient = _history_sum(side * s_hist - hist.mask, q_hist) + hist.weight[:, None] * catalogue.gradient0
    weighted = q_hist * (side * s_hist * (1.0 - s_hist))[:, :, None]
    hessian = torch.bmm(weighted.transpose(1, 2), q_hist)
    hessian.addcmul_(hist.weight[:, None, None], catalogue.hessian0).diagonal(dim1=1, dim2=2).add_(l2)
    bfgs = _InverseBFGS(torch.linalg.cholesky(hessian), l2)
    del weighted, hessian

    shoppers = _Moving(n, dim, q)  # the chunk's vectors; gradient, q_hist, ...: the rows of those still moving
    scores = torch.empty(n, q.shape[0], dtype=q.dtype, device=q.device)  # reused by every gradient
    for step_index in range(iterations):
        step = -bfgs.apply(gradient)
        if shoppers.take(step, step.abs().amax(1) <= tolerance) or step_index == iterations - 1:
            break
        if (keep := shoppers.drop_stopped()) is not None:
            step, gradient, q_hist, hist, bfgs = step[keep], gradient[keep], q_hist[keep], hist[keep], bfgs[keep]
        new_gradient = _gradient(catalogue, hist, q_hist, shoppers.vectors, l2, scores[: len(step)])
        bfgs.update(step, new_gradient - gradient)  # a stopped shopper's zero step leaves its H as it is
        gradient = new_gradient
    return shoppers.result()


class _InverseBFGS:
    """Inverse Hessian approximations of a batch of shoppers, in limited-memory form.

    ``H_0^{-1}`` is given by its Cholesky factor (the exact Hessian at ``p = 0``); each update with a
    step ``s`` and gradient change ``y`` is ``H+ = (I - r s y^T) H (I - r y s^T) + r s s^T``,
    ``r = 1 / y.s``, applied by the two-loop recursion (all pairs are kept: fold-in takes few steps).
    The objective is ``l2``-strongly convex, so ``y.s >= l2 |s|^2``; a pair that misses half of that
    (float rounding of a tiny step) is left out (``r = 0``), which keeps ``H`` positive definite.
    """

    def __init__(self, cholesky: torch.Tensor, l2: float) -> None:
        self.cholesky, self.l2 = cholesky, l2
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, r)

    def apply(self, gradient: torch.Tensor) -> torch.Tensor:
        """``H^{-1} gradient`` for every shopper."""
        v, alphas = gradient, []
        for s, y, r in reversed(self.pairs):
            alpha = r * (s * v).sum(1, keepdim=True)
            v = v - alpha * y
            alphas.append(alpha)
        v = torch.cholesky_solve(v.unsqueeze(-1), self.cholesky).squeeze(-1)
        for (s, y, r), alpha in zip(self.pairs, reversed(alphas)):
            v = v + (alpha - r * (y * v).sum(1, keepdim=True)) * s
        return v

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        ys = (y * s).sum(1, keepdim=True)
        curved = ys > 0.5 * self.l2 * (s * s).sum(1, keepdim=True)
        self.pairs.append((s, y, torch.where(curved, 1.0 / torch.where(curved, ys, 1.0), 0.0)))

    def __getitem__(self, rows: torch.Tensor) -> _InverseBFGS:
        kept = _InverseBFGS(self.cholesky[rows], self.l2)
        kept.pairs = [(s[rows], y[rows], r[rows]) for s, y, r in self.pairs]
        return kept


def _gradient(
    catalogue: FoldInCatalogue, hist: _Histories, q_hist: torch.Tensor, p: torch.Tensor, l2: float, out: torch.Tensor
) -> torch.Tensor:
    """The fold-in objective's gradient at ``p`` (``[n, dim]``; ``q_hist``: the histories' item rows).

    ``out`` (``[n, n_items]``) receives the scores' sigmoids.
    """
    q, b = catalogue.q, catalogue.b
    s = torch.addmm(b, p, q.T, out=out).sigmoid_()
    s_hist = s.gather(1, hist.items)
    history = _history_sum(((1.0 - hist.weight)[:, None] * s_hist - 1.0) * hist.mask, q_hist)
    return torch.addcmul(history, hist.weight[:, None], s @ q).add_(p, alpha=l2)


class _Moving:
    """A chunk's user vectors while fold-in runs: the shoppers still moving, and those that stopped.

    A stopped shopper is carried along (its steps zeroed) until more than an eighth of the carried
    rows have stopped; then they are dropped, and the callers drop the same rows of their tensors.
    """

    def __init__(self, n: int, dim: int, like: torch.Tensor) -> None:
        self.p = torch.zeros(n, dim, dtype=like.dtype, device=like.device)
        self.active = torch.arange(n, device=like.device)  # the shoppers of the carried rows
        self.vectors = self.p  # the carried rows' vectors
        self.done = torch.zeros(n, dtype=torch.bool, device=like.device)
        self.stopped = 0

    def take(self, step: torch.Tensor, converged: torch.Tensor) -> bool:
        """Move by ``step`` (zeroed in place for stopped rows); stop the ``converged`` ones. True: all stopped."""
        if self.stopped:
            step.masked_fill_(self.done[:, None], 0.0)
        self.vectors = self.vectors + step
        self.done |= converged
        self.stopped = int(self.done.sum())
        return self.stopped == len(self.done)

    def drop_stopped(self) -> torch.Tensor | None:
        """The rows to keep, once the stopped ones are worth a copy (None: keep carrying them)."""
        if 8 * self.stopped <= len(self.done):
            return None
        self.p.index_copy_(0, self.active, self.vectors)
        keep = ~self.done
        self.active, self.vectors, self.done, self.stopped = self.active[keep], self.vectors[keep], self.done[keep], 0
        return keep

    def result(self) -> torch.Tensor:
        self.p.index_copy_(0, self.active, self.vectors)
        return self.p


def _cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Cholesky factors of a batch of Hessians that are positive definite in exact arithmetic.

    On extreme tables (item vectors scaled x100 by a poisoning attack, say) float32 rounding of the
    sums can leave one indefinite; its diagonal is then raised by 1e-6, 1e-5, ... of its largest
    entry until it factors (still a descent direction, as any positive definite matrix gives).
    """
    factor, info = torch.linalg.cholesky_ex(hessian)
    shift = 1e-6
    while bool(info.any()):
        if shift > 1.0:
            raise torch.linalg.LinAlgError("fold-in: a Hessian stays indefinite after shifting its diagonal")
        failed = info > 0
        scale = hessian[failed].diagonal(dim1=1, dim2=2).abs().amax(1).clamp(min=1e-30)
        hessian = hessian.clone()
        hessian[failed] += (shift * scale)[:, None, None] * torch.eye(hessian.shape[-1], dtype=hessian.dtype,
                                                                       device=hessian.device)  # fmt: skip
        factor, info = torch.linalg.cholesky_ex(hessian)
        shift *= 10.0
    return factor


#: step lengths tried along a quasi-Newton direction: 0 (the start), then 1, 1/2, 1/4, ...
_STEP_LENGTHS = torch.cat((torch.zeros(1), 0.5 ** torch.arange(16, dtype=torch.float32)))
#: sufficient decrease (Armijo): a step of length t must gain this share of t times the directional slope
_ARMIJO = 1e-4
#: relative size of the model's float rounding (a sum of float32 terms)
_RESOLUTION = 1e-5


def _step_length(
    direction: torch.Tensor,
    gradient: torch.Tensor,
    negatives_gradient: torch.Tensor,
    negatives: _BFGSHessian,
    q_hist: torch.Tensor,
    z_hist: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The longest of 1, 1/2, 1/4, ... along ``direction`` that decreases a model of the objective enough:
    the history's terms exact (``z_hist``: their scores now), the negatives' their quadratic model
    (gradient and ``negatives.hessian``). ``[n, 1]``.

    Without it, a shopper with one or two history items can cycle: a full step pushes those items'
    scores so high that their curvature vanishes, and the next step overshoots back. The full step
    is tried first for everyone; shorter ones only for the shoppers it does not suit (few).
    """
    lengths = _STEP_LENGTHS.to(direction.device, direction.dtype)
    rate = torch.bmm(q_hist, direction.unsqueeze(-1))  # [n, width, 1]: the history scores' change per unit length
    linear = torch.linalg.vecdot(negatives_gradient, direction).unsqueeze(1)
    quadratic = torch.linalg.vecdot(direction, torch.bmm(negatives.hessian, direction.unsqueeze(-1)).squeeze(-1))
    slope = torch.linalg.vecdot(gradient, direction).unsqueeze(1)  # < 0: a descent direction

    def enough(rows: torch.Tensor | slice, tried: torch.Tensor) -> torch.Tensor:
        """Whether each length in ``tried`` (after 0, the start) decreases the model enough, for these rows."""
        scores = torch.addcmul(z_hist[rows].unsqueeze(-1), rate[rows], tried)  # [rows, width, lengths]
        model = (F.logsigmoid(scores) * mask[rows].unsqueeze(-1)).sum(1).neg_()  # -sum log s
        model.addcmul_(linear[rows], tried).addcmul_(quadratic[rows].unsqueeze(1), tried * tried, value=0.5)
        # changes below float32's resolution of the model are not evidence against a step: near the optimum, take it
        allowed = torch.addcmul(model[:, :1], slope[rows], tried[1:], value=_ARMIJO)
        return model[:, 1:] <= allowed + _RESOLUTION * (1.0 + model[:, :1].abs())

    chosen = torch.ones(len(direction), 1, dtype=direction.dtype, device=direction.device)
    short = ~enough(slice(None), lengths[:2])[:, 0]
    if bool(short.any()):
        rows = short.nonzero().squeeze(1)
        fits = enough(rows, lengths).to(torch.int8)  # lengths 1, 1/2, ... for the rows a full step does not suit
        first = fits.argmax(1).masked_fill_(fits.amax(1) == 0, len(lengths) - 2)
        chosen[rows] = lengths[1:][first].unsqueeze(1)
    return chosen


class _BFGSHessian:
    """A batch of Hessians ``[n, dim, dim]`` (the whole objective's, or its negatives' and ``l2``'s part), BFGS-updated.

    It starts exact (at ``p = 0``); each update with a step ``s`` and the change ``y`` of the
    matching gradient is ``B+ = B - (B s)(B s)^T / s.B s + y y^T / y.s``. Both are ``l2``-strongly
    convex, so ``y.s >= l2 |s|^2`` and ``B`` stays positive definite; a pair that misses half of that
    (float rounding of a tiny step, or a stopped shopper's zero step) is left out.
    """

    def __init__(self, hessian: torch.Tensor, l2: float) -> None:
        self.hessian, self.l2 = hessian, l2

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        bs = torch.bmm(self.hessian, s.unsqueeze(-1)).squeeze(-1)
        ys, sbs = torch.linalg.vecdot(y, s), torch.linalg.vecdot(bs, s)
        curved = (ys > 0.5 * self.l2 * torch.linalg.vecdot(s, s)) & (sbs > 0)
        y_weight = torch.where(curved, ys, 1.0).reciprocal_().mul_(curved)  # 1 / y.s, or 0: left out
        bs_weight = torch.where(curved, sbs, 1.0).reciprocal_().mul_(curved).neg_()  # -1 / s.B s, or 0
        # B + (y / y.s) y^T - (B s / s.B s) (B s)^T as one batched product
        left = torch.stack((y * y_weight[:, None], bs * bs_weight[:, None]), 2)  # [n, dim, 2]
        self.hessian = torch.baddbmm(self.hessian, left, torch.stack((y, bs), 1))

    def __getitem__(self, rows: torch.Tensor) -> _BFGSHessian:
        return _BFGSHessian(self.hessian[rows], self.l2)


def _history_sum(coefficients: torch.Tensor, q_hist: torch.Tensor) -> torch.Tensor:
    """``sum_k coefficients[:, k] q_hist[:, k]``: ``[n, dim]``."""
    return torch.bmm(coefficients.unsqueeze(1), q_hist).squeeze(1)


def _history_gram(coefficients: torch.Tensor, q_hist: torch.Tensor) -> torch.Tensor:
    """``sum_k coefficients[:, k] q_hist[:, k] q_hist[:, k]^T``: ``[n, dim, dim]``."""
    return torch.bmm((q_hist * coefficients[:, :, None]).transpose(1, 2), q_hist)


def score_all(table: ItemTable, user_vectors: torch.Tensor) -> torch.Tensor:
    """Scores of every catalogue item for each user vector: ``[n_users, n_items]``."""
    return torch.addmm(table.bias, user_vectors, table.embeddings.T)
