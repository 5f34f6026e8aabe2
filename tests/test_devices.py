"""The simulation's device store: each client gets back exactly the vector it stored last."""

from __future__ import annotations

import numpy as np
import torch

from fedml.federated.devices import DeviceStore, UserVectors


def test_clients_get_back_their_own_last_vectors_across_growth():
    store, dim = DeviceStore(), 4
    rng = np.random.default_rng(0)
    expected: dict[int, torch.Tensor] = {}
    for _ in range(5):  # 5 rounds of 700 clients out of 3000: the storage grows past its first capacity
        clients = rng.choice(3000, 700, replace=False).tolist()
        got = store.get_many(clients, dim, torch.float32, "cpu")
        for i, client in enumerate(clients):
            if client in expected:
                assert got.known[i] and torch.equal(got.values[i], expected[client])
            else:
                assert not got.known[i] and got.get(i) is None and not got.values[i].any()
        new = torch.randn(len(clients), dim)
        store.put_many(clients, new)
        expected.update({client: new[i].clone() for i, client in enumerate(clients)})
    assert len(store) == len(expected)
    client = next(iter(expected))
    assert torch.equal(store.get(client), expected[client]) and store.get(-1) is None


def test_user_vectors_from_optional_vectors():
    vectors = UserVectors.of([None, torch.ones(3), None, torch.full((3,), 2.0)], 3, torch.float64, "cpu")
    assert vectors.known.tolist() == [False, True, False, True] and vectors.values.dtype == torch.float64
    assert vectors.get(0) is None and torch.equal(vectors.get(3), torch.full((3,), 2.0, dtype=torch.float64))
    part = vectors[1:3]
    assert len(part) == 2 and part.known.tolist() == [True, False]
