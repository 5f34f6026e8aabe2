"""Statistics of an interaction frame, to check a synthetic shop against real ones.

:func:`interaction_stats` summarises a canonical frame (``user_id, item_id, event, rating, timestamp``)
in a few numbers that shape a recommender's task:

* **activity**: distinct items per shopper (mean, median, 90th and 99th percentile, Gini);
* **popularity**: distinct shoppers per item (mean, median, 90th percentile, Gini) and the share of
  shopper–item pairs that fall on the top 1% and top 10% of items;
* **repeat rate**: the share of shopper–item pairs the shopper came back to on another day;
* **funnel**: events of each type per view (``cart_per_view``, ``purchase_per_view``,
  ``favourite_per_view``) and ``purchase_per_cart``, when the frame has views.

:data:`TARGETS_FILE` holds the numbers measured on the real data sets (``python -m fedml.data.realism``
re-measures them) and the tolerances within which the synthetic shop must match the shop it imitates
(``tests/test_realism.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedml.data.schema import EVENT, ITEM, TIMESTAMP, USER

TARGETS_FILE = Path(__file__).with_name("realism_targets.json")
DAY_S = 86_400


def interaction_stats(frame: pd.DataFrame) -> dict[str, float]:
    """The summary numbers of ``frame`` (see the module docstring); raises ValueError when it is empty."""
    missing = {USER, ITEM, EVENT, TIMESTAMP} - set(frame.columns)
    if missing:
        raise ValueError(f"interaction frame lacks column(s) {sorted(missing)}")
    if frame.empty:
        raise ValueError("interaction frame is empty")
    users = pd.factorize(frame[USER])[0].astype(np.int64)
    items = pd.factorize(frame[ITEM])[0].astype(np.int64)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    days = (frame[TIMESTAMP].to_numpy(np.int64) // DAY_S).astype(np.int64)
    pairs = users * n_items + items
    pair_codes, pair_index = np.unique(pairs, return_inverse=True)
    pair_users, pair_items = pair_codes // n_items, pair_codes % n_items
    per_user = np.bincount(pair_users, minlength=n_users).astype(np.float64)
    per_item = np.bincount(pair_items, minlength=n_items).astype(np.float64)
    pair_days = np.unique(pair_index * (days.max() - days.min() + 1) + (days - days.min()))
    days_per_pair = np.bincount(pair_days // (days.max() - days.min() + 1), minlength=len(pair_codes))
    ranked = np.sort(per_item)[::-1]
    stats: dict[str, float] = {
        "shoppers": float(n_users),
        "items": float(n_items),
        "rows": float(len(frame)),
        "pairs": float(len(pair_codes)),
        "density": len(pair_codes) / (n_users * n_items),
        "items_per_shopper_mean": float(per_user.mean()),
        "items_per_shopper_median": float(np.median(per_user)),
        "items_per_shopper_p90": float(np.percentile(per_user, 90)),
        "items_per_shopper_p99": float(np.percentile(per_user, 99)),
        "items_per_shopper_gini": gini(per_user),
        "shoppers_per_item_mean": float(per_item.mean()),
        "shoppers_per_item_median": float(np.median(per_item)),
        "shoppers_per_item_p90": float(np.percentile(per_item, 90)),
        "shoppers_per_item_gini": gini(per_item),
        "top1pct_items_pair_share": float(ranked[: max(1, n_items // 100)].sum() / ranked.sum()),
        "top10pct_items_pair_share": float(ranked[: max(1, n_items // 10)].sum() / ranked.sum()),
        "repeat_rate": float(np.mean(days_per_pair > 1)),
    }
    stats["items_per_shopper_p90_over_median"] = stats["items_per_shopper_p90"] / stats["items_per_shopper_median"]
    stats.update(funnel(frame[EVENT]))
    return stats


def funnel(events: pd.Series) -> dict[str, float]:
    """Events of each kind per view, and purchases per cart; empty without views."""
    counts = events.value_counts()
    views = float(counts.get("view", 0))
    if views == 0:
        return {}
    out = {f"{kind}_per_view": float(counts.get(kind, 0)) / views for kind in ("cart", "purchase", "favourite")}
    carts = float(counts.get("cart", 0))
    if carts:
        out["purchase_per_cart"] = float(counts.get("purchase", 0)) / carts
    return out


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative ``values``: 0 when all are equal, towards 1 when one holds everything."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if len(v) == 0 or v.sum() == 0:
        return 0.0
    if v[0] < 0:
        raise ValueError("gini needs non-negative values")
    n = len(v)
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * v.sum()))


def load_targets(path: Path = TARGETS_FILE) -> dict[str, Any]:
    """The stored targets: ``{"measured": {data set: stats}, "synthetic_checks": {...}}``."""
    if not path.is_file():
        raise FileNotFoundError(f"realism targets not found: {path}")
    return json.loads(path.read_text())


def realistic_shop(n_shoppers: int, n_items: int, n_categories: int, *, seed: int = 7, mean_sessions: float = 6.0):
    """:func:`~fedml.data.synthetic.generate_shop` with the parameters fitted to the real data sets."""
    from fedml.data.synthetic import generate_shop

    fit = load_targets()["generator_fit"]
    return generate_shop(n_shoppers, n_items, n_categories, seed=seed, mean_sessions=mean_sessions, **fit)


def compare(stats: dict[str, float], targets: dict[str, float], tolerances: dict[str, float]) -> list[str]:
    """Where ``stats`` misses ``targets``: one line per statistic off by more than its relative tolerance."""
    misses = []
    for key, tolerance in tolerances.items():
        if key not in stats or key not in targets:
            misses.append(f"{key}: missing (stats has it: {key in stats}, targets has it: {key in targets})")
            continue
        target, value = targets[key], stats[key]
        if abs(value - target) > tolerance * abs(target):
            misses.append(f"{key}: {value:.4g}, target {target:.4g} (within {tolerance:.0%})")
    return misses


def rounded(stats: dict[str, float]) -> dict[str, float]:
    """Four significant digits: how the targets file stores measured statistics."""
    return {k: float(f"{v:.4g}") for k, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the statistics of the real data sets (``FEDML_DATA_DIR``, default ../shared/data) as JSON."""
    import argparse
    import os

    from fedml.data.movielens import load_movielens_100k
    from fedml.data.tmall import load_tmall

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("FEDML_DATA_DIR", "../shared/data"))
    args = parser.parse_args(argv)
    root = Path(args.data_dir)
    measured = {
        "movielens": interaction_stats(load_movielens_100k(root / "ml-100k")),
        "tmall": interaction_stats(load_tmall(root / "tmall-brand-2014")),
    }
    print(json.dumps({name: rounded(s) for name, s in measured.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
