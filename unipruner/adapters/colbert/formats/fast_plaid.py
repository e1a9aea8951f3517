"""fast-plaid index directories (PyLate's default PLAID backend, ``indexes.PLAID(use_fast=True)``).

fast-plaid (LightOn, Rust) stores the ColBERTv2/PLAID residual codec (Santhanam et al., "PLAID", CIKM 2022) as
``.npy`` arrays and JSON. PyLate wraps it as ``<index>/fast_plaid_index/`` next to its two pickled id maps; a
bare fast-plaid directory (used without PyLate) is accepted too::

    metadata.json        {num_chunks, nbits, num_partitions, num_embeddings, avg_doclen, num_documents, ...}
    plan.json            {nbits, num_chunks}
    centroids.npy        fp16 [P, dim]
    bucket_cutoffs.npy   float32 [2^nbits - 1]
    bucket_weights.npy   float32 [2^nbits]
    avg_residual.npy     float32 [dim]
    cluster_threshold.npy  float32 [1]  (used by fast-plaid's update)
    {i}.codes.npy        int64 [n_i]
    {i}.residuals.npy    uint8 [n_i, dim*nbits/8]
    doclens.{i}.json     vectors per document of chunk i
    {i}.metadata.json    {num_documents, num_embeddings, embedding_offset}
    ivf.npy, ivf_lengths.npy   document ids per centroid (int64, sorted per list), list lengths (int32) [P]
    metadata.db          optional sqlite of per-document metadata (copied byte for byte, never opened)
    merged_*.npy/.json   caches fast-plaid derives on load (not read, not written: fast-plaid rebuilds them)
    embeddings.npy, buffer.npy   optional pickled (object) arrays of raw vectors kept for updates

Reading decodes with the index's own codec (:class:`~.plaid.ResidualCodec`, the same as colbert-ai's); writing
re-encodes the reduced vectors with the same centroids and buckets, rebuilds ``ivf.npy``/``ivf_lengths.npy`` and
the metadata, and copies every other file (codec files, ``metadata.db``, PyLate's id maps, ...) byte for byte
(documents stay in place). ``embeddings.npy`` (fast-plaid keeps it for indexes of up to 1000 documents, to rebuild
them from scratch on update) is never unpickled; when the source has one, the writer writes the reduced vectors in its
place so an update starts from the compressed index. ``buffer.npy`` (pending vectors for centroid expansion) is dropped.
Arrays are read with ``numpy.load(allow_pickle=False)``.

Memory: one chunk (fast-plaid's chunks hold ``batch_size`` documents, 50k by default), plus doclens; the writer
keeps the unique (centroid, document) pairs of the IVF it builds and, only when the source had ``embeddings.npy``
(at most ~1000 documents), the reduced vectors for it.

Note: the fixture in ``tests/fixtures/colbert/fast_plaid`` is a real fast-plaid 1.4.6 index, built in a separate
venv because fast-plaid pins torch 2.11 (see ``scripts/make_colbert_fixtures.py``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ._atomic import atomic_write_text, copy_file_atomic, save_npy_atomic
from ._codec import ResidualCodec, build_ivf_pairs, check_codec, check_codes_residuals, ivf_from_pairs
from ._safe_io import check_doclens, load_json_file, load_npy, read_pylate_doc_ids, require_int
from .base import (
    Chunk,
    ChunkWriter,
    IndexFormat,
    IndexFormatError,
    IndexInfo,
    check_chunk,
    dir_bytes,
    register,
)

__all__ = ["FastPlaidFormat", "FastPlaidWriter", "copy_unchanged", "out_root", "write_chunk_files", "write_chunk_meta",
           "write_metadata", "write_raw_embeddings"]

SUBDIR = "fast_plaid_index"
# Written anew (or deliberately dropped) by the writer; every other file is copied byte for byte.
_NOT_COPIED = {"metadata.json", "ivf.npy", "ivf_lengths.npy", "embeddings.npy", "buffer.npy", "plaid.lock"}
_CHUNK_FILE = re.compile(r"^(?:doclens\.(\d+)\.json|(\d+)\.(?:codes|residuals)\.npy|(\d+)\.metadata\.json)$")


@register
class FastPlaidFormat(IndexFormat):
    """A fast-plaid index (PyLate ``indexes.PLAID(use_fast=True)`` directory, or a bare fast-plaid directory).

    Same residual codec as colbert-ai PLAID (Santhanam et al., "PLAID", CIKM 2022), stored as ``.npy``.

    Examples
    --------
    >>> from pathlib import Path
    >>> import unipruner
    >>> fixtures = Path(unipruner.__file__).parents[1] / "tests" / "fixtures" / "colbert"  # a source checkout
    >>> FastPlaidFormat.detect(fixtures / "fast_plaid" / "cranfield")
    True
    >>> FastPlaidFormat.open(fixtures / "fast_plaid" / "cranfield").info().n_vectors
    17606
    """

    name: ClassVar[str] = "fast-plaid"

    def __init__(self, path: Path, root: Path, meta: dict[str, Any], codec: ResidualCodec,
                 doclens: list[np.ndarray], offsets: list[tuple[int, int]], codes_dtype: np.dtype) -> None:
        self.path = path
        self.root = root
        self.meta = meta
        self.codec = codec
        self.chunk_doclens = doclens
        self.offsets = offsets  # (document offset, embedding offset) per chunk
        self.codes_dtype = codes_dtype

    @staticmethod
    def _root(p: Path) -> Path:
        return p / SUBDIR if (p / SUBDIR).is_dir() else p

    @classmethod
    def detect(cls, path: Path) -> bool:
        """True for PyLate's ``<index>/fast_plaid_index/`` or a bare fast-plaid directory (file names only)."""
        r = cls._root(Path(path))
        return (r / "metadata.json").is_file() and (r / "centroids.npy").is_file() and (r / "ivf.npy").is_file()

    @classmethod
    def open(cls, path: Path) -> FastPlaidFormat:
        """Open and fully validate a fast-plaid index (codec, chunks vs doclens, IVF, offsets).

        Raises
        ------
        IndexFormatError
            On any missing, truncated, inconsistent or pickled file.
        """
        p = Path(path)
        if not p.is_dir():
            raise IndexFormatError(f"{p} is not a directory: a fast-plaid index is a directory")
        r = cls._root(p)
        mpath = r / "metadata.json"
        meta = load_json_file(mpath, "index metadata")
        nbits = require_int(meta, "nbits", mpath, 1)
        n_chunks = require_int(meta, "num_chunks", mpath, 1)
        partitions = require_int(meta, "num_partitions", mpath, 1)
        n_emb = require_int(meta, "num_embeddings", mpath, 0)
        if meta.get("compress_only"):
            raise IndexFormatError(f"{mpath}: a compress_only fast-plaid index has no IVF; unipruner rewrites "
                                   "searchable indexes only")
        centroids = load_npy(r / "centroids.npy", "centroids")
        if centroids.ndim != 2:
            raise IndexFormatError(f"{r / 'centroids.npy'}: expected [P, dim], got shape {centroids.shape}")
        dim = int(centroids.shape[1])
        arrays = [torch.from_numpy(np.asarray(a)) for a in
                  (centroids, load_npy(r / "bucket_cutoffs.npy", "bucket cutoffs"),
                   load_npy(r / "bucket_weights.npy", "bucket weights"))]
        avg = load_npy(r / "avg_residual.npy", "average residual")
        if avg.shape not in ((dim,), (), (1,)):
            raise IndexFormatError(f"{r / 'avg_residual.npy'}: shape {avg.shape}, expected ({dim},)")
        codec = check_codec(arrays[0], arrays[1], arrays[2], nbits, dim, partitions, r)

        extra = sorted({int(next(g for g in m.groups() if g is not None)) for f in os.listdir(r)
                        if (m := _CHUNK_FILE.match(f))} - set(range(n_chunks)))
        if extra:
            raise IndexFormatError(f"{r}: files of chunk(s) {extra} exist but metadata.json says num_chunks = "
                                   f"{n_chunks}: the index is inconsistent")
        doclens: list[np.ndarray] = []
        offsets: list[tuple[int, int]] = []
        codes_dtype = np.dtype(np.int64)
        doc_off = emb_off = 0
        for i in range(n_chunks):
            dl = check_doclens(load_json_file(r / f"doclens.{i}.json", f"doclens of chunk {i}"),
                               r / f"doclens.{i}.json")
            cmp = r / f"{i}.metadata.json"
            cm = load_json_file(cmp, f"metadata of chunk {i}")
            n_docs_i = require_int(cm, "num_documents", cmp)
            n_i = require_int(cm, "num_embeddings", cmp)
            if "embedding_offset" in cm and require_int(cm, "embedding_offset", cmp) != emb_off:
                raise IndexFormatError(f"{cmp}: embedding_offset {cm['embedding_offset']} but the previous chunks "
                                       f"hold {emb_off} vectors")
            if n_docs_i != len(dl) or n_i != int(dl.sum()):
                raise IndexFormatError(f"{cmp}: says {n_docs_i} documents / {n_i} vectors but doclens.{i}.json "
                                       f"lists {len(dl)} documents / {int(dl.sum())} vectors")
            codes = load_npy(r / f"{i}.codes.npy", f"centroid codes of chunk {i}")
            residuals = load_npy(r / f"{i}.residuals.npy", f"residuals of chunk {i}", mmap=True)
            check_codes_residuals(codes, residuals, n_i, codec, i, r)
            codes_dtype = codes.dtype
            del codes, residuals
            doclens.append(dl)
            offsets.append((doc_off, emb_off))
            doc_off += n_docs_i
            emb_off += n_i
        if emb_off != n_emb:
            raise IndexFormatError(f"{mpath}: num_embeddings = {n_emb} but the chunks hold {emb_off}")
        if "num_documents" in meta and require_int(meta, "num_documents", mpath) != doc_off:
            raise IndexFormatError(f"{mpath}: num_documents = {meta['num_documents']} but the chunks hold {doc_off}")
        ivf = load_npy(r / "ivf.npy", "inverted file (document ids per centroid)")
        lengths = load_npy(r / "ivf_lengths.npy", "inverted list lengths")
        if ivf.ndim != 1 or lengths.ndim != 1 or lengths.size != partitions or int(lengths.sum()) > ivf.size \
                or not np.issubdtype(ivf.dtype, np.integer) or not np.issubdtype(lengths.dtype, np.integer):
            raise IndexFormatError(f"{r}: ivf.npy / ivf_lengths.npy do not form {partitions} integer lists "
                                   f"(shapes {ivf.shape} / {lengths.shape}, {int(lengths.sum())} listed)")
        if ivf.size and (int(ivf.min()) < 0 or int(ivf.max()) >= doc_off):
            raise IndexFormatError(f"{r / 'ivf.npy'}: document ids outside [0, {doc_off})")
        return cls(p, r, meta, codec, doclens, offsets, codes_dtype)

    def info(self) -> IndexInfo:
        """Summary: documents, vectors, dim, bytes on disk, doclens, chunks, codec details."""
        doclens = np.concatenate(self.chunk_doclens) if self.chunk_doclens else np.zeros(0, np.int64)
        # merged_*.npy are caches fast-plaid rebuilds on load (about the size of the chunks again): not counted.
        cache = sum(f.stat().st_size for f in self.root.glob("merged_*") if f.is_file())
        return IndexInfo(
            format=self.name, path=self.path, n_docs=int(doclens.size), n_vectors=int(doclens.sum()),
            dim=self.codec.dim, n_bytes=dir_bytes(self.path) - cache, doclens=doclens,
            n_chunks=len(self.chunk_doclens),
            details={"nbits": self.codec.nbits, "num_partitions": int(self.codec.centroids.shape[0]),
                     "cache_bytes_not_counted": cache,
                     "codec": "fast-plaid residual", "pylate_layout": self.root != self.path,
                     "raw_embeddings_copy": (self.root / "embeddings.npy").is_file(),
                     "metadata_db": (self.root / "metadata.db").is_file()})

    def doc_ids(self) -> list[str] | None:
        """Document ids in index order from PyLate's id map (restricted unpickling), or None without one."""
        return read_pylate_doc_ids(self.path / "plaid_ids_to_documents_ids.pkl",
                                   np.arange(sum(len(d) for d in self.chunk_doclens)))

    def chunks(self) -> Iterator[Chunk]:
        """Yield each fast-plaid chunk decoded with the index's codec (memory: one chunk)."""
        for i in range(len(self.chunk_doclens)):
            yield self.chunk(i)

    def chunk(self, i: int) -> Chunk:
        """fast-plaid chunk ``i`` decoded with the index's codec."""
        if not 0 <= i < len(self.chunk_doclens):
            raise IndexFormatError(f"{self.root}: no chunk {i} (the index has {len(self.chunk_doclens)})")
        dl, doc_off = self.chunk_doclens[i], self.offsets[i][0]
        codes = load_npy(self.root / f"{i}.codes.npy", f"centroid codes of chunk {i}")
        residuals = load_npy(self.root / f"{i}.residuals.npy", f"residuals of chunk {i}")
        check_codes_residuals(codes, residuals, int(dl.sum()), self.codec, i, self.root)
        vectors = self.codec.decode(torch.from_numpy(codes), torch.from_numpy(residuals))
        return Chunk(index=i, doc_offset=doc_off, doclens=dl.copy(), vectors=vectors)

    def writer(self, dst: Path) -> FastPlaidWriter:
        """A writer producing a fast-plaid index (same layout and codec) in the empty directory ``dst``."""
        return FastPlaidWriter(self, Path(dst))


def out_root(src: FastPlaidFormat, dst: Path) -> Path:
    """Where a rewrite of ``src`` into ``dst`` keeps the fast-plaid files (``dst/fast_plaid_index`` for PyLate's
    layout, ``dst`` for a bare fast-plaid directory)."""
    return dst / SUBDIR if src.root != src.path else dst


def copy_unchanged(src: FastPlaidFormat, dst: Path) -> None:
    """Copy the files a rewrite keeps (codec files, plan.json, cluster_threshold.npy, metadata.db, ... and PyLate's
    id maps) byte for byte, never parsed: documents stay in place, so they stay valid."""
    root = out_root(src, dst)
    root.mkdir(exist_ok=True)
    for f in sorted(src.root.iterdir()):
        if f.is_file() and not f.is_symlink() and f.name not in _NOT_COPIED and not _CHUNK_FILE.match(f.name) \
                and not f.name.startswith(("merged_", ".")):
            copy_file_atomic(f, root / f.name)
    if root != dst:
        for f in sorted(src.path.iterdir()):
            if f.is_file() and not f.is_symlink() and not f.name.startswith("."):
                copy_file_atomic(f, dst / f.name)


def write_chunk_files(src: FastPlaidFormat, dst: Path, chunk: Chunk) -> tuple[np.ndarray, torch.Tensor]:
    """Encode one reduced chunk with the source codec; write its codes, residuals and doclens (fast-plaid layout).

    Returns the chunk's int64 doclens and the int64 centroid id of every written vector.
    """
    check_chunk(chunk, src.codec.dim)
    i = chunk.index
    if not 0 <= i < len(src.chunk_doclens):
        raise IndexFormatError(f"chunk {i}: the source index has {len(src.chunk_doclens)} chunks")
    doc_off = src.offsets[i][0]
    n_docs = len(src.chunk_doclens[i])
    doclens = np.asarray(chunk.doclens, dtype=np.int64)
    if chunk.doc_offset != doc_off or len(doclens) != n_docs:
        raise IndexFormatError(f"chunk {i}: has documents [{chunk.doc_offset}, {chunk.doc_offset + len(doclens)})"
                               f" but the source chunk holds [{doc_off}, {doc_off + n_docs}): documents must "
                               "stay in place")
    root = out_root(src, dst)
    codes, residuals = src.codec.encode(chunk.vectors)
    save_npy_atomic(root / f"{i}.codes.npy", codes.numpy().astype(src.codes_dtype))
    save_npy_atomic(root / f"{i}.residuals.npy", residuals.numpy())
    atomic_write_text(root / f"doclens.{i}.json", json.dumps([int(v) for v in doclens], separators=(",", ":")))
    return doclens, codes


def write_chunk_meta(src: FastPlaidFormat, dst: Path, i: int, n_docs: int, n_vectors: int, emb_offset: int) -> None:
    """Write ``{i}.metadata.json`` of a rewritten chunk (``embedding_offset``: vectors of the chunks before it)."""
    atomic_write_text(out_root(src, dst) / f"{i}.metadata.json", json.dumps(
        {"embedding_offset": emb_offset, "num_documents": n_docs, "num_embeddings": n_vectors}, indent=2))


def write_raw_embeddings(src: FastPlaidFormat, dst: Path, docs: list[np.ndarray]) -> None:
    """``embeddings.npy`` in fast-plaid's own layout (``save_list_tensors_on_disk``: an object array of
    per-document float arrays), written (never read) so that fast-plaid's update starts from the reduced vectors."""
    raw = np.empty(len(docs), dtype=object)
    for j, d in enumerate(docs):
        raw[j] = d
    save_npy_atomic(out_root(src, dst) / "embeddings.npy", raw, allow_pickle=True)


def write_metadata(src: FastPlaidFormat, dst: Path, n_vectors: int) -> None:
    """The updated ``metadata.json`` (``num_embeddings``, ``avg_doclen``) of a rewritten fast-plaid index."""
    meta = dict(src.meta)
    n_docs = int(sum(len(d) for d in src.chunk_doclens))
    meta["num_embeddings"] = n_vectors
    meta["avg_doclen"] = n_vectors / n_docs if n_docs else 0.0
    atomic_write_text(out_root(src, dst) / "metadata.json", json.dumps(meta, indent=2))


class FastPlaidWriter(ChunkWriter):
    """Writes reduced chunks as a fast-plaid index with the source's codec (see :class:`FastPlaidFormat`)."""

    def __init__(self, src: FastPlaidFormat, dst: Path) -> None:
        if not dst.is_dir() or any(dst.iterdir()):
            raise IndexFormatError(f"{dst}: the writer needs an existing empty directory")
        self.src = src
        self.dst = dst
        self.root = out_root(src, dst)
        self.next_chunk = 0
        self.emb_offset = 0
        self.ivf_keys: list[torch.Tensor] = []
        self.keep_raw = (src.root / "embeddings.npy").is_file()
        self.raw_docs: list[np.ndarray] = []
        self.closed = False
        copy_unchanged(src, dst)

    def write(self, chunk: Chunk) -> None:
        """Encode one reduced chunk with the source codec; write codes, residuals, doclens, chunk metadata."""
        if self.closed:
            raise IndexFormatError("write() after close()")
        i = self.next_chunk
        if chunk.index != i or i >= len(self.src.chunk_doclens):
            raise IndexFormatError(f"chunk {chunk.index} written out of order: expected chunk {i} of "
                                   f"{len(self.src.chunk_doclens)}")
        doclens, codes = write_chunk_files(self.src, self.dst, chunk)
        n = int(doclens.sum())
        write_chunk_meta(self.src, self.dst, i, len(doclens), n, self.emb_offset)
        self.ivf_keys.append(build_ivf_pairs(codes, doclens, self.src.offsets[i][0], None))
        if self.keep_raw:
            vec = chunk.vectors.detach().to(torch.float32).cpu().numpy()
            self.raw_docs.extend(np.split(vec, np.cumsum(doclens)[:-1]))
        self.emb_offset += n
        self.next_chunk += 1

    def close(self) -> None:
        """Write ``ivf.npy``, ``ivf_lengths.npy``, ``metadata.json`` (and ``embeddings.npy`` if the source had it)."""
        if self.closed:
            return
        if self.next_chunk != len(self.src.chunk_doclens):
            raise IndexFormatError(f"close() after {self.next_chunk} of {len(self.src.chunk_doclens)} chunks")
        pids, lengths = ivf_from_pairs(self.ivf_keys, int(self.src.codec.centroids.shape[0]))
        save_npy_atomic(self.root / "ivf.npy", pids.numpy().astype(np.int64))
        save_npy_atomic(self.root / "ivf_lengths.npy", lengths.numpy().astype(np.int32))
        if self.keep_raw:
            write_raw_embeddings(self.src, self.dst, self.raw_docs)
            self.raw_docs = []
        write_metadata(self.src, self.dst, self.emb_offset)
        self.ivf_keys = []
        self.closed = True
