"""Compress an existing multi-vector index and compare retrieval quality before and after.

Builds a small raw index of Cranfield documents with all-MiniLM-L6-v2 token vectors, pools it with Ward (pool factor
2, [CLS] protected) through the same pipeline as ``unipruner colbert compress``, and evaluates both indexes with exact
MaxSim search. Run from the project root: ``python examples/colbert_compress.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from unipruner.adapters import colbert
from unipruner.adapters.colbert._demo import _data_dir, demo_subset


def main() -> None:
    data = demo_subset(colbert.load_beir(_data_dir()), n_queries=20, n_docs=200)
    model = colbert.load_encoder("minilm")
    docs = colbert.encode_tokens(model, data.doc_texts)
    queries = colbert.encode_tokens(model, data.query_texts)
    with tempfile.TemporaryDirectory() as tmp:
        src = colbert.write_raw(Path(tmp) / "index", docs, ids=data.doc_ids, dtype="float16")
        res = colbert.compress(src, Path(tmp) / "pooled", colbert.ReduceSpec("ward_cosine_pool", factor=2, protected=1))
        before = colbert.evaluate_index(colbert.open_index(src), data, queries)
        after = colbert.evaluate_index(colbert.open_index(res.dst.path), data, queries)
        print(f"vectors {res.src.n_vectors:,} -> {res.dst.n_vectors:,}; bytes {res.src.n_bytes:,} -> "
              f"{res.dst.n_bytes:,}")
        print(f"nDCG@10 {before.ndcg10:.4f} -> {after.ndcg10:.4f} ({after.ndcg10 / before.ndcg10:.1%} retained)")


if __name__ == "__main__":
    main()
