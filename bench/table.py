"""Render bench/results/engine*.json as the Markdown tables the README shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    w = report["workload"]
    lines = [
        f"`{path.name}`: {report['machine']}, device `{report['device']}`; {w['data']}, {w['rounds']} rounds, "
        f"client rate {w['client_rate']}, dim {w['dim']}, {w['negatives']} negatives, {w['epochs']} local epoch",
        "",
        "| contender | seconds | client updates/s | examples/s | peak RSS (MiB) | time / central |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["contenders"]:
        if "seconds" not in r:
            lines.append(f"| {r['contender']} | failed: {r.get('error', '?')} | | | | |")
            continue
        lines.append(
            f"| {r['contender']} | {r['seconds']:.2f} | {r['client_updates_per_second']:,.0f} | "
            f"{r['examples_per_second']:,.0f} | {r['peak_rss_mib']:,.0f} | {r.get('ratio_to_central', float('nan')):.2f} |"
        )
    lines += [
        "",
        "| population (one batched round) | items | clients | seconds | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in report["population"]:
        if "shoppers" in p:
            lines.append(
                f"| {p['shoppers']:,} shoppers | {p['items']:,} | {p['clients']:,} | {p['seconds']:.1f} | {p['peak_rss_mib']:,.0f} |"
            )
    lines += ["", "| target | measured |", "| --- | ---: |"]
    for name, value in report["targets"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["bench/results/engine.json"]:
        print(render(Path(arg)), end="\n\n")
