"""fast-plaid format on a real fast-plaid 1.4.6 index (tests/fixtures/colbert/fast_plaid, made by
scripts/make_colbert_fixtures.py with fast-plaid's own FastPlaid.create): read, validate, decode vs a naive
decoder, rewrite with fewer vectors, re-read, and bad input."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unipruner.adapters.colbert.formats import Chunk, IndexFormatError, detect_format
from unipruner.adapters.colbert.formats.fast_plaid import FastPlaidFormat
from unipruner.adapters.colbert.formats.plaid import PlaidFormat

torch.set_num_threads(2)

FIX = Path(__file__).parent / "fixtures" / "colbert"
SRC = FIX / "fast_plaid" / "cranfield"
INNER = "fast_plaid_index"


def _tree_hash(p: Path) -> dict[str, str]:
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*"))
            if f.is_file()}


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
    fmt = FastPlaidFormat.open(src)
    dst.mkdir()
    w = fmt.writer(dst)
    out = []
    for c in fmt.chunks():
        r = _every_other(c)
        out.append(r)
        w.write(r)
    w.close()
    return out


def naive_decode(centroids: np.ndarray, weights: np.ndarray, nbits: int, code: int, packed: np.ndarray) -> np.ndarray:
    """fast-plaid / ColBERTv2 decompression, bit by bit, one vector."""
    bits = [(int(byte) >> (7 - j)) & 1 for byte in packed for j in range(8)]
    dim = centroids.shape[1]
    out = np.array([float(centroids[code, d]) + float(weights[sum(bits[d * nbits + k] << k for k in range(nbits))])
                    for d in range(dim)])
    return out / np.linalg.norm(out)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_detect_and_info() -> None:
    assert FastPlaidFormat.detect(SRC) and FastPlaidFormat.detect(SRC / INNER)  # PyLate layout and bare layout
    assert detect_format(SRC) is FastPlaidFormat
    assert not PlaidFormat.detect(SRC) and not FastPlaidFormat.detect(FIX / "plaid" / "cranfield")
    fmt = FastPlaidFormat.open(SRC)
    info = fmt.info()
    meta = json.loads((SRC / INNER / "metadata.json").read_text())
    assert (info.format, info.n_docs, info.n_vectors, info.dim, info.n_chunks) == \
        ("fast-plaid", meta["num_documents"], meta["num_embeddings"], 128, meta["num_chunks"])
    assert info.details["nbits"] == 4 and info.details["pylate_layout"]
    assert not FastPlaidFormat.open(SRC / INNER).info().details["pylate_layout"]
    ids = [json.loads(line)["_id"] for line in (FIX / "docs.jsonl").read_text().splitlines()]
    assert fmt.doc_ids() == ids
    assert FastPlaidFormat.open(SRC / INNER).doc_ids() is None


def test_load_caches_are_not_counted(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    before = FastPlaidFormat.open(src).info().n_bytes
    assert before == sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    (src / INNER / "merged_codes.npy").write_bytes(b"0" * 5000)  # what fast-plaid leaves after a search
    info = FastPlaidFormat.open(src).info()
    assert info.n_bytes == before and info.details["cache_bytes_not_counted"] == 5000


def test_chunks_decode_like_naive_decoder() -> None:
    fmt = FastPlaidFormat.open(SRC)
    chunks = list(fmt.chunks())
    assert [c.doc_offset for c in chunks] == [0, 128, 256]
    r = SRC / INNER
    centroids = np.load(r / "centroids.npy").astype(np.float32)
    weights = np.load(r / "bucket_weights.npy")
    codes = np.load(r / "2.codes.npy")
    res = np.load(r / "2.residuals.npy")
    for row in np.random.default_rng(0).choice(len(codes), 30, replace=False):
        ref = naive_decode(centroids, weights, 4, int(codes[row]), res[row])
        np.testing.assert_allclose(chunks[2].vectors[row].numpy(), ref, atol=1e-5)


def test_rewrite_with_fewer_vectors(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    before = _tree_hash(src)
    dst = tmp_path / "dst"
    written = _rewrite(src, dst)
    assert _tree_hash(src) == before
    out = FastPlaidFormat.open(dst)
    info, src_info = out.info(), FastPlaidFormat.open(src).info()
    np.testing.assert_array_equal(info.doclens, (src_info.doclens + 1) // 2)
    assert info.n_bytes < src_info.n_bytes
    for name in ("centroids.npy", "bucket_cutoffs.npy", "bucket_weights.npy", "avg_residual.npy",
                 "cluster_threshold.npy", "plan.json"):
        assert (dst / INNER / name).read_bytes() == (src / INNER / name).read_bytes(), name
    for name in ("documents_ids_to_plaid_ids.pkl", "plaid_ids_to_documents_ids.pkl"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not list((dst / INNER).glob("merged_*")) and not (dst / INNER / "embeddings.npy").exists()
    meta = json.loads((dst / INNER / "metadata.json").read_text())
    assert meta["num_embeddings"] == info.n_vectors and meta["num_documents"] == 300
    assert meta["avg_doclen"] == pytest.approx(info.n_vectors / 300)
    for c, w in zip(out.chunks(), written, strict=True):
        cos = (c.vectors * torch.nn.functional.normalize(w.vectors, dim=1)).sum(1)
        assert float(cos.mean()) > 0.99
    assert np.load(dst / INNER / "0.codes.npy").dtype == np.int64
    # IVF: for every centroid the sorted unique documents with a vector there (naive rebuild).
    ivf = np.load(dst / INNER / "ivf.npy")
    lengths = np.load(dst / INNER / "ivf_lengths.npy")
    assert ivf.dtype == np.int64 and lengths.dtype == np.int32 and lengths.size == 2048
    naive: dict[int, set[int]] = {}
    pid = 0
    for i in range(3):
        codes = np.load(dst / INNER / f"{i}.codes.npy").tolist()
        pos = 0
        for n in json.loads((dst / INNER / f"doclens.{i}.json").read_text()):
            for code in codes[pos:pos + n]:
                naive.setdefault(code, set()).add(pid)
            pos += n
            pid += 1
    start = 0
    for cent, n in enumerate(lengths.tolist()):
        assert ivf[start:start + n].tolist() == sorted(naive.get(cent, ())), cent
        start += n
    assert start == ivf.size


def test_raw_embeddings_copy_is_replaced_not_read(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    # fast-plaid keeps an object array of raw vectors for small indexes; a tampered one must never be unpickled.
    marker = tmp_path / "pwned"
    boom = np.empty(1, dtype=object)
    boom[0] = _Boom(str(marker))
    np.save(src / INNER / "embeddings.npy", boom, allow_pickle=True)
    (src / INNER / "metadata.db").write_bytes(b"SQLite format 3\x00" + bytes(range(64)))
    (src / INNER / "buffer.npy").write_bytes(b"pending")
    (src / INNER / "notes.txt").write_text("kept")
    (src / "extra_map.json").write_text("{}")
    fmt = FastPlaidFormat.open(src)
    assert fmt.info().details["raw_embeddings_copy"] and fmt.info().details["metadata_db"]
    written = _rewrite(src, tmp_path / "dst")
    assert not marker.exists()
    out = tmp_path / "dst" / INNER
    assert (out / "metadata.db").read_bytes() == (src / INNER / "metadata.db").read_bytes()
    assert not (out / "buffer.npy").exists()
    assert (out / "notes.txt").read_text() == "kept" and (tmp_path / "dst" / "extra_map.json").read_text() == "{}"
    raw = np.load(out / "embeddings.npy", allow_pickle=True)  # written by us just above
    assert raw.dtype == object and len(raw) == 300
    flat = np.concatenate([w.vectors.numpy() for w in written])
    np.testing.assert_array_equal(np.concatenate(list(raw)), flat)
    assert [len(x) for x in raw] == np.concatenate([w.doclens for w in written]).tolist()


# --------------------------------------------------------------------------- bad input
def test_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    assert not FastPlaidFormat.detect(tmp_path / "e")
    with pytest.raises(IndexFormatError, match="missing"):
        FastPlaidFormat.open(tmp_path / "e")


def test_truncated_chunk(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    data = (src / INNER / "1.residuals.npy").read_bytes()
    (src / INNER / "1.residuals.npy").write_bytes(data[: len(data) // 3])
    with pytest.raises(IndexFormatError, match=r"1\.residuals\.npy"):
        FastPlaidFormat.open(src)


def test_missing_chunk(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    (src / INNER / "doclens.2.json").unlink()
    with pytest.raises(IndexFormatError, match=r"doclens\.2\.json: missing"):
        FastPlaidFormat.open(src)


def test_doclens_not_matching_codes(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    r = src / INNER
    dl = json.loads((r / "doclens.0.json").read_text())
    dl[5] -= 1
    (r / "doclens.0.json").write_text(json.dumps(dl))
    with pytest.raises(IndexFormatError, match="doclens"):
        FastPlaidFormat.open(src)
    cm = json.loads((r / "0.metadata.json").read_text())
    cm["num_embeddings"] -= 1
    (r / "0.metadata.json").write_text(json.dumps(cm))
    with pytest.raises(IndexFormatError, match="doclens do not match the codes"):
        FastPlaidFormat.open(src)


def test_wrong_dims(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    r = src / INNER
    np.save(r / "bucket_weights.npy", np.zeros(8, dtype=np.float32))
    with pytest.raises(IndexFormatError, match="nbits = 4"):
        FastPlaidFormat.open(src)
    src2 = _copy(tmp_path, "b")
    res = np.load(src2 / INNER / "0.residuals.npy")
    np.save(src2 / INNER / "0.residuals.npy", res[:, :32])
    with pytest.raises(IndexFormatError, match="residuals have shape"):
        FastPlaidFormat.open(src2)


def test_pickle_where_an_array_was_expected(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    marker = tmp_path / "pwned"
    boom = np.empty(1, dtype=object)
    boom[0] = _Boom(str(marker))
    np.save(src / INNER / "0.codes.npy", boom, allow_pickle=True)
    with pytest.raises(IndexFormatError, match="pickled objects"):
        FastPlaidFormat.open(src)
    assert not marker.exists()
    with open(src / INNER / "centroids.npy", "wb") as fh:
        pickle.dump(_Boom(str(marker)), fh)
    with pytest.raises(IndexFormatError, match=r"centroids\.npy"):
        FastPlaidFormat.open(src)
    assert not marker.exists()


def test_ivf_out_of_range(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    ivf = np.load(src / INNER / "ivf.npy")
    ivf[0] = 300
    np.save(src / INNER / "ivf.npy", ivf)
    with pytest.raises(IndexFormatError, match="outside"):
        FastPlaidFormat.open(src)
