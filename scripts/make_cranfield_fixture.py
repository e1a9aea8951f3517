"""Cut the small Cranfield collection bundled with unipruner (``unipruner/data/cranfield_small/``).

Run with the project's venv, next to ``../shared`` (its only input)::

    .venv/bin/python scripts/make_cranfield_fixture.py [--src ../shared/data/ir/cranfield]

Source: Cranfield-1400 (Cleverdon 1967; 1,400 aeronautics abstracts, 225 queries, graded qrels) in BEIR layout
(``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``, plus the distribution's ``cranqrel.readme``) from
``../shared/data/ir/cranfield``. That folder has no README of its own, so no upstream repository or commit is
recorded for it; the script records the sha256 of every source file instead. Cranfield carries no licence statement:
it is the classic, freely redistributed IR test collection (Glasgow IR group's test collections, ir_datasets'
``cranfield``). The qrels scores are Cleverdon's relevance codes, 1 = complete answer ... 4 = minimum interest
(``cranqrel.readme``); :func:`unipruner.adapters.colbert.load_beir` turns them into gains ``5 - code``.

What it keeps (deterministic: a rule over file order, no randomness):

- documents: the union of the first 300 documents in file order (the documents of the ColBERT index fixtures in
  ``tests/fixtures/colbert``, ``scripts/make_colbert_fixtures.py``, so that ``tests_envs/pylate/anchor_quality.py``
  finds their judgements) and the subset ``unipruner demo`` indexes (``_demo.demo_subset``: the first 30 judged
  queries' relevant documents, then other documents in file order up to 300), so the demo's numbers do not move;
  each line copied byte for byte, in file order, gzipped (``corpus.jsonl.gz``, gzip mtime 0);
- queries: those with at least one relevant judgement (code 1..4) on a kept document, lines copied in file order;
- qrels: every judgement of a kept query on a kept document, lines copied in file order under the BEIR header;
- ``cranqrel.readme`` byte for byte (it defines the codes, and its presence makes ``load_beir`` read them as codes).

Before writing, it checks the source against ir_datasets' ``cranfield`` counts (1,400 documents, 225 judged
queries, gains 4: 363, 3: 734, 2: 387, 1: 128); after writing, that the bundled copy gives the demo the same subset
and the anchor script the same judgements as the full collection. The folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unipruner.adapters.colbert._demo import CRANFIELD_SMALL, N_DOCS, N_QUERIES, demo_subset  # noqa: E402
from unipruner.adapters.colbert._eval import BeirData, cleverdon_gain, load_beir  # noqa: E402

SRC = ROOT.parent / "shared" / "data" / "ir" / "cranfield"
N_INDEX_FIXTURE = 300  # documents of tests/fixtures/colbert (scripts/make_colbert_fixtures.py: N_PLAID)
IR_DATASETS_GAINS = {4: 363, 3: 734, 2: 387, 1: 128}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gzip(text: str) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as fh:
        fh.write(text.encode("utf-8"))
    return buf.getvalue()


def _anchor_judgements(data: BeirData, ids: set[str]) -> dict[str, dict[str, int]]:
    """The judgements ``tests_envs/pylate/anchor_quality.py`` uses: relevant documents among ``ids``."""
    rel = {q: {d: g for d, g in data.qrels[q].items() if d in ids and g > 0} for q in data.query_ids}
    return {q: r for q, r in rel.items() if r}


def _same(a: BeirData, b: BeirData) -> bool:
    return (a.doc_ids, a.doc_texts, a.query_ids, a.query_texts, a.qrels) == (
        b.doc_ids, b.doc_texts, b.query_ids, b.query_texts, b.qrels)


def _readme(src: Path, n_docs: int, n_queries: int, n_qrels: int, gains: Counter[int]) -> str:
    sums = "\n".join(f"    {_sha256(src / name)}  {name}"
                     for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "cranqrel.readme"))
    counts = ", ".join(f"{g}: {gains[g]}" for g in sorted(gains, reverse=True))
    return f"""# Cranfield, small cut (bundled with unipruner)

{n_docs} documents, {n_queries} queries (each with a relevant document here), {n_qrels} judgements (gains {counts}):
a subset of Cranfield-1400 (Cleverdon 1967) in BEIR layout, read by `unipruner demo` (ColBERT section) and the
tests, so that neither needs anything outside the repository. Made by `scripts/make_cranfield_fixture.py`, which
documents the selection rule; do not edit by hand.

- `corpus.jsonl.gz`: the documents (`_id`, `title`, `text`), lines as in the source, gzipped.
- `queries.jsonl`, `qrels/test.tsv`: the queries and their judgements on these documents.
- `cranqrel.readme`: the Cranfield distribution's note, copied unchanged. It defines the qrels scores as
  Cleverdon's relevance codes (1 = complete answer ... 4 = minimum interest, 5 = no interest); its presence makes
  `unipruner.adapters.colbert.load_beir` use gain = 5 - code (as ir_datasets does).

Source: `../shared/data/ir/cranfield` (the project's evaluation data; that folder records no upstream repository
or commit). sha256 of the source files this was cut from:

{sums}

Licence: none is stated for the Cranfield collection; it is the classic test collection of information retrieval,
freely redistributed for research (e.g. by the Glasgow IR group and ir_datasets). The documents are abstracts of
1950s-60s aeronautics reports; the relevance judgements are Cleverdon's (Cranfield II, 1967).
"""


def main() -> None:
    """Write the fixture."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=SRC, help="Cranfield in BEIR layout (default ../shared/data/...)")
    ap.add_argument("--out", type=Path, default=CRANFIELD_SMALL)
    args = ap.parse_args()
    src: Path = args.src
    if not (src / "corpus.jsonl").is_file():
        raise SystemExit(f"Cranfield not found at {src} (expected ../shared/data/ir/cranfield next to the project)")

    full = load_beir(src)
    gains = Counter(g for rel in full.qrels.values() for g in rel.values())
    if full.grades != "cleverdon" or len(full.doc_ids) != 1400 or len(full.query_ids) != 225 \
            or gains != IR_DATASETS_GAINS:
        raise SystemExit(f"{src} is not ir_datasets' cranfield: {len(full.doc_ids)} documents, "
                         f"{len(full.query_ids)} queries, gains {dict(gains)}, grades {full.grades}")
    demo = demo_subset(full, N_QUERIES, N_DOCS)
    keep = set(full.doc_ids[:N_INDEX_FIXTURE]) | set(demo.doc_ids)

    doc_lines = [line for line in _lines(src / "corpus.jsonl") if str(json.loads(line)["_id"]) in keep]
    qrel_lines = _lines(src / "qrels" / "test.tsv")
    header, judgements = qrel_lines[0], [line.split("\t") for line in qrel_lines[1:]]
    relevant = {q for q, d, code in judgements if d in keep and cleverdon_gain(int(code)) > 0}
    query_lines = [line for line in _lines(src / "queries.jsonl") if str(json.loads(line)["_id"]) in relevant]
    qrels_kept = ["\t".join(j) for j in judgements if j[0] in relevant and j[1] in keep]

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        (tmp / "qrels").mkdir()
        (tmp / "corpus.jsonl.gz").write_bytes(_gzip("".join(f"{line}\n" for line in doc_lines)))
        (tmp / "queries.jsonl").write_text("".join(f"{line}\n" for line in query_lines), encoding="utf-8")
        (tmp / "qrels" / "test.tsv").write_text("".join(f"{line}\n" for line in [header, *qrels_kept]),
                                                encoding="utf-8")
        shutil.copyfile(src / "cranqrel.readme", tmp / "cranqrel.readme")
        small = load_beir(tmp)
        small_gains = Counter(g for rel in small.qrels.values() for g in rel.values())
        (tmp / "README.md").write_text(_readme(src, len(small.doc_ids), len(small.query_ids), len(qrels_kept),
                                               small_gains), encoding="utf-8")
        if small.grades != "cleverdon" or not _same(demo_subset(small, N_QUERIES, N_DOCS), demo):
            raise SystemExit("the cut does not give the demo the subset of the full collection")
        ids = set(full.doc_ids[:N_INDEX_FIXTURE])
        if _anchor_judgements(small, ids) != _anchor_judgements(full, ids):
            raise SystemExit("the cut does not keep the judgements of the index fixtures' documents")
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(small.doc_ids)} documents, {len(small.query_ids)} queries, {len(qrels_kept)} judgements "
          f"(gains {dict(sorted(small_gains.items(), reverse=True))}), {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
