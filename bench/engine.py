"""Engine benchmark: what a federated round costs, against a centralised pass over the same examples.

``make bench-engine`` (or ``python -m bench.engine [--quick] [--device cuda]``) writes
``bench/results/engine.json``. Every contender trains the same model (MF, dim 32, 4 negatives,
1 local epoch) on the same data with the same rounds and clients per round; every run is a process
of its own (its peak memory, max RSS, is the contender's own), after an untimed warm-up on a tiny
workload; the contenders take turns, :data:`REPEATS` times, and each reports its median run:

1. ``central``: a centralised, non-private PyTorch pass over the same examples (the floor);
2. ``reference``: our one-client-at-a-time engine;
3. ``batched`` and ``batched_dp``: our batched engine, non-private and with DP-FedAvg;
4. ``flower``: Flower's simulation engine running the same client update (needs ``.[bench]``).

Then the population test: memory of one batched round with 10,000 clients of a lazily generated
shop of 100,000 and of 1,000,000 shoppers (50,000 items).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


@dataclass
class Workload:
    shoppers: int
    items: int
    rounds: int
    client_rate: float
    dim: int = 32
    negatives: int = 4
    epochs: int = 1


FULL = Workload(shoppers=20_000, items=1_000, rounds=3, client_rate=0.1)
POPULATION_ITEMS = 50_000  # the population test's catalogue (quick mode too)
QUICK = Workload(shoppers=5_000, items=500, rounds=2, client_rate=0.1)


def _data(w: Workload):
    from fedml.data.ids import IdMap
    from fedml.data.split import leave_last_out
    from fedml.data.synthetic import generate_shop

    shop = generate_shop(w.shoppers, w.items, 16, seed=7)
    ids = IdMap.from_frame(shop.interactions)
    return leave_last_out(shop.interactions, ids).train


def _local(w: Workload):
    from fedml.federated.client import LocalTraining

    return LocalTraining(epochs=w.epochs, lr=0.2, batch_size=32, negatives=w.negatives, l2=1e-4)


def _rounds_clients(data, w: Workload) -> list[np.ndarray]:
    """The clients each round samples (the same for every contender)."""
    from fedml.federated.sampling import poisson_sample

    rng = np.random.default_rng(0)
    counts = data.counts()
    return [
        np.array([c for c in poisson_sample(data.n_users, w.client_rate, rng) if counts[c] > 0])
        for _ in range(w.rounds)
    ]


REPEATS = 5  # each contender (Flower: once) is timed this many times; the median is reported (noisy machines)
WARM_UP = Workload(shoppers=500, items=100, rounds=1, client_rate=0.2)  # first-call costs, off the clock


def run_contender(name: str, w: Workload, device: str) -> dict:
    """One timed run of a contender in this process, after an untimed run on a tiny workload (lazy
    initialisation: autograd, kernels, imports)."""
    if name != "flower":
        _run_once(name, WARM_UP, device)
    return _run_once(name, w, device)


def _median_of_runs(runs: list[dict]) -> dict:
    ok = [r for r in runs if "seconds" in r]
    if not ok:
        return runs[0]
    median = sorted(ok, key=lambda r: r["seconds"])[len(ok) // 2]
    return median | {"runs": [r["seconds"] for r in ok], "peak_rss_mib": max(r["peak_rss_mib"] for r in ok)}


def _run_once(name: str, w: Workload, device: str) -> dict:
    from fedml.federated.aggregation import DPFedAvg, FedAvg
    from fedml.federated.rounds import train_federated
    from fedml.models.mf import init_item_table

    data = _data(w)
    rounds = _rounds_clients(data, w)
    examples = int(sum(data.counts()[r].sum() for r in rounds)) * w.epochs
    updates = int(sum(len(r) for r in rounds))
    init = init_item_table(data.n_items, w.dim, 0.1, 0)
    _warm_up(device)
    started = time.perf_counter()
    if name == "central":
        _central_pass(data, rounds, w, device)
    elif name == "flower":
        from bench.flower_engine import run_flower_simulation

        result = run_flower_simulation(data, init, _local(w), rounds=w.rounds, clients_per_round=int(np.mean([len(r) for r in rounds])),
                                       server_lr=500.0, seed=0)  # fmt: skip
        return _timing(name, result.seconds_total - (result.seconds_startup or 0.0), updates, examples,
                       extra={"startup_seconds": result.seconds_startup})  # fmt: skip
    else:
        engine = "reference" if name == "reference" else "batched"
        if name == "batched_dp":
            aggregator = DPFedAvg.for_population(data.counts(), w.client_rate, clip_norm=0.1, noise_multiplier=1.0,
                                                 weight_cap=5.0, generator=torch.Generator().manual_seed(1))  # fmt: skip
        else:
            aggregator = FedAvg()
        train_federated(data, init, _local(w), aggregator, rounds=w.rounds, client_rate=w.client_rate, server_lr=500.0,
                        seed=0, device=device, engine=engine)  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    return _timing(name, time.perf_counter() - started, updates, examples)


def _warm_up(device: str) -> None:
    """Start the device (CUDA context, kernels' first load) before the clock starts."""
    x = torch.randn(256, 256, device=device)
    (x @ x).sum().item()
    torch.nn.functional.softplus(x).index_add_(0, torch.zeros(256, dtype=torch.long, device=device), x).sum().item()


def _timing(name: str, seconds: float, updates: int, examples: int, extra: dict | None = None) -> dict:
    return {
        "contender": name,
        "seconds": seconds,
        "client_updates": updates,
        "client_updates_per_second": updates / seconds,
        "examples": examples,
        "examples_per_second": examples / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **(extra or {}),
    }


def _central_pass(data, rounds: list[np.ndarray], w: Workload, device: str) -> None:
    """Plain PyTorch: user and item embeddings, BCE with sampled negatives, minibatch SGD over the
    same (shopper, positive) examples the rounds' clients train on."""
    users = np.concatenate([np.repeat(r, data.counts()[r]) for r in rounds])
    items = np.concatenate([np.concatenate([data.of(int(c)) for c in r]) for r in rounds])
    user_emb = torch.nn.Embedding(data.n_users, w.dim).to(device)
    item_emb = torch.nn.Embedding(data.n_items, w.dim).to(device)
    bias = torch.nn.Embedding(data.n_items, 1).to(device)
    params = list(user_emb.parameters()) + list(item_emb.parameters()) + list(bias.parameters())
    optimiser = torch.optim.SGD(params, lr=0.1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    u_all, i_all = torch.as_tensor(users).to(device), torch.as_tensor(items).to(device)
    for _ in range(w.epochs):
        order = torch.randperm(len(u_all), generator=generator).to(device)
        for start in range(0, len(order), 1024):
            idx = order[start : start + 1024]
            u, pos = u_all[idx], i_all[idx]
            neg = torch.randint(0, data.n_items, (len(idx), w.negatives), generator=generator).to(device)
            p = user_emb(u)
            s_pos = (p * item_emb(pos)).sum(1) + bias(pos).squeeze(1)
            s_neg = (p[:, None, :] * item_emb(neg)).sum(2) + bias(neg).squeeze(2)
            loss = torch.nn.functional.softplus(-s_pos).mean() + torch.nn.functional.softplus(s_neg).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


def run_population(shoppers: int, items: int, clients: int, device: str) -> dict:
    """One batched round of ``clients`` clients from a lazily generated shop; peak RSS."""
    from fedml.data.population import LazyShop
    from fedml.federated.aggregation import FedAvg
    from fedml.federated.rounds import train_federated
    from fedml.models.mf import init_item_table

    shop = LazyShop(shoppers, items, 200, seed=7)
    _warm_up(device)
    started = time.perf_counter()
    run = train_federated(shop, init_item_table(items, 32, 0.1, 0), _local(FULL), FedAvg(), rounds=1,
                          client_rate=clients / shoppers, server_lr=500.0, seed=0, device=device)  # fmt: skip
    return {
        "shoppers": shoppers,
        "items": items,
        "clients": run.reports[0].clients,
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.engine", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes on 2 cores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", action="append", default=[], help="contenders to leave out")
    parser.add_argument("--output", help=f"default {RESULTS} ({RESULTS.stem}-quick.json with --quick)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--population", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    w = QUICK if args.quick else FULL
    torch.set_num_threads(os.cpu_count() or 1)
    if args.contender:
        print(json.dumps(run_contender(args.contender, w, args.device)))
        return 0
    if args.population:
        clients = 2_000 if args.quick else 10_000
        print(json.dumps(run_population(args.population, POPULATION_ITEMS, clients, args.device)))
        return 0

    contenders = [c for c in ("central", "reference", "batched", "batched_dp", "flower") if c not in args.skip]
    base = ["--device", args.device] + (["--quick"] if args.quick else [])
    # Repeats interleave the contenders (one process per run, so that each peak RSS is the
    # contender's own): slow drifts of a shared machine hit every contender alike.
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for repeat in range(REPEATS):
        for name in contenders:
            if name == "flower" and repeat > 0:
                continue  # minutes per run
            print(f"run {repeat + 1}/{REPEATS}: {name} ...", flush=True)
            runs[name].append(_in_subprocess(["--contender", name, *base]) | {"contender": name})
            print(json.dumps(runs[name][-1]), flush=True)
    results = [_median_of_runs(runs[name]) for name in contenders]
    floor = next((r for r in results if r["contender"] == "central" and "seconds" in r), None)
    for r in results:
        if floor and "seconds" in r:
            r["ratio_to_central"] = r["seconds"] / floor["seconds"]
    populations = [20_000, 200_000] if args.quick else [100_000, 1_000_000]
    population = []
    for n in populations:
        print(f"population {n} ...", flush=True)
        population.append(_in_subprocess(["--population", str(n), *base]))
        print(json.dumps(population[-1]), flush=True)
    report = {
        "workload": w.__dict__ | {"data": f"synthetic shop {w.shoppers} shoppers x {w.items} items"},
        "quick": args.quick,
        "device": args.device,
        "machine": _machine(args.device),
        "contenders": results,
        "population": population,
        "targets": _targets(results, population),
    }
    output = Path(args.output or (RESULTS.with_name(f"{RESULTS.stem}-quick.json") if args.quick else RESULTS))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {output}")
    return 0


def _targets(results: list[dict], population: list[dict]) -> dict:
    by = {r["contender"]: r.get("seconds") for r in results}
    ratio = lambda a, b: (by[a] / by[b]) if by.get(a) and by.get(b) else None
    mem = [p.get("peak_rss_mib") for p in population]
    return {
        "batched_over_central (target <= 2)": ratio("batched", "central"),
        "reference_over_batched (target >= 20)": ratio("reference", "batched"),
        "flower_over_batched (target >= 20)": ratio("flower", "batched"),
        "dp_over_batched (target <= 1.10)": ratio("batched_dp", "batched"),
        "memory_large_over_small_population (target <= 1.5)": (mem[1] / mem[0]) if all(mem) else None,
    }


def _machine(device: str) -> str:
    name = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if device == "cuda" and torch.cuda.is_available():
        name += f", {torch.cuda.get_device_name(0)}"
    return name


if __name__ == "__main__":
    sys.exit(main())
