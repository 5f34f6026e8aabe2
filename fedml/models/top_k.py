"""The k best scores of each row of a wide score matrix, faster than a full ``torch.topk`` pass.

A served request ranks the whole catalogue for k = 10 or so. :func:`top_k` first takes the maximum
of each of ``groups`` interleaved groups of columns (group ``j`` holds columns ``j, j + groups, ...``;
one vectorised pass), keeps the k groups with the largest maxima, and ranks only their columns.
Every column among the k best lies in one of them: if a column holds ``v`` and is among the k best,
fewer than k columns are larger than ``v``, so fewer than k groups have a maximum larger than ``v``,
and its group (maximum at least ``v``) is among the k largest maxima, up to ties at exactly ``v``.
The values are exactly ``torch.topk``'s; among exactly equal scores the indices may differ (as they
may between torch versions).
"""

from __future__ import annotations

import torch

#: interleaved column groups; a row is split into ``GROUPS`` groups of ``n // GROUPS`` columns
GROUPS = 256


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` (sorted, largest first) for a 2-d ``scores`` ``[m, n]``."""
    m, n = scores.shape
    rows_per_group = n // GROUPS
    if k > GROUPS // 4 or rows_per_group < 8:  # small catalogues or large k: nothing to gain
        return torch.topk(scores, k, dim=1)
    grid = n - n % GROUPS  # columns [grid, n) are always candidates
    group_max = scores[:, :grid].view(m, rows_per_group, GROUPS).amax(1)  # [m, GROUPS]
    best_groups = torch.topk(group_max, k, dim=1).indices  # [m, k]
    offsets = torch.arange(0, grid, GROUPS, device=scores.device)  # [rows_per_group]
    candidates = (best_groups[:, :, None] + offsets).view(m, -1)  # [m, k * rows_per_group]
    if grid < n:
        rest = torch.arange(grid, n, device=scores.device).expand(m, -1)
        candidates = torch.cat((candidates, rest), 1)
    values, positions = torch.topk(scores.gather(1, candidates), k, dim=1)
    return values, candidates.gather(1, positions)
