"""The training pipeline as a Prefect flow: validate, train with privacy, evaluate, register, gate.

Run it with ``make run`` or ``python -m flows.pipeline [--config FILE] [--set section.key=value ...]``.
Each step is a Prefect task over the ``fedml`` library; MLflow records one run per pipeline run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from fedml.config import RunConfig, load_config
from fedml.data.ids import IdMap
from fedml.data.interactions import UserItems
from fedml.data.sources import SourceData, load_source
from fedml.data.split import Split, leave_last_out
from fedml.evaluation.ranking import RankingMetrics, evaluate_ranking, popularity_scorer
from fedml.federated.rounds import RoundReport
from fedml.files import atomic_write_text
from fedml.gate import GateDecision, Policy, load_policy
from fedml.privacy.ledger import BudgetExceeded, check_budget, lifetime
from fedml.privacy.report import build_report, render_markdown
from fedml.serving.recommender import Recommender
from fedml.training import (
    PlannedSpend,
    TrainingOutcome,
    apply_local_dp,
    planned_spend,
    plant_audit_canaries,
    train_model,
)
from flows import tracking
from flows.input_errors import quiet_input_error_tracebacks, retry_unless_input_error
from flows.ledger import MlflowLedger, Spending
from flows.ops import DEFAULT_CONFIG
from flows.promotion import current_actor, promote
from flows.resume import ResumePoint, checkpoint_store, find_resume_point, writer_meta
from flows.sharding import shard_runner

quiet_input_error_tracebacks()  # a bad file or setting is reported in one line, not with a traceback


@dataclass
class PipelineSummary:
    """What a run did, as printed at the end and returned by the flow."""

    run_id: str
    model_name: str
    version: str | None
    promoted: bool
    reasons: list[str]
    production_version: str | None
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    privacy: str
    epsilon: float
    lifetime: str
    audit: str
    hr_at_10: float
    popularity_hr_at_10: float
    tracking_uri: str
    run_dir: str

    def render(self) -> str:
        decision = "PROMOTED to production" if self.promoted else "NOT PROMOTED: " + "; ".join(self.reasons)
        lines = [
            "",
            "=== shopping-guide training run ===",
            f"data        {self.rows_in} rows in, {self.rows_kept} kept, {self.rows_quarantined} quarantined",
            f"privacy     {self.privacy}",
            f"budget      {self.lifetime}",
            f"audit       {self.audit}",
            f"quality     HR@10 {self.hr_at_10:.4f} (popularity baseline {self.popularity_hr_at_10:.4f}), "
            "leave-last-out, full ranking",
            f"model       {self.model_name} version {self.version}",
            f"gate        {decision}",
            f"production  {self.model_name}@production -> version {self.production_version or 'none'}",
            f"MLflow run  {self.run_id}",
            f"files       {self.run_dir}",
            f"look        {ui_hint(self.tracking_uri)}",
        ]
        return "\n".join(lines)


def ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  (then open http://127.0.0.1:5000)"
    return f"open {uri} in a browser"


# ---------------------------------------------------------------- tasks


@task(
    name="load-data",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
)
def load_data(config: RunConfig) -> SourceData:
    source = load_source(config.data)
    get_run_logger().info("loaded %s: %d rows", source.name, len(source.interactions))
    return source


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(source: SourceData, config: RunConfig, run_dir: Path) -> Any:
    from fedml.data.validation import validate_interactions, write_quarantine, write_report

    result = validate_interactions(
        source.interactions,
        source=source.name,
        expectations_dir=config.data.expectations_dir,
        min_interactions=config.data.min_interactions,
        max_quarantine_fraction=config.data.max_quarantine_fraction,
    )
    write_quarantine(result, run_dir / "quarantine.csv")
    write_report(result, run_dir / "validation.json")
    report = result.report
    get_run_logger().info(
        "validation: %d rows in, %d kept, %d quarantined (%s) -> %s",
        report["rows_in"], report["rows_kept"], report["rows_quarantined"],
        run_dir / "quarantine.csv", "passed" if result.passed else "FAILED",
    )  # fmt: skip
    return result


@task(name="split-and-partition", cache_policy=NO_CACHE)
def split_data(kept: Any, config: RunConfig) -> tuple[IdMap, Split]:
    ids = IdMap.from_frame(kept)
    split = leave_last_out(kept, ids, min_rating=config.data.min_positive_rating or None)
    get_run_logger().info(
        "%d shoppers (one client each), %d items, %d training positives, %d held out",
        ids.n_users, ids.n_items, split.train.nnz, int((split.test_items >= 0).sum()),
    )  # fmt: skip
    return ids, split


@task(name="local-dp", cache_policy=NO_CACHE)
def local_dp(split: Split, ids: IdMap, config: RunConfig) -> tuple[UserItems, Any]:
    noisy, statement = apply_local_dp(split.train_frame, ids, config, seed=config.training.seed + 7)
    get_run_logger().info("local DP applied on the devices: %s", statement.describe())
    return noisy, statement


@task(name="reserve-privacy-budget", cache_policy=NO_CACHE)
def reserve_budget(
    ledger: MlflowLedger, cohort: str, spend: PlannedSpend, run_id: str, policy: Policy, config: RunConfig
) -> Any:
    """Open this run's ledger entry, then check the cohort's lifetime budget with it reserved.

    Reserving first and checking second means two runs starting at once on one cohort each see
    the other's reservation: at worst both are refused, never both let through over budget.
    """
    entry = ledger.open(cohort, spend.unit, spend.charge, run_id)
    privacy = config.privacy
    check = check_budget(ledger.entries(), cohort, spend.unit, spend.charge, policy.max_lifetime_epsilon,
                         privacy.delta, privacy.accountant, exclude=entry.entry_id)  # fmt: skip
    if not check.allowed:
        ledger.close(entry.entry_id, "refused", 0, note=check.message())
        raise BudgetExceeded(check.message())
    get_run_logger().info("privacy budget: %s", check.message())
    return entry


@task(name="continue-privacy-budget", cache_policy=NO_CACHE)
def continue_budget(ledger: MlflowLedger, resume: ResumePoint, run_id: str) -> Any:
    """A resumed run goes on with the killed run's open entry (reserved and checked when it began):
    one entry, charged the planned rounds once, never the killed rounds on top of them."""
    entry = ledger.resume(resume.entry.entry_id, run_id, after=resume.round)
    get_run_logger().info(
        "privacy budget: continuing ledger entry %s (%d of %d rounds reported before the kill)",
        entry.entry_id, entry.steps_done, entry.planned.steps,
    )  # fmt: skip
    return entry


@task(name="train", cache_policy=NO_CACHE)
def train(
    data: UserItems,
    config: RunConfig,
    local_statement: Any,
    canaries: Any,
    client: Any,
    run_id: str,
    spending: Spending,
    checkpoints: Any = None,
    resume: ResumePoint | None = None,
) -> TrainingOutcome:
    logger = get_run_logger()
    rounds = config.federated.rounds

    private_diagnostics = not config.publishes_diagnostics()

    def on_round(report: Any) -> None:
        # Under DP-FedAvg only what the accountant covers (and public counts) leaves the server.
        metrics: dict[str, float] = {"train/clients": report.clients, "train/seconds": report.seconds}
        for count in ("clients_sampled", "clients_answered"):  # Flower rounds: who was asked, who answered
            if hasattr(report, count):
                metrics[f"train/{count}"] = getattr(report, count)
        if not private_diagnostics:
            metrics.update({f"train/{k}": v for k, v in report.metrics().items() if k != "epsilon"})
        if report.epsilon is not None:
            metrics["privacy/epsilon"] = report.epsilon
        tracking.log_metrics(client, run_id, metrics, step=report.round)
        spending.step(report.round)
        eps = (
            ""
            if report.epsilon is None
            else f", epsilon {report.epsilon:.3f} (user-level, delta {config.privacy.delta:g})"
        )
        detail = (
            ""
            if private_diagnostics
            else (
                f", loss {report.loss:.4f}, mean update norm {report.update_norm:.4f}, clipped {100 * report.clipped_fraction:.0f}%"
            )
        )
        logger.info(
            "round %d/%d: %d clients%s%s, %.1fs", report.round, rounds, report.clients, detail, eps, report.seconds
        )

    def on_epoch(epoch: int, loss: float, epsilon: float | None) -> None:
        metrics = {} if private_diagnostics else {"train/loss": loss}
        if epsilon is not None:
            metrics["privacy/epsilon"] = epsilon
        tracking.log_metrics(client, run_id, metrics, step=epoch)
        spending.step(spending.entry.planned.steps * epoch // config.privacy.dp_sgd.epochs)
        detail = "" if private_diagnostics else f": loss {loss:.4f}"
        eps = "" if epsilon is None else f", epsilon {epsilon:.3f} (record-level)"
        logger.info("epoch %d/%d%s%s", epoch, config.privacy.dp_sgd.epochs, detail, eps)

    if resume is not None:
        logger.info("resuming after round %d of %d", resume.round, rounds)
        for saved in resume.state["reports"]:  # checkpointed, but the kill came before they were reported
            if saved["round"] > spending.done:
                on_round(RoundReport(**saved))
    if config.federated.engine == "flower":  # a Flower deployment on this machine; no checkpoints
        from fedml.flower.training import train_with_flower

        outcome = train_with_flower(
            data, config, canaries=canaries, local_statement=local_statement, on_round=on_round
        )  # fmt: skip
    else:
        with shard_runner(config) as runner:
            outcome = train_model(
                data, config, canaries=canaries, local_statement=local_statement, shard_runner=runner,
                on_round=on_round, on_epoch=on_epoch, checkpoints=checkpoints,
                resume=None if resume is None else resume.state,
            )  # fmt: skip
    headline = outcome.headline
    logger.info("trained: %s", headline.describe() if headline else "no differential privacy")
    if outcome.audit is not None:
        logger.info("privacy audit: %s", outcome.audit.describe(headline.epsilon if headline else None))
    return outcome


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(recommender: Recommender, split: Split, config: RunConfig) -> dict[str, RankingMetrics]:
    """The served model (fold-in from histories, as serving does) and the popularity baseline."""
    ev = config.evaluation
    common = dict(k=ev.k, sampled_negatives=ev.sampled_negatives, max_users=ev.max_users, seed=ev.seed)
    results = {
        "model": evaluate_ranking(
            lambda users, histories: recommender.score(histories), split.train, split.test_items, **common
        ),  # fmt: skip
        "popularity": evaluate_ranking(popularity_scorer(split.train), split.train, split.test_items, **common),
    }
    get_run_logger().info(
        "HR@%d %.4f, NDCG@%d %.4f (popularity HR@%d %.4f); %s",
        ev.k, results["model"].hit_rate, ev.k, results["model"].ndcg, ev.k, results["popularity"].hit_rate,
        results["model"].protocol,
    )  # fmt: skip
    return results


@task(name="register-model", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register(client: Any, run_id: str, recommender: Recommender, config: RunConfig, tags: dict[str, str]) -> str:
    version = tracking.log_and_register_model(client, run_id, recommender, config.tracking.registered_model, tags)
    get_run_logger().info("registered %s version %s", config.tracking.registered_model, version)
    return version


@task(name="promotion-gate", cache_policy=NO_CACHE)
def gate(
    client: Any, config: RunConfig, version: str, policy_file: str, run_id: str
) -> tuple[GateDecision, str | None]:
    """The gate on the facts recorded on the version (the same path as ``flows.ops promote``)."""
    name, alias = config.tracking.registered_model, config.tracking.production_alias
    before = tracking.production_candidate(client, name, alias)
    decision, production = promote(client, name, alias, version, load_policy(policy_file),
                                   actor=f"pipeline ({current_actor()})", reason=f"training run {run_id}")  # fmt: skip
    logger = get_run_logger()
    if decision.promote:
        logger.info("gate: version %s promoted to @%s (was %s)", version, alias, before[0] if before else "none")
    else:
        logger.warning("gate: version %s NOT promoted: %s", version, "; ".join(decision.reasons))
    return decision, production


# ---------------------------------------------------------------- flow


@flow(name="shopping-guide-training", log_prints=True)
def training_pipeline(
    config_file: str | None = None,
    overrides: list[str] | None = None,
    policy_file: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train, evaluate, register and (maybe) promote the shopping guide; returns the run summary.

    ``resume``: continue the run of this configuration and data that was killed mid-training, when
    there is one (:mod:`flows.resume`), else start afresh.
    """
    config = load_config(config_file, overrides)
    policy_path = policy_file or config.tracking.policy_file
    load_policy(policy_path)  # fail before any work when the policy is broken
    started = datetime.now(UTC)
    run_dir = Path(config.tracking.output_dir) / started.strftime("%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", config.to_json())

    client = tracking.connect()
    source, point = None, None
    if resume:
        source = load_data(config)
        point, why = find_resume_point(config, checkpoint_store(config, source.fingerprint),
                                       MlflowLedger(client, config.tracking.ledger_experiment), client)  # fmt: skip
        get_run_logger().info("--resume: %s", why if point else f"{why}; starting afresh")
    if point is not None:
        run_id = point.run_id
        client.set_tag(run_id, f"resumed.{started:%Y%m%dT%H%M%S}", f"after round {point.round}")
    else:
        run_id = tracking.start_run(
            client, config.tracking.experiment, f"train-{started:%Y%m%d-%H%M%S}",
            {"code.version": tracking.code_version(), "pipeline": "shopping-guide-training"},
        )  # fmt: skip
    try:
        summary = _run_steps(config, policy_path, client, run_id, run_dir, source, point)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    print(summary.render())
    create_markdown_artifact(markdown=_markdown(summary), key="training-summary", description="shopping-guide run")
    return asdict(summary)


def _run_steps(
    config: RunConfig,
    policy_path: str,
    client: Any,
    run_id: str,
    run_dir: Path,
    source: SourceData | None = None,
    resume: ResumePoint | None = None,
) -> PipelineSummary:
    tracking.log_params(client, run_id, config.to_flat_dict())
    client.log_artifact(run_id, str(run_dir / "config.json"))

    source = source if source is not None else load_data(config)
    validation = validate_data(source, config, run_dir)
    client.log_artifact(run_id, str(run_dir / "validation.json"), "validation")
    client.log_artifact(run_id, str(run_dir / "quarantine.csv"), "validation")
    report = validation.report
    tracking.log_metrics(client, run_id, {
        "data/rows_in": report["rows_in"], "data/rows_kept": report["rows_kept"],
        "data/rows_quarantined": report["rows_quarantined"],
    })  # fmt: skip
    client.set_tag(run_id, "data.fingerprint", source.fingerprint)
    client.set_tag(run_id, "validation.passed", str(validation.passed).lower())

    ids, split = split_data(validation.kept, config)
    training_data, local_statement = split.train, None
    if config.privacy.local_dp.enabled:
        training_data, local_statement = local_dp(split, ids, config)
    policy = load_policy(policy_path)
    cohort = config.privacy.cohort or source.name
    ledger = MlflowLedger(client, config.tracking.ledger_experiment)
    client.set_tag(run_id, "privacy.cohort", cohort)
    training_data, canaries = plant_audit_canaries(training_data, config)
    checkpoints = checkpoint_store(config, source.fingerprint)
    if resume is not None:
        entry = continue_budget(ledger, resume, run_id)
    else:
        if checkpoints.exists():
            get_run_logger().warning(
                "%s holds a checkpoint of a killed run of this configuration and data; this run starts afresh and "
                "replaces it (python -m flows.pipeline --resume would continue it)", checkpoints.path,
            )  # fmt: skip
        entry = reserve_budget(
            ledger, cohort, planned_spend(training_data, config, local_statement), run_id, policy, config
        )
    checkpoints.meta = writer_meta(run_id, entry.entry_id)
    try:
        with Spending(ledger, entry) as spending:
            outcome = train(training_data, config, local_statement, canaries, client, run_id, spending,
                            checkpoints if config.training.mode == "federated" else None, resume)  # fmt: skip
    finally:  # the entry is closed now (or the run failed): nothing left to resume
        checkpoints.clear()
    spent = lifetime(ledger.entries(), cohort, config.privacy.delta, config.privacy.accountant)
    recommender = Recommender(
        table=outcome.table, ids=ids, negatives=config.federated.negatives,
        fold_in_l2=config.model.fold_in_l2, fold_in_iterations=config.model.fold_in_iterations,
    )  # fmt: skip
    metrics = evaluate(recommender, split, config)

    headline = outcome.headline
    report_ = build_report(
        headline, outcome.local, cohort=cohort, lifetime=spent, lifetime_budget=policy.max_lifetime_epsilon,
        audit=_audit_report(outcome), secure_noise=config.privacy.secure_noise,
        publishes_diagnostics=config.publishes_diagnostics(),
    )  # fmt: skip
    privacy_tags = {
        **tracking.privacy_tags(headline, outcome.local),
        **{f"privacy.epsilon.{name}": repr(eps) for name, eps in report_["epsilon_by_accountant"].items()},
        "privacy.cohort": cohort,
        "privacy.lifetime_epsilon": repr(spent.epsilon),
        "privacy.lifetime_accountant": spent.accountant,
        "privacy.lifetime_budget": repr(policy.max_lifetime_epsilon),
        "privacy.ledger_entry": entry.entry_id,
        "privacy.secure_noise": str(config.privacy.secure_noise).lower(),
        "privacy.secure_aggregation": str(report_["secure_aggregation"] is not None).lower(),
        **(outcome.audit.to_tags() if outcome.audit else {}),
    }
    quality = {**metrics["model"].as_metrics("quality/"), **metrics["popularity"].as_metrics("baseline/popularity/")}
    tracking.log_metrics(client, run_id, quality)
    privacy_metrics = {f"privacy/epsilon_{name}": eps for name, eps in report_["epsilon_by_accountant"].items()}
    if headline is not None:
        privacy_metrics["privacy/epsilon_final"] = headline.epsilon
    if outcome.audit is not None:
        privacy_metrics["privacy/audit_epsilon_lower_bound"] = outcome.audit.epsilon_lower_bound
    tracking.log_metrics(client, run_id, {**privacy_metrics, "privacy/lifetime_epsilon": spent.epsilon})
    tracking.set_run_tags(client, run_id, privacy_tags)
    tracking.log_json(client, run_id, "privacy.json", report_)
    tracking.log_text(client, run_id, "privacy.md", render_markdown(report_))
    _log_plots(client, run_id, run_dir, outcome, config, spent.epsilon, policy.max_lifetime_epsilon)
    _log_quality_plot(client, run_id, run_dir, headline, metrics, source.name)
    tracking.log_json(client, run_id, "evaluation.json", {k: asdict(v) for k, v in metrics.items()})

    hr = metrics["model"].hit_rate
    version_tags = {
        **privacy_tags,
        "data.fingerprint": source.fingerprint,
        "data.source": source.name,
        "validation.passed": str(validation.passed).lower(),
        "quality.hr_at_10": repr(hr),
        "quality.ndcg_at_10": repr(metrics["model"].ndcg),
        "quality.protocol": metrics["model"].protocol,
        "baseline.popularity.hr_at_10": repr(metrics["popularity"].hit_rate),
        "code.version": tracking.code_version(),
        "mlflow.run_id": run_id,
    }
    version = register(client, run_id, recommender, config, version_tags)
    decision, production = gate(client, config, version, policy_path, run_id)
    client.set_tag(run_id, "gate.decision", "promoted" if decision.promote else "rejected")
    return PipelineSummary(
        run_id=run_id,
        model_name=config.tracking.registered_model,
        version=version,
        promoted=decision.promote,
        reasons=decision.reasons,
        production_version=production,
        rows_in=report["rows_in"],
        rows_kept=report["rows_kept"],
        rows_quarantined=report["rows_quarantined"],
        privacy=headline.describe() if headline else "none (epsilon = inf)",
        epsilon=headline.epsilon if headline else float("inf"),
        lifetime=(
            f"cohort {cohort!r}: lifetime epsilon {spent.epsilon:.3f} of {policy.max_lifetime_epsilon:g} "
            f"over {spent.runs} run(s) ({spent.accountant}); ledger: python -m flows.ops ledger"
        ),
        audit=_audit_report(outcome)["summary"] if outcome.audit else "not run (no central DP mechanism, or disabled)",
        hr_at_10=hr,
        popularity_hr_at_10=metrics["popularity"].hit_rate,
        tracking_uri=tracking.redacted(tracking.tracking_uri()),
        run_dir=str(run_dir),
    )


def _log_plots(
    client: Any, run_id: str, run_dir: Path, outcome: TrainingOutcome, config: RunConfig, lifetime: float, budget: float
) -> None:
    """Training curves and privacy per round, as PNG artifacts under ``plots/``."""
    from flows.plots import privacy_plot, training_plot

    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    unit = outcome.headline.unit if outcome.headline else "user"
    drawn = [
        training_plot(outcome.rounds, outcome.epoch_losses, config.publishes_diagnostics(), folder / "training.png"),
        privacy_plot(outcome.rounds, config.privacy.delta, unit, lifetime, budget, folder / "privacy.png"),
    ]
    for path in drawn:
        if path is not None:
            client.log_artifact(run_id, str(path), "plots")


def _log_quality_plot(
    client: Any, run_id: str, run_dir: Path, headline: Any, metrics: dict[str, RankingMetrics], source: str
) -> None:
    """HR@K at this run's ε beside popularity (the quality benchmark's plot, for one run) as ``plots/quality.png``."""
    from flows.plots import privacy_utility_plot, run_quality_panel

    path = privacy_utility_plot([run_quality_panel(source, headline, metrics)], run_dir / "plots" / "quality.png")
    client.log_artifact(run_id, str(path), "plots")


def _audit_report(outcome: TrainingOutcome) -> dict[str, Any] | None:
    if outcome.audit is None:
        return None
    claimed = outcome.headline.epsilon if outcome.headline else None
    return {**asdict(outcome.audit), "summary": outcome.audit.describe(claimed)}


def _markdown(summary: PipelineSummary) -> str:
    return "# Shopping-guide training run\n\n```\n" + summary.render().strip() + "\n```\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedml-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run configuration (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value (repeatable)")  # fmt: skip
    parser.add_argument("--policy", default=None, help="promotion policy (TOML); default from the configuration")
    parser.add_argument("--device", help="train on this torch device (cpu, cuda); same as --set training.device=...")
    parser.add_argument("--resume", action="store_true",
                        help="continue this configuration's run killed mid-training, if any (see flows/resume.py)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device:
        args.overrides.append(f"training.device={args.device}")
    started = time.perf_counter()
    state = training_pipeline(args.config, args.overrides, args.policy, args.resume, return_state=True)
    if state.is_failed():
        print(f"pipeline failed: {state.message}", file=sys.stderr)
        return 1
    state.result()
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0  # "not promoted" is a normal outcome, reported in the summary


if __name__ == "__main__":
    sys.exit(main())
