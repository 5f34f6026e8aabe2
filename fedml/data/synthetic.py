"""A synthetic shop: a product catalogue and a seeded log of view → cart → purchase events.

The generative model, all of it vectorised numpy:

* **Catalogue.** Every item belongs to one category (each category gets at least one item).
  Item popularity follows a Zipf law over a random ranking, ``weight ∝ rank^-ZIPF_EXPONENT``;
  a category's share of the traffic is the sum of its items' weights, so item views stay
  Zipf-distributed over the whole shop.
* **Shoppers.** Each shopper has 1–3 favourite categories (drawn by category popularity) with
  Dirichlet(1) weights over them: a sparse Dirichlet taste.
* **Sessions.** A shopper has ``1 + NegativeBinomial`` sessions (mean ``mean_sessions``, shape
  :data:`SESSION_DISPERSION`: a heavy-ish tail) spread uniformly over :data:`SPAN_DAYS` days.
  A session picks a category from the taste, or with probability :data:`EXPLORE_PROB` from the
  shop's popularity, and views 1–5 items of it drawn by popularity (seconds to minutes apart).
* **Funnel.** Each view leads to a cart with :data:`P_CART`, each cart to a purchase with
  :data:`P_PURCHASE` (purchases ≈ 12.5% of views), a little later.
* **Realism.** The defaults above are the original hand-picked ones (tests and benchmarks rely on
  them); :func:`fedml.data.realism.realistic_shop` passes a session dispersion and funnel fitted to
  MovieLens 100K and Tmall (``fedml/data/realism_targets.json``, ``docs/quality.md``).
* **Top-up.** A shopper with fewer than :data:`MIN_DISTINCT_ITEMS` distinct items gets extra
  exploration sessions until they have enough, so every shopper can be split leave-last-out.

Same arguments, same output: all randomness comes from one ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedml.data.schema import EVENT, ITEM, RATING, TIMESTAMP, USER
from fedml.data.split import distinct_counts

ZIPF_EXPONENT = 1.1
EXPLORE_PROB = 0.1
P_CART = 0.25
P_PURCHASE = 0.5
MAX_VIEWS = 5
SPAN_DAYS = 90
SESSION_DISPERSION = 2.0  # negative-binomial shape r: the smaller, the heavier the tail
FAVOURITES_P = (0.45, 0.35, 0.20)  # P(1, 2 or 3 favourite categories)
MIN_DISTINCT_ITEMS = 3
MAX_TOP_UP_ROUNDS = 200
VIEW_GAP_S = 40.0  # mean seconds between views of a session
CART_GAP_S = 30.0  # mean seconds from a view to its cart
PURCHASE_GAP_S = 90.0  # mean seconds from a cart to its purchase

FUNNEL = ("view", "cart", "purchase")
CATEGORY_WORDS = (
    "Shoes", "Bags", "Books", "Kitchen", "Toys", "Garden", "Beauty", "Sports",
    "Music", "Games", "Tools", "Pets", "Baby", "Jewellery", "Outdoor", "Office",
)  # fmt: skip


@dataclass
class Shop:
    """The generated shop: the canonical interactions frame and the product catalogue."""

    interactions: pd.DataFrame  # canonical columns, sorted by (user_id, timestamp)
    catalogue: pd.DataFrame  # item_id, category, name, price, popularity (view share, sums to 1)


@dataclass
class _Catalogue:
    category: np.ndarray  # int64 [n_items]
    weight: np.ndarray  # float64 [n_items], Zipf popularity, sums to 1
    category_p: np.ndarray  # float64 [n_categories], traffic share of each category
    order: np.ndarray  # int64 [n_items]: items grouped by category
    cdf: np.ndarray  # float64 [n_items]: category + within-category cumulative p, in `order`


@dataclass
class _Tastes:
    categories: np.ndarray  # int64 [n_shoppers, 3] favourite categories (repeats allowed)
    cdf: np.ndarray  # float64 [n_shoppers, 3] cumulative taste weights, last column 1


@dataclass
class _Events:
    shopper: np.ndarray  # int64
    item: np.ndarray  # int64
    time: np.ndarray  # int64 seconds after the start


def generate_shop(
    n_shoppers: int,
    n_items: int,
    n_categories: int,
    *,
    mean_sessions: float = 6.0,
    seed: int = 7,
    start: str | pd.Timestamp = "2026-01-01",
    session_dispersion: float = SESSION_DISPERSION,
    p_cart: float = P_CART,
    p_purchase: float = P_PURCHASE,
) -> Shop:
    """Generate a reproducible shop; see the module docstring for the model.

    ``session_dispersion``, ``p_cart`` and ``p_purchase`` default to the module's constants;
    :func:`fedml.data.realism.realistic_shop` passes the values fitted to the real data sets.
    """
    _check_sizes(n_shoppers, n_items, n_categories, mean_sessions)
    _check_shape(session_dispersion, p_cart, p_purchase)
    rng = np.random.default_rng(seed)
    catalogue = _make_catalogue(rng, n_items, n_categories)
    events, stage = _shopper_events(rng, catalogue, n_shoppers, mean_sessions, session_dispersion, p_cart, p_purchase)
    interactions = _interactions_frame(events, stage, n_shoppers, n_items, _unix(start))
    return Shop(interactions=interactions, catalogue=_catalogue_frame(rng, catalogue))


def shopper_ids(n: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``S000000``, ``S000001``, …: the ids of shoppers ``start..stop-1`` of a shop of ``n``."""
    return _ids("S", n, width=6, start=start, stop=stop)


def product_ids(n: int) -> np.ndarray:
    """``P00000``, ``P00001``, …: the synthetic product ids."""
    return _ids("P", n, width=5)


def _ids(prefix: str, n: int, width: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Ids of indices ``start..stop-1``, zero-padded to the width the largest index of ``n`` needs."""
    digits = np.arange(start, n if stop is None else stop).astype(str)
    return np.strings.add(prefix, np.strings.zfill(digits, max(width, len(str(max(n - 1, 0))))))


def _check_sizes(n_shoppers: int, n_items: int, n_categories: int, mean_sessions: float) -> None:
    if n_shoppers < 1 or n_categories < 1:
        raise ValueError(f"need n_shoppers >= 1 and n_categories >= 1, got {n_shoppers}, {n_categories}")
    if n_items < max(n_categories, MIN_DISTINCT_ITEMS):
        raise ValueError(
            f"need n_items >= max(n_categories, {MIN_DISTINCT_ITEMS}), got n_items={n_items}, "
            f"n_categories={n_categories}"
        )
    if mean_sessions < 1:
        raise ValueError(f"mean_sessions must be >= 1, got {mean_sessions}")


def _check_shape(session_dispersion: float, p_cart: float, p_purchase: float) -> None:
    if not session_dispersion > 0:
        raise ValueError(f"session_dispersion must be > 0, got {session_dispersion}")
    for name, p in (("p_cart", p_cart), ("p_purchase", p_purchase)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")


def _make_catalogue(rng: np.random.Generator, n_items: int, n_categories: int) -> _Catalogue:
    # every category gets one item, the rest are spread by Dirichlet category sizes
    sizes = 1 + rng.multinomial(n_items - n_categories, rng.dirichlet(np.full(n_categories, 2.0)))
    category = rng.permutation(np.repeat(np.arange(n_categories, dtype=np.int64), sizes))
    rank = rng.permutation(n_items)
    weight = (rank + 1.0) ** -ZIPF_EXPONENT
    weight /= weight.sum()
    category_p = np.bincount(category, weights=weight, minlength=n_categories)
    order = np.argsort(category, kind="stable")
    # cumulative item probability within each category, offset by the category index, so that
    # one searchsorted over the whole array samples from any category: value in [c, c + 1]
    within = np.cumsum(weight[order]) - np.repeat(np.cumsum(category_p) - category_p, sizes)
    cdf = category[order] + within / category_p[category[order]]
    cdf[np.cumsum(sizes) - 1] = np.arange(1, n_categories + 1)  # exact category ends
    return _Catalogue(category, weight, category_p, order, cdf)


def _make_tastes(rng: np.random.Generator, n_shoppers: int, category_p: np.ndarray) -> _Tastes:
    n_favourites = 1 + rng.choice(len(FAVOURITES_P), size=n_shoppers, p=FAVOURITES_P)
    categories = rng.choice(len(category_p), size=(n_shoppers, len(FAVOURITES_P)), p=category_p)
    weights = rng.gamma(1.0, size=categories.shape)  # Dirichlet(1) once normalised
    weights[np.arange(len(FAVOURITES_P)) >= n_favourites[:, None]] = 0.0
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    return _Tastes(categories.astype(np.int64), cdf)


def _session_views(
    rng: np.random.Generator, cat: _Catalogue, tastes: _Tastes, shoppers: np.ndarray, explore_prob: float
) -> _Events:
    """One session per entry of ``shoppers``: pick a category, view 1–5 of its items."""
    n = len(shoppers)
    slot = (rng.random(n)[:, None] > tastes.cdf[shoppers]).sum(axis=1).clip(max=tastes.cdf.shape[1] - 1)
    category = tastes.categories[shoppers, slot]
    explore = rng.random(n) < explore_prob
    category[explore] = rng.choice(len(cat.category_p), size=int(explore.sum()), p=cat.category_p)
    start = rng.integers(0, SPAN_DAYS * 86_400 - 3_600, size=n)

    n_views = rng.integers(1, MAX_VIEWS + 1, size=n)
    session = np.repeat(np.arange(n), n_views)
    u = category[session] + rng.random(len(session))
    item = cat.order[np.searchsorted(cat.cdf, u, side="right").clip(max=len(cat.order) - 1)]
    gaps = 1.0 + rng.exponential(VIEW_GAP_S, size=len(session))
    first = np.cumsum(n_views) - n_views  # index of each session's first view
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first] - gaps[first], n_views)  # restart the clock per session
    return _Events(shoppers[session], item, start[session] + elapsed.astype(np.int64))


def _top_up(
    rng: np.random.Generator, cat: _Catalogue, tastes: _Tastes, views: _Events, n_shoppers: int, n_items: int
) -> list[_Events]:
    """Extra exploration sessions for shoppers with too few distinct items, until none is left."""
    short = np.flatnonzero(distinct_counts(views.shopper, views.item, n_shoppers, n_items) < MIN_DISTINCT_ITEMS)
    theirs = np.isin(views.shopper, short)
    pool = [_Events(views.shopper[theirs], views.item[theirs], views.time[theirs])]
    for _ in range(MAX_TOP_UP_ROUNDS):
        if len(short) == 0:
            return pool[1:]
        pool.append(_session_views(rng, cat, tastes, short, explore_prob=1.0))
        seen = _concat(pool)
        short = short[distinct_counts(seen.shopper, seen.item, n_shoppers, n_items)[short] < MIN_DISTINCT_ITEMS]
    raise RuntimeError(f"could not give every shopper {MIN_DISTINCT_ITEMS} distinct items")


def _concat(parts: list[_Events]) -> _Events:
    return _Events(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("shopper", "item", "time")))


def _funnel(
    rng: np.random.Generator, views: _Events, p_cart: float = P_CART, p_purchase: float = P_PURCHASE
) -> tuple[_Events, np.ndarray]:
    """Add carts and purchases after the views; returns the events and their funnel stage."""
    carted = rng.random(len(views.item)) < p_cart
    cart_time = views.time[carted] + 1 + rng.exponential(CART_GAP_S, int(carted.sum())).astype(np.int64)
    bought = rng.random(len(cart_time)) < p_purchase
    buy_time = cart_time[bought] + 1 + rng.exponential(PURCHASE_GAP_S, int(bought.sum())).astype(np.int64)
    cart_idx = np.flatnonzero(carted)
    buy_idx = cart_idx[bought]
    events = _Events(
        np.concatenate([views.shopper, views.shopper[cart_idx], views.shopper[buy_idx]]),
        np.concatenate([views.item, views.item[cart_idx], views.item[buy_idx]]),
        np.concatenate([views.time, cart_time, buy_time]),
    )
    stage = np.repeat(np.arange(3, dtype=np.int8), [len(views.item), len(cart_idx), len(buy_idx)])
    return events, stage


def _shopper_events(
    rng: np.random.Generator,
    cat: _Catalogue,
    n_shoppers: int,
    mean_sessions: float,
    session_dispersion: float = SESSION_DISPERSION,
    p_cart: float = P_CART,
    p_purchase: float = P_PURCHASE,
) -> tuple[_Events, np.ndarray]:
    """The shopper model for shoppers ``0..n_shoppers-1``: tastes, sessions, top-up and funnel.

    Returns the events and their funnel stage (int8) in the frame's row order: sorted by
    shopper, then time, funnel stage and item, exact repeats dropped. Shared with
    :mod:`fedml.data.population`, which calls it once per block of shoppers.
    """
    n_items = len(cat.category)
    tastes = _make_tastes(rng, n_shoppers, cat.category_p)
    n_sessions = 1 + rng.negative_binomial(
        session_dispersion, session_dispersion / (session_dispersion + mean_sessions - 1), n_shoppers
    )
    shoppers = np.repeat(np.arange(n_shoppers, dtype=np.int64), n_sessions)
    views = [_session_views(rng, cat, tastes, shoppers, EXPLORE_PROB)]
    views += _top_up(rng, cat, tastes, views[0], n_shoppers, n_items)
    events, stage = _funnel(rng, _concat(views), p_cart, p_purchase)
    # order by shopper, then time, funnel stage and item (one int64 key: times span only ~90 days)
    within = (events.time * len(FUNNEL) + stage) * n_items + events.item
    order = np.lexsort((within, events.shopper))
    shopper, within = events.shopper[order], within[order]
    repeat = (shopper[1:] == shopper[:-1]) & (within[1:] == within[:-1])  # e.g. two carts in one second
    order = order[np.concatenate([[True], ~repeat])]
    return _Events(events.shopper[order], events.item[order], events.time[order]), stage[order]


def _interactions_frame(events: _Events, stage: np.ndarray, n_shoppers: int, n_items: int, start: int) -> pd.DataFrame:
    """The canonical frame of events already in row order (see :func:`_shopper_events`)."""
    return pd.DataFrame(
        {
            USER: pd.array(shopper_ids(n_shoppers), dtype="str").take(events.shopper),
            ITEM: pd.array(product_ids(n_items), dtype="str").take(events.item),
            EVENT: pd.array(np.array(FUNNEL), dtype="str").take(stage.astype(np.int64)),
            RATING: np.full(len(stage), np.nan),
            TIMESTAMP: start + events.time,
        }
    )


def _catalogue_frame(rng: np.random.Generator, cat: _Catalogue) -> pd.DataFrame:
    n_items, n_categories = len(cat.category), len(cat.category_p)
    category = _category_labels(n_categories)[cat.category]
    mean_log_price = rng.uniform(np.log(5.0), np.log(200.0), size=n_categories)
    price = np.round(np.exp(mean_log_price[cat.category] + rng.normal(0.0, 0.5, size=n_items)), 2)
    ids = product_ids(n_items)
    return pd.DataFrame(
        {
            ITEM: pd.array(ids, dtype="str"),
            "category": pd.array(category, dtype="str"),
            "name": pd.array(np.strings.add(np.strings.add(category, " "), ids), dtype="str"),
            "price": price,
            "popularity": cat.weight,
        }
    )


def _category_labels(n: int) -> np.ndarray:
    """``Shoes, Bags, …, Office, Shoes 2, Bags 2, …``."""
    words = len(CATEGORY_WORDS)
    return np.array([CATEGORY_WORDS[c % words] + (f" {c // words + 1}" if c >= words else "") for c in range(n)])


def _unix(start: str | pd.Timestamp) -> int:
    ts = pd.Timestamp(start)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.timestamp())


__all__ = ["Shop", "generate_shop", "shopper_ids", "product_ids"]
