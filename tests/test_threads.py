"""unipruner._threads.limit_threads: thread counts are limited inside the block and restored after it."""

from __future__ import annotations

import faiss
import pytest
import torch

from unipruner import UniprunerError
from unipruner._threads import limit_threads


def test_torch_and_faiss_threads_restored() -> None:
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    with limit_threads(1, faiss=faiss):
        assert torch.get_num_threads() == 1
        assert faiss.omp_get_max_threads() == 1
        with limit_threads(2):  # nested blocks restore what they found
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert faiss.omp_get_max_threads() == 2


def test_restored_after_an_exception() -> None:
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"), limit_threads(1, faiss=faiss):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    assert faiss.omp_get_max_threads() == 2


def test_none_is_a_no_op_and_bad_counts_fail() -> None:
    torch.set_num_threads(2)
    with limit_threads(None):
        assert torch.get_num_threads() == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UniprunerError, match="thread count"), limit_threads(bad):  # type: ignore[arg-type]
            pass
    assert torch.get_num_threads() == 2
