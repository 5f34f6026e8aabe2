"""Secure aggregation (Flower's SecAgg+) of DP-FedAvg: devices clip, the server sees only the sum.

The pieces are checked without processes (device-side clipping is the server's, Flower's own
quantisation stays within the stated bound); one integration test runs SecAgg+ on a real SuperLink
with three SuperNodes (two rounds, tiny data) against the simulator.
"""

# ruff: noqa: E402  (the flwr imports come after the skip when Flower is not installed)
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr", reason="needs the flower extra: pip install -e '.[flower]' (make test installs it)")

from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedml.config import ConfigError, RunConfig
from fedml.data.interactions import UserItems
from fedml.federated.client import LocalTraining, client_update
from fedml.federated.randomness import draw_round
from fedml.flower.secagg import (
    DIAGNOSTICS,
    MIN_NODES,
    MODULUS,
    QUANTIZATION_RANGE,
    SecAggParams,
    SecureRound,
    decode_sum,
    device_upload,
    quantization_error_bound,
)
from fedml.flower.setup import check_flower_config
from fedml.models.mf import init_item_table
from fedml.privacy.report import SECURE_AGGREGATION, build_report, render_markdown
from fedml.training import build_accountant, build_aggregator, federated_statement, planned_spend, train_model
from tests.flower_setup import DIM, N_ITEMS, NODES, flower_config, flower_shop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(*overrides: str) -> RunConfig:
    return flower_config(2, *overrides)


@pytest.fixture(scope="module")
def shop() -> UserItems:
    return flower_shop()


def _updates(shop: UserItems, clients: list[int]) -> list:
    table = init_item_table(N_ITEMS, DIM, 0.1, seed=3)
    local = LocalTraining(epochs=1, lr=0.5, batch_size=4, negatives=2, l2=1e-4)
    positives = [shop.of(c) for c in clients]
    draws = draw_round(7, 1, clients, positives, N_ITEMS, local.epochs, local.negatives)
    return [client_update(table, p, None, local, d)[0] for p, d in zip(positives, draws)]


def test_devices_clip_and_weigh_as_the_server_would_and_flower_quantisation_stays_within_the_bound(shop) -> None:
    config = _config()
    dp = config.privacy.dp_fedavg
    nodes = [[0, 3, 5], [8, 9], [17, 20, 21, 23]]
    updates = [_updates(shop, clients) for clients in nodes]
    uploads = [device_upload(u, dp.clip_norm, dp.weight_cap, N_ITEMS, DIM) for u in updates]
    server = build_aggregator(config, shop.counts()).accumulate([u for us in updates for u in us], N_ITEMS, DIM)
    assert server.clipped > 0  # clipping matters here
    total = [sum(upload[i] for upload in uploads) for i in range(3)]
    np.testing.assert_allclose(total[0], server.embeddings.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(total[1], server.bias.numpy(), rtol=0, atol=1e-12)
    assert total[2].shape == (DIAGNOSTICS,)
    # what the server decodes from the sum: the partial sum finish() takes, and the round's diagnostics
    params = SecAggParams.for_round(len(nodes), max(len(c) for c in nodes), dp.clip_norm)
    strategy = SecureRound([], params, total=total, answered_nodes=[10, 11, 12])
    decoded_sum = decode_sum(strategy, dict(zip([10, 11, 12], nodes)), shop.counts(), dp.clip_norm)
    flat = [u for us in updates for u in us]
    assert decoded_sum.answered == sorted(c for clients in nodes for c in clients)
    assert decoded_sum.partial is not None and decoded_sum.partial.clipped == server.clipped
    assert np.array_equal(decoded_sum.partial.num_examples, shop.counts()[decoded_sum.answered])
    assert decoded_sum.partial.norms.mean() == pytest.approx(np.minimum(server.norms, dp.clip_norm).mean())
    assert decoded_sum.loss == pytest.approx(np.mean([u.loss for u in flat]))

    # Flower's own quantisation (what secaggplus_mod and the workflow do, masks aside) of these uploads
    assert max(np.abs(a).max() for upload in uploads for a in upload) <= params.clipping_range  # never clipped
    quantised = [quantize(upload, params.clipping_range, params.quantization_range) for upload in uploads]
    summed = [sum(q[i].astype(np.int64) for q in quantised) % MODULUS for i in range(3)]
    decoded = dequantize(summed, params.clipping_range, params.quantization_range)
    bound = quantization_error_bound(len(nodes), params.clipping_range, params.quantization_range)
    for got, want in zip(decoded, total):
        error = np.abs(got - (len(nodes) - 1) * params.clipping_range - want).max()
        assert 0 < error <= bound


def test_secagg_parameters_keep_a_majority_threshold_and_the_sum_below_the_modulus() -> None:
    for nodes in (3, 4, 16, 1000, 5000):
        params = SecAggParams.for_round(nodes, 2, 0.1)
        assert params.num_shares == min(nodes, 15) and params.num_shares / 2 < params.threshold < params.num_shares
        assert nodes * params.quantization_range < MODULUS and params.quantization_range <= QUANTIZATION_RANGE
        assert params.clipping_range == pytest.approx(0.2)
    assert SecAggParams.for_round(1000, 1, 0.1).quantization_range == QUANTIZATION_RANGE
    assert SecAggParams.for_round(5000, 1, 0.1).quantization_range == 2**19
    with pytest.raises(ValueError, match=f"at least {MIN_NODES}"):
        SecAggParams.for_round(2, 1, 0.1)


def test_secure_aggregation_is_refused_where_it_cannot_run(shop) -> None:
    with pytest.raises(ConfigError, match="engine = 'flower'"):
        train_model(shop, _config("federated.secure_aggregation=true"))
    with pytest.raises(ConfigError, match="dp_fedavg.enabled"):
        check_flower_config(_config("federated.secure_aggregation=true", "privacy.dp_fedavg.enabled=false"))


def test_the_privacy_report_says_when_secure_aggregation_was_on() -> None:
    secure, clear = _config("federated.secure_aggregation=true"), _config()
    statements = {}
    for name, config in (("secure", secure), ("clear", clear)):
        accountant = build_accountant(config)
        accountant.step(config.federated.rounds)
        statements[name] = federated_statement(accountant, config)
    assert statements["secure"].epsilon == statements["clear"].epsilon  # the same mechanism's accounting
    assert (
        planned_spend(UserItems.from_pairs([0], [0], 1, 1), secure, None).charge.mechanism
        == statements["secure"].mechanism
    )
    report = build_report(statements["secure"], None, cohort="test")
    assert report["secure_aggregation"] == SECURE_AGGREGATION
    server = report["threat_model"]["server"]
    assert "only the sum" in server and "skip its own clipping" in server
    assert SECURE_AGGREGATION in render_markdown(report)
    assert SECURE_AGGREGATION in statements["secure"].to_tags()["privacy.mechanism"]
    clear_report = build_report(statements["clear"], None, cohort="test")
    assert clear_report["secure_aggregation"] is None and "in the clear" in clear_report["threat_model"]["server"]


@pytest.mark.integration
def test_a_secagg_deployment_trains_the_simulators_model_within_the_quantisation_bound(shop, tmp_path) -> None:
    """SuperLink + 3 SuperNodes (insecure transport: a local trial), 2 rounds through SecAgg+: the model
    of the simulator (server-side clipping, same noise) within the quantisation bound, the same epsilon,
    and the privacy report says SecAgg+ was on."""
    from fedml.flower.local import LocalFederation

    config = _config("federated.secure_aggregation=true")
    with LocalFederation(shop, nodes=NODES, tls=False, workdir=tmp_path) as federation:
        run = federation.run(config, round_timeout_s=120, timeout_s=600)
    simulated = train_model(shop, _config())

    rounds = [e for e in run.events if e["event"] == "round"]
    assert len(rounds) == config.federated.rounds and all(e["secagg"]["nodes"] >= MIN_NODES for e in rounds)
    fed = config.federated
    qw = build_aggregator(config, shop.counts()).expected_weight
    tolerance = sum(fed.server_lr * e["secagg"]["error_bound"] / qw for e in rounds) + 1e-6  # server SGD steps
    difference = max(
        (run.table.embeddings - simulated.table.embeddings).abs().max().item(),
        (run.table.bias - simulated.table.bias).abs().max().item(),
    )
    assert 0 < difference <= tolerance  # not bit-equal: the sum really went through SecAgg+'s quantisation
    assert run.statement is not None and simulated.central is not None
    assert run.statement.epsilon == simulated.central.epsilon and run.statement.steps == simulated.central.steps
    for got, want in zip(run.reports, simulated.rounds):
        assert got.clients == got.clients_answered == got.clients_sampled == want.clients
        assert got.clipped_fraction == pytest.approx(want.clipped_fraction)
        assert got.loss == pytest.approx(want.loss, abs=1e-4)
        assert got.update_norm <= config.privacy.dp_fedavg.clip_norm + 1e-6  # the mean clipped norm
    assert any(r.clipped_fraction > 0 for r in run.reports)  # clipping happened, on the devices

    report = build_report(run.statement, None, cohort="test")
    assert report["secure_aggregation"] == SECURE_AGGREGATION
    assert (
        "only the sum" in report["threat_model"]["server"]
        and "skip its own clipping" in report["threat_model"]["server"]
    )
    assert SECURE_AGGREGATION in render_markdown(report)
    assert run.statement.to_tags()["privacy.mechanism"] == run.statement.mechanism
    assert SECURE_AGGREGATION in run.statement.mechanism
    assert build_report(simulated.central, None, cohort="test")["secure_aggregation"] is None
