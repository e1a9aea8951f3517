"""Raw-array multi-vector index: ``vectors.npy`` (or ``vectors.safetensors``), ``doclens.npy``, ``ids.json``.

Layout of the directory (all vectors of all documents, documents contiguous, ColBERT-style late-interaction index of
Khattab & Zaharia, SIGIR 2020, without compression)::

    manifest.json          {"format": "unipruner-colbert-raw", "version": 1, "dim": D, "dtype": "float16"|"float32",
                            "n_docs": n, "n_vectors": N, "vectors": "vectors.npy"|"vectors.safetensors"}
    vectors.npy            float16/float32 [N, D]   (or vectors.safetensors with one tensor named "vectors")
    doclens.npy            int64 [n], every entry >= 1, summing to N
    ids.json               list of n document ids (strings)

Reading is memory-mapped and chunked: a chunk holds whole documents and at most ``chunk_vectors`` vectors (default
2^18 = 262,144, i.e. 128 MiB of float32 at dim 128, 384 MiB at dim 384), except a single document longer than that,
which is a chunk alone. Writing streams chunks straight into the final files (headers are reserved and filled in on
close). Nothing is unpickled: ``np.load(allow_pickle=False)`` and safetensors only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from ._atomic import atomic_write_text
from ._safe_io import load_json_file, load_npy
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

__all__ = ["FORMAT_NAME", "RawIndex", "write_raw"]

FORMAT_NAME = "unipruner-colbert-raw"
VERSION = 1
#: default chunk bound (vectors per chunk)
CHUNK_VECTORS = 2**18
_DTYPES = {"float16": np.float16, "float32": np.float32}
_ST_DTYPES = {"F16": "float16", "F32": "float32"}
_NPY_HEADER = 128  # bytes reserved for the .npy header (magic + length + dict)
_ST_HEADER = 256  # bytes reserved for the safetensors JSON header


def _st_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without reading the data; return (header, data offset)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise IndexFormatError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise IndexFormatError(f"{path}: not a safetensors file (header length {n})")
            head = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFormatError(f"{path}: not a safetensors file ({err})") from err
    if not isinstance(head, dict):
        raise IndexFormatError(f"{path}: not a safetensors file")
    return head, 8 + n


class _Vectors:
    """Row access to the vectors file (npy memory map, or a memory-mapped safetensors buffer)."""

    def __init__(self, path: Path, dtype: str, dim: int) -> None:
        self.path = path
        if path.suffix == ".npy":
            arr = load_npy(path, "vectors", mmap=True)
        else:
            head, start = _st_header(path)
            t = head.get("vectors")
            if not isinstance(t, dict) or set(t) < {"dtype", "shape", "data_offsets"}:
                raise IndexFormatError(f"{path}: expected one tensor named 'vectors'")
            if t["dtype"] not in _ST_DTYPES:
                raise IndexFormatError(f"{path}: vectors dtype {t['dtype']} is not F16 or F32")
            shape = tuple(int(s) for s in t["shape"])
            b0, b1 = (int(o) for o in t["data_offsets"])
            npd = np.dtype(_DTYPES[_ST_DTYPES[t["dtype"]]])
            if len(shape) != 2 or b1 - b0 != math.prod(shape) * npd.itemsize:
                raise IndexFormatError(f"{path}: tensor 'vectors' has shape {shape} and {b1 - b0} bytes: inconsistent")
            if os.path.getsize(path) < start + b1:
                raise IndexFormatError(f"{path}: truncated ({os.path.getsize(path)} bytes, needs {start + b1})")
            arr = np.memmap(path, dtype=npd.newbyteorder("<"), mode="r", offset=start + b0, shape=shape)
        if arr.ndim != 2:
            raise IndexFormatError(f"{path}: vectors must be 2-D [N, dim], got shape {arr.shape}")
        if arr.dtype not in (np.float16, np.float32):
            raise IndexFormatError(f"{path}: vectors must be float16 or float32, got {arr.dtype}")
        if str(arr.dtype) != dtype:
            raise IndexFormatError(f"{path}: vectors are {arr.dtype} but manifest.json says {dtype}")
        if arr.shape[1] != dim:
            raise IndexFormatError(f"{path}: vectors have dimension {arr.shape[1]} but manifest.json says {dim}")
        self.arr = arr
        self._offset = int(arr.offset) if isinstance(arr, np.memmap) else None
        self._fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` as float32, read with plain file reads (no mapped pages stay resident in this process)."""
        if self._offset is None or self._fortran:
            return torch.from_numpy(np.array(self.arr[a:b], dtype=np.float32))
        dim = self.arr.shape[1]
        out = np.fromfile(self.path, dtype=self.arr.dtype, count=(b - a) * dim,
                          offset=self._offset + a * dim * self.arr.dtype.itemsize)
        if out.size != (b - a) * dim:
            raise IndexFormatError(f"{self.path}: truncated while reading rows {a}..{b}")
        return torch.from_numpy(out.reshape(b - a, dim).astype(np.float32))


@register
class RawIndex(IndexFormat):
    """A directory of raw arrays (see the module docstring); chunks bounded by ``chunk_vectors`` vectors."""

    name: ClassVar[str] = "raw"

    def __init__(self, path: Path, manifest: dict[str, Any], vectors: _Vectors, doclens: np.ndarray,
                 ids: list[str], chunk_vectors: int = CHUNK_VECTORS) -> None:
        self.path = path
        self.manifest = manifest
        self._vectors = vectors
        self.doclens = doclens
        self.ids = ids
        self.chunk_vectors = int(chunk_vectors)
        self._bounds = self._chunk_bounds()
        self._vec_bounds = np.concatenate([[0], np.cumsum(self.doclens)])[self._bounds]  # first vector per chunk

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        man = path / "manifest.json"
        if man.is_file():
            try:
                if json.loads(man.read_text(encoding="utf-8")).get("format") == FORMAT_NAME:
                    return True
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                pass  # a broken manifest next to our arrays is still ours: open() says what is wrong
        return (path / "doclens.npy").is_file() and any((path / f).is_file() for f in
                                                       ("vectors.npy", "vectors.safetensors"))

    @classmethod
    def open(cls, path: Path, chunk_vectors: int | None = None) -> RawIndex:
        """Open and validate a raw index (manifest, dtypes, shapes, doclens vs vectors, ids).

        ``chunk_vectors`` bounds the vectors per chunk (default: the module's ``CHUNK_VECTORS``, 2^18).
        """
        path = Path(path)
        if chunk_vectors is None:
            chunk_vectors = CHUNK_VECTORS
        if not path.is_dir():
            raise IndexFormatError(f"{path} is not a directory")
        man = load_json_file(path / "manifest.json", "manifest")
        if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{path}/manifest.json: 'format' must be {FORMAT_NAME!r}")
        if man.get("version") != VERSION:
            raise IndexFormatError(f"{path}/manifest.json: unsupported version {man.get('version')!r} "
                                   f"(this unipruner reads version {VERSION})")
        dim, dtype, vfile = man.get("dim"), man.get("dtype"), man.get("vectors")
        if not isinstance(dim, int) or dim < 1:
            raise IndexFormatError(f"{path}/manifest.json: 'dim' must be a positive int, got {dim!r}")
        if dtype not in _DTYPES:
            raise IndexFormatError(f"{path}/manifest.json: 'dtype' must be float16 or float32, got {dtype!r}")
        if vfile not in ("vectors.npy", "vectors.safetensors"):
            raise IndexFormatError(f"{path}/manifest.json: 'vectors' must be vectors.npy or vectors.safetensors")
        if not (path / vfile).is_file():
            raise IndexFormatError(f"{path}: {vfile} is missing")
        vectors = _Vectors(path / vfile, dtype, dim)
        doclens = load_npy(path / "doclens.npy", "doclens", mmap=False)
        if doclens.ndim != 1 or not np.issubdtype(doclens.dtype, np.integer):
            raise IndexFormatError(f"{path}/doclens.npy must be a 1-D integer array, got {doclens.dtype} "
                                   f"{doclens.shape}")
        doclens = doclens.astype(np.int64)
        if doclens.size and int(doclens.min()) < 1:
            raise IndexFormatError(f"{path}/doclens.npy: document {int(np.argmin(doclens))} has "
                                   f"{int(doclens.min())} vectors; every document needs at least one")
        n = int(doclens.sum())
        if n != vectors.arr.shape[0]:
            raise IndexFormatError(f"{path}: doclens sum to {n} vectors but {vfile} holds {vectors.arr.shape[0]} "
                                   "(truncated or inconsistent index)")
        ids = load_json_file(path / "ids.json", "ids file")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise IndexFormatError(f"{path}/ids.json must be a JSON list of strings")
        if len(ids) != doclens.size:
            raise IndexFormatError(f"{path}: ids.json has {len(ids)} ids but doclens.npy has {doclens.size} "
                                   "documents")
        for key, val in (("n_docs", doclens.size), ("n_vectors", n)):
            if key in man and man[key] != val:
                raise IndexFormatError(f"{path}/manifest.json says {key}={man[key]} but the arrays have {val}")
        if isinstance(chunk_vectors, bool) or not isinstance(chunk_vectors, int) or chunk_vectors < 1:
            raise IndexFormatError(f"chunk_vectors must be a positive int, got {chunk_vectors!r}")
        return cls(path, man, vectors, doclens, ids, chunk_vectors)

    def _chunk_bounds(self) -> np.ndarray:
        """Document boundaries ``[n_chunks + 1]``: greedy runs of documents with <= chunk_vectors vectors."""
        ends = np.cumsum(self.doclens)
        bounds = [0]
        start_vec = 0
        n = self.doclens.size
        while bounds[-1] < n:  # one iteration per chunk
            j = int(np.searchsorted(ends, start_vec + self.chunk_vectors, side="right"))
            j = max(j, bounds[-1] + 1)
            bounds.append(j)
            start_vec = int(ends[j - 1])
        return np.asarray(bounds, dtype=np.int64)

    def info(self) -> IndexInfo:
        return IndexInfo(
            format=self.name, path=self.path, n_docs=int(self.doclens.size), n_vectors=int(self.doclens.sum()),
            dim=int(self.manifest["dim"]), n_bytes=dir_bytes(self.path), doclens=self.doclens.copy(),
            n_chunks=len(self._bounds) - 1,
            details={"dtype": self.manifest["dtype"], "vectors": self.manifest["vectors"],
                     "chunk_vectors": self.chunk_vectors},
        )

    def doc_ids(self) -> list[str]:
        """Document ids, in index order."""
        return list(self.ids)

    def chunks(self) -> Iterator[Chunk]:
        for c in range(len(self._bounds) - 1):
            yield self.chunk(c)  # hold no decoded chunk while the next one is read

    def chunk(self, i: int) -> Chunk:
        """Chunk ``i`` (documents ``bounds[i]:bounds[i + 1]``), read from the vectors file."""
        if not 0 <= i < len(self._bounds) - 1:
            raise IndexFormatError(f"{self.path}: no chunk {i} (the index has {len(self._bounds) - 1})")
        d0, d1 = int(self._bounds[i]), int(self._bounds[i + 1])
        vecs = self._vectors.rows(int(self._vec_bounds[i]), int(self._vec_bounds[i + 1]))
        if not bool(torch.isfinite(vecs).all()):
            raise IndexFormatError(f"{self.path}: chunk {i} (documents {d0}..{d1 - 1}) contains NaN or inf")
        return Chunk(i, d0, self.doclens[d0:d1].copy(), vecs)

    def writer(self, dst: Path) -> ChunkWriter:
        return RawWriter(Path(dst), dim=int(self.manifest["dim"]), dtype=self.manifest["dtype"], ids=self.ids,
                         vectors_file=self.manifest["vectors"])


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    d = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    body_len = _NPY_HEADER - 10
    body = d.ljust(body_len - 1) + "\n"
    if len(body) != body_len:
        raise IndexFormatError(f"npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + body.encode("latin1")


def _st_header_bytes(shape: tuple[int, int], dtype: str, nbytes: int) -> bytes:
    head = {"vectors": {"dtype": "F16" if dtype == "float16" else "F32", "shape": list(shape),
                        "data_offsets": [0, nbytes]}, "__metadata__": {"format": FORMAT_NAME}}
    text = json.dumps(head, separators=(",", ":"))
    if len(text) > _ST_HEADER:
        raise IndexFormatError(f"safetensors header too long for shape {shape}")
    return struct.pack("<Q", _ST_HEADER) + text.ljust(_ST_HEADER).encode("utf-8")


class RawWriter(ChunkWriter):
    """Streams chunks into ``vectors.npy`` / ``vectors.safetensors``; writes doclens, ids and manifest on close."""

    def __init__(self, dst: Path, *, dim: int, dtype: str, ids: Sequence[str],
                 vectors_file: str = "vectors.npy") -> None:
        if dtype not in _DTYPES:
            raise IndexFormatError(f"dtype must be float16 or float32, got {dtype!r}")
        if vectors_file not in ("vectors.npy", "vectors.safetensors"):
            raise IndexFormatError("vectors_file must be vectors.npy or vectors.safetensors")
        self.dst, self.dim, self.dtype, self.ids = Path(dst), int(dim), dtype, list(ids)
        self.vectors_file = vectors_file
        self._np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
        self._fh: BinaryIO | None = open(self.dst / vectors_file, "wb")
        self._fh.write(b"\0" * (_NPY_HEADER if vectors_file.endswith(".npy") else 8 + _ST_HEADER))
        self._doclens: list[np.ndarray] = []
        self._n = 0
        self._next = 0

    def write(self, chunk: Chunk) -> None:
        if self._fh is None:
            raise IndexFormatError("writer already closed")
        check_chunk(chunk, self.dim)
        if chunk.index != self._next:
            raise IndexFormatError(f"chunks must be written in order: expected {self._next}, got {chunk.index}")
        self._next += 1
        arr = chunk.vectors.detach().cpu().float().numpy().astype(self._np_dtype, copy=False)
        self._fh.write(np.ascontiguousarray(arr).tobytes())
        self._doclens.append(np.asarray(chunk.doclens, dtype=np.int64))
        self._n += arr.shape[0]

    def close(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.seek(0)
            shape = (self._n, self.dim)
            if self.vectors_file.endswith(".npy"):
                fh.write(_npy_header(shape, self._np_dtype))
            else:
                fh.write(_st_header_bytes(shape, self.dtype, self._n * self.dim * self._np_dtype.itemsize))
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        doclens = np.concatenate(self._doclens) if self._doclens else np.zeros(0, dtype=np.int64)
        if doclens.size != len(self.ids):
            raise IndexFormatError(f"wrote {doclens.size} documents but the index has {len(self.ids)} ids")
        np.save(self.dst / "doclens.npy", doclens, allow_pickle=False)
        atomic_write_text(self.dst / "ids.json", json.dumps(self.ids))
        atomic_write_text(self.dst / "manifest.json", json.dumps({
            "format": FORMAT_NAME, "version": VERSION, "dim": self.dim, "dtype": self.dtype,
            "n_docs": int(doclens.size), "n_vectors": int(self._n), "vectors": self.vectors_file}, indent=1))


def write_raw(path: Path | str, docs: Sequence[torch.Tensor] | torch.Tensor, *, doclens: Sequence[int] | None = None,
              ids: Sequence[str] | None = None, dtype: str = "float32", safetensors: bool = False) -> Path:
    """Write a raw multi-vector index atomically (temporary directory, then rename) and return its path.

    Builds the uncompressed late-interaction index (Khattab & Zaharia, "ColBERT", SIGIR 2020) that
    ``unipruner colbert compress`` reads.

    Parameters
    ----------
    path : Path or str
        Destination directory; must not exist.
    docs : list of Tensor ``[n_i, D]`` or Tensor ``[N, D]``
        Per-document vectors, or all vectors flat (then ``doclens`` is required).
    doclens : sequence of int, optional
        Vectors per document for a flat ``docs`` tensor.
    ids : sequence of str, optional
        Document ids (default ``"0", "1", ...``).
    dtype : {"float32", "float16"}
    safetensors : bool
        Store ``vectors.safetensors`` instead of ``vectors.npy``.

    Examples
    --------
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp()) / "idx"
    >>> _ = write_raw(d, [torch.ones(3, 4), torch.zeros(1, 4)])
    >>> RawIndex.open(d).info().n_vectors
    4
    """
    import shutil
    import tempfile

    path = Path(path)
    if path.exists():
        raise IndexFormatError(f"{path} already exists")
    if isinstance(docs, torch.Tensor):
        if doclens is None:
            raise IndexFormatError("a flat [N, D] tensor needs doclens=")
        flat = docs
        lens = np.asarray(list(doclens), dtype=np.int64)
    else:
        if doclens is not None:
            raise IndexFormatError("doclens= is only for a flat [N, D] tensor")
        if len(docs) == 0:
            raise IndexFormatError("an index needs at least one document")
        lens = np.asarray([int(d.shape[0]) for d in docs], dtype=np.int64)
        flat = torch.cat([d.detach().float().cpu() for d in docs])
    if flat.ndim != 2:
        raise IndexFormatError(f"vectors must be [N, D], got shape {tuple(flat.shape)}")
    ids_l = [str(i) for i in range(lens.size)] if ids is None else [str(i) for i in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        w = RawWriter(tmp, dim=int(flat.shape[1]), dtype=dtype, ids=ids_l,
                      vectors_file="vectors.safetensors" if safetensors else "vectors.npy")
        w.write(Chunk(0, 0, lens, flat.detach().float().cpu()))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
