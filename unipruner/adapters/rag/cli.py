"""``unipruner rag prune``: prune the retrieved contexts of a Parquet corpus, locally or on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ...errors import MissingDependencyError, UniprunerError

__all__ = ["rag_app"]

rag_app = typer.Typer(name="rag", help="Prune retrieved RAG contexts offline (Parquet in, Parquet out).",
                      no_args_is_help=True, add_completion=False)


@rag_app.callback()
def _group() -> None:
    """Prune retrieved RAG contexts offline."""


@rag_app.command("prune")
def prune_cmd(
    src: Annotated[Path, typer.Argument(help="Parquet file or directory of Parquet files (never modified).")],
    dst: Annotated[Path, typer.Argument(help="Output directory (part-*.parquet + _manifest.json, written "
                                             "atomically).")],
    method: Annotated[str, typer.Option(help="A registry method of the rag domain (`unipruner methods --domain "
                                             "rag`): multihop, bm25, idf, hybrid, query_similarity, ...")
                      ] = "multihop",
    ratio: Annotated[float | None, typer.Option(help="Fraction of each row's tokens kept (default 0.25).")] = None,
    keep: Annotated[int | None, typer.Option(help="Tokens kept per row.")] = None,
    granularity: Annotated[str, typer.Option(help="sentence, token or chunk.")] = "sentence",
    scope: Annotated[str, typer.Option(help="global (one budget over a row's contexts) or document.")
                     ] = "global",
    id_column: Annotated[str, typer.Option(help="Column of unique row ids.")] = "id",
    query_column: Annotated[str, typer.Option(help="Column of queries.")] = "query",
    contexts_column: Annotated[str, typer.Option(help="Column of contexts: a list of strings or of {text, title}.")
                               ] = "contexts",
    engine: Annotated[str, typer.Option(help="local (this process) or ray (Ray Data actor pool; pip install "
                                             "'unipruner[ray]'); both write the same bytes.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto, HOST:PORT or ray://HOST:10001.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray: actors (default and cap: the cluster's CPUs minus one).")
                       ] = None,
    cpus_per_worker: Annotated[float, typer.Option(help="Ray: CPUs per actor.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Rows per batch and per output part.")] = 256,
    resume: Annotated[bool, typer.Option(help="Continue a killed run: batches already written are kept (by id).")
                      ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing DST.")] = False,
) -> None:
    """Prune every row's contexts of SRC to a token budget and write them, with per-row stats, to DST."""
    console = Console()
    try:
        from rich.progress import Progress, TextColumn, TimeElapsedColumn

        from ._batch import PruneJob, prune_parquet

        if ratio is not None and keep is not None:
            raise UniprunerError("give --ratio or --keep, not both")
        job = PruneJob(method, ratio=0.25 if ratio is None and keep is None else ratio, keep=keep,
                       granularity=granularity, scope=scope, id_col=id_column, query_col=query_column,
                       contexts_col=contexts_column)
        with Progress(TextColumn("[bold]prune"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("prune", info="")
            import time

            t0 = time.perf_counter()

            def tick(rows: int, before: int, after: int) -> None:
                bar.update(task, info=f"{rows:,} rows, {rows / max(time.perf_counter() - t0, 1e-9):,.1f} rows/s, "
                                      f"tokens {before:,} -> {after:,}")

            res = prune_parquet(src, dst, job, engine=engine, address=address, workers=workers,
                                cpus_per_worker=cpus_per_worker, batch_size=batch_size, resume=resume,
                                force=force, progress=tick)
    except (UniprunerError, MissingDependencyError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from err
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    t = Table(title=f"{src} -> {dst} ({method}, {res.seconds:.1f} s, {res.rows_per_s:,.1f} rows/s; engine "
                    f"{res.engine}, {res.workers} workers, {res.resumed_batches} of {res.batches} batches resumed)")
    for col in ("", "before", "after", "kept"):
        t.add_column(col, justify="right")
    t.add_row("rows", f"{res.rows:,}", f"{res.rows:,}", "")
    t.add_row("documents", f"{res.documents_before:,}", f"{res.documents_after:,}",
              f"{res.documents_after / max(res.documents_before, 1):.1%}")
    t.add_row("tokens", f"{res.tokens_before:,}", f"{res.tokens_after:,}",
              f"{res.tokens_after / max(res.tokens_before, 1):.1%}")
    console.print(t)
