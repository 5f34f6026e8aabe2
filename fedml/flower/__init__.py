"""Federated training on real devices with Flower (flwr 1.32, Message API).

Our own client update (:func:`fedml.federated.client.client_update`) runs in a Flower ``ClientApp``
on each SuperNode, and our own server side (Poisson sampling, DP-FedAvg clipping and noise, server
optimiser, accountant) runs in a Flower ``ServerApp``: a deployment computes what
:func:`fedml.federated.rounds.train_federated` computes for the same shoppers and seeds. Only item-row
deltas travel; user vectors stay in each SuperNode's state. See ``docs/flower.md``.

This is the only part of ``fedml`` that imports Flower; heavy imports stay in the submodules.
"""
