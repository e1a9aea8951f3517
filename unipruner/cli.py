"""The ``unipruner`` command line (typer + rich)."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .adapters.colbert.cli import colbert_app
from .adapters.rag.cli import rag_app
from .errors import MissingDependencyError, UniprunerError
from .methods import DOMAINS, FAMILIES, methods

app = typer.Typer(
    name="unipruner",
    help="Token pruning and merging for ViTs, VLMs, KV caches, RAG, ColBERT and diffusion.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(colbert_app, name="colbert")
app.add_typer(rag_app, name="rag")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unipruner {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """unipruner: score -> select -> reduce, one core for six domains."""


@app.command("methods")
def methods_cmd(
    family: Annotated[str | None, typer.Option(help=f"Only this family: {', '.join(FAMILIES)}.")] = None,
    domain: Annotated[str | None, typer.Option(
        help=f"Only the methods this domain accepts: {', '.join(DOMAINS)}.")] = None,
) -> None:
    """List the registered methods: family, domains, what each does, what it needs and its paper.

    ``--domain D`` lists exactly the methods ``unipruner.D`` accepts.
    """
    console = Console()
    try:
        rows = methods(family=family, domain=domain)
    except UniprunerError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from err
    title = f"unipruner methods ({len(rows)})" + (f" for {domain}" if domain else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("method / family", no_wrap=True)
    table.add_column("domains", max_width=12)
    table.add_column("what it does · needs · paper", ratio=1)
    for m in rows:
        needs = ", ".join(m.requires) or "tokens"
        where = "all" if set(m.domains) == set(DOMAINS) else ", ".join(m.domains)
        table.add_row(f"[bold]{m.name}[/]\n[dim]{m.family}[/]", where,
                      f"{escape(m.summary)}\n[dim]needs {escape(needs)} · {escape(m.paper)}[/]")
    console.print(table)


@app.command()
def demo(
    ratio: Annotated[float, typer.Option(help="Fraction of tokens kept.", min=0.0, max=1.0)] = 0.25,
    section: Annotated[list[str] | None, typer.Option(help="Run only these sections.")] = None,
) -> None:
    """Run the main job on the bundled offline models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .demo import run

    try:  # the demo prints its own tables; weight-loading progress bars only add noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    console = Console()
    try:
        run(console, ratio=ratio, sections=section)
    except (MissingDependencyError, UniprunerError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from err


if __name__ == "__main__":  # pragma: no cover
    app()
