"""Qrels grade conventions of ``load_beir``: BEIR relevance (higher is better) vs Cleverdon's Cranfield codes."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from unipruner.adapters.colbert._demo import CRANFIELD_SMALL
from unipruner.adapters.colbert._eval import cleverdon_gain, load_beir, metrics
from unipruner.errors import UniprunerError

INDEX_FIXTURE_DOCS = Path(__file__).resolve().parent / "fixtures" / "colbert" / "docs.jsonl"
# q1: d1 is a complete answer (code 1), d2 of minimum interest (code 4), d3 useful (3), d4 of no interest (5);
# q2: only a code-5 judgement (not relevant under Cleverdon's codes, relevant under BEIR's).
QRELS = [("q1", "d1", 1), ("q1", "d2", 4), ("q1", "d3", 3), ("q1", "d4", 5), ("q2", "d2", 5)]


def _beir(root: Path, *, readme: bool) -> Path:
    root.mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) + "\n"
                                               for i in range(1, 6)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n"
                                                for q in ("q1", "q2")))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n"
                                                                                    for q, d, s in QRELS))
    if readme:
        (root / "cranqrel.readme").write_text("The codes are defined by Cleverdon as follows: 1. complete answer\n")
    return root


CLEVERDON = {"q1": {"d1": 4, "d2": 1, "d3": 2, "d4": 0}}
RELEVANCE = {"q1": {"d1": 1, "d2": 4, "d3": 3, "d4": 5}, "q2": {"d2": 5}}


def test_cleverdon_gain_is_five_minus_code() -> None:
    assert [cleverdon_gain(c) for c in (1, 2, 3, 4, 5, 6, 0, -1)] == [4, 3, 2, 1, 0, 0, 0, 0]


def test_without_readme_scores_are_gains_as_is(tmp_path: Path) -> None:
    data = load_beir(_beir(tmp_path / "beir", readme=False))
    assert data.grades == "relevance"
    assert data.query_ids == ["q1", "q2"] and data.qrels == RELEVANCE


def test_cranqrel_readme_selects_cleverdon_codes(tmp_path: Path) -> None:
    root = _beir(tmp_path / "cran", readme=True)
    data = load_beir(root)
    assert data.grades == "cleverdon"
    assert data.query_ids == ["q1"] and data.qrels == CLEVERDON  # q2's only judgement is code 5: no interest
    # the corpus file instead of the directory, and explicit queries / qrels, detect it too
    again = load_beir(root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / "test.tsv")
    assert again.grades == "cleverdon" and again.qrels == CLEVERDON


def test_explicit_grades_override_detection(tmp_path: Path) -> None:
    with_readme = _beir(tmp_path / "a", readme=True)
    without = _beir(tmp_path / "b", readme=False)
    assert load_beir(with_readme, grades="relevance").qrels == RELEVANCE
    forced = load_beir(without, grades="cleverdon")
    assert forced.grades == "cleverdon" and forced.qrels == CLEVERDON


def test_ndcg_prefers_the_complete_answer_first(tmp_path: Path) -> None:
    data = load_beir(_beir(tmp_path / "cran", readme=True))
    rel = [data.qrels["q1"]]
    best = metrics([["d1", "d3", "d2", "d5"]], rel)  # complete answer, useful, minimum interest
    worst = metrics([["d2", "d3", "d1", "d5"]], rel)  # minimum interest first
    assert best.ndcg10 == pytest.approx(1.0)
    ideal = 4 + 2 / math.log2(3) + 1 / 2
    assert worst.ndcg10 == pytest.approx((1 + 2 / math.log2(3) + 4 / 2) / ideal)
    assert best.ndcg10 > worst.ndcg10
    assert best.recall100 == worst.recall100 == 1.0 and best.mrr10 == worst.mrr10 == 1.0


@pytest.mark.parametrize("bad", ["Cleverdon", "linear", "", 1])
def test_bad_grades_raise(tmp_path: Path, bad: object) -> None:
    root = _beir(tmp_path / "beir", readme=False)
    with pytest.raises(UniprunerError, match="grades must be one of relevance, cleverdon"):
        load_beir(root, grades=bad)  # type: ignore[arg-type]


def test_gzipped_corpus_is_read_like_the_plain_one(tmp_path: Path) -> None:
    root = _beir(tmp_path / "cran", readme=True)
    plain = load_beir(root)
    corpus = root / "corpus.jsonl"
    (root / "corpus.jsonl.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    corpus.unlink()
    assert load_beir(root) == plain  # the dataset directory finds corpus.jsonl.gz
    assert load_beir(root / "corpus.jsonl.gz", root / "queries.jsonl", root / "qrels" / "test.tsv") == plain
    (root / "corpus.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UniprunerError, match="not a readable gzip file"):
        load_beir(root)


def test_bundled_cranfield_gains_match_ir_datasets() -> None:
    """The Cranfield cut bundled with the package (``scripts/make_cranfield_fixture.py``) reads as Cleverdon codes.

    The script checks the full collection against ir_datasets' ``cranfield`` (gains 4: 363, 3: 734, 2: 387, 1: 128
    over 225 queries) before cutting; here every judgement of the cut, read from its TSV independently of
    ``load_beir``, must come back as ir_datasets' relevance ``5 - code``, detected from its ``cranqrel.readme``.
    """
    readme = (CRANFIELD_SMALL / "cranqrel.readme").read_text()
    assert "1.  References which are a complete answer" in readme and "4.  References of minimum interest" in readme
    data = load_beir(CRANFIELD_SMALL)
    assert data.grades == "cleverdon" and len(data.query_ids) == 136 and len(data.doc_ids) == 398
    rows = [line.split("\t") for line in (CRANFIELD_SMALL / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    codes = Counter(int(code) for _, _, code in rows)
    assert codes == {1: 103, 2: 247, 3: 150, 4: 51} and len(rows) == 551  # no code 5 in Cranfield's qrels
    assert all(data.qrels[q][d] == 5 - int(code) for q, d, code in rows)
    counts = Counter(g for rel in data.qrels.values() for g in rel.values())
    assert counts == {4: 103, 3: 247, 2: 150, 1: 51}
    assert load_beir(CRANFIELD_SMALL, grades="relevance").qrels == {
        q: {d: 5 - g for d, g in rel.items()} for q, rel in data.qrels.items()}
    # a consistent collection: every judged document is in the corpus, every query has one
    assert {d for rel in data.qrels.values() for d in rel} <= set(data.doc_ids)
    assert set(data.query_ids) == {q for q, _, _ in rows}


def test_bundled_cranfield_holds_the_index_fixtures_documents() -> None:
    """The 300 documents of ``tests/fixtures/colbert`` (their first 240 characters) are in the bundled cut, in order.

    ``tests_envs/pylate/anchor_quality.py`` reads their judgements from it.
    """
    fixture = [json.loads(line) for line in INDEX_FIXTURE_DOCS.read_text().splitlines()]
    with gzip.open(CRANFIELD_SMALL / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        corpus = {r["_id"]: r for r in map(json.loads, fh)}
    assert len(fixture) == 300 and list(corpus)[:300] == [r["_id"] for r in fixture]
    assert all(corpus[r["_id"]]["text"][:240] == r["text"] for r in fixture)
