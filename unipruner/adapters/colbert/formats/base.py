"""The interface every multi-vector index format implements (shared by all formats).

Interface owner: helper A. Changes to this file are announced here.

Change log
----------
- v1: IndexInfo, Chunk, IndexFormat, ChunkWriter, IndexFormatError, FORMATS, register, detect_format,
  check_chunk (a helper formats may call to validate a chunk before writing), atomic_write_bytes / atomic_write_text
  helpers for single files inside the writer's directory.
- v2 (00:45 UTC): optional, non-abstract ``IndexFormat.doc_ids() -> list[str] | None`` (document ids in index order
  when the format stores them readably; default None = "same order as the collection"). ``dir_bytes(path)`` helper.
  Nothing else changed; formats need not override it.
- v3 (issue 14, Ray scale-out): optional, non-abstract ``IndexFormat.chunk(i) -> Chunk`` (random access to one
  chunk, so a distributed engine can hand chunk numbers to its workers; default: iterate :meth:`chunks` up to ``i``).
  raw, plaid and fast-plaid override it with a direct read.

A format decodes an index on disk into :class:`Chunk` objects (float32 vectors of contiguous documents) and writes
reduced chunks back in the same format and codec. The compress pipeline (``_compress.py``) opens the source with
:meth:`IndexFormat.open` (full validation, nothing written yet), iterates :meth:`IndexFormat.chunks`, reduces every
document's vectors, and hands the reduced chunks in order to :meth:`IndexFormat.writer` on an empty temporary
directory, which it renames to the destination once :meth:`ChunkWriter.close` returned.

Used for token pooling / pruning of late-interaction indexes (Khattab & Zaharia, "ColBERT", SIGIR 2020; Santhanam
et al., "PLAID", CIKM 2022; Clavié et al., "Reducing the Footprint of Multi-Vector Retrieval with Minimal
Performance Impact via Token Pooling", 2024).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from ....errors import UniprunerError

__all__ = [
    "FORMATS",
    "Chunk",
    "ChunkWriter",
    "IndexFormat",
    "IndexFormatError",
    "IndexInfo",
    "check_chunk",
    "detect_format",
    "dir_bytes",
    "register",
]


class IndexFormatError(UniprunerError):
    """An index directory is missing, truncated, inconsistent or not of the expected format."""


@dataclass(frozen=True)
class IndexInfo:
    """Summary of an index on disk.

    Attributes
    ----------
    format : str
        Registered format name (``"raw"``, ``"plaid"``, ``"fast-plaid"``, ``"voyager"``).
    path : Path
        The index directory.
    n_docs, n_vectors, dim : int
        Documents, stored vectors (all documents together) and vector dimension.
    n_bytes : int
        Bytes on disk of the whole index directory.
    doclens : numpy.ndarray
        int64 ``[n_docs]``, vectors per document, in index order.
    n_chunks : int
        Number of chunks :meth:`IndexFormat.chunks` yields.
    details : dict
        Format specifics (``nbits``, number of centroids, dtype, ...), JSON-serialisable values.
    """

    format: str
    path: Path
    n_docs: int
    n_vectors: int
    dim: int
    n_bytes: int
    doclens: np.ndarray
    n_chunks: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chunk:
    """A run of contiguous documents with their decoded vectors.

    Attributes
    ----------
    index : int
        Chunk number, ``0 .. n_chunks - 1``, in order.
    doc_offset : int
        Position of the chunk's first document in the whole index.
    doclens : numpy.ndarray
        int64 ``[docs in chunk]``, every entry >= 1.
    vectors : torch.Tensor
        float32 ``[doclens.sum(), dim]``; document ``j`` occupies rows ``doclens[:j].sum() : doclens[:j+1].sum()``.
    """

    index: int
    doc_offset: int
    doclens: np.ndarray
    vectors: torch.Tensor


def check_chunk(chunk: Chunk, dim: int | None = None) -> None:
    """Validate a chunk's shapes (used by writers and the pipeline; ColBERT/PLAID chunk layout).

    Parameters
    ----------
    chunk : Chunk
        The chunk to check.
    dim : int, optional
        Expected vector dimension.

    Raises
    ------
    IndexFormatError
        If the doclens are not a 1-D integer array of positive entries summing to the number of vectors, or the
        vectors are not a 2-D floating tensor of the expected dimension.
    """
    doclens = np.asarray(chunk.doclens)
    if doclens.ndim != 1 or not np.issubdtype(doclens.dtype, np.integer):
        raise IndexFormatError(f"chunk {chunk.index}: doclens must be a 1-D integer array, got {doclens.dtype} "
                               f"with shape {doclens.shape}")
    if doclens.size and int(doclens.min()) < 1:
        raise IndexFormatError(f"chunk {chunk.index}: every document needs at least one vector "
                               f"(found a document with {int(doclens.min())})")
    v = chunk.vectors
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or not v.is_floating_point():
        raise IndexFormatError(f"chunk {chunk.index}: vectors must be a 2-D floating tensor")
    if int(doclens.sum()) != v.shape[0]:
        raise IndexFormatError(f"chunk {chunk.index}: doclens sum to {int(doclens.sum())} but there are "
                               f"{v.shape[0]} vectors")
    if dim is not None and v.shape[1] != dim:
        raise IndexFormatError(f"chunk {chunk.index}: vectors have dimension {v.shape[1]}, the index has {dim}")


class ChunkWriter(ABC):
    """Writes reduced chunks into an (initially empty) directory in one format and codec."""

    @abstractmethod
    def write(self, chunk: Chunk) -> None:
        """Write one reduced chunk; called in chunk order, with the same documents as the source chunk."""

    @abstractmethod
    def close(self) -> None:
        """Write the global files (IVF, metadata, id maps); the directory is then a complete index."""


class IndexFormat(ABC):
    """One on-disk multi-vector index format (ColBERT / PLAID / PyLate / raw arrays).

    Subclasses set :attr:`name`, implement the five methods and are registered with :func:`register`.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Return True when ``path`` looks like an index of this format (cheap: file names, no full read)."""

    @classmethod
    @abstractmethod
    def open(cls, path: Path) -> IndexFormat:
        """Open and fully validate the index at ``path``; raise :class:`IndexFormatError` on any problem."""

    @abstractmethod
    def info(self) -> IndexInfo:
        """Return the index summary."""

    @abstractmethod
    def chunks(self) -> Iterator[Chunk]:
        """Yield the index's chunks in order, decoded; memory bounded by one chunk."""

    def chunk(self, i: int) -> Chunk:
        """Chunk ``i`` alone, decoded (what :meth:`chunks` yields ``i``-th); formats with per-chunk files override
        this with a direct read (the default iterates :meth:`chunks`)."""
        for c in self.chunks():
            if c.index == i:
                return c
        raise IndexFormatError(f"{self.info().path}: no chunk {i}")

    @abstractmethod
    def writer(self, dst: Path) -> ChunkWriter:
        """Return a writer into the empty directory ``dst`` producing this format with this index's codec."""

    def doc_ids(self) -> list[str] | None:
        """Document ids in index order, or None when the format does not store them readably (then evaluation
        assumes the index holds the collection's documents in corpus order)."""
        return None


FORMATS: dict[str, type[IndexFormat]] = {}

_F = TypeVar("_F", bound=type[IndexFormat])


def register(cls: _F) -> _F:
    """Class decorator adding an :class:`IndexFormat` subclass to :data:`FORMATS` under its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    FORMATS[name] = cls
    return cls


def detect_format(path: Path | str) -> type[IndexFormat]:
    """Return the format class whose :meth:`IndexFormat.detect` accepts ``path`` (ColBERT index formats).

    Parameters
    ----------
    path : Path or str
        An index directory.

    Returns
    -------
    type[IndexFormat]
        The first registered format that recognises the directory.

    Raises
    ------
    IndexFormatError
        If ``path`` does not exist, is not a directory, or no registered format recognises it.
    """
    p = Path(path)
    if not p.exists():
        raise IndexFormatError(f"{p} does not exist: give the directory of a multi-vector index")
    if not p.is_dir():
        raise IndexFormatError(f"{p} is not a directory: an index is a directory (formats: {', '.join(FORMATS)})")
    for cls in FORMATS.values():
        if cls.detect(p):
            return cls
    raise IndexFormatError(
        f"{p} is not a known multi-vector index: expected one of the formats {', '.join(sorted(FORMATS))} "
        "(raw: manifest.json + vectors.npy/.safetensors + doclens.npy + ids.json; plaid: metadata.json + "
        "{i}.codes.pt ...; fast-plaid: fast_plaid_index/; voyager: a PyLate Voyager index)"
    )


def dir_bytes(path: Path) -> int:
    """Total size in bytes of the regular files under ``path`` (recursively)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())
