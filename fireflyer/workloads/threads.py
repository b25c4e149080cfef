"""Intra-op threads for small tensor work on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_intra_op_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block: on small tensors OpenMP's fork/join costs more
    than it saves, and on a busy host several threads make each op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
