"""Federated training over a real Flower deployment computes what the simulator computes.

The integration tests start a SuperLink and three SuperNodes as separate processes on 127.0.0.1
(free ports); Flower runs each message's ClientApp in a fresh process (Python + torch start-up), so a
round costs seconds, not milliseconds. Small data, dim 8.
"""

# ruff: noqa: E402  (the flwr imports come after the skip when Flower is not installed)
from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="needs the flower extra: pip install -e '.[flower]' (make test installs it)")

from cryptography import x509
from flwr.common.config import validate_config

from fedml.config import RunConfig
from fedml.data.interactions import UserItems
from fedml.federated.client import LocalTraining, client_update
from fedml.federated.randomness import draw_round
from fedml.federated.sampling import poisson_sample
from fedml.flower.app_project import RunSettings, write_app_project
from fedml.flower.certs import generate_certificates
from fedml.flower.node_data import load_user_items, partition, save_user_items
from fedml.flower.protocol import read_train_request, read_updates, train_content, updates_content
from fedml.models.mf import init_item_table
from fedml.privacy.accountant import SubsampledGaussianAccountant
from fedml.training import plant_audit_canaries, train_model
from tests.flower_setup import N_ITEMS, N_USERS, NODES, flower_config, flower_shop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(*overrides: str) -> RunConfig:
    return flower_config(3, *overrides)


@pytest.fixture(scope="module")
def shop() -> UserItems:
    return flower_shop()


# ---------------------------------------------------------------------------------------------
# Pieces, without processes


def test_node_data_round_trips_and_partitions_cover_every_shopper(tmp_path, shop) -> None:
    loaded = load_user_items(save_user_items(tmp_path / "d.npz", shop))
    assert np.array_equal(loaded.indptr, shop.indptr) and np.array_equal(loaded.items, shop.items)
    assert (loaded.n_users, loaded.n_items) == (shop.n_users, shop.n_items)
    blocks = [partition(N_USERS, i, NODES) for i in range(NODES)]
    assert np.array_equal(np.concatenate(blocks), np.arange(N_USERS))
    with pytest.raises(ValueError, match="partition-id"):
        partition(N_USERS, NODES, NODES)
    device = load_user_items(save_user_items(tmp_path / "device.npz", shop, shoppers=[3, 17]))
    assert (device.n_users, device.n_items) == (shop.n_users, shop.n_items)
    assert np.flatnonzero(device.counts()).tolist() == [3, 17]
    assert np.array_equal(device.of(17), shop.of(17)) and np.array_equal(device.of(3), shop.of(3))
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npz"):
        load_user_items(tmp_path / "bad.npz")


def test_messages_carry_the_table_and_each_shoppers_row_deltas_exactly(shop) -> None:
    table = init_item_table(N_ITEMS, 8, 0.1, seed=3)
    local = LocalTraining(epochs=1, lr=0.2, batch_size=4, negatives=2, l2=1e-4)
    request = read_train_request(train_content(table, local, 7, 2, [5, 1]))
    assert (request.local, request.seed, request.round, request.clients) == (local, 7, 2, [5, 1])
    assert torch.equal(request.table.embeddings, table.embeddings) and torch.equal(request.table.bias, table.bias)

    clients = [1, 5]
    positives = [shop.of(c) for c in clients]
    draws = draw_round(7, 2, clients, positives, N_ITEMS, local.epochs, local.negatives)
    updates = [client_update(table, p, None, local, d)[0] for p, d in zip(positives, draws)]
    decoded = read_updates(updates_content(clients, updates, 8))
    assert [c for c, _ in decoded] == clients
    for (_, got), sent in zip(decoded, updates):
        assert torch.equal(got.rows, sent.rows)
        assert torch.equal(got.delta_embeddings, sent.delta_embeddings)
        assert torch.equal(got.delta_bias, sent.delta_bias)
        assert (got.num_examples, got.loss) == (sent.num_examples, sent.loss)


def test_app_project_is_a_valid_flower_app(tmp_path) -> None:
    directory = write_app_project(tmp_path / "app", _config(), RunSettings(output_dir=str(tmp_path / "out")))
    project = tomllib.loads((directory / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(project, check_module=True, project_dir=directory)
    assert valid, errors
    assert RunConfig.from_dict(json.loads(project["tool"]["flwr"]["app"]["config"]["fedml-config"])) == (_config())


def test_certificates_name_the_superlink_and_chain_to_the_ca(tmp_path) -> None:
    files = generate_certificates(tmp_path, ["127.0.0.1", "superlink.example"])
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example"]
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert oct(files.server_key.stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------------------------------------
# A real deployment


@pytest.mark.integration
def test_a_flower_deployment_trains_what_the_simulator_trains(shop, tmp_path) -> None:
    """SuperLink + 3 SuperNodes over TLS, 3 rounds, as the pipeline's federated.engine = "flower" runs
    them (audit canaries included): the same model, epsilon and audit as train_model."""
    from fedml.flower.training import train_with_flower

    config = _config("privacy.audit.enabled=true", "privacy.audit.canaries=6")
    data, canaries = plant_audit_canaries(shop, config)
    assert canaries is not None and data.n_users > N_USERS
    simulated = train_model(data, config, canaries=canaries)
    rounds = []
    flower = train_with_flower(data, config, canaries=canaries, on_round=rounds.append, workdir=tmp_path)

    torch.testing.assert_close(flower.table.embeddings, simulated.table.embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(flower.table.bias, simulated.table.bias, rtol=0, atol=1e-6)
    assert flower.central == simulated.central  # epsilon, sigma, q and steps from the same accountant
    assert flower.audit == simulated.audit
    assert rounds == flower.rounds and len(rounds) == config.federated.rounds
    assert [r.epsilon for r in rounds] == [r.epsilon for r in simulated.rounds]
    assert [r.clients for r in rounds] == [r.clients for r in simulated.rounds]
    assert [r.clipped_fraction for r in rounds] == pytest.approx([r.clipped_fraction for r in simulated.rounds])
    assert any(r.clipped_fraction > 0 for r in rounds)  # clipping happened, on the server
    assert all(r.clients_answered == r.clients_sampled == r.clients for r in rounds)


@pytest.mark.integration
def test_a_supernode_stopped_during_a_round_does_not_stall_the_run(shop, tmp_path) -> None:
    """Insecure mode (local trial). SuperNode 0 is stopped when round 2 starts: the round goes on
    without its shoppers, records them as missing, and epsilon is the planned one."""
    from fedml.flower.local import LocalFederation

    config = _config("federated.rounds=2")
    fed, dp = config.federated, config.privacy.dp_fedavg
    rng = np.random.default_rng(config.training.seed)  # the server's sampling, as the simulator does it
    sampled = [set(poisson_sample(N_USERS, fed.client_rate, rng).tolist()) for _ in range(fed.rounds)]
    lost = sampled[1] & set(partition(N_USERS, 0, NODES).tolist())
    assert lost, "the seed must sample some of node 0's shoppers in round 2 for this test to mean anything"

    with LocalFederation(shop, nodes=NODES, tls=False, workdir=tmp_path) as federation:

        def stop_node_0(event: dict) -> None:
            if event["event"] == "round_started" and event["round"] == 2:
                federation.stop_node(0)

        run = federation.run(config, on_event=stop_node_0, round_timeout_s=120, timeout_s=600)

    first, second = run.reports
    assert (first.clients_sampled, first.clients_answered) == (len(sampled[0]), len(sampled[0]))
    assert second.clients_sampled == len(sampled[1])
    assert second.clients_answered == second.clients == len(sampled[1] - lost)
    missing = next(e["missing"] for e in run.events if e["event"] == "round" and e["round"] == 2)
    assert set(missing) == lost
    planned = SubsampledGaussianAccountant(dp.noise_multiplier, fed.client_rate, config.privacy.accountant)
    planned.step(fed.rounds)
    assert run.statement is not None and run.statement.steps == fed.rounds
    assert run.statement.epsilon == planned.epsilon(config.privacy.delta)
    assert second.epsilon == run.statement.epsilon
