"""Pictures of a run for the MLflow UI: the training curves and the privacy spent per round.

Drawn with matplotlib's Agg backend (no display), written as PNG files the flow logs under
``plots/``. Only what the run may publish is drawn: under a central DP mechanism the training loss
is not published (it is computed from raw data), so the training picture then shows public counts.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedml.federated.rounds import RoundReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_plot(
    rounds: list[RoundReport], epoch_losses: list[float], publish_diagnostics: bool, path: Path
) -> Path | None:
    """Clients (and, when published, loss and clipped fraction) per round; or loss per epoch."""
    plt = _pyplot()
    if rounds:
        x = [r.round for r in rounds]
        panels = [
            ("clients per round", [r.clients for r in rounds]),
            ("seconds per round", [r.seconds for r in rounds]),
        ]
        if publish_diagnostics:
            panels += [
                ("training loss", [r.loss for r in rounds]),
                ("clipped fraction", [r.clipped_fraction for r in rounds]),
            ]
        xlabel = "round"
    elif epoch_losses and publish_diagnostics:
        x = list(range(1, len(epoch_losses) + 1))
        panels, xlabel = [("training loss", epoch_losses)], "epoch"
    else:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        ax.plot(x, values, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def privacy_plot(
    rounds: list[RoundReport],
    delta: float,
    unit: str,
    lifetime: float | None,
    budget: float | None,
    path: Path,
) -> Path | None:
    """ε after each round, and where the cohort's lifetime spend and budget stand."""
    points = [(r.round, r.epsilon) for r in rounds if r.epsilon is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label="this run")
    if lifetime:
        ax.axhline(lifetime, color="tab:orange", linestyle=":", label="cohort lifetime, this run included")
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color="tab:red", linestyle="--", label="cohort lifetime budget")
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon ({unit}-level, delta {delta:g})")
    ax.set_title("privacy spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
