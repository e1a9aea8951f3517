"""Retrieval quality of a multi-vector index: exact MaxSim search, nDCG@10, recall@100, MRR@10 on BEIR data.

Late interaction as in ColBERT (Khattab & Zaharia, SIGIR 2020): ``score(q, d) = sum_i max_j <q_i, d_j>`` over the
query's token vectors ``q_i`` and the document's stored vectors ``d_j``, computed exactly (brute force, chunk by
chunk: fine at evaluation sizes). Metrics as in BEIR (Thakur et al., NeurIPS 2021 Datasets track): nDCG@10 with
linear gains of the graded qrels (Järvelin & Kekäläinen, TOIS 2002), recall@100 and MRR@10 over the documents with a
positive grade. No identical-id filtering (BEIR's ``ignore_identical_ids``) is applied.

Qrels grades are read as gains (BEIR: higher is more relevant), except Cleverdon's Cranfield codes (1 = complete
answer ... 4 = minimum interest, Cleverdon 1967), which :func:`load_beir` turns into gains ``5 - code`` as
ir_datasets does (so a complete answer weighs 4, a document of minimum interest 1).

The multi-vector encoder is a sentence-transformers model's token embeddings (e.g. all-MiniLM-L6-v2), L2-normalised
per token, the setting of the token-pooling paper's MiniLM experiments; the index must have the encoder's dimension.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import UniprunerError
from .formats import IndexFormat

__all__ = [
    "GRADES",
    "BeirData",
    "EvalResult",
    "cleverdon_gain",
    "corpus_texts",
    "encode_tokens",
    "evaluate_index",
    "load_beir",
    "load_encoder",
    "maxsim_search",
    "metrics",
]


GRADES = ("relevance", "cleverdon")
"""Conventions of the qrels score column that :func:`load_beir` understands."""

CLEVERDON_README = "cranqrel.readme"
"""The Cranfield distribution's note defining Cleverdon's relevance codes: its presence selects ``"cleverdon"``."""


@dataclass(frozen=True)
class BeirData:
    """A BEIR-layout collection: corpus (ids, texts), queries with judgements, graded qrels.

    ``qrels`` holds gains (higher is more relevant, ``<= 0`` not relevant) whatever the file's convention was;
    ``grades`` records that convention (:data:`GRADES`).
    """

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    grades: str = "relevance"


@dataclass(frozen=True)
class EvalResult:
    """Mean metrics over the judged queries."""

    ndcg10: float
    recall100: float
    mrr10: float
    n_queries: int

    def as_dict(self) -> dict[str, float]:
        """The metrics as a plain dict."""
        return {"nDCG@10": self.ndcg10, "recall@100": self.recall100, "MRR@10": self.mrr10,
                "queries": float(self.n_queries)}


def _corpus_file(root: Path) -> Path:
    """The corpus of a BEIR dataset directory: ``corpus.jsonl``, else ``corpus.jsonl.gz`` when only that exists."""
    plain = root / "corpus.jsonl"
    packed = root / "corpus.jsonl.gz"
    return packed if not plain.exists() and packed.is_file() else plain


def _jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UniprunerError(f"{what} file {path} does not exist")
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UniprunerError(f"{path}:{i}: not a JSON line ({err})") from err
                if not isinstance(row, dict) or "_id" not in row or "text" not in row:
                    raise UniprunerError(f"{path}:{i}: a BEIR {what} line needs '_id' and 'text'")
                rows.append(row)
    except (gzip.BadGzipFile, EOFError) as err:
        raise UniprunerError(f"{path}: not a readable gzip file ({err})") from err
    return rows


def doc_text(row: dict[str, Any]) -> str:
    """BEIR document text as the encoder sees it: ``title + " " + text`` (the title once)."""
    title, text = str(row.get("title") or "").strip(), str(row["text"]).strip()
    return text if not title or text.startswith(title) else f"{title} {text}"


def corpus_texts(corpus: Path | str, ids: Sequence[str] | None = None) -> list[str]:
    """Texts of a BEIR ``corpus.jsonl`` (or dataset directory) in index order (``ids``), or in file order."""
    c = Path(corpus)
    rows = _jsonl(_corpus_file(c) if c.is_dir() else c, "corpus")
    if ids is None:
        return [doc_text(r) for r in rows]
    by_id = {str(r["_id"]): doc_text(r) for r in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UniprunerError(f"{len(missing)} index documents are not in {corpus} (e.g. {missing[0]!r})")
    return [by_id[i] for i in ids]


def cleverdon_gain(code: int) -> int:
    """Gain of a Cleverdon relevance code (Cranfield): ``5 - code`` for codes 1..4, else 0 (not relevant).

    Code 1 is a complete answer, 2 highly relevant, 3 useful background, 4 minimum interest, 5 no interest
    (``cranqrel.readme``); the mapping is ir_datasets' for ``cranfield`` (4, 3, 2, 1).

    >>> [cleverdon_gain(c) for c in (1, 2, 3, 4, 5, 0, -1)]
    [4, 3, 2, 1, 0, 0, 0]
    """
    return 5 - code if 1 <= code <= 4 else 0


def _grades(grades: str | None, dirs: Sequence[Path]) -> str:
    if grades is None:
        return "cleverdon" if any((d / CLEVERDON_README).is_file() for d in dirs) else "relevance"
    if not isinstance(grades, str) or grades not in GRADES:
        raise UniprunerError(f"grades must be one of {', '.join(GRADES)} (or None: detect), got {grades!r}")
    return grades


def load_beir(corpus: Path | str, queries: Path | str | None = None, qrels: Path | str | None = None,
              grades: str | None = None) -> BeirData:
    """Read a BEIR collection (Thakur et al., 2021): ``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``.

    Parameters
    ----------
    corpus : Path or str
        ``corpus.jsonl``, or the dataset directory (then queries and qrels default to the BEIR layout inside it;
        its corpus may be gzipped, ``corpus.jsonl.gz``). A ``.gz`` corpus or queries file is read gzipped.
    queries, qrels : Path or str, optional
        ``queries.jsonl`` and a TSV of ``query-id  corpus-id  score`` (header line optional).
    grades : {"relevance", "cleverdon"} or None
        What the qrels score means. ``"relevance"``: BEIR's convention, higher is more relevant, the score is the
        gain as is. ``"cleverdon"``: Cleverdon's Cranfield codes, 1 (complete answer) is the best and 4 (minimum
        interest) the least relevant; the gain is ``5 - code`` (4, 3, 2, 1, as in ir_datasets) and any other code
        (5 = no interest, ``<= 0``) is not relevant (gain 0). ``None`` (default) detects it: ``"cleverdon"`` when
        the dataset directory (the corpus directory or the folder of ``corpus.jsonl``), the folder of the qrels
        file or the folder above it (BEIR's ``qrels/``) holds ``cranqrel.readme``, the Cranfield distribution's
        note that defines the codes; else ``"relevance"``.

    Returns
    -------
    BeirData
        Only queries with at least one positive judgement (after conversion) are kept, in file order; ``qrels``
        holds the gains and ``grades`` the convention used.

    Raises
    ------
    UniprunerError
        Missing or malformed files, or ``grades`` not one of the above.
    """
    c = Path(corpus)
    if grades is not None:
        _grades(grades, [])  # a bad value fails before any file is read
    if c.is_dir():
        queries = queries if queries is not None else c / "queries.jsonl"
        qrels = qrels if qrels is not None else c / "qrels" / "test.tsv"
        c = _corpus_file(c)
    if queries is None or qrels is None:
        raise UniprunerError("give queries= and qrels= (or the BEIR dataset directory as corpus)")
    docs = _jsonl(c, "corpus")
    ids = [str(r["_id"]) for r in docs]
    if len(set(ids)) != len(ids):
        raise UniprunerError(f"{c}: document ids are not unique")
    q = Path(qrels)
    if not q.is_file():
        raise UniprunerError(f"qrels file {q} does not exist")
    convention = _grades(grades, [c.parent, q.parent, q.parent.parent])
    judged: dict[str, dict[str, int]] = {}
    for i, line in enumerate(q.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts or not line.strip():
            continue
        if len(parts) < 3:
            raise UniprunerError(f"{q}:{i}: expected 'query-id corpus-id score'")
        try:
            score = int(float(parts[-1]))
        except ValueError as err:
            if i == 1:
                continue  # header
            raise UniprunerError(f"{q}:{i}: score {parts[-1]!r} is not a number") from err
        judged.setdefault(parts[0], {})[parts[1]] = cleverdon_gain(score) if convention == "cleverdon" else score
    qrows = _jsonl(Path(queries), "queries")
    keep = [r for r in qrows if any(v > 0 for v in judged.get(str(r["_id"]), {}).values())]
    if not keep:
        raise UniprunerError(f"no query in {queries} has a positive judgement in {q}")
    return BeirData(ids, [doc_text(r) for r in docs], [str(r["_id"]) for r in keep],
                    [str(r["text"]) for r in keep], {str(r["_id"]): judged[str(r["_id"])] for r in keep},
                    convention)


def load_encoder(name: str = "minilm") -> Any:
    """A sentence-transformers encoder: ``"minilm"`` (the packaged all-MiniLM-L6-v2) or a local model directory."""
    if name.lower() in ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        from ...models import load_minilm

        return load_minilm()
    path = Path(name)
    if not path.is_dir():
        raise UniprunerError(f"model {name!r} is neither 'minilm' nor a local sentence-transformers directory")
    from ...models import require

    st = require("sentence_transformers", "colbert")
    return st.SentenceTransformer(str(path), device="cpu", local_files_only=True)


def encode_tokens(model: Any, texts: Sequence[str], *, batch_size: int = 32) -> list[torch.Tensor]:
    """Per-token embeddings of each text, L2-normalised, float32 ``[n_tokens, D]`` (ColBERT-style multi-vectors).

    Uses the sentence-transformers model's ``token_embeddings`` output (special tokens included, padding removed),
    the multi-vector setting of Clavié et al. 2024 for single-vector encoders.
    """
    if len(texts) == 0:
        return []
    with torch.inference_mode():
        out = model.encode(list(texts), output_value="token_embeddings", batch_size=batch_size,
                           convert_to_numpy=False, show_progress_bar=False)
    return [torch.nn.functional.normalize(t.float().cpu(), dim=-1) for t in out]


def maxsim_search(index: IndexFormat, queries: Sequence[torch.Tensor], k: int = 100,
                  block_bytes: int = 256 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """Exact late-interaction search (ColBERT MaxSim, Khattab & Zaharia 2020) over every document of ``index``.

    Parameters
    ----------
    index : IndexFormat
        An opened index; read chunk by chunk.
    queries : sequence of Tensor ``[q_i, D]``
        Query token vectors.
    k : int
        Documents returned per query.
    block_bytes : int
        Bound of the ``[query tokens, vectors]`` similarity block.

    Returns
    -------
    (scores, positions) : (float32 ``[n_queries, k']``, int64 ``[n_queries, k']``)
        Best documents (positions in index order) by descending score, ``k' = min(k, n_docs)``.
    """
    info = index.info()
    if not queries:
        raise UniprunerError("no queries to search")
    qlens = np.asarray([int(q.shape[0]) for q in queries], dtype=np.int64)
    if qlens.min() < 1:
        raise UniprunerError("every query needs at least one vector")
    qdims = {int(q.shape[1]) for q in queries}
    if qdims != {info.dim}:
        raise UniprunerError(f"query vectors have dimension {sorted(qdims)} but the index has {info.dim}: "
                             "encode the queries with the model that built the index")
    qflat = torch.cat([q.float() for q in queries]).numpy()
    qstarts = np.concatenate([[0], np.cumsum(qlens)[:-1]])
    nq = len(queries)
    kk = min(k, info.n_docs)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    max_vec = max(1, block_bytes // (4 * qflat.shape[0]))
    for chunk in index.chunks():
        lens = np.asarray(chunk.doclens, dtype=np.int64)
        vecs = chunk.vectors.float().numpy()
        ends = np.cumsum(lens)
        d0 = 0
        while d0 < lens.size:  # blocks of whole documents with <= max_vec vectors (one per iteration)
            v0 = int(ends[d0 - 1]) if d0 else 0
            d1 = max(d0 + 1, int(np.searchsorted(ends, v0 + max_vec, side="right")))
            v1 = int(ends[d1 - 1])
            sim = qflat @ vecs[v0:v1].T  # [query tokens, vectors]
            starts = (np.concatenate([[v0], ends[d0:d1 - 1]]) - v0).astype(np.int64)
            per_doc = np.maximum.reduceat(sim, starts, axis=1)  # MaxSim: best vector per query token
            scores = np.add.reduceat(per_doc, qstarts, axis=0)  # [queries, docs in block]
            pos = np.arange(chunk.doc_offset + d0, chunk.doc_offset + d1, dtype=np.int64)
            best_s = np.concatenate([best_s, scores.astype(np.float32)], axis=1)
            best_i = np.concatenate([best_i, np.broadcast_to(pos, scores.shape)], axis=1)
            if best_s.shape[1] > kk:
                top = np.argpartition(-best_s, kk - 1, axis=1)[:, :kk]
                best_s = np.take_along_axis(best_s, top, 1)
                best_i = np.take_along_axis(best_i, top, 1)
            d0 = d1
    order = np.lexsort((best_i, -best_s), axis=1) if best_s.size else np.zeros_like(best_i)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def metrics(ranked: Sequence[Sequence[str]], qrels: Sequence[dict[str, int]]) -> EvalResult:
    """Mean nDCG@10, recall@100 and MRR@10 of ranked document ids against graded judgements (BEIR conventions).

    >>> r = metrics([["a", "b", "c"]], [{"b": 2, "z": 1}])
    >>> round(r.ndcg10, 4), r.recall100, r.mrr10
    (0.4796, 0.5, 0.5)
    """
    if len(ranked) != len(qrels) or not ranked:
        raise UniprunerError("metrics needs one ranking per judged query")
    disc = 1.0 / np.log2(np.arange(2, 12))
    nd = rc = mr = 0.0
    for docs, rel in zip(ranked, qrels, strict=True):  # per query (hundreds): plain Python is fine
        gains = np.asarray([max(rel.get(d, 0), 0) for d in docs[:10]], dtype=np.float64)
        ideal = np.sort(np.asarray([g for g in rel.values() if g > 0], dtype=np.float64))[::-1][:10]
        idcg = float((ideal * disc[: ideal.size]).sum())
        nd += float((gains * disc[: gains.size]).sum()) / idcg if idcg > 0 else 0.0
        pos = {d for d, g in rel.items() if g > 0}
        rc += len(pos.intersection(docs[:100])) / len(pos) if pos else 0.0
        first = next((i for i, d in enumerate(docs[:10]) if d in pos), None)
        mr += 1.0 / (first + 1) if first is not None else 0.0
    n = len(ranked)
    return EvalResult(nd / n, rc / n, mr / n, n)


def evaluate_index(index: IndexFormat, data: BeirData, query_vectors: Sequence[torch.Tensor]) -> EvalResult:
    """nDCG@10, recall@100 and MRR@10 of exact MaxSim search over ``index`` (ColBERT late interaction).

    Document ids come from the index when it stores them (:meth:`IndexFormat.doc_ids`), else the index is taken to
    hold the corpus in file order (the number of documents must match).
    """
    info = index.info()
    ids = index.doc_ids()
    if ids is None:
        if info.n_docs != len(data.doc_ids):
            raise UniprunerError(f"the index has {info.n_docs} documents and stores no ids, but the corpus has "
                                 f"{len(data.doc_ids)}: cannot tell which document is which")
        ids = data.doc_ids
    if len(query_vectors) != len(data.query_ids):
        raise UniprunerError(f"{len(query_vectors)} query encodings for {len(data.query_ids)} queries")
    _, pos = maxsim_search(index, query_vectors, k=100)
    ranked = [[ids[int(p)] for p in row] for row in pos]
    return metrics(ranked, [data.qrels[q] for q in data.query_ids])


def retention(after: float, before: float) -> float:
    """``after / before`` (1.0 when both are 0; ``nan`` when only ``before`` is)."""
    if before == 0:
        return 1.0 if after == 0 else math.nan
    return after / before
