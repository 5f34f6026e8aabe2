"""Pictures of a run for the MLflow UI: the training curves, the privacy spent per round, and quality
against epsilon (the privacy–utility plot the pipeline logs for its run and ``bench.quality`` draws for its sweep).

Drawn with matplotlib's Agg backend (no display), written as PNG files the flow logs under
``plots/``. Only what the run may publish is drawn: under a central DP mechanism the training loss
is not published (it is computed from raw data), so the training picture then shows public counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedml.evaluation.ranking import RankingMetrics
from fedml.federated.rounds import RoundReport
from fedml.privacy.statement import PrivacyStatement


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


@dataclass
class UtilityPanel:
    """One data set: quality against ε per mechanism, and references (no ε) as horizontal lines.

    ``curves`` maps a label that names the unit, δ and accountant to (ε, quality) points.
    """

    title: str
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    references: dict[str, float] = field(default_factory=dict)
    metric: str = "HR@10, full ranking"


def privacy_utility_plot(panels: list[UtilityPanel], path: Path) -> Path:
    """Quality against ε (log scale), a panel per data set: mechanisms as lines, references as horizontal lines."""
    if not panels:
        raise ValueError("privacy_utility_plot needs at least one panel")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    styles = (":", "--", "-.", (0, (1, 3)), (0, (5, 2, 1, 2)))
    for ax, panel in zip(axes[0], panels):
        epsilons = [e for points in panel.curves.values() for e, _ in points if math.isfinite(e) and e > 0]
        for label, points in panel.curves.items():
            shown = sorted((e, q) for e, q in points if math.isfinite(e) and e > 0)
            ax.plot([e for e, _ in shown], [q for _, q in shown], marker="o", markersize=4, label=label)
        for i, (label, value) in enumerate(panel.references.items()):
            ax.axhline(value, color=f"C{len(panel.curves) + i}", linestyle=styles[i % len(styles)], label=label)
        if epsilons:  # points sit at the ε each run spent (a hair under its target); ticks at the targets
            ticks = sorted({_nice(e) for e in epsilons})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
        ax.set_xlabel("ε (unit, δ and accountant in the legend)")
        ax.set_ylabel(panel.metric)
        ax.set_ylim(bottom=0)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nice(epsilon: float) -> float:
    """The round number an accountant-calibrated ε sits just under (7.992 -> 8), else two digits."""
    whole = round(epsilon)
    return float(whole) if whole >= 1 and abs(epsilon - whole) <= 0.02 * epsilon else float(f"{epsilon:.2g}")


def run_quality_panel(
    title: str, statement: PrivacyStatement | None, metrics: dict[str, RankingMetrics]
) -> UtilityPanel:
    """The pipeline's own point for :func:`privacy_utility_plot`: the model's HR@K at the run's ε, popularity beside it.

    ``metrics`` holds ``"model"`` and ``"popularity"`` (as ``flows.pipeline.evaluate`` returns them). A run without
    differential privacy has no ε to plot at: its model is drawn as a reference line instead.
    """
    model, popularity = metrics["model"], metrics["popularity"]
    panel = UtilityPanel(title=title, metric=f"HR@{model.k}, full ranking ({model.users} shoppers)")
    if statement is not None and math.isfinite(statement.epsilon):
        delta = f"δ={statement.delta:g}" if statement.delta else "δ=0"
        label = (
            f"this run: {statement.mechanism.split(' (')[0]} ({statement.unit}-level, {delta}, {statement.accountant})"
        )
        panel.curves[label] = [(statement.epsilon, model.hit_rate)]
    else:
        panel.references["this run (no DP)"] = model.hit_rate
    panel.references["popularity (no DP)"] = popularity.hit_rate
    return panel
