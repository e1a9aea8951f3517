"""``unipruner rag prune SRC DST`` (issue 14): Parquet in and out, local engine == Ray Data actor pool byte for byte,
atomic commit, resumable by id, and an actor pool that cannot starve its read tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _ray_cluster import ray_cluster  # noqa: F401  (the fixture)
from typer.testing import CliRunner

from unipruner.adapters.rag._batch import PruneJob, prune_parquet
from unipruner.cli import app
from unipruner.errors import UniprunerError

runner = CliRunner()


def _rows(n: int, structured: bool) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        ctx = [(f"City {i}", f"City {i} lies in country {i % 7}. It has {i} parks. Its river floods in spring."),
               ("Pets", "Cats sleep a lot. Dogs bark at night. Parrots talk.")]
        out.append({"id": f"q{i}", "query": f"which country is city {i} in?",
                    "contexts": [{"text": t, "title": h} for h, t in ctx] if structured else [t for _, t in ctx]})
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rag") / "src"
    d.mkdir()
    rows = _rows(30, structured=True)
    pq.write_table(pa.Table.from_pylist(rows[:17]), d / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[17:]), d / "b.parquet")
    return d


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_local_prune_parquet(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    res = runner.invoke(app, ["rag", "prune", str(src), str(dst), "--method", "bm25", "--ratio", "0.5",
                              "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert "rows/s" in _flat(res.output) and "tokens" in res.output
    assert sorted(p.name for p in dst.iterdir()) == ["_manifest.json"] + [f"part-{k:05d}.parquet" for k in range(4)]
    out = pq.read_table(dst).to_pylist()
    assert [r["id"] for r in out] == [f"q{i}" for i in range(30)]
    for r in out:
        assert r["tokens_after"] <= r["tokens_before"] // 2 + 1 and r["documents_after"] == len(r["contexts"])
        assert all(set(c) == {"text", "title"} for c in r["contexts"])
    man = json.loads((dst / "_manifest.json").read_text())
    assert man["rows"] == 30 and man["tokens_after"] == sum(r["tokens_after"] for r in out)
    again = runner.invoke(app, ["rag", "prune", str(src), str(dst)])
    assert again.exit_code == 2 and "already exists" in _flat(again.output)


def test_plain_string_contexts_and_column_names(tmp_path: Path) -> None:
    rows = [{"qid": r["id"], "question": r["query"], "docs": r["contexts"]} for r in _rows(5, structured=False)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    job = PruneJob("bm25", ratio=0.5, id_col="qid", query_col="question", contexts_col="docs")
    res = prune_parquet(tmp_path / "in.parquet", tmp_path / "out", job)
    assert res.rows == 5 and res.tokens_after < res.tokens_before
    assert all(isinstance(c, str) for r in pq.read_table(tmp_path / "out").to_pylist() for c in r["docs"])
    bad = runner.invoke(app, ["rag", "prune", str(tmp_path / "in.parquet"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "column 'id' is missing" in _flat(bad.output)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_error_leaves_no_dst(tmp_path: Path) -> None:
    rows = _rows(6, structured=False)
    rows[4]["contexts"] = ["   "]  # an empty document: the pruner refuses it
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    with pytest.raises(UniprunerError, match="row 'q4'"):
        prune_parquet(tmp_path / "in.parquet", tmp_path / "out", PruneJob("bm25"), batch_size=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_resume_by_id(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unipruner.adapters.rag import _batch

    clean = prune_parquet(src, tmp_path / "clean", PruneJob("bm25", ratio=0.5), batch_size=8)
    real = _batch.prune_table
    calls = {"n": 0}

    def dies_on_third(job: PruneJob, table: Any, pruner: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the driver is interrupted: finished parts stay for --resume
        return real(job, table, pruner)

    monkeypatch.setattr(_batch, "prune_table", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prune_parquet(src, tmp_path / "out", PruneJob("bm25", ratio=0.5), batch_size=8)
    assert not (tmp_path / "out").exists() and len(list(tmp_path.glob(".out.tmp-*/part-*.parquet"))) == 2
    monkeypatch.setattr(_batch, "prune_table", real)
    res = prune_parquet(src, tmp_path / "out", PruneJob("bm25", ratio=0.5), batch_size=8, resume=True)
    assert (res.resumed_batches, res.tokens_after) == (2, clean.tokens_after)
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean") and not list(tmp_path.glob(".out.*"))


def test_ray_equals_local_and_leaves_a_cpu_free(ray_cluster: Any, src: Path, tmp_path: Path) -> None:  # noqa: F811
    local = prune_parquet(src, tmp_path / "local", PruneJob("bm25", ratio=0.5), batch_size=8)
    res = runner.invoke(app, ["rag", "prune", str(src), str(tmp_path / "ray"), "--method", "bm25", "--ratio", "0.5",
                              "--batch-size", "8", "--engine", "ray", "--workers", "4"])
    assert res.exit_code == 0, res.output
    # 4 CPUs in the cluster: an actor on each would starve the read tasks (ray#44687); 3 actors are used
    assert "4 workers asked, 3 used" in _flat(res.output) and "engine ray, 3 workers" in _flat(res.output)
    assert _tree(tmp_path / "ray") == _tree(tmp_path / "local") and local.rows == 30
