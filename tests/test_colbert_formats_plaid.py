"""colbert-ai PLAID format on a real PyLate index (tests/fixtures/colbert/plaid, made by
scripts/make_colbert_fixtures.py): read, validate, decode vs a naive decoder, rewrite with fewer vectors,
re-read, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unipruner.adapters.colbert.formats import Chunk, IndexFormatError, detect_format
from unipruner.adapters.colbert.formats._codec import ResidualCodec
from unipruner.adapters.colbert.formats.plaid import PlaidFormat
from unipruner.errors import UniprunerError

torch.set_num_threads(2)

FIX = Path(__file__).parent / "fixtures" / "colbert"
SRC = FIX / "plaid" / "cranfield"


def _tree_hash(p: Path) -> dict[str, str]:
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*"))
            if f.is_file()}


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(SRC, dst)
    return dst


def _every_other(chunk: Chunk) -> tuple[Chunk, torch.Tensor]:
    """Keep vectors 0, 2, 4, ... of every document (at least one per document); return the kept row indices."""
    starts = np.concatenate([[0], np.cumsum(chunk.doclens)[:-1]])
    keep = [np.arange(s, s + n, 2) for s, n in zip(starts, chunk.doclens, strict=True)]
    rows = torch.from_numpy(np.concatenate(keep))
    return Chunk(chunk.index, chunk.doc_offset, np.array([len(k) for k in keep]), chunk.vectors[rows]), rows


def _rewrite(src: Path, dst: Path) -> list[torch.Tensor]:
    fmt = PlaidFormat.open(src)
    dst.mkdir()
    w = fmt.writer(dst)
    kept = []
    for c in fmt.chunks():
        r, _ = _every_other(c)
        kept.append(r.vectors)
        w.write(r)
    w.close()
    return kept


class _Boom:
    """Unpickling this would create a marker file (stands for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------------------
def naive_decode(codec: ResidualCodec, code: int, packed: bytes) -> np.ndarray:
    """ColBERTv2 decompression spelled out bit by bit, one vector."""
    bits = []
    for byte in packed:
        bits.extend((byte >> (7 - j)) & 1 for j in range(8))
    out = np.zeros(codec.dim)
    for d in range(codec.dim):
        b = sum(bits[d * codec.nbits + k] << k for k in range(codec.nbits))
        out[d] = float(codec.centroids[code, d]) + float(codec.bucket_weights[b])
    return out / np.linalg.norm(out)


def naive_encode(codec: ResidualCodec, x: np.ndarray) -> tuple[int, bytes]:
    """ColBERTv2 compression spelled out: nearest centroid by dot product, buckets, LSB-first bits, packbits."""
    x = x / np.linalg.norm(x)
    cents = codec.centroids.numpy().astype(np.float64)
    code = int(np.argmax(cents @ x))
    r = x - cents[code]
    cut = codec.bucket_cutoffs.numpy().astype(np.float64)
    bits = []
    for d in range(codec.dim):
        b = int(sum(r[d] > c for c in cut))
        bits.extend((b >> k) & 1 for k in range(codec.nbits))
    return code, np.packbits(np.array(bits, dtype=np.uint8)).tobytes()


def test_detect_and_info() -> None:
    assert PlaidFormat.detect(SRC)
    assert detect_format(SRC) is PlaidFormat
    assert not PlaidFormat.detect(FIX / "voyager" / "cranfield")
    assert not PlaidFormat.detect(FIX / "fast_plaid" / "cranfield")
    info = PlaidFormat.open(SRC).info()
    doclens = np.concatenate([json.loads((SRC / f"doclens.{i}.json").read_text()) for i in range(3)])
    assert (info.format, info.n_docs, info.dim, info.n_chunks) == ("plaid", 300, 128, 3)
    assert info.n_vectors == int(doclens.sum()) == json.loads((SRC / "metadata.json").read_text())["num_embeddings"]
    np.testing.assert_array_equal(info.doclens, doclens)
    assert info.details["nbits"] == 2 and info.details["num_partitions"] == 2048
    assert info.details["removed_docs"] == 0 and info.details["unlisted_docs"] == 0
    assert info.details["pylate_id_maps"]
    assert info.n_bytes == sum(f.stat().st_size for f in SRC.iterdir())
    ids = [json.loads(line)["_id"] for line in (FIX / "docs.jsonl").read_text().splitlines()]
    assert PlaidFormat.open(SRC).doc_ids() == ids


def test_chunks_decode_like_naive_decoder() -> None:
    fmt = PlaidFormat.open(SRC)
    chunks = list(fmt.chunks())
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.doc_offset for c in chunks] == [0, 128, 256]
    codes = torch.load(SRC / "1.codes.pt", weights_only=True)
    res = torch.load(SRC / "1.residuals.pt", weights_only=True)
    rng = np.random.default_rng(0)
    for row in rng.choice(len(codes), 40, replace=False):
        ref = naive_decode(fmt.codec, int(codes[row]), bytes(res[row].tolist()))
        np.testing.assert_allclose(chunks[1].vectors[row].numpy(), ref, atol=1e-5)
    for c in chunks:
        assert c.vectors.dtype == torch.float32 and c.vectors.shape == (int(c.doclens.sum()), 128)
        torch.testing.assert_close(c.vectors.norm(dim=1), torch.ones(len(c.vectors)), atol=1e-4, rtol=0)


def test_encode_like_naive_encoder_and_reproduces_codes() -> None:
    fmt = PlaidFormat.open(SRC)
    chunk = next(fmt.chunks())
    codes, _ = fmt.codec.encode(chunk.vectors)
    # Re-encoding decoded vectors gives back (almost all of) the stored codes: same codec, same geometry.
    stored = torch.load(SRC / "0.codes.pt", weights_only=True).long()
    assert (codes == stored).float().mean() > 0.98
    rng = np.random.default_rng(1)
    x = torch.randn(30, 128)
    c2, p2 = fmt.codec.encode(x)
    for i in rng.choice(30, 10, replace=False):
        code, raw = naive_encode(fmt.codec, x[i].numpy().astype(np.float64))
        assert int(c2[i]) == code
        assert bytes(p2[i].tolist()) == raw


def test_rewrite_with_fewer_vectors(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    before = _tree_hash(src)
    dst = tmp_path / "dst"
    kept = _rewrite(src, dst)
    assert _tree_hash(src) == before, "the source index was modified"
    out = PlaidFormat.open(dst)
    info, src_info = out.info(), PlaidFormat.open(src).info()
    np.testing.assert_array_equal(info.doclens, (src_info.doclens + 1) // 2)
    assert info.n_vectors == int(((src_info.doclens + 1) // 2).sum()) < src_info.n_vectors
    assert info.n_bytes < src_info.n_bytes
    # Codec files and PyLate's id maps: byte for byte.
    for name in ("centroids.pt", "buckets.pt", "avg_residual.pt", "plan.json", "documents_ids_to_plaid_ids.pkl",
                 "plaid_ids_to_documents_ids.pkl"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    meta = json.loads((dst / "metadata.json").read_text())
    assert meta["num_embeddings"] == info.n_vectors
    assert meta["avg_doclen"] == pytest.approx(info.n_vectors / 300)
    assert meta["config"] == json.loads((src / "metadata.json").read_text())["config"]
    off = 0
    for i in range(3):
        cm = json.loads((dst / f"{i}.metadata.json").read_text())
        assert cm["embedding_offset"] == off and cm["passage_offset"] == 128 * i
        off += cm["num_embeddings"]
        assert torch.load(dst / f"{i}.codes.pt", weights_only=True).dtype == torch.int32
    # Decoded vectors of the new index are the kept vectors re-encoded with the same codec.
    for c, k in zip(out.chunks(), kept, strict=True):
        cos = (c.vectors * torch.nn.functional.normalize(k, dim=1)).sum(1)
        assert float(cos.mean()) > 0.99 and float(cos.min()) > 0.9
    # The IVF is the naive one: for every centroid, the sorted unique documents that have a vector there.
    ivf, lengths = torch.load(dst / "ivf.pid.pt", weights_only=True)
    assert ivf.dtype == torch.int32 and lengths.numel() == 2048
    naive: dict[int, set[int]] = {}
    pid = 0
    for i in range(3):
        codes = torch.load(dst / f"{i}.codes.pt", weights_only=True).tolist()
        dl = json.loads((dst / f"doclens.{i}.json").read_text())
        pos = 0
        for n in dl:
            for code in codes[pos:pos + n]:
                naive.setdefault(code, set()).add(pid)
            pos += n
            pid += 1
    start = 0
    for cent, n in enumerate(lengths.tolist()):
        assert ivf[start:start + n].tolist() == sorted(naive.get(cent, ())), cent
        start += n
    assert start == sum(len(v) for v in naive.values())


def test_unlisted_documents_stay_out_of_the_ivf(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    ivf, lengths = torch.load(src / "ivf.pid.pt", weights_only=True)
    # A document dropped from every inverted list (what colbert-ai's IndexUpdater.remove does in memory).
    keep = ivf[: int(lengths.sum())] != 7
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    new_lengths = torch.bincount(owner[keep], minlength=len(lengths))
    torch.save((ivf[: int(lengths.sum())][keep], new_lengths), src / "ivf.pid.pt")
    assert PlaidFormat.open(src).info().details["unlisted_docs"] == 1
    _rewrite(src, tmp_path / "dst")
    out_ivf, out_len = torch.load(tmp_path / "dst" / "ivf.pid.pt", weights_only=True)
    assert 7 not in out_ivf[: int(out_len.sum())].tolist()
    assert 8 in out_ivf[: int(out_len.sum())].tolist()


def test_removed_documents_keep_their_id(tmp_path: Path) -> None:
    """What IndexUpdater.persist_to_disk leaves after PyLate's remove_documents: length 0, rows and IVF gone."""
    src = _copy(tmp_path)
    pid, local = 260, 4  # the fifth document of chunk 2
    dl = json.loads((src / "doclens.2.json").read_text())
    start, n = sum(dl[:local]), dl[local]
    for name in ("2.codes.pt", "2.residuals.pt"):
        t = torch.load(src / name, weights_only=True)
        torch.save(torch.cat([t[:start], t[start + n:]]), src / name)
    dl[local] = 0
    (src / "doclens.2.json").write_text(json.dumps(dl))
    m = json.loads((src / "2.metadata.json").read_text())
    m["num_embeddings"] -= n
    (src / "2.metadata.json").write_text(json.dumps(m))
    m = json.loads((src / "metadata.json").read_text())
    m["num_embeddings"] = 2 * m["num_embeddings"] - n  # colbert-ai's IndexUpdater leaves it stale like this
    (src / "metadata.json").write_text(json.dumps(m))
    ivf, lengths = torch.load(src / "ivf.pid.pt", weights_only=True)
    keep = ivf[: int(lengths.sum())] != pid
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    torch.save((ivf[: int(lengths.sum())][keep], torch.bincount(owner[keep], minlength=len(lengths))),
               src / "ivf.pid.pt")

    fmt = PlaidFormat.open(src)
    info = fmt.info()
    assert (info.n_docs, info.details["removed_docs"], info.details["unlisted_docs"]) == (299, 1, 0)
    ids = fmt.doc_ids()
    assert ids is not None and len(ids) == 299 and "261" not in ids and ids[259:261] == ["260", "262"]
    chunks = list(fmt.chunks())
    assert [c.doc_offset for c in chunks] == [0, 128, 256] and len(chunks[2].doclens) == 43
    assert sum(len(c.doclens) for c in chunks) == info.n_docs and (info.doclens > 0).all()
    _rewrite(src, tmp_path / "dst")
    out_dl = json.loads((tmp_path / "dst" / "doclens.2.json").read_text())
    assert len(out_dl) == 44 and out_dl[local] == 0 and all(v > 0 for j, v in enumerate(out_dl) if j != local)
    out_ivf, out_len = torch.load(tmp_path / "dst" / "ivf.pid.pt", weights_only=True)
    assert pid not in out_ivf[: int(out_len.sum())].tolist()
    assert PlaidFormat.open(tmp_path / "dst").doc_ids() == ids
    meta = json.loads((tmp_path / "dst" / "metadata.json").read_text())
    assert meta["num_embeddings"] == PlaidFormat.open(tmp_path / "dst").info().n_vectors


def test_other_files_are_copied_byte_for_byte(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    (src / "pid_docid_map.json").write_text(json.dumps({str(i): f"doc-{i}" for i in range(300)}))  # RAGatouille
    (src / "collection.json").write_text(json.dumps(["text"] * 300))
    _rewrite(src, tmp_path / "dst")
    for name in ("pid_docid_map.json", "collection.json"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()


def test_older_vector_level_ivf(tmp_path: Path) -> None:
    """Indexes from older colbert-ai versions only have ivf.pt (vector ids per centroid)."""
    src = _copy(tmp_path)
    codes = torch.cat([torch.load(src / f"{i}.codes.pt", weights_only=True) for i in range(3)]).long()
    order = torch.sort(codes, stable=True).indices
    # Drop every vector of document 11 from the lists (it is then unlisted).
    dl = torch.tensor(np.concatenate([json.loads((src / f"doclens.{i}.json").read_text()) for i in range(3)]))
    emb2pid = torch.repeat_interleave(torch.arange(300), dl)
    order = order[emb2pid[order] != 11]
    torch.save((order.to(torch.int32), torch.bincount(codes[order], minlength=2048)), src / "ivf.pt")
    (src / "ivf.pid.pt").unlink()
    fmt = PlaidFormat.open(src)
    assert fmt.info().details["unlisted_docs"] == 1
    _rewrite(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "ivf.pt").exists()
    ivf, lengths = torch.load(tmp_path / "dst" / "ivf.pid.pt", weights_only=True)
    listed = set(ivf[: int(lengths.sum())].tolist())
    assert 11 not in listed and listed == set(range(300)) - {11}
    # Vector ids beyond the index are an error.
    torch.save((torch.tensor([0, 10**7], dtype=torch.int32), torch.bincount(torch.tensor([0, 1]), minlength=2048)),
               src / "ivf.pt")
    with pytest.raises(IndexFormatError, match="ids outside"):
        PlaidFormat.open(src)


def test_global_count_must_match_without_removals(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    meta = json.loads((src / "metadata.json").read_text())
    meta["num_embeddings"] += 5
    (src / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="num_embeddings"):
        PlaidFormat.open(src)


# --------------------------------------------------------------------------- bad input
def test_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert not PlaidFormat.detect(tmp_path / "empty")
    with pytest.raises(IndexFormatError, match="not a known multi-vector index"):
        detect_format(tmp_path / "empty")
    with pytest.raises(IndexFormatError, match="missing"):
        PlaidFormat.open(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexFormatError, match="not a directory"):
        PlaidFormat.open(tmp_path / "file")
    assert issubclass(IndexFormatError, UniprunerError)


def test_truncated_chunk(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    data = (src / "1.residuals.pt").read_bytes()
    (src / "1.residuals.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match=r"1\.residuals\.pt"):
        PlaidFormat.open(src)


def test_missing_and_extra_chunk(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    (src / "2.codes.pt").unlink()
    with pytest.raises(IndexFormatError, match=r"2\.codes\.pt: missing"):
        PlaidFormat.open(src)
    src2 = tmp_path / "b"
    shutil.copytree(SRC, src2)
    meta = json.loads((src2 / "metadata.json").read_text())
    meta["num_chunks"] = 2
    (src2 / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match=r"chunk\(s\) \[2\] exist"):
        PlaidFormat.open(src2)


def test_doclens_not_matching_codes(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    dl = json.loads((src / "doclens.1.json").read_text())
    dl[0] += 1
    (src / "doclens.1.json").write_text(json.dumps(dl))
    with pytest.raises(IndexFormatError, match="doclens"):
        PlaidFormat.open(src)
    # Make the metadata agree with the doclens: the codes still disagree.
    cm = json.loads((src / "1.metadata.json").read_text())
    cm["num_embeddings"] += 1
    (src / "1.metadata.json").write_text(json.dumps(cm))
    meta = json.loads((src / "metadata.json").read_text())
    meta["num_embeddings"] += 1
    (src / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="doclens do not match the codes"):
        PlaidFormat.open(src)


def test_wrong_dims(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    meta = json.loads((src / "metadata.json").read_text())
    meta["config"]["dim"] = 96
    (src / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match=r"centroids have shape \(2048, 128\), expected \[P, 96\]"):
        PlaidFormat.open(src)
    meta["config"]["dim"] = 100
    (src / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="not a multiple"):
        PlaidFormat.open(src)
    src2 = tmp_path / "b"
    shutil.copytree(SRC, src2)
    res = torch.load(src2 / "0.residuals.pt", weights_only=True)
    torch.save(res[:, :16].clone(), src2 / "0.residuals.pt")
    with pytest.raises(IndexFormatError, match=r"residuals have shape"):
        PlaidFormat.open(src2)


def test_codes_out_of_range(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    codes = torch.load(src / "0.codes.pt", weights_only=True)
    codes[3] = 5000
    torch.save(codes, src / "0.codes.pt")
    with pytest.raises(IndexFormatError, match="2048 centroids"):
        PlaidFormat.open(src)


def test_pickle_where_a_tensor_was_expected(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    marker = tmp_path / "pwned"
    with open(src / "centroids.pt", "wb") as fh:
        pickle.dump(_Boom(str(marker)), fh)
    with pytest.raises(IndexFormatError, match=r"centroids\.pt: (holds pickled objects|cannot be read)"):
        PlaidFormat.open(src)
    assert not marker.exists()
    # Same through torch.save of a non-tensor object.
    torch.save({"x": _Boom(str(marker))}, src / "centroids.pt")
    with pytest.raises(IndexFormatError, match="holds pickled objects where a plain tensor was expected"):
        PlaidFormat.open(src)
    assert not marker.exists()


def test_malicious_id_map_is_refused(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    marker = tmp_path / "pwned"
    with open(src / "plaid_ids_to_documents_ids.pkl", "wb") as fh:
        pickle.dump({0: _Boom(str(marker))}, fh)
    fmt = PlaidFormat.open(src)  # the map is not needed to read or rewrite the index
    with pytest.raises(IndexFormatError, match="refused to load"):
        fmt.doc_ids()
    assert not marker.exists()
    # Rewriting copies it as bytes, never loading it.
    _rewrite(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "plaid_ids_to_documents_ids.pkl").read_bytes() == \
        (src / "plaid_ids_to_documents_ids.pkl").read_bytes()
    assert not marker.exists()


def test_writer_rejects_bad_chunks(tmp_path: Path) -> None:
    fmt = PlaidFormat.open(SRC)
    chunks = fmt.chunks()
    c0 = next(chunks)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(IndexFormatError, match="empty directory"):
        fmt.writer(tmp_path / "full")
    (tmp_path / "d").mkdir()
    w = fmt.writer(tmp_path / "d")
    with pytest.raises(IndexFormatError, match="out of order"):
        w.write(Chunk(1, 128, c0.doclens, c0.vectors))
    with pytest.raises(IndexFormatError, match="stay in place"):
        w.write(Chunk(0, 0, c0.doclens[:-1], c0.vectors[: int(c0.doclens[:-1].sum())]))
    with pytest.raises(IndexFormatError, match="dimension"):
        w.write(Chunk(0, 0, c0.doclens, c0.vectors[:, :64]))
    empty = c0.doclens.copy()
    empty[0] = 0
    with pytest.raises(IndexFormatError, match="at least one vector"):
        w.write(Chunk(0, 0, empty, c0.vectors[: int(empty.sum())]))
    w.write(c0)
    with pytest.raises(IndexFormatError, match="close"):
        w.close()
    assert sorted(os.listdir(tmp_path / "d")) == sorted(
        ["0.codes.pt", "0.residuals.pt", "0.metadata.json", "doclens.0.json", "centroids.pt", "buckets.pt",
         "avg_residual.pt", "plan.json", "documents_ids_to_plaid_ids.pkl", "plaid_ids_to_documents_ids.pkl"])


def test_codec_batching_does_not_change_results() -> None:
    codec = PlaidFormat.open(SRC).codec
    codes = torch.load(SRC / "1.codes.pt", weights_only=True)
    res = torch.load(SRC / "1.residuals.pt", weights_only=True)
    full = codec.decode(codes, res)
    torch.testing.assert_close(codec.decode(codes, res, batch=97), full, atol=0, rtol=0)
    c1, r1 = codec.encode(full)
    c2, r2 = codec.encode(full, batch=61)
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    c0, r0 = codec.encode(torch.zeros(0, 128))
    assert c0.shape == (0,) and r0.shape == (0, 32)


def test_legacy_torch_serialization_is_read(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    for name in ("0.residuals.pt", "0.codes.pt"):
        t = torch.load(src / name, weights_only=True)
        torch.save(t, src / name, _use_new_zipfile_serialization=False)  # pre-1.6 torch format: no mmap
    a = next(PlaidFormat.open(src).chunks()).vectors
    b = next(PlaidFormat.open(SRC).chunks()).vectors
    assert torch.equal(a, b)
