"""Compress an existing multi-vector index: open, validate, reduce chunk by chunk, write atomically.

The pipeline behind ``unipruner colbert compress`` (token pooling of Clavié et al. 2024 / ColBERT pruning of Lassance
et al. 2021 applied to an index that already exists, instead of re-encoding the collection):

1. detect the source format and open it (full validation, nothing written yet); tokenise the collection for
   ``idf`` / ``stopwords`` and check it lines up with the index;
2. ``scope="global"``: a first pass scores every vector (:func:`~._methods.chunk_scores`) and turns one budget for the
   whole index into per-document counts (:func:`~._methods.global_counts`);
3. raw, PLAID and fast-plaid (:mod:`._parts`): create the staging directory ``.DST.tmp-XXXX`` next to DST and map
   the per-chunk task :func:`~._parts.stage_chunk` over the chunks on an engine (:mod:`unipruner.engines`: this
   process, local worker processes, or Ray tasks; the same function, the same bytes); each task reads its chunk,
   reduces it, encodes it and writes its files; the driver then checks every chunk, computes the offsets, rebuilds
   the IVF (counting sort into a memory map) and writes the metadata last. ``resume=True`` continues a staging
   directory a killed driver left. Voyager (one HNSW file): the format's writer, fed in chunk order, optionally from
   ``workers`` processes;
4. rename the finished index to DST (an existing DST is replaced only with ``force=True``); on any error the
   staging directory is removed and DST is left as it was. SRC is only read.

Memory bound: the source format's chunk (raw: <= 2^18 vectors, float32) times ``2 * workers + 1`` chunks in flight
(decoded input + reduced output), plus per-batch workspace (one ``[B, N, N]`` float32 matrix <= 64 MiB per process)
and, for a global budget, 8 bytes per vector of the whole index for the scores.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._threads import limit_threads
from ...engines import Engine, LocalEngine, commit_dir, make_engine
from ...errors import UniprunerError
from ...methods import Method
from ._methods import ReduceSpec, TokenTable, as_spec, chunk_scores, global_counts, global_total, reduce_chunk
from ._parts import (
    STAGED_FORMATS,
    ChunkJob,
    assemble,
    check_summaries,
    fingerprint,
    open_stage,
    prepare,
    score_chunk,
    stage_chunk,
)
from .formats import Chunk, IndexFormat, IndexInfo, detect_format

__all__ = ["CompressResult", "compress", "open_index"]

Progress = Callable[[int, int, int], None]
"""Called after every written chunk with (documents done, vectors read, vectors written) so far."""


@dataclass(frozen=True)
class CompressResult:
    """What :func:`compress` did.

    Attributes
    ----------
    src, dst : IndexInfo
        The source index and the written one (re-opened and validated).
    spec : ReduceSpec
    seconds : float
        Wall time of the whole run.
    engine : str
        ``"local"`` or ``"ray"``.
    workers : int
        Chunks reduced at once.
    retries : int
        Chunks run again after a lost worker or node.
    resumed_chunks : int
        Chunks a previous run had finished (``resume``).
    worker_peak_rss : tuple of int
        Peak resident bytes of every worker process that reduced a chunk (empty for Voyager).
    """

    src: IndexInfo
    dst: IndexInfo
    spec: ReduceSpec
    seconds: float
    engine: str = "local"
    workers: int = 1
    retries: int = 0
    resumed_chunks: int = 0
    worker_peak_rss: tuple[int, ...] = ()

    @property
    def docs_per_s(self) -> float:
        """Documents processed per second."""
        return self.src.n_docs / max(self.seconds, 1e-9)


def open_index(path: Path | str) -> IndexFormat:
    """Detect the format of ``path`` and open it (full validation; ColBERT / PLAID / PyLate / raw indexes).

    Raises
    ------
    IndexFormatError
        If ``path`` is not an index of a known format, or is truncated or inconsistent.
    """
    return detect_format(Path(path)).open(Path(path))


# ----------------------------------------------------------------------------------------------
# worker side (module-level functions: picklable for process pools)
# ----------------------------------------------------------------------------------------------

_TOKENS: TokenTable | None = None


def _init_worker(tokens: TokenTable | None) -> None:
    global _TOKENS
    _TOKENS = tokens


def _pack(chunk: Chunk) -> tuple[int, int, np.ndarray, np.ndarray]:
    return chunk.index, chunk.doc_offset, np.asarray(chunk.doclens, dtype=np.int64), chunk.vectors.float().numpy()


def _unpack(p: tuple[int, int, np.ndarray, np.ndarray]) -> Chunk:
    return Chunk(p[0], p[1], p[2], torch.from_numpy(p[3]))


def _reduce_task(packed: tuple[int, int, np.ndarray, np.ndarray], spec: ReduceSpec,
                 counts: np.ndarray | None) -> tuple[int, int, np.ndarray, np.ndarray]:
    with limit_threads(1):  # one thread per worker process: the workers are the parallelism
        return _pack(reduce_chunk(_unpack(packed), spec, counts=counts, tokens=_TOKENS))


def _score_task(packed: tuple[int, int, np.ndarray, np.ndarray], spec: ReduceSpec) -> np.ndarray:
    with limit_threads(1):
        return chunk_scores(_unpack(packed), spec, _TOKENS)


def _ordered_map(fn: Callable[..., Any], items: Iterator[tuple[Any, ...]], pool: ProcessPoolExecutor | None,
                 max_in_flight: int) -> Iterator[Any]:
    """``fn(*item)`` for every item, results in order; at most ``max_in_flight`` items submitted at once."""
    if pool is None:
        for item in items:
            yield fn(*item)
        return
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise UniprunerError(f"DST {dst} must not be SRC, inside SRC or contain SRC: SRC is never modified")
    if dst.exists() and not force:
        raise UniprunerError(f"DST {dst} already exists; choose another path or pass --force (force=True) to "
                             "replace it")
    if dst.exists() and not dst.is_dir():
        raise UniprunerError(f"DST {dst} exists and is not a directory; remove it first")
    if not dst.parent.is_dir():
        raise UniprunerError(f"the parent directory of DST ({dst.parent}) does not exist; create it first")


def compress(src: Path | str, dst: Path | str, spec: ReduceSpec | Method, *, workers: int | None = None,
             force: bool = False, texts: Sequence[str] | None = None, tokenizer: Any = None,
             max_length: int | None = None, progress: Progress | None = None, engine: str | Engine = "local",
             address: str | None = None, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
             resume: bool = False) -> CompressResult:
    """Write a reduced copy of the index ``src`` to ``dst`` in the same format and codec.

    Token pooling (Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal
    Performance Impact via Token Pooling", 2024) or pruning (Lassance et al., "A Study on Token Pruning for ColBERT",
    2021) of every document of an existing index; see the module docstring for the steps and the memory bound.

    Parameters
    ----------
    src : Path or str
        An index directory of a registered format; only read.
    dst : Path or str
        The directory to create; its parent must exist.
    spec : ReduceSpec or Method
        Method, budget, protected vectors, scope (a registry Method instance: per-document scope).
    workers : int, optional
        Chunks reduced at once: local processes (default 1: in this process) or Ray tasks in flight (default: the
        cluster's CPUs / ``cpus_per_worker``).
    force : bool
        Replace an existing ``dst``.
    texts, tokenizer, max_length :
        Collection text in index order and the encoder's tokenizer, for ``idf`` / ``stopwords``.
    progress : callable, optional
        ``progress(docs_done, vectors_in, vectors_out)`` after each chunk.
    engine : {"local", "ray"} or Engine
        Where the chunks run (:mod:`unipruner.engines`); both run the same per-chunk function
        (:func:`~._parts.stage_chunk`) and write the same bytes. Voyager indexes (one HNSW file) run locally only.
    address, cpus_per_worker, gpus_per_worker :
        Ray only: the cluster (``"auto"``, ``"HOST:PORT"``; None: a local instance) and each task's resources.
    resume : bool
        Continue the staging directory a killed run left next to ``dst`` (same SRC and method): its finished
        chunks are kept, the others are run.

    Returns
    -------
    CompressResult

    Raises
    ------
    UniprunerError
        Bad paths, arguments or index (:class:`~.formats.IndexFormatError`); ``dst`` is then not created.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    spec = as_spec(spec)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UniprunerError(f"workers must be an int >= 1, got {workers!r}")
    index = open_index(src)  # full validation before anything is written
    _check_paths(src, dst, force)
    info = index.info()
    local = engine == "local" or isinstance(engine, LocalEngine)
    if info.format not in STAGED_FORMATS and (resume or not local):
        raise UniprunerError(f"{info.format} indexes are one monolithic file (Voyager's HNSW graph): they are "
                             "compressed on one machine; use --engine local (without --resume)")
    tokens: TokenTable | None = None
    if spec.needs_tokens:
        if texts is None or tokenizer is None:
            raise UniprunerError(f"method {spec.name!r} needs the collection text and the encoder's tokenizer "
                                 "(--corpus and --model in the CLI)")
        tokens = TokenTable.from_texts(texts, tokenizer, info.doclens, max_length=max_length)
    if info.format not in STAGED_FORMATS:
        _compress_sequential(index, info, dst, spec, tokens, workers or 1, force, progress)
        return CompressResult(info, open_index(dst).info(), spec, time.perf_counter() - t0)

    eng = engine if isinstance(engine, Engine) else make_engine(
        engine, workers=workers, address=address, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    stage, done = open_stage(dst, fingerprint(info, spec, tokens), resume)
    keep_stage = False
    try:
        job = ChunkJob(str(src.resolve()), info.format, spec, str(stage.resolve()), tokens,
                       getattr(index, "chunk_vectors", None) if info.format == "raw" else None)
        counts: list[np.ndarray | None] = [None] * info.n_chunks
        if spec.scope == "global":
            scored: dict[int, tuple[int, int, np.ndarray]] = {}
            eng.map(score_chunk, job, list(range(info.n_chunks)), scored.__setitem__)
            total = global_total(info.n_vectors, info.n_docs, spec)
            ordered = [scored[i] for i in range(info.n_chunks)]
            counts_all = global_counts(np.concatenate([s for _, _, s in ordered]) if ordered else np.zeros(0),
                                       info.doclens, total)
            counts = [counts_all[a:a + n] for a, n, _ in ordered]
            del scored, ordered
        prepare(index, stage)
        state = {"docs": sum(s["docs"] for s in done.values()), "in": sum(s["vectors_in"] for s in done.values()),
                 "out": sum(s["vectors_out"] for s in done.values())}

        def on_result(_: int, s: dict[str, Any]) -> None:
            done[s["chunk"]] = s
            state["docs"] += s["docs"]
            state["in"] += s["vectors_in"]
            state["out"] += s["vectors_out"]
            if progress is not None:
                progress(state["docs"], state["in"], state["out"])

        if progress is not None and done:
            progress(state["docs"], state["in"], state["out"])
        todo = [(i, counts[i]) for i in range(info.n_chunks) if i not in done]
        stats = eng.map(stage_chunk, job, todo, on_result)
        assemble(index, stage, check_summaries(done, info))
        commit_dir(stage / "index", dst)
    except Exception:
        raise  # an error: the staging directory goes
    except BaseException:  # interrupted (Ctrl-C): the finished chunks stay for --resume
        keep_stage = True
        raise
    finally:
        if not isinstance(engine, Engine):
            eng.close()
        if not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)
    peaks: dict[int, int] = {}
    for s in done.values():
        peaks[s["pid"]] = max(peaks.get(s["pid"], 0), s["peak_rss"])
    return CompressResult(info, open_index(dst).info(), spec, time.perf_counter() - t0, engine=eng.name,
                          workers=stats.workers, retries=stats.retries, resumed_chunks=info.n_chunks - len(todo),
                          worker_peak_rss=tuple(sorted(peaks.values())))


def _compress_sequential(index: IndexFormat, info: IndexInfo, dst: Path, spec: ReduceSpec,
                         tokens: TokenTable | None, workers: int, force: bool, progress: Progress | None) -> None:
    """Formats without independent chunk files (Voyager): chunks reduced in order (optionally in ``workers``
    processes) and fed to the format's writer on a temporary directory, renamed to ``dst`` at the end."""
    pool: ProcessPoolExecutor | None = None
    if workers > 1 and info.n_chunks > 1:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(tokens,))
    in_flight = 2 * workers
    tmp: Path | None = None
    try:
        counts_all: np.ndarray | None = None
        if spec.scope == "global":
            if pool is None:
                scores = [chunk_scores(c, spec, tokens) for c in index.chunks()]
            else:
                scores = list(_ordered_map(_score_task, ((_pack(c), spec) for c in index.chunks()), pool, in_flight))
            total = global_total(info.n_vectors, info.n_docs, spec)
            counts_all = global_counts(np.concatenate(scores) if scores else np.zeros(0), info.doclens, total)
            del scores

        def counts_of(c: Chunk) -> np.ndarray | None:
            if counts_all is None:
                return None
            return counts_all[c.doc_offset:c.doc_offset + len(c.doclens)]

        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        writer = index.writer(tmp)
        docs = n_in = n_out = 0
        if pool is None:
            results: Iterator[Chunk] = (reduce_chunk(c, spec, counts=counts_of(c), tokens=tokens)
                                        for c in index.chunks())
        else:
            packed = _ordered_map(_reduce_task, ((_pack(c), spec, counts_of(c)) for c in index.chunks()), pool,
                                  in_flight)
            results = (_unpack(p) for p in packed)
        for out in results:
            writer.write(out)
            docs += len(out.doclens)
            n_in = int(info.doclens[:docs].sum())
            n_out += int(out.vectors.shape[0])
            if progress is not None:
                progress(docs, n_in, n_out)
            del out  # release the reduced chunk before the next one is decoded
        writer.close()
        if docs != info.n_docs:
            raise UniprunerError(f"the source yielded {docs} documents but reports {info.n_docs}")
        commit_dir(tmp, dst)
        tmp = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
