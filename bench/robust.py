"""Poisoned-clients benchmark: HR@10 with 10% of each round's clients attacking, with and without the defence.

``make bench-robust`` (or ``python -m bench.robust [--quick] [--datasets synthetic movielens]``) writes
``bench/results/robust.json`` (``--quick``: ``bench/results/robust-quick.json``); the default data set is
the synthetic shop of ``configs/default.toml``, MovieLens 100K is opt-in (``BENCH_ARGS="--datasets
movielens --output bench/results/robust-movielens.json"``). Per data set
(``configs/<name>.toml``, trained without DP, as :mod:`bench.quality` trains it), nine runs:

* attacks: ``clean``; ``scale`` (each round, 10% of the clients upload ``factor`` times their update);
  ``sign_flip`` (they upload ``-factor`` times it), simulated by :mod:`fedml.federated.attacks`;
* aggregation: ``none`` (FedAvg), ``clipped`` (FedAvg of norm-bounded updates: ``federated.norm_bound``)
  and ``defended`` (norm bounding plus the per-row trimmed mean of :mod:`fedml.federated.robust`:
  ``federated.aggregation=trimmed_mean``, ``trim_fraction``, ``norm_bound``).

Each figure is HR@10 (full ranking, the pipeline's protocol) and its ratio to the clean FedAvg run; the
issue's target is a ratio of at least 0.95 with the defence under both attacks. CPU seconds are
``time.process_time`` of training (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench.quality import NON_PRIVATE, ROOT, prepare

RESULTS = ROOT / "bench" / "results"
DATASETS = {"synthetic": ROOT / "configs" / "default.toml", "movielens": ROOT / "configs" / "movielens.toml"}
ATTACKS = ("clean", "scale", "sign_flip")
TARGET_RATIO = 0.95
#: --quick: a smaller synthetic shop, fewer rounds
QUICK = ["data.n_shoppers=4000", "data.n_items=400", "federated.rounds=10", "evaluation.max_users=2000"]


def run_dataset(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    from fedml.config import load_config
    from fedml.evaluation.ranking import PROTOCOL, evaluate_ranking
    from fedml.federated.attacks import PoisonedUploads
    from fedml.serving.recommender import Recommender
    from fedml.training import train_model

    base = NON_PRIVATE + overrides
    config = load_config(DATASETS[name], base)
    ids, split = prepare(config)
    ev = config.evaluation
    clipped = [f"federated.norm_bound={args.norm_bound}"]
    defences = {"none": [], "clipped": clipped,
                "defended": clipped + ["federated.aggregation=trimmed_mean", f"federated.trim_fraction={args.trim_fraction}"]}  # fmt: skip
    runs: dict[str, dict[str, dict]] = {}
    for attack in ATTACKS:
        runs[attack] = {}
        for aggregation, extra in defences.items():
            run_config = load_config(DATASETS[name], base + extra)
            wrap = None
            if attack != "clean":
                factor = args.scale_factor if attack == "scale" else args.flip_factor

                def wrap(inner, attack=attack, factor=factor):
                    return PoisonedUploads(inner, attack, args.fraction, factor, seed=args.attack_seed)

            started = time.process_time()
            try:
                table = train_model(split.train, run_config, wrap_aggregator=wrap).table
                seconds = time.process_time() - started
                model = Recommender(table=table, ids=ids, negatives=run_config.federated.negatives,
                                    fold_in_l2=run_config.model.fold_in_l2,
                                    fold_in_iterations=run_config.model.fold_in_iterations)  # fmt: skip
                metrics = evaluate_ranking(lambda users, histories, model=model: model.score(histories),
                                           split.train, split.test_items, k=ev.k,
                                           sampled_negatives=ev.sampled_negatives, max_users=ev.max_users,
                                           seed=ev.seed)  # fmt: skip
                runs[attack][aggregation] = {f"hr_at_{ev.k}": metrics.hit_rate, "cpu_seconds": round(seconds, 1)}
            except (RuntimeError, ValueError) as exc:  # a poisoned table can blow up (inf/NaN): no usable model
                seconds = time.process_time() - started
                runs[attack][aggregation] = {f"hr_at_{ev.k}": 0.0, "cpu_seconds": round(seconds, 1),
                                             "failed": f"{type(exc).__name__}: {str(exc)[:200]}"}  # fmt: skip
            print(json.dumps({"dataset": name, "attack": attack, "aggregation": aggregation,
                              **runs[attack][aggregation]}), flush=True)  # fmt: skip
    key = f"hr_at_{ev.k}"
    clean = runs["clean"]["none"][key]
    for attack in ATTACKS:
        for result in runs[attack].values():
            result["ratio_to_clean"] = result[key] / clean if clean else float("nan")
    return {
        "config": str(DATASETS[name].relative_to(ROOT)),
        "overrides": base,
        "shoppers": ids.n_users,
        "items": ids.n_items,
        "rounds": config.federated.rounds,
        "client_rate": config.federated.client_rate,
        "protocol": PROTOCOL.format(neg=ev.sampled_negatives, users=min(ev.max_users or ids.n_users, ids.n_users)),
        "runs": runs,
        "defence_meets_target": all(runs[a]["defended"]["ratio_to_clean"] >= TARGET_RATIO for a in ATTACKS),
        "clipping_alone_meets_target": all(runs[a]["clipped"]["ratio_to_clean"] >= TARGET_RATIO for a in ATTACKS),
        "attacks_hurt_without_defence": {a: runs[a]["none"]["ratio_to_clean"] < TARGET_RATIO for a in ATTACKS[1:]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["synthetic"],
                        help="movielens: MovieLens 100K, every shopper every round (slow: ~15 CPU minutes)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small synthetic shop only, 10 rounds")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of each round's clients attacking")
    parser.add_argument("--scale-factor", type=float, default=100.0, help="scale attack: upload factor x update")
    parser.add_argument("--flip-factor", type=float, default=10.0, help="sign-flip attack: upload -factor x update")
    parser.add_argument("--attack-seed", type=int, default=0)
    parser.add_argument("--trim-fraction", type=float, default=0.1)
    parser.add_argument("--norm-bound", type=float, default=1.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    datasets = ["synthetic"] if args.quick else args.datasets
    overrides = (QUICK if args.quick else []) + args.overrides
    started = time.perf_counter()
    report = {
        "machine": f"{platform.machine()}, {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "quick": args.quick,
        "attack": {
            "fraction": args.fraction,
            "scale_factor": args.scale_factor,
            "flip_factor": args.flip_factor,
            "seed": args.attack_seed,
        },  # fmt: skip
        "defence": {
            "clipped": {"aggregation": "fedavg", "norm_bound": args.norm_bound},
            "defended": {
                "aggregation": "trimmed_mean",
                "trim_fraction": args.trim_fraction,
                "norm_bound": args.norm_bound,
            },
        },  # fmt: skip
        "target": f"HR@10 with the defence >= {TARGET_RATIO} x the clean FedAvg run, under both attacks",
        "datasets": {name: run_dataset(name, overrides, args) for name in datasets},
    }
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    output = Path(args.output or RESULTS / ("robust-quick.json" if args.quick else "robust.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
