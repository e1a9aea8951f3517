"""PyLate 1.3.4 (SqliteDict id maps) loads and searches a Voyager index that unipruner compressed.

Runs in .venv-pylate13 (pylate==1.3.4 + sqlitedict over .venv-pylate's dependencies; scripts/ci_pylate.sh). The
fixture tests/fixtures/colbert/voyager_sqlite was written by PyLate 1.3.4 itself (scripts/make_colbert_fixtures.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from unipruner.adapters import colbert

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests" / "fixtures" / "colbert" / "voyager_sqlite" / "cranfield"

torch.set_num_threads(2)


def _queries(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    """Each document's first 8 stored vectors, read through PyLate 1.3.4's own SqliteDict map."""
    from sqlitedict import SqliteDict
    from voyager import Index

    index = Index.load(str(folder / "index.voyager"))
    with SqliteDict(str(folder / "document_ids_to_embeddings.sqlite"), outer_stack=False) as m:
        ids = list(m.keys())
        return ids, [np.asarray(index.get_vectors(m[k][:8])) for k in ids]


def test_environment_is_the_anchor() -> None:
    import pylate

    assert pylate.__version__ == "1.3.4"


def test_pylate13_voyager_searches_compressed_index(tmp_path: Path) -> None:
    from pylate import indexes, retrieve

    shutil.copytree(SRC, tmp_path / "orig" / "cranfield")
    (tmp_path / "small").mkdir()
    res = colbert.compress(SRC, tmp_path / "small" / "cranfield", colbert.ReduceSpec("ward_pool", factor=2))
    assert res.dst.n_vectors < 0.55 * res.src.n_vectors
    ids, queries = _queries(tmp_path / "orig" / "cranfield")
    for folder in ("orig", "small"):
        index = indexes.Voyager(index_folder=str(tmp_path / folder), index_name="cranfield", override=False,
                                embedding_size=128)
        results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=queries, k=3)
        assert [r[0]["id"] for r in results] == ids, folder
    # PyLate 1.3.4 can keep adding to the compressed index (its SqliteDict maps are in its own layout).
    index.add_documents(documents_ids=["new"], documents_embeddings=[queries[0][:4] * -1.0])
    results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=queries, k=3)
    assert [r[0]["id"] for r in results] == ids
