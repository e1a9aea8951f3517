"""Offline pruning of a RAG corpus: Parquet in, Parquet out, on this machine or on Ray Data.

``unipruner rag prune SRC DST`` reads rows of (id, query, retrieved contexts) from Parquet, prunes every row's
contexts with :class:`~._pruner.ContextPruner` (query-aware context pruning as in Provence, Chirkova et al., ICLR
2025, and LongLLMLingua, Jiang et al., ACL 2024), and writes the pruned contexts plus per-row statistics. The unit of
work is a *batch*: rows ``[k * batch_size, (k + 1) * batch_size)`` of SRC in file order; batch ``k`` becomes
``DST/part-{k:05d}.parquet`` (``_manifest.json`` last). The per-batch function :func:`prune_table` is the same on
both engines:

* ``engine="local"``: batches read with pyarrow and pruned in this process;
* ``engine="ray"``: ``ray.data.read_parquet`` -> ``map_batches`` over an actor pool (:class:`_PrunerActor`, one
  pruner per actor, built once), order preserved; the actor pool leaves one CPU of the cluster free for the read
  tasks (an actor pool that takes every CPU starves them: ray#44687) and Ray Data's no-progress timeout turns a hang
  into an error.

The driver writes the parts (the pruned rows, re-cut to the batch boundaries, in a fixed schema), so both engines
write the same bytes. Commit: everything goes to ``.DST.tmp-XXXX`` next to DST, ``_manifest.json`` last, then one
rename. Resume: parts are written atomically and hold their rows' ids; ``resume=True`` keeps every batch whose part
exists with the expected ids and prunes only the other rows.

Input columns (named by ``columns``): id (string or integer, unique), query (string), contexts (a list of strings,
or of ``{text, title}`` structs). Output: the same three columns (contexts pruned, in the input's form; dropped
documents left out), plus ``dropped`` (input positions of dropped documents), ``tokens_before``, ``tokens_after``,
``documents_before``, ``documents_after``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...engines import commit_dir
from ...errors import MissingDependencyError, UniprunerError
from ...select import Budget

__all__ = ["BatchResult", "PruneJob", "prune_parquet", "prune_table"]

_STATS = ("tokens_before", "tokens_after", "documents_before", "documents_after")


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.compute
        import pyarrow.parquet  # both register themselves on pa
    except ImportError as err:
        raise MissingDependencyError("Parquet input needs pyarrow: pip install 'unipruner[ray]'") from err
    return pa


@dataclass(frozen=True)
class PruneJob:
    """What every worker needs to build its pruner and read a batch (shipped once per worker).

    Attributes
    ----------
    scorer : str
        A registry method of the ``rag`` domain (``unipruner methods --domain rag``).
    ratio, keep : float or int, optional
        The budget (fraction of tokens kept, or tokens kept per row); one of them.
    granularity, scope : str
        As :class:`~._pruner.ContextPruner`.
    id_col, query_col, contexts_col : str
        Column names.
    """

    scorer: str = "multihop"
    ratio: float | None = 0.25
    keep: int | None = None
    granularity: str = "sentence"
    scope: str = "global"
    id_col: str = "id"
    query_col: str = "query"
    contexts_col: str = "contexts"

    def budget(self) -> Budget:
        return Budget(keep=self.keep) if self.keep is not None else Budget(ratio=self.ratio)

    def pruner(self) -> Any:
        from ._pruner import ContextPruner

        return ContextPruner(self.scorer, self.budget(), granularity=self.granularity, scope=self.scope)


def _out_schema(job: PruneJob, id_type: Any, structured: bool) -> Any:
    pa = _pa()
    ctx = pa.list_(pa.struct([("text", pa.string()), ("title", pa.string())])) if structured else pa.list_(pa.string())
    return pa.schema([(job.id_col, id_type), (job.query_col, pa.string()), (job.contexts_col, ctx),
                      ("dropped", pa.list_(pa.int64())), *((s, pa.int64()) for s in _STATS)])


def _structured(contexts_type: Any) -> bool:
    pa = _pa()
    if not (pa.types.is_list(contexts_type) or pa.types.is_large_list(contexts_type)):
        raise UniprunerError(f"the contexts column must be a list of strings or of {{text, title}} structs, got "
                             f"{contexts_type}")
    v = contexts_type.value_type
    if pa.types.is_string(v) or pa.types.is_large_string(v):
        return False
    if pa.types.is_struct(v) and v.get_field_index("text") >= 0:
        return True
    raise UniprunerError(f"the contexts column must hold strings or {{text, title}} structs, got {v}")


def prune_table(job: PruneJob, table: Any, pruner: Any = None) -> Any:
    """Prune every row of a pyarrow table (the per-batch function of both engines); returns the output table."""
    pa = _pa()
    pruner = job.pruner() if pruner is None else pruner
    for c in (job.id_col, job.query_col, job.contexts_col):
        if c not in table.column_names:
            raise UniprunerError(f"column {c!r} is missing (columns: {', '.join(table.column_names)}); name the "
                                 "columns with --id-column / --query-column / --contexts-column")
    structured = _structured(table.schema.field(job.contexts_col).type)
    rows: dict[str, list[Any]] = {k: [] for k in (job.id_col, job.query_col, job.contexts_col, "dropped", *_STATS)}
    for rid, query, contexts in zip(table.column(job.id_col).to_pylist(), table.column(job.query_col).to_pylist(),
                                    table.column(job.contexts_col).to_pylist(), strict=True):
        if rid is None or query is None or not contexts:
            raise UniprunerError(f"row {rid!r}: id, query and at least one context are required")
        docs: list[Any] = ([{"text": c["text"], "metadata": {"title": c.get("title") or ""}} for c in contexts]
                           if structured else list(contexts))
        try:
            res = pruner.prune(query, docs)
        except UniprunerError as err:
            raise UniprunerError(f"row {rid!r}: {err}") from err
        kept = [{"text": d.text, "title": contexts[d.index].get("title")} if structured else d.text
                for d in res.documents]
        st = res.stats
        for k, v in ((job.id_col, rid), (job.query_col, query), (job.contexts_col, kept),
                     ("dropped", list(res.dropped)), ("tokens_before", st.tokens_before),
                     ("tokens_after", st.tokens_after), ("documents_before", st.documents_before),
                     ("documents_after", st.documents_after)):
            rows[k].append(v)
    return pa.table(rows, schema=_out_schema(job, table.schema.field(job.id_col).type, structured))


class _PrunerActor:
    """Ray Data actor: builds the pruner once, prunes each batch (``map_batches(..., compute=ActorPoolStrategy)``)."""

    def __init__(self, job: PruneJob) -> None:
        self.job = job
        self.pruner = job.pruner()

    def __call__(self, table: Any) -> Any:
        return prune_table(self.job, table, self.pruner)


@dataclass(frozen=True)
class BatchResult:
    """What :func:`prune_parquet` did: rows, batches (resumed ones too), tokens and documents before/after."""

    dst: Path
    rows: int
    batches: int
    resumed_batches: int
    tokens_before: int
    tokens_after: int
    documents_before: int
    documents_after: int
    seconds: float
    engine: str
    workers: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.parquet") if not any(x.startswith((".", "_")) for x in
                                                                    p.relative_to(src).parts))
        if files:
            return files
    raise UniprunerError(f"{src}: not a Parquet file or a directory of .parquet files")


def _read_batches(files: list[Path], columns: list[str], size: int) -> Iterator[Any]:
    """Tables of ``size`` rows (the last one shorter) across ``files`` in order."""
    pa = _pa()
    buf: list[Any] = []
    n = 0
    for f in files:
        for b in pa.parquet.ParquetFile(f).iter_batches(batch_size=size, columns=columns):
            buf.append(b)
            n += b.num_rows
            while n >= size:
                t = pa.Table.from_batches(buf)
                yield t.slice(0, size)
                rest = t.slice(size)
                buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf)


def prune_parquet(src: Path | str, dst: Path | str, job: PruneJob | None = None, *, engine: str = "local",
                  address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                  batch_size: int = 256, resume: bool = False, force: bool = False,
                  no_progress_s: float = 600.0,
                  progress: Callable[[int, int, int], None] | None = None) -> BatchResult:
    """Prune the contexts of every row of the Parquet data ``src`` into the Parquet directory ``dst``.

    Parameters
    ----------
    src : Path or str
        A Parquet file or a directory of them (read in sorted path order).
    dst : Path or str
        Directory to create: ``part-{k:05d}.parquet`` per batch and ``_manifest.json`` (``pyarrow.parquet.read_table
        (dst)`` reads it as one table).
    job : PruneJob
        Method, budget and column names (default: multihop at ratio 0.25, columns id / query / contexts).
    engine : {"local", "ray"}
    address, workers, cpus_per_worker :
        Ray: the cluster, the actor pool's size (default and cap: the cluster's CPUs minus one, / cpus_per_worker)
        and each actor's CPUs.
    batch_size : int
        Rows per batch (and per output part).
    resume : bool
        Continue a killed run's staging directory: batches whose part exists are kept.
    force : bool
        Replace an existing ``dst``.
    no_progress_s : float
        Ray Data's no-progress timeout (a hang becomes an error).
    progress : callable, optional
        ``progress(rows_done, tokens_before, tokens_after)`` after every batch.

    Returns
    -------
    BatchResult
    """
    t0 = time.perf_counter()
    pa = _pa()
    job = PruneJob() if job is None else job
    job.pruner()  # validate method and budget before reading anything
    src, dst = Path(src), Path(dst)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UniprunerError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if engine not in ("local", "ray"):
        raise UniprunerError(f"unknown engine {engine!r}; choose local or ray")
    files = _files(src)
    if dst.exists() and not force:
        raise UniprunerError(f"DST {dst} already exists; choose another path or pass --force")
    if not dst.parent.is_dir():
        raise UniprunerError(f"the parent directory of DST ({dst.parent}) does not exist; create it first")
    columns = [job.id_col, job.query_col, job.contexts_col]
    for f in files:
        head = pa.parquet.read_schema(f)
        for c in columns:
            if c not in head.names:
                raise UniprunerError(f"column {c!r} is missing from {f} (columns: {', '.join(head.names)}); name "
                                     "the columns with --id-column / --query-column / --contexts-column")
    head = pa.parquet.read_schema(files[0])
    schema = _out_schema(job, head.field(job.id_col).type, _structured(head.field(job.contexts_col).type))
    ids = pa.concat_arrays([pa.parquet.read_table(f, columns=[job.id_col]).column(0).combine_chunks()
                            for f in files]).to_pylist() if files else []
    if len(set(ids)) != len(ids) or any(i is None for i in ids):
        raise UniprunerError(f"column {job.id_col!r} must hold unique, non-null ids (resume works by id)")
    n_batches = -(-len(ids) // batch_size)
    fp = {"src": [str(f.resolve()) for f in files], "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
          "job": repr(job), "batch_size": batch_size}
    stage, done = _open_stage(dst, fp, resume, ids, batch_size, job.id_col)
    totals = dict.fromkeys(_STATS, 0)
    rows_done = 0


    def write(k: int, table: Any) -> None:
        table = table.cast(schema)  # one schema for both engines (Ray Data may widen string types)
        out = stage / f"part-{k:05d}.parquet"
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=stage)
        os.close(fd)
        try:
            pa.parquet.write_table(table, tmp)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _count(table)

    def _count(table: Any) -> None:
        nonlocal rows_done
        rows_done += table.num_rows
        for s in _STATS:
            totals[s] += int(pa.compute.sum(table.column(s)).as_py() or 0)
        if progress is not None:
            progress(rows_done, totals["tokens_before"], totals["tokens_after"])

    for k in sorted(done):
        _count(pa.parquet.read_table(stage / f"part-{k:05d}.parquet", columns=list(_STATS)))
    todo = [k for k in range(n_batches) if k not in done]
    keep_stage = False
    n_workers = 1
    notes: list[str] = []
    try:
        if engine == "local":
            if workers not in (None, 1):
                raise UniprunerError("rag prune --engine local runs in this process; use --engine ray for workers")
            pruner = job.pruner()
            todo_set = set(todo)
            for k, table in enumerate(_read_batches(files, columns, batch_size)):
                if k in todo_set:
                    write(k, prune_table(job, table, pruner))
        elif todo:
            n_workers = _run_ray(files, job, todo, done, ids, batch_size, address, workers, cpus_per_worker,
                                 no_progress_s, write, notes)
        manifest = {"format": "unipruner-rag-pruned", "version": 1, "rows": len(ids), "batches": n_batches,
                    "batch_size": batch_size, "job": repr(job), **totals}
        (stage / "job.json").unlink()
        tmp_manifest = stage / ".manifest.json.tmp"  # "_" and "." names: pyarrow reads DST as one dataset
        tmp_manifest.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp_manifest, stage / "_manifest.json")
        commit_dir(stage, dst)
    except Exception:
        raise  # an error: the staging directory goes
    except BaseException:  # interrupted: the finished parts stay for resume
        keep_stage = True
        raise
    finally:
        if not keep_stage and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return BatchResult(dst, len(ids), n_batches, len(done), totals["tokens_before"], totals["tokens_after"],
                       totals["documents_before"], totals["documents_after"], time.perf_counter() - t0, engine,
                       n_workers, tuple(notes))


def _open_stage(dst: Path, fp: dict[str, Any], resume: bool, ids: list[Any], batch_size: int,
                id_col: str) -> tuple[Path, set[int]]:
    """The staging directory (continued with ``resume`` when its job matches) and the batches done in it."""
    pa = _pa()
    if resume:
        for d in sorted(dst.parent.glob(f".{dst.name}.tmp-*"), key=lambda d: -d.stat().st_mtime):
            try:
                if json.loads((d / "job.json").read_text(encoding="utf-8")) != fp:
                    continue
            except (OSError, ValueError):
                continue
            done = set()
            for part in d.glob("part-*.parquet"):
                k = int(part.stem.split("-")[1])
                try:
                    got = pa.parquet.read_table(part, columns=[id_col]).column(0).to_pylist()
                except (OSError, pa.ArrowException):
                    continue
                if got == ids[k * batch_size:(k + 1) * batch_size]:  # resumable by id
                    done.add(k)
            return d, done
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    (stage / "job.json").write_text(json.dumps(fp), encoding="utf-8")
    return stage, set()


def _user_error(err: BaseException) -> UniprunerError | None:
    """The UniprunerError a Ray (Data) error wraps, if any (``cause`` of a RayTaskError, or the ``__cause__``
    chain)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, UniprunerError):
            return e
        seen.add(id(e))
        nxt = getattr(e, "cause", None)
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)
    return None


def _run_ray(files: list[Path], job: PruneJob, todo: list[int], done: set[int], ids: list[Any], batch_size: int,
             address: str | None, workers: int | None, cpus_per_worker: float, no_progress_s: float,
             write: Callable[[int, Any], None], notes: list[str]) -> int:
    """Ray Data: read_parquet -> map_batches(actor pool) in order; the driver cuts the stream into the batches."""
    from ...engines import RayEngine

    pa = _pa()
    eng = RayEngine(address=address, cpus_per_worker=cpus_per_worker)
    ray = eng.connect()
    try:
        import ray.data
        from ray.data import ActorPoolStrategy, DataContext

        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        cap = max(1, int((cpus - 1) // cpus_per_worker)) if cpus_per_worker > 0 else (workers or 1)
        size = cap if workers is None else min(workers, cap)
        if workers is not None and workers > cap:
            notes.append(f"{workers} workers asked, {cap} used: one CPU of the cluster stays free for the read "
                         "tasks (an actor pool on every CPU starves them)")
        ctx = DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.execution_no_progress_timeout_s,
                 ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True
        ctx.execution_no_progress_timeout_s = no_progress_s
        ctx.enable_progress_bars = False
        try:
            ds = ray.data.read_parquet([str(f) for f in files]).select_columns(
                [job.id_col, job.query_col, job.contexts_col])
            if done:
                skip = {i for k in done for i in ids[k * batch_size:(k + 1) * batch_size]}
                ds = ds.filter(lambda row: row[job.id_col] not in skip)
            ds = ds.map_batches(_PrunerActor, fn_constructor_args=(job,), compute=ActorPoolStrategy(size=size),
                                batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus_per_worker)
            sizes = [min(batch_size, len(ids) - k * batch_size) for k in todo]
            buf: list[Any] = []
            n = 0
            queue = list(zip(todo, sizes, strict=True))
            for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                buf.append(b)
                n += b.num_rows
                while queue and n >= queue[0][1]:
                    k, m = queue.pop(0)
                    t = pa.concat_tables(buf)
                    write(k, t.slice(0, m))
                    rest = t.slice(m)
                    buf, n = [rest], rest.num_rows
            if queue:
                raise UniprunerError(f"Ray returned {len(todo) - len(queue)} of {len(todo)} batches")
        finally:
            (ctx.execution_options.preserve_order, ctx.execution_no_progress_timeout_s,
             ctx.enable_progress_bars) = saved
    except Exception as err:
        user = _user_error(err)
        if user is not None and user is not err:
            raise UniprunerError(str(user)) from err
        raise
    finally:
        eng.close()
    return size
