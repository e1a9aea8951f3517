"""``unipruner colbert inspect | compress | eval``: compress an existing multi-vector index from the shell.

Heavy modules (torch, faiss, sentence-transformers) are imported inside the commands, so ``unipruner --help``
stays fast.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ...errors import MissingDependencyError, UniprunerError

__all__ = ["colbert_app"]

colbert_app = typer.Typer(
    name="colbert",
    help="Compress existing ColBERT / PLAID / PyLate / raw multi-vector indexes (token pooling and pruning).",
    no_args_is_help=True,
    add_completion=False,
)


class Grades(str, Enum):
    """``--grades`` choices (:data:`unipruner.adapters.colbert._eval.GRADES`)."""

    relevance = "relevance"
    cleverdon = "cleverdon"


def _fail(console: Console, err: BaseException) -> typer.Exit:
    console.print(f"[red]error:[/] {err}")
    return typer.Exit(2)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _histogram(doclens: Any, bins: int = 10) -> list[tuple[str, int]]:
    import numpy as np

    if doclens.size == 0:
        return []
    lo, hi = int(doclens.min()), int(doclens.max())
    edges = np.unique(np.linspace(lo, hi + 1, bins + 1).astype(np.int64))
    counts, _ = np.histogram(doclens, bins=edges)
    return [(f"{int(a)}-{int(b) - 1}", int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)]


@colbert_app.command("inspect")
def inspect_cmd(
    src: Annotated[Path, typer.Argument(help="Index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show an index's format, documents, vectors, dimension, bytes and vectors per document."""
    console = Console()
    try:
        from ._compress import open_index

        info = open_index(src).info()
    except (UniprunerError, MissingDependencyError) as err:
        raise _fail(console, err) from err
    d = info.doclens
    vp = {"min": int(d.min()) if d.size else 0, "mean": float(d.mean()) if d.size else 0.0,
          "max": int(d.max()) if d.size else 0}
    hist = _histogram(d)
    summary: dict[str, Any] = {
               "format": info.format, "path": str(info.path), "documents": info.n_docs, "vectors": info.n_vectors,
               "dim": info.dim, "bytes": info.n_bytes, "chunks": info.n_chunks,
               "vectors_per_doc": vp, "histogram": hist, "details": info.details}
    if as_json:
        typer.echo(json.dumps(summary, default=str, indent=1))
        return
    t = Table(title=f"{info.path} ({info.format})", show_header=False)
    t.add_row("documents", f"{info.n_docs:,}")
    t.add_row("vectors", f"{info.n_vectors:,}")
    t.add_row("dimension", str(info.dim))
    t.add_row("bytes on disk", f"{_human(info.n_bytes)} ({info.n_bytes:,})")
    t.add_row("chunks", str(info.n_chunks))
    t.add_row("vectors / document", f"min {vp['min']}, mean {vp['mean']:.1f}, max {vp['max']}")
    for k, v in info.details.items():
        t.add_row(str(k), str(v))
    console.print(t)
    h = Table(title="vectors per document")
    h.add_column("vectors")
    h.add_column("documents", justify="right")
    h.add_column("")
    top = max((c for _, c in hist), default=1) or 1
    for label, c in hist:
        h.add_row(label, str(c), "█" * round(30 * c / top))
    console.print(h)


@colbert_app.command("compress")
def compress_cmd(
    src: Annotated[Path, typer.Argument(help="Source index directory (never modified).")],
    dst: Annotated[Path, typer.Argument(help="Destination directory (written atomically).")],
    method: Annotated[str, typer.Option(help="A registry method for ColBERT (`unipruner methods --domain colbert`): "
                                             "ward_cosine_pool (PyLate's pooling criterion; the best retention on "
                                             "Cranfield), ward_pool, kmeans_pool, sequential_pool, first, "
                                             "hidden_norm, duplicates, divprune, centroid, idf, stopwords, ...")
                      ] = "ward_cosine_pool",
    factor: Annotated[float | None, typer.Option(help="Pool factor: about n/F vectors remain.")] = None,
    ratio: Annotated[float | None, typer.Option(help="Fraction of vectors kept, in (0, 1].")] = None,
    keep: Annotated[int | None, typer.Option(help="Vectors kept per document.")] = None,
    protected: Annotated[int, typer.Option(help="Leading vectors of each document kept unchanged.")] = 0,
    scope: Annotated[str, typer.Option(help="document, or global (one budget over the index, by score).")
                     ] = "document",
    workers: Annotated[int | None, typer.Option(
        help="Chunks reduced at once: local processes (default 1) or Ray tasks (default: the cluster's CPUs / "
             "--cpus-per-worker).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing DST.")] = False,
    engine: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster; pip install "
                                             "'unipruner[ray]'); both write the same bytes. Voyager: local only.")
                      ] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: "
                                                     "a local Ray instance).")] = None,
    cpus_per_worker: Annotated[float, typer.Option(help="Ray: CPUs of each chunk task (its torch threads).")
                               ] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(help="Ray: GPUs of each chunk task.")] = 0.0,
    resume: Annotated[bool, typer.Option(help="Continue the run a killed driver left next to DST (same SRC and "
                                              "method): finished chunks are kept.")] = False,
    corpus: Annotated[Path | None, typer.Option(help="corpus.jsonl (BEIR) for idf / stopwords.")] = None,
    model: Annotated[str, typer.Option(help="Encoder whose tokenizer built the index (idf / stopwords).")
                     ] = "minilm",
    seed: Annotated[int, typer.Option(help="Seed of kmeans_pool / random.")] = 0,
    backend: Annotated[str | None, typer.Option(help="k-means solver of kmeans_pool: torch (default) or faiss.")
                       ] = None,
) -> None:
    """Reduce every document of SRC and write an index of the same format to DST."""
    console = Console()
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ._compress import compress, open_index
        from ._methods import ReduceSpec

        if factor is None and ratio is None and keep is None:
            factor = 2.0
        spec = ReduceSpec(method, factor=factor, ratio=ratio, keep=keep, protected=protected, scope=scope,
                          seed=seed)
        if backend is not None:
            import dataclasses

            if "backend" not in {f.name for f in dataclasses.fields(spec.reducer)}:
                raise UniprunerError(f"--backend is a setting of kmeans_pool; {spec.name!r} has none")
            params: dict[str, Any] = {"backend": backend}
            spec = ReduceSpec(dataclasses.replace(spec.reducer, **params), scope=scope)
        texts = tokenizer = max_length = None
        if spec.needs_tokens:
            if corpus is None:
                raise UniprunerError(f"--method {method} needs --corpus (the collection text) and --model")
            from ._eval import corpus_texts, load_encoder

            texts = corpus_texts(corpus, open_index(src).doc_ids())
            enc = load_encoder(model)
            tokenizer, max_length = enc.tokenizer, int(enc.max_seq_length)
        from ._compress import _check_paths

        n_docs = open_index(src).info().n_docs  # validate SRC and DST before the progress bar starts
        _check_paths(src, dst, force)
        with Progress(TextColumn("[bold]compress"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                      transient=False) as bar:
            task = bar.add_task("compress", total=n_docs, rate="")
            import time

            t0 = time.perf_counter()

            def tick(done: int, n_in: int, n_out: int) -> None:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=done, rate=f"{rate:,.0f} docs/s, vectors {n_in:,} -> {n_out:,}")

            res = compress(src, dst, spec, workers=workers, force=force, texts=texts, tokenizer=tokenizer,
                           max_length=max_length, progress=tick, engine=engine, address=address,
                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, resume=resume)
    except (UniprunerError, MissingDependencyError) as err:
        raise _fail(console, err) from err
    t = Table(title=f"{res.src.format}: {src} -> {dst} ({spec.name}, {res.seconds:.1f} s, "
                    f"{res.docs_per_s:,.0f} docs/s; engine {res.engine}, {res.workers} workers, "
                    f"{res.retries} retries, {res.resumed_chunks} chunks resumed)")
    for col in ("", "before", "after", "kept"):
        t.add_column(col, justify="right")
    t.add_row("documents", f"{res.src.n_docs:,}", f"{res.dst.n_docs:,}", "")
    t.add_row("vectors", f"{res.src.n_vectors:,}", f"{res.dst.n_vectors:,}",
              f"{res.dst.n_vectors / max(res.src.n_vectors, 1):.1%}")
    t.add_row("bytes", _human(res.src.n_bytes), _human(res.dst.n_bytes),
              f"{res.dst.n_bytes / max(res.src.n_bytes, 1):.1%}")
    console.print(t)


@colbert_app.command("eval")
def eval_cmd(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    corpus: Annotated[Path, typer.Option(help="corpus.jsonl or a BEIR dataset directory.")],
    queries: Annotated[Path | None, typer.Option(help="queries.jsonl (default: next to the corpus).")] = None,
    qrels: Annotated[Path | None, typer.Option(help="qrels TSV (default: qrels/test.tsv next to the corpus).")
                     ] = None,
    model: Annotated[str, typer.Option(help="Query encoder: 'minilm' or a sentence-transformers directory.")
                     ] = "minilm",
    grades: Annotated[Grades | None, typer.Option(
        help="qrels scores: 'relevance' (BEIR, higher is better) or 'cleverdon' (Cranfield codes, 1 = complete "
             "answer, gain 5 - code). Default: cleverdon if the dataset has cranqrel.readme, else relevance.")
                      ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """nDCG@10, recall@100 and MRR@10 of exact MaxSim search over INDEX."""
    console = Console()
    try:
        from ._compress import open_index
        from ._eval import encode_tokens, evaluate_index, load_beir, load_encoder

        idx = open_index(index)
        base = corpus if corpus.is_dir() else corpus.parent
        data = load_beir(corpus, queries if queries is not None else base / "queries.jsonl",
                         qrels if qrels is not None else base / "qrels" / "test.tsv",
                         grades=grades.value if grades is not None else None)
        enc = load_encoder(model)
        res = evaluate_index(idx, data, encode_tokens(enc, data.query_texts))
    except (UniprunerError, MissingDependencyError) as err:
        raise _fail(console, err) from err
    info = idx.info()
    out = {"index": str(index), "format": info.format, "documents": info.n_docs, "vectors": info.n_vectors,
           "bytes": info.n_bytes, "grades": data.grades, **res.as_dict()}
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    t = Table(title=f"{index} ({info.format}, {info.n_vectors:,} vectors, {res.n_queries} queries, "
                    f"{data.grades} grades)")
    for col in ("nDCG@10", "recall@100", "MRR@10"):
        t.add_column(col, justify="right")
    t.add_row(f"{res.ndcg10:.4f}", f"{res.recall100:.4f}", f"{res.mrr10:.4f}")
    console.print(t)
