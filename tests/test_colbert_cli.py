"""``unipruner colbert inspect | compress | eval`` through the real typer app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unipruner.adapters.colbert._eval import encode_tokens, load_beir, load_encoder
from unipruner.adapters.colbert.formats.raw import write_raw
from unipruner.cli import app

runner = CliRunner()


def _flat(text: str) -> str:
    """Console output with the terminal's line wrapping undone."""
    return " ".join(text.split())
torch.set_num_threads(2)

CORPUS = [
    ("d1", "wing flutter", "flutter of a swept wing at transonic speed was measured in a wind tunnel ."),
    ("d2", "boundary layer", "the laminar boundary layer on a flat plate with suction and heat transfer ."),
    ("d3", "shock waves", "interaction of a shock wave with a turbulent boundary layer near a corner ."),
    ("d4", "heat transfer", "heat transfer to a blunt body in hypersonic flow of a real gas ."),
    ("d5", "buckling", "buckling of thin cylindrical shells under axial compression and pressure ."),
    ("d6", "propellers", "slipstream of a propeller and its effect on the lift of a wing ."),
]
QUERIES = [("q1", "flutter of wings"), ("q2", "shock boundary layer interaction"), ("q3", "buckling of shells")]
QRELS = [("q1", "d1", 2), ("q1", "d6", 1), ("q2", "d3", 3), ("q3", "d5", 1)]


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("beir")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                            for i, t, x in CORPUS))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in QUERIES))
    (d / "qrels").mkdir()
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n"
                                                                                  for q, c, s in QRELS))
    return d


@pytest.fixture(scope="module")
def minilm_index(beir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = load_beir(beir)
    docs = encode_tokens(load_encoder("minilm"), data.doc_texts)
    return write_raw(tmp_path_factory.mktemp("idx") / "src", docs, ids=data.doc_ids)


def test_help_lists_the_commands() -> None:
    res = runner.invoke(app, ["colbert", "--help"])
    assert res.exit_code == 0
    for cmd in ("inspect", "compress", "eval"):
        assert cmd in res.output


def test_inspect_json_and_table(minilm_index: Path) -> None:
    res = runner.invoke(app, ["colbert", "inspect", str(minilm_index), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    lens = np.load(minilm_index / "doclens.npy")
    assert (out["format"], out["documents"], out["vectors"], out["dim"]) == ("raw", 6, int(lens.sum()), 384)
    assert sum(c for _, c in out["histogram"]) == 6
    assert out["vectors_per_doc"]["max"] == int(lens.max())
    res = runner.invoke(app, ["colbert", "inspect", str(minilm_index)])
    assert res.exit_code == 0 and "vectors per document" in res.output


def test_compress_then_eval(minilm_index: Path, beir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    res = runner.invoke(app, ["colbert", "compress", str(minilm_index), str(dst), "--method", "ward_pool", "--factor",
                              "2", "--protected", "1"])
    assert res.exit_code == 0, res.output
    assert "docs/s" in res.output and "vectors" in res.output and "bytes" in res.output
    lens = np.load(minilm_index / "doclens.npy")
    assert np.load(dst / "doclens.npy").tolist() == [1 + max((n - 1) // 2, 1) for n in lens.tolist()]
    full = runner.invoke(app, ["colbert", "eval", str(minilm_index), "--corpus", str(beir / "corpus.jsonl"), "--json"])
    small = runner.invoke(app, ["colbert", "eval", str(dst), "--corpus", str(beir), "--json"])
    assert full.exit_code == 0 and small.exit_code == 0, full.output + small.output
    a, b = json.loads(full.stdout), json.loads(small.stdout)
    assert a["queries"] == 3 and b["vectors"] < a["vectors"]
    for m in ("nDCG@10", "recall@100", "MRR@10"):
        assert 0.0 <= b[m] <= 1.0
    assert a["recall@100"] == 1.0  # six documents: every relevant one is in the top 100
    res = runner.invoke(app, ["colbert", "compress", str(minilm_index), str(dst), "--method", "first", "--keep", "1"])
    assert res.exit_code == 2 and "already exists" in _flat(res.output)
    res = runner.invoke(app, ["colbert", "compress", str(minilm_index), str(dst), "--method", "first", "--keep", "1",
                              "--force"])
    assert res.exit_code == 0 and np.load(dst / "doclens.npy").tolist() == [1] * 6


def test_eval_grades_option(minilm_index: Path, beir: Path) -> None:
    base = ["colbert", "eval", str(minilm_index), "--corpus", str(beir), "--json"]
    auto, rel, clev = (runner.invoke(app, base + extra) for extra in ([], ["--grades", "relevance"],
                                                                       ["--grades", "cleverdon"]))
    assert auto.exit_code == rel.exit_code == clev.exit_code == 0, auto.output + rel.output + clev.output
    a, r, c = (json.loads(x.stdout) for x in (auto, rel, clev))
    assert (a["grades"], r["grades"], c["grades"]) == ("relevance", "relevance", "cleverdon")  # no cranqrel.readme
    assert a["nDCG@10"] == r["nDCG@10"]
    # q1 judges d1 (2) and d6 (1): read as Cleverdon codes d6 becomes the better one (gain 4 vs 3), so nDCG moves
    assert c["nDCG@10"] != r["nDCG@10"] and c["recall@100"] == r["recall@100"] and c["MRR@10"] == r["MRR@10"]
    bad = runner.invoke(app, [*base, "--grades", "linear"])
    assert bad.exit_code != 0 and "linear" in _flat(bad.output)


def test_compress_idf_with_corpus(minilm_index: Path, beir: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["colbert", "compress", str(minilm_index), str(tmp_path / "idf"), "--method", "idf",
                              "--ratio", "0.5", "--corpus", str(beir / "corpus.jsonl")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["colbert", "compress", str(minilm_index), str(tmp_path / "idf2"), "--method",
                              "stopwords", "--ratio", "0.5", "--scope", "global", "--corpus", str(beir)])
    assert res.exit_code == 0, res.output
    lens = np.load(minilm_index / "doclens.npy")
    assert int(np.load(tmp_path / "idf2" / "doclens.npy").sum()) == round(int(lens.sum()) * 0.5)


@pytest.mark.parametrize("args, match", [
    (["--method", "magic"], "unknown method"),
    (["--method", "ward_pool", "--factor", "0.5"], "factor"),
    (["--method", "hidden_norm", "--ratio", "0"], "at least one vector"),
    (["--method", "hidden_norm", "--keep", "0"], "at least one vector"),
    (["--method", "ward_pool", "--scope", "global"], "per document only"),
    (["--method", "idf", "--ratio", "0.5"], "--corpus"),
    (["--method", "ward_pool", "--workers", "0"], "workers"),
])
def test_compress_bad_arguments(minilm_index: Path, tmp_path: Path, args: list[str], match: str) -> None:
    res = runner.invoke(app, ["colbert", "compress", str(minilm_index), str(tmp_path / "out"), *args])
    assert res.exit_code == 2 and match in _flat(res.output)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_indexes_exit_non_zero(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an index")
    res = runner.invoke(app, ["colbert", "inspect", str(tmp_path / "notes")])
    assert res.exit_code == 2 and "not a known multi-vector index" in _flat(res.output)
    src = write_raw(tmp_path / "src", [torch.randn(4, 8), torch.randn(2, 8)])
    torch.save({"x": torch.ones(2)}, src / "vectors.npy")  # a torch pickle where an array belongs
    res = runner.invoke(app, ["colbert", "compress", str(src), str(tmp_path / "dst")])
    assert res.exit_code == 2 and "error" in res.output
    assert not (tmp_path / "dst").exists()
    np.save(src / "vectors.npy", np.ones((5, 8), dtype=np.float32))  # doclens say 6
    res = runner.invoke(app, ["colbert", "compress", str(src), str(tmp_path / "dst")])
    assert res.exit_code == 2 and "doclens sum to 6" in _flat(res.output)
    res = runner.invoke(app, ["colbert", "eval", str(tmp_path / "notes"), "--corpus", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2


def test_demo_section_runs_on_a_small_cranfield_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from unipruner.adapters.colbert import _demo

    # the bundled cut inside the package (nothing outside the repository), and the demo's own subset of it
    assert _demo._data_dir() == _demo.CRANFIELD_SMALL
    assert _demo.CRANFIELD_SMALL.is_relative_to(Path(_demo.__file__).resolve().parents[2])
    data = load_beir(_demo._data_dir())
    full = _demo.demo_subset(data)
    judged = {d for q in full.query_ids for d, g in full.qrels[q].items() if g > 0}
    assert len(full.doc_ids) == _demo.N_DOCS == 300 and len(full.query_ids) == _demo.N_QUERIES == 30
    assert judged <= set(full.doc_ids) and len(judged) == 187
    sub = _demo.demo_subset(data, n_queries=5, n_docs=80)
    judged = {d for q in sub.query_ids for d, g in sub.qrels[q].items() if g > 0}
    assert len(sub.doc_ids) == 80 and judged <= set(sub.doc_ids) and sub.query_ids == data.query_ids[:5]
    small = _demo.demo_subset(data, n_queries=3, n_docs=12)
    orig = _demo.demo_subset
    monkeypatch.setattr(_demo, "demo_subset", lambda d: orig(d, 3, 12))
    console = Console(record=True, width=160)
    _demo.demo_section(console, 0.5)
    text = console.export_text()
    for needle in ("ward_cosine pool factor 2", "idf pruning, keep 50%", "nDCG@10", f"{len(small.doc_ids)} documents"):
        assert needle in text
