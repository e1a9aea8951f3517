"""The ``unipruner demo`` ColBERT section: compress a small Cranfield index and compare nDCG@10 before/after."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["CRANFIELD_SMALL", "demo_section", "demo_subset"]

#: judged queries used by the demo, and the size of its small index
N_QUERIES = 30
N_DOCS = 300

#: the Cranfield cut bundled with the package (BEIR layout + ``cranqrel.readme``; see its README.md), made by
#: ``scripts/make_cranfield_fixture.py``: the demo and the tests read it, never anything outside the repository
CRANFIELD_SMALL = Path(__file__).resolve().parents[2] / "data" / "cranfield_small"


def _data_dir() -> Path:
    from ...errors import UniprunerError

    if not (CRANFIELD_SMALL / "qrels" / "test.tsv").is_file():
        raise UniprunerError(f"the Cranfield data bundled with unipruner is missing from {CRANFIELD_SMALL}: "
                             "reinstall the package")
    return CRANFIELD_SMALL


def demo_subset(data: Any, n_queries: int = N_QUERIES, n_docs: int = N_DOCS) -> Any:
    """A small BEIR subset: the first ``n_queries`` judged queries, their judged documents, then other documents in
    file order up to ``n_docs`` (Cranfield, Cleverdon 1967)."""
    from ._eval import BeirData

    qids = data.query_ids[:n_queries]
    wanted = {d for q in qids for d, g in data.qrels[q].items() if g > 0}
    pick = [i for i, d in enumerate(data.doc_ids) if d in wanted]
    rest = [i for i, d in enumerate(data.doc_ids) if d not in wanted]
    pick = sorted(pick + rest[: max(0, n_docs - len(pick))])
    return BeirData([data.doc_ids[i] for i in pick], [data.doc_texts[i] for i in pick], qids,
                    data.query_texts[:n_queries], {q: data.qrels[q] for q in qids})


def demo_section(console: Any, ratio: float) -> None:
    """Build a small Cranfield index of all-MiniLM-L6-v2 token vectors, compress it, and compare.

    Rows: the full index; Ward token pooling with pool factor 2 (Clavié et al. 2024); IDF pruning keeping ``ratio``
    of the vectors (Lassance et al. 2021). Each compressed index is written by the real pipeline
    (``unipruner colbert compress``) into a temporary directory and searched by exact MaxSim. Runs on at most two
    threads; the caller's thread setting comes back afterwards.
    """
    import torch

    from ..._threads import limit_threads

    with limit_threads(min(2, torch.get_num_threads())):
        _demo(console, ratio)


def _demo(console: Any, ratio: float) -> None:
    from rich.table import Table

    from ._compress import compress, open_index
    from ._eval import encode_tokens, evaluate_index, load_beir, load_encoder
    from ._methods import ReduceSpec
    from .formats.raw import write_raw

    ratio = min(max(float(ratio), 0.05), 1.0)
    console.rule("[bold]colbert: compress an existing multi-vector index of Cranfield (MiniLM token vectors)")
    t0 = time.perf_counter()
    data = demo_subset(load_beir(_data_dir()))
    model = load_encoder("minilm")
    docs = encode_tokens(model, data.doc_texts)
    queries = encode_tokens(model, data.query_texts)
    console.print(f"{len(docs)} documents, {sum(d.shape[0] for d in docs):,} token vectors (dim {docs[0].shape[1]}),"
                  f" {len(queries)} judged queries; encoded in {time.perf_counter() - t0:.0f} s")
    with tempfile.TemporaryDirectory(prefix="unipruner-colbert-demo-") as tmp:
        src = write_raw(Path(tmp) / "index", docs, ids=data.doc_ids, dtype="float16")
        base = evaluate_index(open_index(src), data, queries)
        info = open_index(src).info()
        table = Table()
        for col in ("index", "vectors", "bytes", "nDCG@10", "retention", "recall@100", "seconds"):
            table.add_column(col, justify="left" if col == "index" else "right")
        table.add_row("full", f"{info.n_vectors:,}", f"{info.n_bytes / 1e6:.2f} MB", f"{base.ndcg10:.4f}", "100%",
                      f"{base.recall100:.3f}", "")
        runs = (("ward_cosine pool factor 2", ReduceSpec("ward_cosine_pool", factor=2, protected=1)),
                (f"idf pruning, keep {ratio:.0%}", ReduceSpec("idf", ratio=ratio, protected=1)))
        for i, (label, spec) in enumerate(runs):
            t1 = time.perf_counter()
            res = compress(src, Path(tmp) / f"out{i}", spec, texts=data.doc_texts, tokenizer=model.tokenizer,
                           max_length=int(model.max_seq_length))
            dt = time.perf_counter() - t1
            ev = evaluate_index(open_index(Path(tmp) / f"out{i}"), data, queries)
            table.add_row(label, f"{res.dst.n_vectors:,} ({res.dst.n_vectors / info.n_vectors:.0%})",
                          f"{res.dst.n_bytes / 1e6:.2f} MB", f"{ev.ndcg10:.4f}", f"{ev.ndcg10 / base.ndcg10:.1%}",
                          f"{ev.recall100:.3f}", f"{dt:.1f}")
        console.print(table)
    console.print("[dim]float16 raw index; exact MaxSim search; the same from the shell: unipruner colbert compress "
                  "SRC DST --method ward_cosine_pool --factor 2 --protected 1, then unipruner colbert eval.[/]")
