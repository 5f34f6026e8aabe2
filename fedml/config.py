"""One typed run configuration: a TOML file plus ``section.key=value`` overrides.

The resolved configuration is logged with every run (``RunConfig.to_flat_dict``) so that any run
can be reproduced from its MLflow params.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "movielens", "tmall", "events"] = "synthetic"
    path: str = ""  # file or folder for movielens / tmall / events sources
    # synthetic shop
    n_shoppers: int = 20000
    n_items: int = 1000
    n_categories: int = 16
    mean_sessions: float = 6.0
    seed: int = 7
    # validation
    expectations_dir: str = "expectations"
    min_interactions: int = 3
    min_positive_rating: float = 0.0  # ratings below this are not positives (0: every rating counts)
    max_quarantine_fraction: float = 0.2


@dataclass
class ModelConfig:
    dim: int = 32
    l2: float = 1e-4
    init_scale: float = 0.1
    fold_in_l2: float = 1.0
    fold_in_iterations: int = 30  # a cap (fedml.models.mf.FOLD_IN_ITERATIONS): each shopper stops once converged
    # mf: matrix factorisation (fedml.models.mf); ease: item-item weights from the federated Gram matrix
    # (fedml.models.ease: no local training, server_optimizer sgd or momentum, DP-SGD not available)
    kind: Literal["mf", "ease"] = "mf"
    ease_l2: float = 8.0  # ease: lambda = ease_l2 * mean item count (relative, see fedml.models.ease)


@dataclass
class FederatedConfig:
    rounds: int = 30
    client_rate: float = 0.1  # Poisson sampling rate q: expected clients per round = q * shoppers
    local_epochs: int = 2
    local_lr: float = 0.2
    local_batch_size: int = 32
    negatives: int = 4
    server_lr: float = 500.0
    server_optimizer: Literal["sgd", "momentum", "adam"] = "sgd"  # FedAvg(M)/FedAdam (federated.server_optim)
    server_beta1: float = 0.9  # momentum / Adam's first moment
    server_beta2: float = 0.99  # Adam's second moment
    server_tau: float = 1e-3  # Adam's adaptivity (epsilon)
    client_init_iterations: int = 2  # fold-in steps of a new client's start (federated.client.CLIENT_INIT_ITERATIONS)
    # one client at a time, a round's clients batched, or a Flower deployment of processes (fedml.flower)
    engine: Literal["reference", "batched", "flower"] = "batched"
    shards: int = 1  # split each round's clients into this many shards (Prefect tasks)
    flower_supernodes: int = 3  # engine = flower: SuperNodes on this machine, each holding a block of shoppers
    flower_round_timeout_s: float = 300.0  # engine = flower: a round stops waiting for replies after this
    # engine = flower with DP-FedAvg: Flower's SecAgg+, the server sees only the sum of the devices' uploads;
    # clipping and weighting move to the devices (docs/flower.md, "Secure aggregation")
    secure_aggregation: bool = False
    # poisoned clients (fedml.federated.robust; not with DP-FedAvg): fedavg | per-item-row trimmed_mean | median
    aggregation: Literal["fedavg", "trimmed_mean", "median"] = "fedavg"
    trim_fraction: float = 0.1  # trimmed_mean: share of each row's client weight cut from each end, in [0, 0.5)
    norm_bound: float = 0.0  # > 0: clip each update to this multiple of the round's median update norm
    task_runner: Literal["inline", "dask"] = "inline"  # dask: shards run on a Dask cluster
    dask_address: str = ""  # an existing Dask scheduler; empty: a local cluster of worker processes


@dataclass
class DPFedAvgConfig:
    enabled: bool = True
    clip_norm: float = 0.1  # S
    noise_multiplier: float = 1.0  # sigma; the noise on the sum has std sigma * S
    weight_cap: float = 5.0  # client weight w_k = min(n_k / weight_cap, 1)


@dataclass
class DPSGDConfig:
    enabled: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 0.0  # > 0: calibrate the noise multiplier to this epsilon instead
    epochs: int = 5
    batch_size: int = 256
    lr: float = 0.05


@dataclass
class LocalDPConfig:
    enabled: bool = False
    implicit_epsilon: float = 4.0  # randomized response on each (shopper, item) presence bit
    rating_epsilon: float = 2.0  # Laplace noise on each rating value


@dataclass
class AuditConfig:
    """One-run canary audit (Steinke, Nasr & Jagielski 2023) of the central DP mechanism."""

    enabled: bool = True
    canaries: int = 1000  # m: fake shoppers, each with its own fake product, included with probability 1/2
    items_per_canary: int = 1  # 1: a canary is one shopper and one record (valid for DP-SGD too)
    seed: int = 1234  # the auditor's secret draw of which canaries are in
    confidence: float = 0.95
    guesses: Literal["planned", "grid"] = "planned"  # planned: one guess count fixed from the config


@dataclass
class PrivacyConfig:
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"  # the one the gate and the ledger use; both are reported
    # the shoppers whose data the run uses, for the lifetime budget ledger; empty: the data source's name.
    # Name it for production (scheduled runs over new exports of the same shoppers must share it).
    cohort: str = ""
    # noise from the OS CSPRNG, hardened against floating-point attacks (not reproducible): for production
    secure_noise: bool = False
    # Training loss, update norms and clipped fractions are computed from raw data and are NOT
    # covered by epsilon: under a central DP mechanism they are published only when this is true.
    publish_diagnostics: bool = False
    dp_fedavg: DPFedAvgConfig = field(default_factory=DPFedAvgConfig)
    dp_sgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    local_dp: LocalDPConfig = field(default_factory=LocalDPConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


@dataclass
class TrainingConfig:
    mode: Literal["federated", "central"] = "federated"
    seed: int = 0
    device: str = "cpu"


@dataclass
class EvaluationConfig:
    k: int = 10
    sampled_negatives: int = 100
    max_users: int = 3000
    seed: int = 0


@dataclass
class TrackingConfig:
    experiment: str = "shopping-guide"
    registered_model: str = "shopping-guide"
    production_alias: str = "production"
    policy_file: str = "configs/promotion-policy.toml"
    ledger_experiment: str = "privacy-ledger"  # the MLflow experiment that holds the privacy ledger
    output_dir: str = ".fedml/runs"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def publishes_diagnostics(self) -> bool:
        """Whether un-noised training diagnostics may be logged: no central DP, or explicitly allowed."""
        central_dp = self.privacy.dp_sgd.enabled if self.training.mode == "central" else self.privacy.dp_fedavg.enabled
        return self.privacy.publish_diagnostics or not central_dp

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"federated.rounds": 30, ...}``: the form logged as MLflow params."""
        return _flatten(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, prefix="")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or start from defaults) and apply ``section.key=value`` overrides."""
    data = {} if path is None else read_toml(path, "configuration file", ConfigError)
    config = RunConfig.from_dict(data)
    for override in overrides or []:
        apply_override(config, override)
    return config


def read_toml(path: str | Path, what: str, error: type[ValueError]) -> dict[str, Any]:
    """The tables of a TOML file; ``error`` names the file when it is missing or not valid TOML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def apply_override(config: RunConfig, override: str) -> None:
    """Set one ``section.sub.key=value`` on ``config``; the value is parsed by the field's type."""
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    *parents, leaf = key.strip().split(".")
    target: Any = config
    for name in parents:
        if not dataclasses.is_dataclass(target) or name not in _field_types(type(target)):
            raise ConfigError(f"unknown configuration section {key!r}")
        target = getattr(target, name)
    types_ = _field_types(type(target)) if dataclasses.is_dataclass(target) else {}
    if leaf not in types_:
        raise ConfigError(f"unknown configuration key {key!r}")
    setattr(target, leaf, _coerce(types_[leaf], raw.strip(), key))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"configuration section {prefix.rstrip('.') or '<root>'} must be a table")
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        hint = types_[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _check(hint, value, prefix + name)
    return cls(**kwargs)


def _check(hint: Any, value: Any, key: str) -> Any:
    """Validate a value from a file against the field type (ints are accepted for floats)."""
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value


def _coerce(hint: Any, raw: str, key: str) -> Any:
    """Parse a command-line override string into the field's type."""
    try:
        if hint is bool:
            lowered = raw.lower()
            if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return lowered in {"true", "1", "yes"}
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}: cannot parse {raw!r} as {hint.__name__}") from None
    return _check(hint, raw, key)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "FederatedConfig",
    "DPFedAvgConfig",
    "DPSGDConfig",
    "LocalDPConfig",
    "PrivacyConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "TrackingConfig",
    "RunConfig",
    "load_config",
    "apply_override",
]
