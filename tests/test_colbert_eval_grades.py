"""Qrels grade conventions of ``load_beir``: BEIR relevance (higher is better) vs Cleverdon's Cranfield codes."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from unipruner.adapters.colbert._eval import cleverdon_gain, load_beir, metrics
from unipruner.errors import UniprunerError

CRANFIELD = Path(__file__).resolve().parents[2] / "shared" / "data" / "ir" / "cranfield"
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


def test_bundled_cranfield_gains_match_ir_datasets() -> None:
    data = load_beir(CRANFIELD)
    assert data.grades == "cleverdon" and len(data.query_ids) == 225
    counts = Counter(g for rel in data.qrels.values() for g in rel.values())
    # ir_datasets' cranfield qrels: relevance 4: 363, 3: 734, 2: 387, 1: 128 (codes 1..4 of cranqrel)
    assert counts == {4: 363, 3: 734, 2: 387, 1: 128}
