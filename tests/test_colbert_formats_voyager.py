"""PyLate Voyager format on a real PyLate index (tests/fixtures/colbert/voyager, made by
scripts/make_colbert_fixtures.py): read, validate, restricted unpickling of the id maps (tested against a
malicious pickle), rewrite with fewer vectors, re-read, and bad input."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import voyager

import unipruner.adapters.colbert.formats.voyager as vmod
from unipruner.adapters.colbert.formats import Chunk, IndexFormatError, detect_format
from unipruner.adapters.colbert.formats.voyager import VoyagerFormat

torch.set_num_threads(2)

FIX = Path(__file__).parent / "fixtures" / "colbert"
SRC = FIX / "voyager" / "cranfield"


def _copy(tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(SRC, dst)
    return dst


def _every_other(chunk: Chunk) -> Chunk:
    starts = np.concatenate([[0], np.cumsum(chunk.doclens)[:-1]])
    keep = [np.arange(s, s + n, 2) for s, n in zip(starts, chunk.doclens, strict=True)]
    rows = torch.from_numpy(np.concatenate(keep))
    return Chunk(chunk.index, chunk.doc_offset, np.array([len(k) for k in keep]), chunk.vectors[rows])


def _rewrite(src: Path, dst: Path) -> list[Chunk]:
    fmt = VoyagerFormat.open(src)
    dst.mkdir()
    w = fmt.writer(dst)
    out = []
    for c in fmt.chunks():
        r = _every_other(c)
        out.append(r)
        w.write(r)
    w.close()
    return out


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _plain_load(path: Path) -> object:
    with open(path, "rb") as fh:
        return pickle.load(fh)  # test-only: files from the committed fixture or written by our writer


def test_detect_info_and_vectors() -> None:
    assert VoyagerFormat.detect(SRC) and detect_format(SRC) is VoyagerFormat
    fmt = VoyagerFormat.open(SRC)
    info = fmt.info()
    doc_map = _plain_load(SRC / "document_ids_to_embeddings.pkl")
    assert isinstance(doc_map, dict)
    assert (info.format, info.n_docs, info.dim, info.n_chunks) == ("voyager", len(doc_map), 128, 1)
    assert info.doclens.tolist() == [len(v) for v in doc_map.values()]
    assert info.details["space"] == "Space.Cosine" and info.details["M"] == 16
    ids = [json.loads(line)["_id"] for line in (FIX / "docs.jsonl").read_text().splitlines()]
    assert fmt.doc_ids() == ids[: info.n_docs]
    # Chunks are the documents' stored vectors, in map order (naive: one get_vector call per embedding id).
    index = voyager.Index.load(str(SRC / "index.voyager"))
    (chunk,) = list(fmt.chunks())
    naive = np.stack([index.get_vector(e) for v in doc_map.values() for e in v])
    np.testing.assert_array_equal(chunk.vectors.numpy(), naive)


def test_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmod, "CHUNK_VECTORS", 500)
    fmt = VoyagerFormat.open(SRC)
    chunks = list(fmt.chunks())
    assert len(chunks) == fmt.info().n_chunks > 3
    assert [c.doc_offset for c in chunks] == [0, *np.cumsum([len(c.doclens) for c in chunks])[:-1].tolist()]
    assert sum(int(c.doclens.sum()) for c in chunks) == fmt.info().n_vectors


def test_rewrite_with_fewer_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmod, "CHUNK_VECTORS", 700)
    src = _copy(tmp_path)
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()}
    written = _rewrite(src, tmp_path / "dst")
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()} == before
    out = VoyagerFormat.open(tmp_path / "dst")
    s_info, o_info = VoyagerFormat.open(src).info(), out.info()
    np.testing.assert_array_equal(o_info.doclens, (s_info.doclens + 1) // 2)
    assert o_info.n_bytes < s_info.n_bytes and out.doc_ids() == VoyagerFormat.open(src).doc_ids()
    assert (o_info.details["M"], o_info.details["ef_construction"], o_info.details["space"]) == \
        (s_info.details["M"], s_info.details["ef_construction"], s_info.details["space"])
    got = torch.cat([c.vectors for c in out.chunks()])
    want = torch.nn.functional.normalize(torch.cat([w.vectors for w in written]), dim=1)  # Cosine space
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    doc_map = _plain_load(tmp_path / "dst" / "document_ids_to_embeddings.pkl")
    emb_map = _plain_load(tmp_path / "dst" / "embeddings_to_documents_ids.pkl")
    assert isinstance(doc_map, dict) and isinstance(emb_map, dict)
    assert all(emb_map[e] == k for k, v in doc_map.items() for e in v) and len(emb_map) == o_info.n_vectors
    # A nearest-neighbour query on the new graph finds a document's own vector.
    index = voyager.Index.load(str(tmp_path / "dst" / "index.voyager"))
    first = next(iter(doc_map.values()))[0]
    ids, _ = index.query(index.get_vector(first), k=1)
    assert int(ids[0]) == first


# --------------------------------------------------------------------------- bad input
def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    marker = tmp_path / "pwned"
    with open(src / "document_ids_to_embeddings.pkl", "wb") as fh:
        pickle.dump({"1": _Boom(str(marker))}, fh)
    with pytest.raises(IndexFormatError, match="refused to load"):
        VoyagerFormat.open(src)
    assert not marker.exists()


def test_maps_disagree(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    emb_map = _plain_load(src / "embeddings_to_documents_ids.pkl")
    assert isinstance(emb_map, dict)
    emb_map[0] = "2"
    (src / "embeddings_to_documents_ids.pkl").write_bytes(pickle.dumps(emb_map))
    with pytest.raises(IndexFormatError, match="maps disagree"):
        VoyagerFormat.open(src)
    del emb_map[0]
    (src / "embeddings_to_documents_ids.pkl").write_bytes(pickle.dumps(emb_map))
    with pytest.raises(IndexFormatError, match="entries"):
        VoyagerFormat.open(src)


def test_embedding_missing_from_graph(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    doc_map = _plain_load(src / "document_ids_to_embeddings.pkl")
    emb_map = _plain_load(src / "embeddings_to_documents_ids.pkl")
    assert isinstance(doc_map, dict) and isinstance(emb_map, dict)
    doc_map["1"] = [*doc_map["1"], 99999]
    emb_map[99999] = "1"
    (src / "document_ids_to_embeddings.pkl").write_bytes(pickle.dumps(doc_map))
    (src / "embeddings_to_documents_ids.pkl").write_bytes(pickle.dumps(emb_map))
    with pytest.raises(IndexFormatError, match="not in the index"):
        VoyagerFormat.open(src)


def test_truncated_graph_and_wrong_types(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    data = (src / "index.voyager").read_bytes()
    (src / "index.voyager").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match=r"index\.voyager"):
        VoyagerFormat.open(src)
    src2 = _copy(tmp_path, "b")
    (src2 / "document_ids_to_embeddings.pkl").write_bytes(pickle.dumps({"1": []}))
    with pytest.raises(IndexFormatError, match="non-empty list"):
        VoyagerFormat.open(src2)
    (src2 / "document_ids_to_embeddings.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(IndexFormatError, match="must be dicts"):
        VoyagerFormat.open(src2)
    (src2 / "document_ids_to_embeddings.pkl").write_bytes(b"\x80\x04trunc")
    with pytest.raises(IndexFormatError, match="not a plain-data pickle"):
        VoyagerFormat.open(src2)


def test_writer_rejects_bad_chunks(tmp_path: Path) -> None:
    fmt = VoyagerFormat.open(SRC)
    (c0,) = list(fmt.chunks())
    (tmp_path / "d").mkdir()
    w = fmt.writer(tmp_path / "d")
    with pytest.raises(IndexFormatError, match="stay in place"):
        w.write(Chunk(0, 1, c0.doclens, c0.vectors))
    with pytest.raises(IndexFormatError, match="dimension"):
        w.write(Chunk(0, 0, c0.doclens, c0.vectors[:, :32]))
    with pytest.raises(IndexFormatError, match="close"):
        w.close()
    assert list((tmp_path / "d").iterdir()) == []


# --------------------------------------------------------------------------- PyLate 1.2 - 1.4 layout (SqliteDict maps)
SQL = FIX / "voyager_sqlite" / "cranfield"


def _sqlite_rows(path: Path) -> list[tuple[str, bytes]]:
    con = sqlite3.connect(path)
    try:
        return con.execute('SELECT key, value FROM "unnamed" ORDER BY rowid').fetchall()
    finally:
        con.close()


def test_sqlite_layout_read() -> None:
    assert VoyagerFormat.detect(SQL) and detect_format(SQL) is VoyagerFormat
    fmt = VoyagerFormat.open(SQL)
    info = fmt.info()
    rows = _sqlite_rows(SQL / "document_ids_to_embeddings.sqlite")
    doc_map = {k: pickle.loads(v) for k, v in rows}  # test-only: the committed fixture made by PyLate 1.3.4
    assert info.details["layout"] == "sqlite" and info.n_docs == len(doc_map) == 10
    assert fmt.doc_ids() == list(doc_map)
    index = voyager.Index.load(str(SQL / "index.voyager"))
    (chunk,) = list(fmt.chunks())
    naive = np.stack([index.get_vector(e) for v in doc_map.values() for e in v])
    np.testing.assert_array_equal(chunk.vectors.numpy(), naive)


def test_sqlite_layout_rewrite(tmp_path: Path) -> None:
    written = _rewrite(SQL, tmp_path / "dst")
    assert sorted(f.name for f in (tmp_path / "dst").iterdir()) == [
        "document_ids_to_embeddings.sqlite", "embeddings_to_documents_ids.sqlite", "index.voyager"]
    out = VoyagerFormat.open(tmp_path / "dst")
    assert out.info().details["layout"] == "sqlite" and out.doc_ids() == VoyagerFormat.open(SQL).doc_ids()
    np.testing.assert_array_equal(out.info().doclens, np.concatenate([w.doclens for w in written]))
    emb_rows = _sqlite_rows(tmp_path / "dst" / "embeddings_to_documents_ids.sqlite")
    assert all(isinstance(k, str) and k.isdigit() for k, _ in emb_rows)  # SqliteDict keys are text, as PyLate's
    assert len(emb_rows) == out.info().n_vectors


def test_sqlite_malicious_value_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(SQL, src)
    marker = tmp_path / "pwned"
    con = sqlite3.connect(src / "document_ids_to_embeddings.sqlite")
    con.execute('UPDATE "unnamed" SET value = ? WHERE key = ?', (pickle.dumps(_Boom(str(marker))), "3"))
    con.commit()
    con.close()
    with pytest.raises(IndexFormatError, match="refused to load"):
        VoyagerFormat.open(src)
    assert not marker.exists()
    (src / "embeddings_to_documents_ids.sqlite").write_bytes(b"not a database at all" * 100)
    shutil.copy(SQL / "document_ids_to_embeddings.sqlite", src / "document_ids_to_embeddings.sqlite")
    with pytest.raises(IndexFormatError, match="not a SqliteDict store"):
        VoyagerFormat.open(src)
