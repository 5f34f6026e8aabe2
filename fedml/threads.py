"""Thread settings for work made of many tiny tensor operations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the previous setting.

    One client's tensors are tiny: on a loaded 2-core machine, PyTorch's thread pool made each
    small operation up to 100x slower, and it gains nothing at this size.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
