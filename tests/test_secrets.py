"""Secrets and access: no credentials in the repository, in a run's MLflow record, or in what the service shows.

* The repository's tracked files are scanned for credentials: passwords in URLs, AWS keys, private
  keys, GitHub and Slack tokens, and literal ``password = "..."``-style assignments (outside tests,
  whose fixtures need tokens). The scanner is shown to catch a planted example of each.
* A real pipeline run whose tracking URL carries a password leaves that password in none of the
  run's params, tags, model-version tags or text artifacts (the whole MLflow store is searched).
* Tracking and orchestration locations come from the environment, never from configuration files.
* A registry error that quotes the tracking URL reaches the service's public ``/version`` redacted.

The serving token (tests/test_serving_api.py) and the MLflow server's authentication
(tests/test_production_stack.py, infra/bin/mlflow-server) have their own tests.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from fedml.redaction import redact_text, redacted

ROOT = Path(__file__).resolve().parents[1]
PLANTED = "PLANTED-pw-7f3e9"  # the password a test puts into a tracking URL, then looks for everywhere

PATTERNS: dict[str, re.Pattern[str]] = {
    "password in a URL": re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?P<user>[^/\s:@'\"]+):(?P<secret>[^/\s@'\"]+)@(?P<host>[^/\s:'\"]*)"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?(?P<secret>[A-Za-z0-9/+]{40})"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "secret assignment": re.compile(
        r"(?i)\b[\w.]*(?:password|passwd|secret|token|api_?key)[\w.]*\s*[=:]\s*['\"](?P<secret>[^'\"\s]{8,})['\"]"
    ),
}  # fmt: skip
# a value that only names where a secret comes from, or stands in for one
_PLACEHOLDER = re.compile(  # "$...": a shell expansion; "password": the word itself, in an example
    r"^(?:\*+|%s|\{[^}]*\}|\$.*|<[^>]+>|[A-Z][A-Z0-9_]*|(?i:password|passwd|pass|pwd|secret|token))$"
)
_EXAMPLE_HOST = re.compile(r"(?:^|\.)(?:example(?:\.com|\.org|\.net)?|invalid|test|localhost)$")  # RFC 2606
_KEY_FILES = re.compile(r"(?:^|/)(?:id_rsa|id_ed25519|id_ecdsa|\.env|credentials|\.netrc|.*\.pem|.*\.p12|.*\.key)$")


def find_credentials(text: str, path: str = "") -> list[str]:
    """``"line: kind: match"`` for each credential-like string in ``text`` (``path`` picks the rules)."""
    found = []
    for kind, pattern in PATTERNS.items():
        if kind == "secret assignment" and path.startswith("tests/"):
            continue  # test fixtures set tokens for the servers they start
        for match in pattern.finditer(text):
            groups = match.groupdict()
            if groups.get("secret") and _PLACEHOLDER.match(groups["secret"]):
                continue
            if groups.get("host") is not None and _EXAMPLE_HOST.search(groups["host"]):
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{line}: {kind}: {match.group(0)[:60]}")
    return found


def tracked_files() -> list[str]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [name for name in listing.stdout.decode().split("\0") if name]


def test_the_scanner_finds_each_kind_of_credential() -> None:
    """Planted examples (built here, so that this file holds none) are all found; placeholders are not."""
    planted = {
        "password in a URL": "MLFLOW_TRACKING_URI=https://admin:" + "hunter2hunter2@mlflow.internal.corp/",
        "AWS access key id": "key = AKIA" + "Q" * 16,
        "AWS secret access key": "aws_secret_access_key = " + "a1B2" * 10,
        "private key": "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIE...",
        "GitHub token": "GH_TOKEN=ghp_" + "x" * 36,
        "Slack token": "hook xoxb-" + "1234567890-abcdef",
        "secret assignment": 'db_password = "' + 'correct-horse-battery"',
    }
    for kind, text in planted.items():
        assert any(f": {kind}: " in hit for hit in find_credentials(text, "flows/x.py")), kind
    harmless = [
        "url = f'{scheme}://{user}:{password}@{host}'",
        "printf '%s://%s:%s@%s' ...",
        "https://ops:***@mlflow.example.com:5000",
        "https://ops:s3cret@mlflow.example:5000/x",  # a reserved example host: no real service
        'TOKEN_ENV = "FEDML_SERVE_TOKEN"',
        'password = "${MLFLOW_TRACKING_PASSWORD}"',
        "``https://user:password@host`` -> ``https://user:***@host``",
    ]
    for text in harmless:
        assert find_credentials(text, "flows/x.py") == [], text


def test_tracked_files_hold_no_credentials() -> None:
    hits, scanned = [], 0
    for name in tracked_files():
        path = ROOT / name
        if _KEY_FILES.search(name):
            hits.append(f"{name}: a key or credentials file is tracked")
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        scanned += 1
        hits += [f"{name}:{hit}" for hit in find_credentials(data.decode("utf-8", "replace"), name)]
    assert scanned > 100  # the scan really ran over the repository
    assert hits == [], "credentials in tracked files:\n" + "\n".join(hits)


def test_ignored_state_holds_the_generated_secrets() -> None:
    """The stack's generated secrets (infra/bin/make-secrets) and the local MLflow store stay untracked."""
    ignore = (ROOT / ".gitignore").read_text().split()
    assert ".fedml/" in ignore and "mlflow.db" in ignore
    assert not [name for name in tracked_files() if name.startswith(".fedml/")]


# ---------------------------------------------------------------------- where URLs and credentials come from


def test_tracking_and_orchestration_locations_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedml.config import RunConfig
    from flows import tracking

    for config in sorted((ROOT / "configs").glob("*.toml")):
        text = config.read_text()
        assert "://" not in text and not find_credentials(text, str(config)), config
        tomllib.loads(text)
    assert not [key for key in RunConfig().to_flat_dict() if re.search(r"(?i)uri|url|password|token", key)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://ops:{PLANTED}@mlflow.internal:5000")
    assert tracking.tracking_uri() == f"https://ops:{PLANTED}@mlflow.internal:5000"
    assert tracking.local_artifact_root() is None  # a server decides where artifacts go
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri().startswith("sqlite:///")  # unset: the embedded store, nothing remote


def test_redaction() -> None:
    assert redacted(f"https://ops:{PLANTED}@mlflow.internal:5000/x") == "https://ops:***@mlflow.internal:5000/x"
    assert redacted("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    message = f"API request to http://ops:{PLANTED}@10.0.0.9:5000/api/2.0/x failed; db postgresql://u:{PLANTED}@db/x"
    assert (
        redact_text(message)
        == "API request to http://ops:***@10.0.0.9:5000/api/2.0/x failed; db postgresql://u:***@db/x"
    )
    assert (
        redact_text("user@example.com wrote https://plain.example/x")
        == "user@example.com wrote https://plain.example/x"
    )


def test_a_registry_error_quoting_the_tracking_url_is_shown_redacted() -> None:
    """Regression: MLflow's "API request to http://user:password@host/... failed" went verbatim into the
    service's last_error, shown by the unauthenticated GET /version and in the 503 answers."""
    from fastapi.testclient import TestClient

    from fedml.serving.api import ServiceSettings, create_app
    from fedml.serving.source import StaticSource

    class Unreachable(StaticSource):
        def current_version(self) -> str | None:
            raise ConnectionError(f"API request to http://ops:{PLANTED}@10.0.0.9:5000/api/2.0/mlflow failed")

    app = create_app(Unreachable(None, name="shopping-guide"), ServiceSettings(token="t0ken-t0ken", poll_seconds=3600))
    with TestClient(app) as client:
        version, ready = client.get("/version"), client.get("/readyz")
    assert "http://ops:***@10.0.0.9:5000" in version.json()["reload_error"]
    assert ready.status_code == 503 and "ops:***@" in ready.json()["detail"]
    assert PLANTED not in version.text + ready.text


# ---------------------------------------------------------------------- a real run's MLflow record


@pytest.mark.integration
def test_a_pipeline_run_logs_no_credentials(pipeline_env: Path, monkeypatch: pytest.MonkeyPatch, servers) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import training_pipeline

    url = servers["mlflow"].url.replace("http://", f"http://fedml-ops:{PLANTED}@")  # basic auth in the URL
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    name = "secrets-check"
    overrides = ["data.n_shoppers=400", "data.n_items=100", "federated.rounds=2", "federated.client_rate=0.3",
                 "evaluation.max_users=400", f"tracking.registered_model={name}", "tracking.experiment=secrets-check",
                 "privacy.cohort=secrets-check"]  # fmt: skip
    state = training_pipeline(None, overrides, None, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["tracking_uri"] == url.replace(PLANTED, "***")  # printed, redacted

    client = MlflowClient(tracking_uri=servers["mlflow"].url, registry_uri=servers["mlflow"].url)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    ours = [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("train-")]
    assert ours and any(r.data.params for r in ours)
    texts = []
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        texts.append(run.info.artifact_uri or "")
    for version in client.search_model_versions(f"name='{name}'"):
        texts += [f"{k}={v}" for k, v in version.tags.items()] + [version.source or ""]
    run = max(ours, key=lambda r: r.info.start_time)
    for artifact in ("config.json", "privacy.md", "evaluation.json", "validation/validation.json"):
        texts.append(Path(client.download_artifacts(run.info.run_id, artifact, str(pipeline_env))).read_text())
    assert len(texts) > 50
    leaks = [text[:120] for text in texts if PLANTED in text]
    assert leaks == [], leaks
    assert not [hit for text in texts for hit in find_credentials(text)]
