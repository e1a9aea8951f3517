"""Scoped thread limits: library code never leaves a process-wide thread count changed.

``torch.set_num_threads`` and faiss's ``omp_set_num_threads`` change a setting of the whole process. Loops of many
small tensor ops (the Ward merge loop, one faiss k-means per document, a tokenizer-sized encoder batch) often run
faster on one thread than on many (intra-op threads only add synchronisation there, and under CPU contention they
can slow such a loop down more than tenfold), so library code may want fewer threads *for one block*. It must then
give the caller's settings back, also when the block raises: :func:`limit_threads` does both.

>>> import torch
>>> before = torch.get_num_threads()
>>> with limit_threads(1):
...     torch.get_num_threads()
1
>>> torch.get_num_threads() == before
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import UniprunerError

__all__ = ["limit_threads"]


@contextmanager
def limit_threads(n: int | None, *, faiss: Any = None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (and ``n`` faiss OpenMP threads); restore them afterwards.

    Parameters
    ----------
    n : int or None
        Threads for the block (``>= 1``); ``None`` leaves every setting as it is (a no-op, for optional knobs).
    faiss : module, optional
        The imported ``faiss`` module: its OpenMP thread count (``omp_get_max_threads`` /
        ``omp_set_num_threads``) is limited and restored too.

    Notes
    -----
    The settings are process-wide for the duration of the block: other threads of the process see them too. Blocks
    nest (each restores what it found). Only the counts that differ from ``n`` are changed, so a block that asks
    for the current count costs nothing.

    Raises
    ------
    UniprunerError
        If ``n`` is not a positive int (or None).
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UniprunerError(f"a thread count must be an int >= 1 (or None for no limit), got {n!r}")
    before = torch.get_num_threads()
    f_before = int(faiss.omp_get_max_threads()) if faiss is not None else None
    try:
        if before != n:
            torch.set_num_threads(n)
        if faiss is not None and f_before != n:
            faiss.omp_set_num_threads(n)
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        if faiss is not None and f_before is not None and int(faiss.omp_get_max_threads()) != f_before:
            faiss.omp_set_num_threads(f_before)
