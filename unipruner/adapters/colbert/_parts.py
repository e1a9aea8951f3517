"""Staged compression: one function per chunk (any engine), then the driver's global steps.

The per-chunk task :func:`stage_chunk` (context :class:`ChunkJob`, item ``(chunk number, per-document counts)``)
opens SRC once per worker process, reads chunk ``i`` alone (:meth:`IndexFormat.chunk`), reduces it
(:func:`~._methods.reduce_chunk`), encodes it with the source codec and writes its files, each with ``os.replace``,
then its summary last. It is idempotent, so an engine may run it again after a lost worker. The driver then checks
every chunk's summary, computes the embedding offsets, rebuilds the IVF with a two-pass counting sort into a
memory-mapped file (:func:`~.formats._codec.ivf_to_file`: never every code in memory), writes the metadata last and
renames the index into place. PLAID is a colbert-ai chunk per task (Santhanam et al., "PLAID", CIKM 2022), fast-plaid
one of its chunks, raw one run of <= 2^18 vectors.

Staging directory ``.DST.tmp-XXXX`` next to DST (on storage every worker can reach)::

    job.json          SRC, its size and format, the method: ``resume`` continues only a matching job
    index/            the index being built; renamed to DST at the end
    parts/{i}.json    chunk i's summary, written after its files: chunk i is done
    parts/{i}.npy     raw: chunk i's reduced vectors in the index's dtype (the driver streams them into vectors.npy)
    parts/{i}.raw.npy fast-plaid with an embeddings.npy copy (<= ~1000 documents): chunk i's reduced vectors

Voyager is one HNSW graph in one file (no chunk files to write independently): it stays on the sequential writer.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import UniprunerError
from ._methods import ReduceSpec, TokenTable, chunk_scores, reduce_chunk
from .formats import Chunk, IndexFormat, IndexInfo, detect_format
from .formats._atomic import atomic_write_text, save_npy_atomic
from .formats._codec import build_ivf_pairs, ivf_to_file

__all__ = ["STAGED_FORMATS", "ChunkJob", "assemble", "open_stage", "peak_rss", "prepare", "score_chunk", "stage_chunk"]

#: formats whose chunks are written independently (the others go through the sequential writer)
STAGED_FORMATS = ("raw", "plaid", "fast-plaid")
_JOB_VERSION = 1


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk task needs (shipped to each worker once).

    Attributes
    ----------
    src : str
        The source index (absolute path, readable by every worker).
    format : str
        Its format name.
    spec : ReduceSpec
    stage : str
        The staging directory (absolute path, writable by every worker).
    tokens : TokenTable, optional
        Token ids for ``idf`` / ``stopwords``.
    chunk_vectors : int, optional
        raw: the chunk bound the driver opened SRC with.
    """

    src: str
    format: str
    spec: ReduceSpec
    stage: str
    tokens: TokenTable | None = None
    chunk_vectors: int | None = None


_OPENED: dict[tuple[str, str, int | None], IndexFormat] = {}


def _source(job: ChunkJob) -> IndexFormat:
    """SRC opened once per worker process (the codec, doclens and offsets stay loaded between chunks)."""
    key = (job.src, job.format, job.chunk_vectors)
    if key not in _OPENED:
        _OPENED.clear()
        cls = detect_format(Path(job.src))
        if cls.name != job.format:
            raise UniprunerError(f"{job.src} is now a {cls.name!r} index, the job was for {job.format!r}")
        if job.chunk_vectors is not None:
            _OPENED[key] = cls.open(Path(job.src), chunk_vectors=job.chunk_vectors)  # type: ignore[call-arg]
        else:
            _OPENED[key] = cls.open(Path(job.src))
    return _OPENED[key]


def peak_rss() -> int:
    """This process's peak resident bytes: ``VmHWM`` (Linux; reset by exec, unlike ``ru_maxrss``, which a child
    inherits from its parent), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _dirs(job: ChunkJob) -> tuple[Path, Path]:
    return Path(job.stage) / "index", Path(job.stage) / "parts"


def score_chunk(job: ChunkJob, i: int) -> tuple[int, int, np.ndarray]:
    """Chunk ``i``'s ``(first document, documents, score of every vector)`` for a global budget."""
    c = _source(job).chunk(i)
    return c.doc_offset, len(c.doclens), chunk_scores(c, job.spec, job.tokens)


def stage_chunk(job: ChunkJob, item: tuple[int, np.ndarray | None]) -> dict[str, Any]:
    """Reduce, encode and write chunk ``item[0]`` (with per-document counts ``item[1]`` for a global budget).

    Returns the chunk's summary (also written to ``parts/{i}.json`` after its files): documents, vectors before and
    after, the worker's process id and peak resident memory.
    """
    i, counts = item
    src = _source(job)
    index_dir, parts = _dirs(job)
    chunk = src.chunk(i)
    n_in = int(chunk.vectors.shape[0])
    out = reduce_chunk(chunk, job.spec, counts=counts, tokens=job.tokens)
    del chunk
    _STAGE[job.format](src, out, index_dir, parts)
    summary = {"chunk": i, "doc_offset": int(out.doc_offset), "docs": len(out.doclens), "vectors_in": n_in,
               "vectors_out": int(out.vectors.shape[0]), "doclens": [int(v) for v in out.doclens],
               "pid": os.getpid(), "peak_rss": peak_rss()}
    atomic_write_text(parts / f"{i}.json", json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------------------------
# per format: prepare (driver, before the chunks), stage (worker, one chunk), assemble (driver, at the end)
# ----------------------------------------------------------------------------------------------


def _stage_raw(src: Any, out: Chunk, index_dir: Path, parts: Path) -> None:
    dtype = np.dtype(str(src.manifest["dtype"])).newbyteorder("<")
    save_npy_atomic(parts / f"{out.index}.npy", out.vectors.numpy().astype(dtype, copy=False))


def _stage_plaid(src: Any, out: Chunk, index_dir: Path, parts: Path) -> None:
    from .formats import plaid

    plaid.write_chunk_files(src, index_dir, out)


def _stage_fast_plaid(src: Any, out: Chunk, index_dir: Path, parts: Path) -> None:
    from .formats import fast_plaid

    fast_plaid.write_chunk_files(src, index_dir, out)
    if (src.root / "embeddings.npy").is_file():
        save_npy_atomic(parts / f"{out.index}.raw.npy", out.vectors.detach().to(torch.float32).numpy())


_STAGE: dict[str, Callable[[Any, Chunk, Path, Path], None]] = {
    "raw": _stage_raw, "plaid": _stage_plaid, "fast-plaid": _stage_fast_plaid}


def prepare(src: IndexFormat, stage: Path) -> None:
    """Copy the files the rewrite keeps unchanged into ``stage/index`` (idempotent)."""
    if src.name == "plaid":
        from .formats import plaid

        plaid.copy_unchanged(src, stage / "index")  # type: ignore[arg-type]
    elif src.name == "fast-plaid":
        from .formats import fast_plaid

        fast_plaid.copy_unchanged(src, stage / "index")  # type: ignore[arg-type]


def check_summaries(summaries: dict[int, dict[str, Any]], info: IndexInfo) -> list[dict[str, Any]]:
    """Every chunk done, documents contiguous and complete: the summaries in chunk order, or an error."""
    missing = [i for i in range(info.n_chunks) if i not in summaries]
    if missing:
        raise UniprunerError(f"chunks {missing[:10]} have no result; the job is incomplete")
    out = [summaries[i] for i in range(info.n_chunks)]
    docs = 0
    for s in out:
        if s["doc_offset"] != docs or len(s["doclens"]) != s["docs"] or sum(s["doclens"]) != s["vectors_out"]:
            raise UniprunerError(f"chunk {s['chunk']}: inconsistent result (documents from {s['doc_offset']}, "
                                 f"expected {docs}); rerun without --resume")
        docs += s["docs"]
    if docs != info.n_docs:
        raise UniprunerError(f"the chunks hold {docs} documents but the index reports {info.n_docs}")
    return out


def assemble(src: IndexFormat, stage: Path, summaries: list[dict[str, Any]]) -> None:
    """The driver's global steps on the checked summaries: offsets, IVF, metadata (written last)."""
    index_dir, parts = stage / "index", stage / "parts"
    if src.name == "raw":
        w = src.writer(index_dir)  # streams the parts into vectors.npy (memory: one chunk)
        for s in summaries:
            arr = np.load(parts / f"{s['chunk']}.npy", allow_pickle=False)
            w.write(Chunk(s["chunk"], s["doc_offset"], np.asarray(s["doclens"], dtype=np.int64),
                          torch.from_numpy(arr.astype(np.float32))))
            del arr
        w.close()
    elif src.name == "plaid":
        _assemble_plaid(src, index_dir, parts, summaries)
    else:
        _assemble_fast_plaid(src, index_dir, parts, summaries)


def _offsets(summaries: list[dict[str, Any]]) -> list[int]:
    return [0, *np.cumsum([s["vectors_out"] for s in summaries]).tolist()]


def _assemble_plaid(src: Any, index_dir: Path, parts: Path, summaries: list[dict[str, Any]]) -> None:
    from .formats import plaid
    from .formats._safe_io import load_json_file, load_tensor_file

    off = _offsets(summaries)
    stored: list[np.ndarray] = []
    for i in range(len(summaries)):  # stored doclens keep the removed documents (length 0)
        dl = np.asarray(load_json_file(index_dir / f"doclens.{i}.json", f"doclens of chunk {i}"), dtype=np.int64)
        plaid.write_chunk_meta(src, index_dir, i, len(dl), int(dl.sum()), off[i])
        stored.append(dl)

    def pairs(i: int) -> torch.Tensor:
        codes = load_tensor_file(index_dir / f"{i}.codes.pt", f"centroid codes of chunk {i}", mmap=True)
        return build_ivf_pairs(codes, stored[i], int(src.chunk_meta[i]["passage_offset"]), src.live)

    partitions = int(src.codec.centroids.shape[0])
    ivf, lengths = ivf_to_file(pairs, len(summaries), partitions, parts / "ivf.npy", np.int32, plaid.ivf_padding)
    plaid.write_globals(src, index_dir, torch.from_numpy(ivf), torch.from_numpy(lengths), off[-1])
    del ivf


def _assemble_fast_plaid(src: Any, index_dir: Path, parts: Path, summaries: list[dict[str, Any]]) -> None:
    from .formats import fast_plaid
    from .formats._safe_io import load_npy

    off = _offsets(summaries)
    root = fast_plaid.out_root(src, index_dir)
    for i, s in enumerate(summaries):
        fast_plaid.write_chunk_meta(src, index_dir, i, s["docs"], s["vectors_out"], off[i])

    def pairs(i: int) -> torch.Tensor:
        codes = torch.from_numpy(load_npy(root / f"{i}.codes.npy", f"centroid codes of chunk {i}"))
        return build_ivf_pairs(codes, np.asarray(summaries[i]["doclens"], dtype=np.int64), src.offsets[i][0], None)

    fd, tmp = tempfile.mkstemp(prefix=".ivf.npy.", suffix=".tmp", dir=root)
    os.close(fd)
    ivf, lengths = ivf_to_file(pairs, len(summaries), int(src.codec.centroids.shape[0]), Path(tmp), np.int64)
    del ivf
    os.replace(tmp, root / "ivf.npy")
    save_npy_atomic(root / "ivf_lengths.npy", lengths.astype(np.int32))
    if (src.root / "embeddings.npy").is_file():
        docs: list[np.ndarray] = []
        for s in summaries:
            vec = np.load(parts / f"{s['chunk']}.raw.npy", allow_pickle=False)
            docs.extend(np.split(vec, np.cumsum(s["doclens"])[:-1]))
        fast_plaid.write_raw_embeddings(src, index_dir, docs)
    fast_plaid.write_metadata(src, index_dir, off[-1])


# ----------------------------------------------------------------------------------------------
# the staging directory
# ----------------------------------------------------------------------------------------------


def fingerprint(info: IndexInfo, spec: ReduceSpec, tokens: TokenTable | None) -> dict[str, Any]:
    """What identifies a job for ``resume``: SRC (path, format, size), its chunks and the method."""
    return {"version": _JOB_VERSION, "src": str(Path(info.path).resolve()), "format": info.format,
            "n_docs": info.n_docs, "n_vectors": info.n_vectors, "n_bytes": info.n_bytes, "n_chunks": info.n_chunks,
            "spec": repr(spec), "tokens": None if tokens is None else int(tokens.ids.size)}


def open_stage(dst: Path, job: dict[str, Any], resume: bool) -> tuple[Path, dict[int, dict[str, Any]]]:
    """The staging directory of ``dst`` and the chunks already done in it.

    With ``resume``, the newest ``.DST.tmp-*`` whose ``job.json`` matches ``job`` is continued (its finished chunks
    are kept); otherwise (or when none matches) a new one is created.
    """
    if resume:
        found = []
        for d in dst.parent.glob(f".{dst.name}.tmp-*"):
            try:
                if json.loads((d / "job.json").read_text(encoding="utf-8")) == job:
                    found.append(d)
            except (OSError, ValueError):
                continue
        if found:
            stage = max(found, key=lambda d: d.stat().st_mtime)
            done: dict[int, dict[str, Any]] = {}
            for f in (stage / "parts").glob("*.json"):
                try:
                    s = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # a summary is written atomically; an unreadable one is redone
                if isinstance(s, dict) and f.stem == str(s.get("chunk")):
                    done[int(s["chunk"])] = s
            return stage, done
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    (stage / "index").mkdir()
    (stage / "parts").mkdir()
    atomic_write_text(stage / "job.json", json.dumps(job))
    return stage, {}
