"""colbert-ai PLAID index directories (as written by colbert-ai and by PyLate's ``indexes.PLAID(use_fast=False)``).

Layout (Santhanam et al., "PLAID: An Efficient Engine for Late Interaction Retrieval", CIKM 2022; the residual
compression of Santhanam et al., "ColBERTv2", NAACL 2022)::

    metadata.json        {config: {dim, nbits, ...}, num_chunks, num_partitions, num_embeddings, avg_doclen}
    plan.json            the indexing plan (copied unchanged)
    centroids.pt         fp16 [P, dim]
    buckets.pt           (bucket_cutoffs [2^nbits - 1], bucket_weights [2^nbits])
    avg_residual.pt      scalar tensor
    {i}.codes.pt         int32 [n_i]               nearest centroid of every vector of chunk i
    {i}.residuals.pt     uint8 [n_i, dim*nbits/8]  packed residual bucket indices
    doclens.{i}.json     vectors per document of chunk i
    {i}.metadata.json    {passage_offset, num_passages, num_embeddings, embedding_offset}
    ivf.pid.pt           (document ids per centroid, concatenated (int32), lengths [P])
                         (older colbert-ai indexes: ivf.pt, vector ids per centroid; read, and replaced by ivf.pid.pt)
    documents_ids_to_plaid_ids.pkl, plaid_ids_to_documents_ids.pkl    PyLate's id maps (optional)
    any other file       e.g. RAGatouille's pid_docid_map.json: copied byte for byte

Reading decodes every vector with the index's own codec, ``normalize(centroid[code] + bucket_weights[bucket])``;
writing re-encodes the reduced vectors with the *same* centroids and buckets (nearest centroid by dot product,
residual bucketised against the cutoffs, bits packed), rebuilds the IVF (unique document ids per centroid) and the
metadata. Documents removed with colbert-ai's ``IndexUpdater`` (PyLate's ``remove_documents``) keep their PLAID id
with length 0 and no IVF entry: they are hidden from :meth:`PlaidFormat.chunks` (which yields the remaining documents,
``doc_offset`` counting those only) and written back with length 0, so ids do not shift; a document with vectors that
the IVF no longer lists is read and rewritten but stays out of the rebuilt IVF. Documents stay in place, so PyLate's
pickled id maps are copied byte for byte and never unpickled. Tensors are loaded with ``torch.load(weights_only=True)``
only.

Memory: reading holds one chunk's codes, residuals and decoded float32 vectors (colbert-ai chunks hold at most
25k documents), plus ``int64`` doclens and a boolean per document; the writer additionally keeps the unique
(centroid, document) pairs of the IVF it is building, which is the size of ``ivf.pid.pt`` itself.
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

from ._atomic import atomic_write_text, copy_file_atomic, save_atomic
from ._codec import ResidualCodec, build_ivf_pairs, check_codec, check_codes_residuals, ivf_from_pairs
from ._safe_io import check_doclens, load_json_file, load_tensor_file, read_pylate_doc_ids, require_int
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

__all__ = ["PlaidFormat", "PlaidWriter", "copy_unchanged", "ivf_padding", "save_tensor_atomic", "write_chunk_files",
           "write_chunk_meta", "write_globals"]

PYLATE_ID_MAPS = ("documents_ids_to_plaid_ids.pkl", "plaid_ids_to_documents_ids.pkl")
_REGENERATED = {"metadata.json", "ivf.pid.pt", "ivf.pt"}
_CHUNK_FILE = re.compile(r"^(?:doclens\.(\d+)\.json|(\d+)\.(?:codes|residuals)\.pt|(\d+)\.metadata\.json)$")


# --------------------------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------------------------
@register
class PlaidFormat(IndexFormat):
    """A colbert-ai PLAID index directory (colbert-ai, PyLate ``indexes.PLAID(use_fast=False)``).

    Santhanam et al., "PLAID: An Efficient Engine for Late Interaction Retrieval" (CIKM 2022). Open it with
    :meth:`open` (full validation), read decoded chunks with :meth:`chunks`, write a reduced copy with
    :meth:`writer`.

    Examples
    --------
    >>> from pathlib import Path
    >>> import unipruner
    >>> fixtures = Path(unipruner.__file__).parents[1] / "tests" / "fixtures" / "colbert"  # a source checkout
    >>> PlaidFormat.detect(fixtures / "plaid" / "cranfield")
    True
    >>> PlaidFormat.open(fixtures / "plaid" / "cranfield").info().n_docs
    300
    """

    name: ClassVar[str] = "plaid"

    def __init__(self, path: Path, meta: dict[str, Any], codec: ResidualCodec, doclens: list[np.ndarray],
                 chunk_meta: list[dict[str, Any]], live: np.ndarray) -> None:
        self.path = path
        self.meta = meta
        self.codec = codec
        self.chunk_doclens = doclens  # per chunk, as stored (0 for removed documents)
        self.chunk_meta = chunk_meta
        self.live = live  # per PLAID id: listed in the source IVF
        n_present = [int((d > 0).sum()) for d in doclens]
        self.present_offsets = np.concatenate([[0], np.cumsum(n_present)]).astype(np.int64)

    @classmethod
    def detect(cls, path: Path) -> bool:
        """True for a directory with ``metadata.json``, ``centroids.pt`` and ``0.codes.pt`` (no read)."""
        p = Path(path)
        return (p / "metadata.json").is_file() and (p / "centroids.pt").is_file() and (p / "0.codes.pt").is_file()

    @classmethod
    def open(cls, path: Path) -> PlaidFormat:
        """Open and fully validate a colbert-ai PLAID index (Santhanam et al., CIKM 2022).

        Checks the metadata, the codec (centroids, buckets), every chunk's doclens against its codes and residuals
        (count, dtype, packed width, centroid range), the chunk offsets, the IVF, and that no chunk is missing.

        Raises
        ------
        IndexFormatError
            On any missing, truncated, inconsistent or non-tensor file.
        """
        p = Path(path)
        if not p.is_dir():
            raise IndexFormatError(f"{p} is not a directory: a PLAID index is a directory")
        meta = load_json_file(p / "metadata.json", "index metadata")
        config = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(config, dict):
            raise IndexFormatError(f"{p / 'metadata.json'}: no 'config' object: not a colbert-ai PLAID index")
        dim = require_int(config, "dim", p / "metadata.json", 1)
        nbits = require_int(config, "nbits", p / "metadata.json", 1)
        n_chunks = require_int(meta, "num_chunks", p / "metadata.json", 1)
        partitions = require_int(meta, "num_partitions", p / "metadata.json", 1)
        n_emb = require_int(meta, "num_embeddings", p / "metadata.json", 0)

        centroids = load_tensor_file(p / "centroids.pt", "centroids")
        buckets = load_tensor_file(p / "buckets.pt", "bucket cutoffs and weights")
        if not isinstance(buckets, (tuple, list)) or len(buckets) != 2:
            raise IndexFormatError(f"{p / 'buckets.pt'}: expected a pair (bucket_cutoffs, bucket_weights)")
        avg = load_tensor_file(p / "avg_residual.pt", "average residual")
        if not isinstance(avg, torch.Tensor):
            raise IndexFormatError(f"{p / 'avg_residual.pt'}: expected a tensor, got {type(avg).__name__}")
        codec = check_codec(centroids, buckets[0], buckets[1], nbits, dim, partitions, p)

        extra = sorted({int(next(g for g in m.groups() if g is not None)) for f in os.listdir(p)
                        if (m := _CHUNK_FILE.match(f))} - set(range(n_chunks)))
        if extra:
            raise IndexFormatError(f"{p}: files of chunk(s) {extra} exist but metadata.json says num_chunks = "
                                   f"{n_chunks}: the index is inconsistent")
        all_doclens: list[np.ndarray] = []
        chunk_meta: list[dict[str, Any]] = []
        doc_off = emb_off = 0
        for i in range(n_chunks):
            dl = check_doclens(load_json_file(p / f"doclens.{i}.json", f"doclens of chunk {i}"),
                               p / f"doclens.{i}.json", allow_empty=True)
            cm = load_json_file(p / f"{i}.metadata.json", f"metadata of chunk {i}")
            n_pass = require_int(cm, "num_passages", p / f"{i}.metadata.json")
            n_i = require_int(cm, "num_embeddings", p / f"{i}.metadata.json")
            if require_int(cm, "passage_offset", p / f"{i}.metadata.json") != doc_off:
                raise IndexFormatError(f"{p / f'{i}.metadata.json'}: passage_offset {cm['passage_offset']} but the "
                                       f"previous chunks hold {doc_off} documents")
            if n_pass != len(dl) or n_i != int(dl.sum()):
                raise IndexFormatError(f"{p / f'{i}.metadata.json'}: says {n_pass} documents / {n_i} vectors but "
                                       f"doclens.{i}.json lists {len(dl)} documents / {int(dl.sum())} vectors")
            codes = load_tensor_file(p / f"{i}.codes.pt", f"centroid codes of chunk {i}")
            residuals = load_tensor_file(p / f"{i}.residuals.pt", f"residuals of chunk {i}", mmap=True)
            check_codes_residuals(codes, residuals, n_i, codec, i, p)
            del codes, residuals
            all_doclens.append(dl)
            chunk_meta.append({"passage_offset": doc_off, "num_passages": n_pass, "num_embeddings": n_i,
                               "embedding_offset": emb_off})
            doc_off += n_pass
            emb_off += n_i
        n_removed = int(sum(int((d == 0).sum()) for d in all_doclens))
        if emb_off != n_emb and not n_removed:
            raise IndexFormatError(f"{p / 'metadata.json'}: num_embeddings = {n_emb} but the chunks hold {emb_off}")
        # colbert-ai's IndexUpdater leaves a wrong global num_embeddings after removals (PyLate 1.6.0: about twice
        # the true count); the chunks, each checked against its codes above, are the truth and the writer fixes it.

        # ivf.pid.pt lists documents per centroid; older colbert-ai indexes only have ivf.pt, which lists vectors
        # (colbert-ai's loader converts it on load; the writer writes ivf.pid.pt).
        by_vector = not (p / "ivf.pid.pt").is_file() and (p / "ivf.pt").is_file()
        ivf_path = p / ("ivf.pt" if by_vector else "ivf.pid.pt")
        ivf_obj = load_tensor_file(ivf_path, "inverted file (ids per centroid)")
        if not isinstance(ivf_obj, (tuple, list)) or len(ivf_obj) != 2 or \
                not all(isinstance(t, torch.Tensor) for t in ivf_obj):
            raise IndexFormatError(f"{ivf_path}: expected a pair of tensors (ivf, ivf_lengths)")
        ivf, lengths = ivf_obj
        if lengths.numel() != partitions or int(lengths.sum()) > ivf.numel() or (lengths.numel() and
                                                                                 int(lengths.min()) < 0):
            raise IndexFormatError(f"{ivf_path}: {lengths.numel()} list lengths summing to "
                                   f"{int(lengths.sum())} for {ivf.numel()} entries and {partitions} centroids")
        listed = ivf[: int(lengths.sum())].to(torch.int64)
        bound = emb_off if by_vector else doc_off
        if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= bound):
            raise IndexFormatError(f"{ivf_path}: ids outside [0, {bound})")
        if by_vector:
            stored = np.concatenate(all_doclens) if all_doclens else np.zeros(0, np.int64)
            emb2pid = np.repeat(np.arange(doc_off), stored)
            listed = torch.from_numpy(emb2pid[listed.numpy()])
        live = np.zeros(doc_off, dtype=bool)
        live[listed.numpy()] = True
        return cls(p, meta, codec, all_doclens, chunk_meta, live)

    def info(self) -> IndexInfo:
        """Summary: documents, vectors, dim, bytes on disk, doclens, chunks, and codec details."""
        stored = np.concatenate(self.chunk_doclens) if self.chunk_doclens else np.zeros(0, np.int64)
        doclens = stored[stored > 0]
        return IndexInfo(
            format=self.name, path=self.path, n_docs=int(doclens.size), n_vectors=int(doclens.sum()),
            dim=self.codec.dim, n_bytes=dir_bytes(self.path), doclens=doclens, n_chunks=len(self.chunk_doclens),
            details={"nbits": self.codec.nbits, "num_partitions": int(self.codec.centroids.shape[0]),
                     "codec": "colbert-ai residual", "removed_docs": int((stored == 0).sum()),
                     "unlisted_docs": int((~self.live & (stored > 0)).sum()),
                     "pylate_id_maps": all((self.path / f).is_file() for f in PYLATE_ID_MAPS)})

    def doc_ids(self) -> list[str] | None:
        """Ids of the documents :meth:`chunks` yields, from PyLate's id map (restricted unpickling), or None."""
        stored = np.concatenate(self.chunk_doclens) if self.chunk_doclens else np.zeros(0, np.int64)
        return read_pylate_doc_ids(self.path / "plaid_ids_to_documents_ids.pkl", np.flatnonzero(stored > 0))

    def chunks(self) -> Iterator[Chunk]:
        """Yield each colbert-ai chunk decoded with the index's codec (memory: one chunk); removed documents
        (length 0) are left out and ``doc_offset`` counts the documents yielded before."""
        for i in range(len(self.chunk_doclens)):
            yield self.chunk(i)

    def chunk(self, i: int) -> Chunk:
        """colbert-ai chunk ``i`` decoded with the index's codec (removed documents left out)."""
        if not 0 <= i < len(self.chunk_doclens):
            raise IndexFormatError(f"{self.path}: no chunk {i} (the index has {len(self.chunk_doclens)})")
        dl = self.chunk_doclens[i]
        codes = load_tensor_file(self.path / f"{i}.codes.pt", f"centroid codes of chunk {i}")
        residuals = load_tensor_file(self.path / f"{i}.residuals.pt", f"residuals of chunk {i}")
        check_codes_residuals(codes, residuals, int(dl.sum()), self.codec, i, self.path)
        return Chunk(index=i, doc_offset=int(self.present_offsets[i]), doclens=dl[dl > 0].copy(),
                     vectors=self.codec.decode(codes, residuals))

    def writer(self, dst: Path) -> PlaidWriter:
        """A writer producing a PLAID index with this index's codec in the empty directory ``dst``."""
        return PlaidWriter(self, Path(dst))


def save_tensor_atomic(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically, through a file handle: the archive's inner folder is then always
    ``archive`` (saving to a path names it after the temporary file), so equal tensors give equal bytes."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
    save_atomic(path, write)


def copy_unchanged(src: PlaidFormat, dst: Path) -> None:
    """Copy every file a rewrite does not regenerate (codec, plan, PyLate's id maps, RAGatouille's
    pid_docid_map.json / collection, ...) from ``src`` to ``dst`` byte for byte: they stay valid because documents
    stay in place, and they are never parsed."""
    for f in sorted(src.path.iterdir()):
        if f.is_file() and not f.is_symlink() and f.name not in _REGENERATED and not _CHUNK_FILE.match(f.name) \
                and not f.name.startswith("."):
            copy_file_atomic(f, dst / f.name)


def write_chunk_files(src: PlaidFormat, dst: Path, chunk: Chunk) -> tuple[np.ndarray, torch.Tensor]:
    """Encode one reduced chunk with the source codec and write ``{i}.codes.pt``, ``{i}.residuals.pt`` and
    ``doclens.{i}.json`` (the files that depend on this chunk alone; colbert-ai PLAID layout).

    Returns
    -------
    doclens : numpy.ndarray
        int64 stored lengths of the chunk's documents (0 for removed ones).
    codes : torch.Tensor
        int64 centroid id of every written vector.
    """
    check_chunk(chunk, src.codec.dim)
    i = chunk.index
    if not 0 <= i < len(src.chunk_doclens):
        raise IndexFormatError(f"chunk {i}: the source index has {len(src.chunk_doclens)} chunks")
    present = src.chunk_doclens[i] > 0
    first, end = int(src.present_offsets[i]), int(src.present_offsets[i + 1])
    if chunk.doc_offset != first or len(chunk.doclens) != end - first:
        raise IndexFormatError(f"chunk {i}: has documents [{chunk.doc_offset}, "
                               f"{chunk.doc_offset + len(chunk.doclens)}) but the source chunk holds [{first}, "
                               f"{end}): documents must stay in place")
    doclens = np.zeros(len(present), dtype=np.int64)  # removed documents keep their id with length 0
    doclens[present] = np.asarray(chunk.doclens, dtype=np.int64)
    codes, residuals = src.codec.encode(chunk.vectors)
    codes32 = codes.to(torch.int32)
    save_tensor_atomic(dst / f"{i}.codes.pt", codes32)
    save_tensor_atomic(dst / f"{i}.residuals.pt", residuals)
    atomic_write_text(dst / f"doclens.{i}.json", json.dumps([int(v) for v in doclens]))
    return doclens, codes


def write_chunk_meta(src: PlaidFormat, dst: Path, i: int, n_docs: int, n_vectors: int, emb_offset: int) -> None:
    """Write ``{i}.metadata.json`` of a rewritten chunk (``embedding_offset``: vectors of the chunks before it)."""
    atomic_write_text(dst / f"{i}.metadata.json", json.dumps(
        {"passage_offset": int(src.chunk_meta[i]["passage_offset"]), "num_passages": n_docs,
         "num_embeddings": n_vectors, "embedding_offset": emb_offset}, indent=4) + "\n")


def ivf_padding(lengths: torch.Tensor | np.ndarray) -> int:
    """Zeros colbert-ai appends to the IVF so a batched lookup of ``max_stride`` entries from the last list stays
    in bounds (0 when none are needed)."""
    lengths = np.asarray(lengths)
    if not lengths.size:
        return 0
    max_stride, total = int(lengths.max()), int(lengths.sum())
    return max_stride if int(lengths[:-1].sum()) + max_stride > total else 0


def write_globals(src: PlaidFormat, dst: Path, ivf: torch.Tensor, lengths: torch.Tensor, n_vectors: int) -> None:
    """Write ``ivf.pid.pt`` (``ivf``: int32 document ids per centroid, padded; ``lengths`` ``[P]``) and the
    updated ``metadata.json`` (``num_embeddings``, ``avg_doclen``) of a rewritten PLAID index."""
    ivf_lengths = lengths.to(torch.int64)
    save_tensor_atomic(dst / "ivf.pid.pt", (ivf, ivf_lengths))
    meta = dict(src.meta)
    n_docs = int(src.present_offsets[-1])
    meta["num_embeddings"] = n_vectors
    meta["avg_doclen"] = n_vectors / n_docs if n_docs else 0.0
    atomic_write_text(dst / "metadata.json", json.dumps(meta, indent=4) + "\n")


class PlaidWriter(ChunkWriter):
    """Writes reduced chunks as a colbert-ai PLAID index with the source's codec (see :class:`PlaidFormat`)."""

    def __init__(self, src: PlaidFormat, dst: Path) -> None:
        if not dst.is_dir() or any(dst.iterdir()):
            raise IndexFormatError(f"{dst}: the writer needs an existing empty directory")
        self.src = src
        self.dst = dst
        self.next_chunk = 0
        self.emb_offset = 0
        self.ivf_keys: list[torch.Tensor] = []
        self.closed = False
        copy_unchanged(src, dst)

    def write(self, chunk: Chunk) -> None:
        """Encode one reduced chunk with the source codec and write its codes, residuals, doclens, metadata."""
        if self.closed:
            raise IndexFormatError("write() after close()")
        i = self.next_chunk
        if chunk.index != i or i >= len(self.src.chunk_doclens):
            raise IndexFormatError(f"chunk {chunk.index} written out of order: expected chunk {i} of "
                                   f"{len(self.src.chunk_doclens)}")
        doclens, codes = write_chunk_files(self.src, self.dst, chunk)
        n = int(doclens.sum())
        write_chunk_meta(self.src, self.dst, i, len(doclens), n, self.emb_offset)
        self.ivf_keys.append(build_ivf_pairs(codes, doclens, int(self.src.chunk_meta[i]["passage_offset"]),
                                             self.src.live))
        self.emb_offset += n
        self.next_chunk += 1

    def close(self) -> None:
        """Write the rebuilt IVF (``ivf.pid.pt``, colbert-ai's padded layout) and the updated ``metadata.json``."""
        if self.closed:
            return
        if self.next_chunk != len(self.src.chunk_doclens):
            raise IndexFormatError(f"close() after {self.next_chunk} of {len(self.src.chunk_doclens)} chunks")
        partitions = int(self.src.codec.centroids.shape[0])
        pids, lengths = ivf_from_pairs(self.ivf_keys, partitions)
        ivf = pids.to(torch.int32)
        pad = ivf_padding(lengths)
        if pad:
            ivf = torch.cat([ivf, torch.zeros(pad, dtype=torch.int32)])
        write_globals(self.src, self.dst, ivf, lengths, self.emb_offset)
        self.ivf_keys = []
        self.closed = True
