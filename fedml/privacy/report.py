"""The privacy report of a run: what was spent, by which mechanism, and what it protects against.

:func:`build_report` gathers the facts (the headline and local-DP statements, ε from both
accountants, the cohort's lifetime spend, the empirical audit) into one JSON-ready dict;
:func:`render_markdown` writes it for people, with the threat model in plain words.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from fedml.privacy.accountant import gaussian_epsilon
from fedml.privacy.ledger import Lifetime
from fedml.privacy.statement import PrivacyStatement

ACCOUNTANTS = ("rdp", "prv")
#: named in a DP-FedAvg statement's mechanism when the run used secure aggregation (fedml.flower.secagg)
SECURE_AGGREGATION = "secure aggregation: SecAgg+ (Flower), server sees only the sum; clipping on the device"


def secure_aggregation(headline: PrivacyStatement | None) -> str | None:
    """How the updates were aggregated securely, when the headline mechanism says they were."""
    return SECURE_AGGREGATION if headline is not None and SECURE_AGGREGATION in headline.mechanism else None


def accountant_comparison(statement: PrivacyStatement | None) -> dict[str, float]:
    """ε of a subsampled-Gaussian statement under each accountant ({} for pure or no DP)."""
    if statement is None or statement.noise_multiplier is None or statement.sample_rate is None:
        return {}
    return {
        name: gaussian_epsilon(
            statement.noise_multiplier, statement.sample_rate, statement.steps or 0, statement.delta, name
        )  # fmt: skip
        for name in ACCOUNTANTS
    }


def build_report(
    headline: PrivacyStatement | None,
    local: PrivacyStatement | None,
    *,
    cohort: str,
    lifetime: Lifetime | None = None,
    lifetime_budget: float | None = None,
    audit: dict[str, Any] | None = None,
    secure_noise: bool = False,
    publishes_diagnostics: bool = False,
) -> dict[str, Any]:
    """Everything an auditor needs about one run's privacy, as plain data."""
    return {
        "headline": None if headline is None else {**asdict(headline), "statement": headline.describe()},
        "local_dp": None if local is None or local is headline else {**asdict(local), "statement": local.describe()},
        "epsilon_by_accountant": accountant_comparison(headline),
        "composition": _composition(headline, local),
        "cohort": cohort,
        "lifetime": None
        if lifetime is None
        else {
            "unit": lifetime.unit,
            "delta": lifetime.delta,
            "runs": lifetime.runs,
            "epsilon": lifetime.epsilon,
            "accountant": lifetime.accountant,
            "epsilon_by_accountant": lifetime.by_accountant,
            "budget": lifetime_budget,
        },
        "audit": audit,
        "secure_noise": secure_noise,
        "secure_aggregation": secure_aggregation(headline),
        "diagnostics_published": publishes_diagnostics,
        "threat_model": threat_model(headline, local, publishes_diagnostics),
    }


def _composition(headline: PrivacyStatement | None, local: PrivacyStatement | None) -> str:
    if local is None or headline is None or local is headline:
        return "one mechanism"
    return (
        f"local DP runs on the device before the central mechanism, which only sees its output: the model is "
        f"post-processing of both, so both guarantees hold at once. Per record the better one applies "
        f"(epsilon {min(local.epsilon, headline.epsilon):.3g}); per {headline.unit}, the central one. Against the "
        f"server, which sees {_what_server_sees(headline)} before noise is added, only local DP protects "
        f"(epsilon {local.epsilon:.3g} per record)."
    )


def _what_server_sees(headline: PrivacyStatement) -> str:
    return "only the sum of the devices' updates" if secure_aggregation(headline) else "individual updates"


def threat_model(
    headline: PrivacyStatement | None, local: PrivacyStatement | None, publishes_diagnostics: bool = False
) -> dict[str, str]:
    """What the server, another shopper, and someone holding the published model can and cannot learn."""
    if headline is None:
        return {
            "server": "Sees the training data or updates in the clear. No differential privacy.",
            "another shopper": "Gets the same model as everyone; nothing bounds what it reveals about you.",
            "model holder": "No guarantee: a model trained without DP can memorise individual histories.",
        }
    eps = f"epsilon {headline.epsilon:.3g}, delta {headline.delta:g}"
    local_line = (
        f" Your device randomises your data first (local DP, epsilon {local.epsilon:.3g} per record), so even "
        "the server cannot be sure of any one record."
        if local is not None and local is not headline
        else ""
    )
    if headline.unit == "user" and "fedavg" in headline.mechanism and secure_aggregation(headline):
        server = (
            "Sees only the sum of the sampled devices' clipped updates (secure aggregation, Flower's SecAgg+): no "
            "single device's update, as long as it follows the protocol and does not collude with devices. It adds "
            "the noise to the sum. Clipping runs on each device, so a malicious or modified device can skip its "
            "own clipping and weigh more than the bound in the sum; epsilon assumes every device clips. The "
            "server never sees raw histories or shopper vectors." + local_line
        )
        covered = f"whether any one shopper took part at all, and anything about their whole history ({eps})"
    elif headline.unit == "user" and "fedavg" in headline.mechanism:
        server = (
            "Sees the clipped update of each sampled device in the clear (no secure aggregation): it is trusted "
            "to add the noise. It never sees raw histories or shopper vectors, which stay on the device." + local_line
        )
        covered = f"whether any one shopper took part at all, and anything about their whole history ({eps})"
    elif headline.unit == "record" and "dp-sgd" in headline.mechanism:
        server = "Trains centrally on everyone's pooled interactions: it is trusted with the raw data." + local_line
        covered = (
            f"any single interaction ({eps}); a shopper with k interactions is protected as a group, roughly "
            f"k x epsilon, so heavy shoppers are protected less"
        )
    else:  # local DP only
        server = f"Receives only randomised data: each record is protected even from the server ({eps} per record)."
        covered = f"any single record ({eps})"
    holder = (
        f"Holding the published model (item table) and every intermediate global model, cannot tell beyond {covered}. "
        "It can learn what the population as a whole likes (popular items, items bought together): that is the model."
    )
    diagnostics = (
        "Training diagnostics (loss, update norms) are published and are NOT covered by epsilon."
        if publishes_diagnostics
        else "Training diagnostics computed from raw data are not published under DP."
    )
    return {
        "server": server,
        "another shopper": "Receives only global models, so learns no more about you than any model holder.",
        "model holder": holder,
        "not covered": (
            f"{diagnostics} The evaluation figures (HR@10 and friends) and the data-validation report are computed "
            "on raw data; they are aggregate statistics kept in the tracking store, outside epsilon."
        ),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown for the MLflow UI."""
    lines = ["# Privacy report", ""]
    head = report["headline"]
    lines.append(f"**Guarantee:** {head['statement'] if head else 'none (no differential privacy, epsilon = inf)'}")
    if report["local_dp"]:
        lines.append(f"\n**Local DP on the devices:** {report['local_dp']['statement']}")
    if report["composition"] != "one mechanism":
        lines.append(f"\n**How they compose:** {report['composition']}")
    if report["epsilon_by_accountant"]:
        lines += ["", "| accountant | epsilon |", "| --- | --- |"]
        lines += [f"| {name.upper()} | {_num(value)} |" for name, value in report["epsilon_by_accountant"].items()]
        lines.append("\nBoth are upper bounds; the smaller is the tighter. The gate uses the configured one.")
    if head:
        params = {
            k: head[k] for k in ("unit", "delta", "mechanism", "sampling", "noise_multiplier", "sample_rate", "steps")
        }
        lines += ["", "## Mechanism", "", "| parameter | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in params.items() if v is not None]
    life = report["lifetime"]
    if life:
        lines += [
            "",
            f"## Lifetime budget of cohort `{report['cohort']}`",
            "",
            f"{life['runs']} charged run(s) composed: epsilon {_num(life['epsilon'])} ({life['unit']}-level, delta "
            f"{life['delta']:g}, {life['accountant']}) of a budget of {_num(life['budget'])}. By accountant: "
            + ", ".join(f"{k} {_num(v)}" for k, v in life["epsilon_by_accountant"].items())
            + ".",
        ]
    audit = report["audit"]
    if audit:
        lines += ["", "## Empirical audit", "", audit.get("summary", str(audit))]
    lines += ["", "## Who can learn what", ""]
    lines += [f"- **{who}:** {text}" for who, text in report["threat_model"].items()]
    noise = (
        "cryptographically secure (OS CSPRNG)"
        if report["secure_noise"]
        else "seeded, reproducible (not for production)"
    )
    lines += ["", f"Noise source: {noise}."]
    if report.get("secure_aggregation"):
        lines.append(f"Secure aggregation: {report['secure_aggregation']}.")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    if value is None:
        return "none"
    return "inf" if math.isinf(value) else f"{value:.3f}"


__all__ = [
    "SECURE_AGGREGATION",
    "accountant_comparison",
    "build_report",
    "render_markdown",
    "secure_aggregation",
    "threat_model",
]
