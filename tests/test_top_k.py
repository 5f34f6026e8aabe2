"""top_k: the values of torch.topk exactly, and its indices wherever scores are distinct."""

from __future__ import annotations

import pytest
import torch

from fedml.models.top_k import GROUPS, top_k


@pytest.mark.parametrize("n", [GROUPS * 8, GROUPS * 8 + 1, 50_000, 123_457])
@pytest.mark.parametrize("k", [1, 10, GROUPS // 4])
def test_top_k_equals_torch_topk(n, k):
    generator = torch.Generator().manual_seed(n + k)
    scores = torch.randn(6, n, generator=generator)
    scores[1] -= torch.linspace(0.0, 50.0, n)  # the best at the front
    scores[2] += torch.linspace(0.0, 50.0, n)  # the best at the end: in the columns outside the groups' grid
    scores[3, : n // 2] = -torch.inf  # items already seen
    scores[4, torch.randperm(n, generator=generator)[:k]] += 100.0  # the best k in k different groups, or one
    scores[5, torch.arange(0, n, GROUPS)[:k]] += 100.0  # the best k all in group 0
    values, indices = top_k(scores, k)
    want_values, want_indices = torch.topk(scores, k, dim=1)
    assert torch.equal(values, want_values)
    assert torch.equal(indices, want_indices)
    assert torch.equal(scores.gather(1, indices), values)


def test_ties_give_the_same_values():
    scores = torch.zeros(3, 20_000)
    scores[0, ::7] = 1.0  # many equal best scores
    scores[1, :] = -torch.inf
    scores[1, 5] = 2.0  # one finite score, the rest -inf
    values, indices = top_k(scores, 10)
    assert torch.equal(values, torch.topk(scores, 10, dim=1).values)
    assert torch.equal(scores.gather(1, indices), values)
    assert len(set(indices[0].tolist())) == 10  # ten different columns


def test_small_rows_and_large_k_fall_back_to_torch():
    scores = torch.randn(4, 300)
    assert torch.equal(top_k(scores, 5)[1], torch.topk(scores, 5, dim=1).indices)
    wide = torch.randn(2, 40_000)
    assert torch.equal(top_k(wide, 100)[1], torch.topk(wide, 100, dim=1).indices)
