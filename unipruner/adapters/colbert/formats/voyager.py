"""PyLate Voyager indexes (``pylate.indexes.Voyager``): an HNSW index of every token vector plus two id maps.

Layout (PyLate 1.x; Chaffin & Sourty, "PyLate: Flexible Training and Retrieval for Late Interaction Models",
2025; the HNSW graph of Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
Hierarchical Navigable Small World graphs", TPAMI 2018, as implemented by Spotify's Voyager)::

    index.voyager                      the HNSW index; its vectors are the documents' token vectors
    document_ids_to_embeddings.pkl     {document id: [embedding id, ...]}   (pickled; PyLate >= 1.5)
    embeddings_to_documents_ids.pkl    {embedding id: document id}          (pickled; PyLate >= 1.5)

PyLate 1.2 - 1.4 kept the same two maps as SqliteDict stores instead (``document_ids_to_embeddings.sqlite``,
``embeddings_to_documents_ids.sqlite``: a table ``unnamed(key TEXT PRIMARY KEY, value BLOB)`` of pickled values, in
insertion order); both layouts are read and each is written back in its own layout. Every pickle (a whole map, or
each sqlite value) is read with a restricted unpickler that admits plain types (dict, list, str, int, ...) and
numpy arrays only, so a tampered map is refused instead of executing anything; sqlite files are opened read-only.
Documents are read in the order of the ``document_ids_to_embeddings`` map (PyLate's insertion order), in chunks of
about 64k vectors; documents PyLate removed (absent from the map, ``mark_deleted`` in the graph) are not read and
not written.

Writing builds a new Voyager index with the same space, dimension, ``M``, ``ef_construction`` and storage type,
adds each document's reduced vectors, and writes the two maps for the new embedding ids (document ids unchanged).
The Voyager library has no partial reads: the source index is loaded whole (memory ~ its file size), and the
writer holds the new, smaller graph until :meth:`VoyagerWriter.close`. Needs the ``voyager`` package.
"""

from __future__ import annotations

import itertools
import pickle
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ....models import require
from ._atomic import atomic_write_bytes, save_atomic
from ._safe_io import restricted_pickle_load, restricted_pickle_loads
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

__all__ = ["VoyagerFormat", "VoyagerWriter"]

INDEX_FILE = "index.voyager"
DOC_MAP = "document_ids_to_embeddings.pkl"
EMB_MAP = "embeddings_to_documents_ids.pkl"
SQLITE_DOC_MAP = "document_ids_to_embeddings.sqlite"
SQLITE_EMB_MAP = "embeddings_to_documents_ids.sqlite"
_SQLITE_TABLE = "unnamed"  # SqliteDict's default table
CHUNK_VECTORS = 1 << 16


def _doc_chunks(doclens: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """Split documents into runs of about ``per_chunk`` vectors: ``[(first doc, end doc), ...]``."""
    if doclens.size == 0:
        return []
    starts = np.concatenate([[0], np.cumsum(doclens)[:-1]])
    bucket = starts // per_chunk
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    bounds = np.concatenate([[0], cuts, [doclens.size]])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _read_sqlitedict(path: Path, what: str) -> dict[Any, Any]:
    """Read a SqliteDict store (PyLate 1.2 - 1.4 id maps) read-only; values through the restricted unpickler."""
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing ({what}); the index is incomplete")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = con.execute(f'SELECT key, value FROM "{_SQLITE_TABLE}" ORDER BY rowid').fetchall()
        finally:
            con.close()
    except sqlite3.Error as err:
        raise IndexFormatError(f"{path}: not a SqliteDict store ({what}): {err}") from err
    out: dict[Any, Any] = {}
    for key, blob in rows:
        if not isinstance(blob, bytes):
            raise IndexFormatError(f"{path}: value of {key!r} is not a pickled blob ({what})")
        out[key] = restricted_pickle_loads(blob, what, f"{path} [{key!r}]")
    return out


def _write_sqlitedict(path: Path, items: dict[Any, Any]) -> None:
    """Write ``items`` as a SqliteDict store (same table, key text, pickled values), atomically."""
    def write(tmp: str) -> None:
        Path(tmp).unlink()
        con = sqlite3.connect(tmp)
        try:
            con.execute(f'CREATE TABLE IF NOT EXISTS "{_SQLITE_TABLE}" (key TEXT PRIMARY KEY, value BLOB)')
            con.executemany(f'REPLACE INTO "{_SQLITE_TABLE}" (key, value) VALUES (?, ?)',
                            ((k, sqlite3.Binary(pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)))
                             for k, v in items.items()))
            con.commit()
        finally:
            con.close()
    save_atomic(path, write)


@register
class VoyagerFormat(IndexFormat):
    """A PyLate Voyager index directory (Chaffin & Sourty, "PyLate", 2025; HNSW of Malkov & Yashunin, 2018).

    Examples
    --------
    >>> from pathlib import Path
    >>> import unipruner
    >>> fixtures = Path(unipruner.__file__).parents[1] / "tests" / "fixtures" / "colbert"  # a source checkout
    >>> VoyagerFormat.detect(fixtures / "voyager" / "cranfield")
    True
    """

    name: ClassVar[str] = "voyager"

    def __init__(self, path: Path, index: Any, doc_keys: list[Any], emb_ids: list[np.ndarray],
                 per_chunk: int | None = None, layout: str = "pickle") -> None:
        self.path = path
        self.layout = layout  # "pickle" (PyLate >= 1.5) or "sqlite" (PyLate 1.2 - 1.4)
        self.index = index
        self.doc_keys = doc_keys
        self.emb_ids = emb_ids
        self.doclens = np.array([len(e) for e in emb_ids], dtype=np.int64)
        self.bounds = _doc_chunks(self.doclens, per_chunk or CHUNK_VECTORS)

    @classmethod
    def detect(cls, path: Path) -> bool:
        """True for a directory with ``index.voyager`` and PyLate's ``document_ids_to_embeddings`` map."""
        p = Path(path)
        return (p / INDEX_FILE).is_file() and ((p / DOC_MAP).is_file() or (p / SQLITE_DOC_MAP).is_file())

    @classmethod
    def open(cls, path: Path) -> VoyagerFormat:
        """Open and validate a PyLate Voyager index: both maps (restricted unpickling), their agreement, the graph.

        Raises
        ------
        IndexFormatError
            When a file is missing or truncated, a map is not plain data (e.g. a pickle that would run code), the
            maps disagree, or an embedding id is absent from the HNSW index.
        MissingDependencyError
            When the ``voyager`` package is not installed.
        """
        p = Path(path)
        if not p.is_dir():
            raise IndexFormatError(f"{p} is not a directory: a PyLate Voyager index is a directory")
        voyager = require("voyager", "colbert")
        layout = "pickle" if (p / DOC_MAP).is_file() or not (p / SQLITE_DOC_MAP).is_file() else "sqlite"
        if layout == "pickle":
            doc_map = restricted_pickle_load(p / DOC_MAP, "PyLate's map from document ids to embedding ids")
            emb_map = restricted_pickle_load(p / EMB_MAP, "PyLate's map from embedding ids to document ids")
        else:
            doc_map = _read_sqlitedict(p / SQLITE_DOC_MAP, "PyLate's map from document ids to embedding ids")
            raw = _read_sqlitedict(p / SQLITE_EMB_MAP, "PyLate's map from embedding ids to document ids")
            try:  # SqliteDict keys are text
                emb_map = {int(k): v for k, v in raw.items()}
            except ValueError as err:
                raise IndexFormatError(f"{p / SQLITE_EMB_MAP}: keys must be integer embedding ids ({err})") from err
        if not isinstance(doc_map, dict) or not isinstance(emb_map, dict):
            raise IndexFormatError(f"{p}: the id maps must be dicts, got {type(doc_map).__name__} / "
                                   f"{type(emb_map).__name__}")
        keys = list(doc_map)
        emb_ids: list[np.ndarray] = []
        for k in keys:
            v = doc_map[k]
            arr = np.asarray(v)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise IndexFormatError(f"{p / DOC_MAP}: document {k!r} must map to a non-empty list of integer "
                                       f"embedding ids, got {type(v).__name__} {arr.shape}")
            emb_ids.append(arr.astype(np.int64))
        flat = np.concatenate(emb_ids) if emb_ids else np.zeros(0, np.int64)
        if np.unique(flat).size != flat.size:
            raise IndexFormatError(f"{p / DOC_MAP}: an embedding id is listed for more than one document")
        if len(emb_map) != flat.size:
            raise IndexFormatError(f"{p}: {EMB_MAP} has {len(emb_map)} entries but {DOC_MAP} lists {flat.size} "
                                   "embeddings: the maps disagree")
        key_pos = {k: j for j, k in enumerate(keys)}
        try:
            e_ids = np.fromiter(emb_map.keys(), dtype=np.int64, count=len(emb_map))
        except (TypeError, ValueError, OverflowError) as err:
            raise IndexFormatError(f"{p / EMB_MAP}: keys must be integer embedding ids ({err})") from err
        e_doc = np.fromiter((key_pos.get(v, -1) for v in emb_map.values()), dtype=np.int64, count=len(emb_map))
        order = np.argsort(e_ids)
        pos = np.minimum(np.searchsorted(e_ids[order], flat), max(0, len(order) - 1))
        doc_of = np.repeat(np.arange(len(keys)), [len(e) for e in emb_ids])
        if flat.size and (not np.array_equal(e_ids[order][pos], flat) or not np.array_equal(e_doc[order][pos], doc_of)):
            bad = int(doc_of[(e_ids[order][pos] != flat) | (e_doc[order][pos] != doc_of)][0])
            raise IndexFormatError(f"{p}: {EMB_MAP} does not map the embeddings of document {keys[bad]!r} back to it: "
                                   "the maps disagree")
        try:
            index = voyager.Index.load(str(p / INDEX_FILE))
        except Exception as err:  # voyager raises RuntimeError/ValueError on bad files
            raise IndexFormatError(f"{p / INDEX_FILE}: cannot be loaded as a Voyager index: {err}") from err
        present = np.fromiter(index.ids, dtype=np.int64, count=len(index.ids))
        if not np.isin(flat, present).all():
            missing = flat[~np.isin(flat, present)][:5].tolist()
            raise IndexFormatError(f"{p / INDEX_FILE}: embedding ids {missing} of the maps are not in the index")
        return cls(p, index, keys, emb_ids, layout=layout)

    def info(self) -> IndexInfo:
        """Summary: documents, vectors, dim, bytes on disk, doclens, chunks, HNSW parameters."""
        return IndexInfo(
            format=self.name, path=self.path, n_docs=len(self.doc_keys), n_vectors=int(self.doclens.sum()),
            dim=int(self.index.num_dimensions), n_bytes=dir_bytes(self.path), doclens=self.doclens.copy(),
            n_chunks=len(self.bounds),
            details={"layout": self.layout, "space": str(self.index.space), "M": int(self.index.M),
                     "ef_construction": int(self.index.ef_construction),
                     "storage_data_type": str(self.index.storage_data_type),
                     "graph_vectors": len(self.index.ids)})

    def doc_ids(self) -> list[str]:
        """Document ids in index order (the order of PyLate's map)."""
        return [str(k) for k in self.doc_keys]

    def chunks(self) -> Iterator[Chunk]:
        """Yield runs of documents (about 64k vectors each) with their stored vectors."""
        for i, (a, b) in enumerate(self.bounds):
            ids = np.concatenate(self.emb_ids[a:b])
            vectors = np.asarray(self.index.get_vectors(ids.tolist()), dtype=np.float32)
            yield Chunk(index=i, doc_offset=a, doclens=self.doclens[a:b].copy(), vectors=torch.from_numpy(vectors))

    def writer(self, dst: Path) -> VoyagerWriter:
        """A writer building a Voyager index with this index's parameters in the empty directory ``dst``."""
        return VoyagerWriter(self, Path(dst))


class VoyagerWriter(ChunkWriter):
    """Builds a new Voyager index of the reduced vectors and PyLate's two maps (see :class:`VoyagerFormat`)."""

    def __init__(self, src: VoyagerFormat, dst: Path) -> None:
        if not dst.is_dir() or any(dst.iterdir()):
            raise IndexFormatError(f"{dst}: the writer needs an existing empty directory")
        voyager = require("voyager", "colbert")
        s = src.index
        self.src = src
        self.dst = dst
        self.index = voyager.Index(s.space, num_dimensions=int(s.num_dimensions), M=int(s.M),
                                   ef_construction=int(s.ef_construction),
                                   max_elements=max(1, int(src.doclens.sum())), storage_data_type=s.storage_data_type)
        self.doc_map: dict[Any, list[int]] = {}
        self.emb_map: dict[int, Any] = {}
        self.next_chunk = 0
        self.closed = False

    def write(self, chunk: Chunk) -> None:
        """Add one reduced chunk's vectors to the new graph and record their embedding ids per document."""
        if self.closed:
            raise IndexFormatError("write() after close()")
        check_chunk(chunk, int(self.src.index.num_dimensions))
        i = self.next_chunk
        if chunk.index != i or i >= len(self.src.bounds):
            raise IndexFormatError(f"chunk {chunk.index} written out of order: expected chunk {i} of "
                                   f"{len(self.src.bounds)}")
        a, b = self.src.bounds[i]
        doclens = np.asarray(chunk.doclens, dtype=np.int64)
        if chunk.doc_offset != a or len(doclens) != b - a:
            raise IndexFormatError(f"chunk {i}: has documents [{chunk.doc_offset}, {chunk.doc_offset + len(doclens)})"
                                   f" but the source chunk holds [{a}, {b}): documents must stay in place")
        vec = chunk.vectors.detach().to(torch.float32).cpu().numpy()
        ids = np.asarray(self.index.add_items(vec), dtype=np.int64)
        for key, part in zip(self.src.doc_keys[a:b], np.split(ids, np.cumsum(doclens)[:-1]), strict=True):
            lst = part.tolist()
            self.doc_map[key] = lst
            self.emb_map.update(dict.fromkeys(lst, key))
        self.next_chunk += 1

    def close(self) -> None:
        """Save ``index.voyager`` and the two maps in the source's layout (pickles or SqliteDict), each atomically."""
        if self.closed:
            return
        if self.next_chunk != len(self.src.bounds):
            raise IndexFormatError(f"close() after {self.next_chunk} of {len(self.src.bounds)} chunks")
        save_atomic(self.dst / INDEX_FILE, lambda t: self.index.save(t))
        if self.src.layout == "sqlite":
            _write_sqlitedict(self.dst / SQLITE_DOC_MAP, self.doc_map)
            _write_sqlitedict(self.dst / SQLITE_EMB_MAP, {str(k): v for k, v in self.emb_map.items()})
        else:
            atomic_write_bytes(self.dst / DOC_MAP, pickle.dumps(self.doc_map))
            atomic_write_bytes(self.dst / EMB_MAP, pickle.dumps(self.emb_map))
        self.closed = True
