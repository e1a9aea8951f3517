"""ColBERT index compression: methods against naive references, raw format, pipeline, evaluation, bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import unipruner
from unipruner import Budget
from unipruner.adapters.colbert import _methods as M
from unipruner.adapters.colbert._compress import compress, open_index
from unipruner.adapters.colbert._eval import maxsim_search, metrics
from unipruner.adapters.colbert._methods import ReduceSpec, TokenTable, global_counts, reduce_chunk, target_counts
from unipruner.adapters.colbert.formats import FORMATS, Chunk, IndexFormatError, detect_format
from unipruner.adapters.colbert.formats import raw as raw_mod
from unipruner.adapters.colbert.formats.raw import RawIndex, write_raw
from unipruner.errors import UniprunerError

torch.set_num_threads(2)


def _docs(lens: list[int], dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lens]


def _chunk(docs: list[torch.Tensor]) -> Chunk:
    return Chunk(0, 0, np.array([d.shape[0] for d in docs], dtype=np.int64), torch.cat(docs))


def _split(chunk: Chunk) -> list[torch.Tensor]:
    return list(torch.split(chunk.vectors, chunk.doclens.tolist()))


def _tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


LENS = [1, 2, 3, 7, 12, 30, 31, 64, 5, 9]


# ----------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------


def test_target_counts_match_pylate_pool_factor_and_never_empty() -> None:
    lens = np.array([1, 2, 3, 10, 11, 100])
    got = target_counts(lens, ReduceSpec("ward_pool", factor=3)).tolist()
    assert got == [max(n // 3, 1) for n in lens]
    got = target_counts(lens, ReduceSpec("ward_pool", factor=2, protected=1)).tolist()
    assert got == [1, 2, 2, 5, 6, 50]  # protected + max((n - 1) // 2, 1)
    assert target_counts(lens, ReduceSpec("hidden_norm", ratio=0.3)).tolist() == [1, 1, 1, 3, 3, 30]
    assert target_counts(lens, ReduceSpec("hidden_norm", keep=4)).tolist() == [1, 2, 3, 4, 4, 4]


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "nope", "factor": 2}, "unknown method"),
    ({"method": "ward_pool"}, "exactly one budget"),
    ({"method": "ward_pool", "factor": 2, "ratio": 0.5}, "exactly one budget"),
    ({"method": "ward_pool", "factor": 0.5}, "factor"),
    ({"method": "hidden_norm", "ratio": 0.0}, "at least one vector"),
    ({"method": "hidden_norm", "keep": 0}, "at least one vector"),
    ({"method": "hidden_norm", "ratio": 0.5, "protected": -1}, "protected"),
    ({"method": "ward_pool", "factor": 2, "scope": "global"}, "per document only"),
    ({"method": "hidden_norm", "factor": 2, "scope": "everywhere"}, "scope"),
    ({"method": "ward_cosine", "factor": 2}, "ColBERT method 'ward_cosine' is now 'ward_cosine_pool'"),
    ({"method": "norm", "ratio": 0.5}, "ColBERT method 'norm' is now 'hidden_norm'"),
    ({"method": "tome", "ratio": 0.5}, "does not apply to multi-vector indexes"),
    ({"method": "mmr", "ratio": 0.5}, "does not apply to multi-vector indexes"),
])
def test_spec_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(UniprunerError, match=match):
        ReduceSpec(**kwargs)


# ----------------------------------------------------------------------------------------------
# methods vs naive references
# ----------------------------------------------------------------------------------------------


def test_ward_matches_scipy_per_document() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    docs = _docs(LENS, seed=1)
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec("ward_pool", factor=2, protected=1)))
    for d, o in zip(docs, out, strict=True):
        n = d.shape[0]
        k = 1 if n == 1 else 1 + max((n - 1) // 2, 1)
        assert o.shape[0] == k
        if n <= 2:
            torch.testing.assert_close(o, d)
            continue
        rest = d[1:]
        unit = torch.nn.functional.normalize(rest.double(), dim=1).numpy()
        lab = fcluster(linkage(unit, "ward"), k - 1, "maxclust")
        means = [rest[torch.from_numpy(lab == c)].mean(0) for c in np.unique(lab)]
        firsts = [int(np.flatnonzero(lab == c)[0]) for c in np.unique(lab)]
        ref = torch.stack([d[0]] + [means[i] for i in np.argsort(firsts)])
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_ward_cosine_matches_pylate_scipy_criterion() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    docs = _docs(LENS, seed=16)
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec("ward_cosine_pool", factor=3, protected=1)))
    for d, o in zip(docs, out, strict=True):
        n = d.shape[0]
        k = 1 if n == 1 else 1 + max((n - 1) // 3, 1)
        assert o.shape[0] == k
        if n <= 2:
            torch.testing.assert_close(o, d)
            continue
        rest = d[1:]
        u = torch.nn.functional.normalize(rest.double(), dim=1)
        dist = (1 - u @ u.T).clamp(min=0).numpy()  # what PyLate hands to scipy
        lab = fcluster(linkage(dist[np.triu_indices(n - 1, k=1)], "ward"), k - 1, "maxclust")
        means = [rest[torch.from_numpy(lab == c)].mean(0) for c in np.unique(lab)]
        firsts = [int(np.flatnonzero(lab == c)[0]) for c in np.unique(lab)]
        ref = torch.stack([d[0]] + [means[i] for i in np.argsort(firsts)])
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_sequential_pooling_matches_naive_runs() -> None:
    docs = _docs(LENS, seed=2)
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec("sequential_pool", factor=3)))
    for d, o in zip(docs, out, strict=True):
        n = d.shape[0]
        k = max(n // 3, 1)
        lab = [i * k // n for i in range(n)]
        ref = torch.stack([d[[i for i in range(n) if lab[i] == c]].mean(0) for c in range(k)])
        torch.testing.assert_close(o, ref)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kmeans_recovers_separated_clusters(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1) * 5
    lab = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    doc = centres[lab] + 0.01 * torch.randn(12, 16, generator=g)
    spec = ReduceSpec(unipruner.method("kmeans_pool", budget=Budget(keep=4), backend=backend))
    out = reduce_chunk(_chunk([doc, doc[:1]]), spec)
    assert out.doclens.tolist() == [4, 1]
    ref = torch.stack([doc[lab == c].mean(0) for c in range(4)])  # first-member order = 0, 1, 2, 3
    torch.testing.assert_close(out.vectors[:4], ref, atol=1e-5, rtol=1e-5)


def _naive_keep(d: torch.Tensor, k: int, score: list[float], protected: int = 0) -> torch.Tensor:
    n = d.shape[0]
    p = min(protected, n)
    order = sorted(range(p, n), key=lambda i: (-score[i], i))
    keep = sorted(list(range(p)) + order[: max(k - p, 0)])
    return d[keep]


@pytest.mark.parametrize("method", ["first", "hidden_norm", "duplicates", "centroid"])
def test_scoring_methods_match_naive(method: str) -> None:
    docs = _docs(LENS, seed=4)
    docs[5][7] = docs[5][2] * 1.001  # a near-duplicate
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec(method, ratio=0.5, protected=1)))
    for d, o in zip(docs, out, strict=True):
        n = d.shape[0]
        k = max(min(math.floor(n * 0.5 + 0.5), n), 1)
        u = torch.nn.functional.normalize(d, dim=1)
        if method == "first":
            score = [-float(i) for i in range(n)]
        elif method == "hidden_norm":
            score = [float(v.norm()) for v in d]
        elif method == "duplicates":
            score = [2.0] + [1.0 - max(float(u[i] @ u[j]) for j in range(i)) for i in range(1, n)]
        else:
            c = torch.nn.functional.normalize(u.mean(0), dim=0)
            score = [float(u[i] @ c) for i in range(n)]
        torch.testing.assert_close(o, _naive_keep(d, k, score, protected=1))
    if method == "duplicates":
        assert not any(torch.equal(v, docs[5][7]) for v in out[5])


def test_diversity_matches_naive_max_min() -> None:
    docs = _docs([9, 14, 4], seed=5)
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec("divprune", keep=4)))
    for d, o in zip(docs, out, strict=True):
        u = torch.nn.functional.normalize(d, dim=1)
        dist = 1 - u @ u.T
        n = d.shape[0]
        if n <= 4:
            torch.testing.assert_close(o, d)
            continue
        nn_dist = dist.masked_fill(torch.eye(n, dtype=torch.bool), math.inf).min(1).values
        chosen = [int(nn_dist.argmax())]
        while len(chosen) < 4:
            mind = dist[:, chosen].min(1).values
            mind[chosen] = -math.inf
            chosen.append(int(mind.argmax()))
        torch.testing.assert_close(o, d[sorted(chosen)])


def test_batching_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs([3, 50, 4, 49, 8, 2, 17], seed=6)
    for method in ("ward_pool", "ward_cosine_pool", "duplicates", "sequential_pool"):
        a = reduce_chunk(_chunk(docs), ReduceSpec(method, factor=2))
        with monkeypatch.context() as mp:
            mp.setattr(M, "BATCH_BYTES", 1)  # one document per batch
            b = reduce_chunk(_chunk(docs), ReduceSpec(method, factor=2))
        assert a.doclens.tolist() == b.doclens.tolist()
        torch.testing.assert_close(a.vectors, b.vectors, atol=1e-5, rtol=1e-5)


def test_every_method_keeps_one_vector_per_document() -> None:
    docs = _docs([1, 1, 2, 40], seed=7)
    for method in M.accepted_methods():
        if ReduceSpec(method, factor=2).needs_tokens:  # idf / stopwords: tested with a tokenizer below
            continue
        out = reduce_chunk(_chunk(docs), ReduceSpec(method, factor=100))
        assert out.doclens.tolist() == [1, 1, 1, 1], method
        assert out.vectors.shape == (4, 16)


def test_global_budget_spends_removal_by_score() -> None:
    docs = _docs([10, 10, 10], seed=8)
    docs[0] = docs[0] * 10  # large norms: document 0 should keep most of its vectors
    ch = _chunk(docs)
    spec = ReduceSpec("hidden_norm", ratio=0.4, scope="global")
    scores = M.chunk_scores(ch, spec)
    counts = global_counts(scores, ch.doclens, M.global_total(30, 3, spec))
    assert counts.sum() == 12 and counts.min() >= 1 and counts[0] == 10
    out = reduce_chunk(ch, spec, counts=counts)
    assert out.doclens.tolist() == counts.tolist()
    # naive reference: the 12 largest norms overall, at least one per document
    norms = torch.cat(docs).norm(dim=1)
    forced = {0, 10, 20}
    forced = {int(torch.argmax(norms[i:i + 10])) + i for i in (0, 10, 20)}
    rest = sorted((i for i in range(30) if i not in forced), key=lambda i: -float(norms[i]))
    keep = sorted(forced | set(rest[: 12 - len(forced)]))
    torch.testing.assert_close(out.vectors, torch.cat(docs)[keep])


def test_idf_and_stopwords_with_real_tokenizer() -> None:
    from transformers import AutoTokenizer

    from unipruner.models import model_path

    tok = AutoTokenizer.from_pretrained(str(model_path("all-minilm-l6-v2")), local_files_only=True)
    texts = ["the wing of the aircraft .", "the flow of the boundary layer", "shock wave , the wing"]
    lens = np.array([len(tok(t)["input_ids"]) for t in texts])
    table = TokenTable.from_texts(texts, tok, lens)
    docs = _docs(lens.tolist(), seed=9)
    ids = [tok(t)["input_ids"] for t in texts]
    df: dict[int, int] = {}
    for row in ids:
        for t in set(row):
            df[t] = df.get(t, 0) + 1
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec("idf", keep=3, protected=1), tokens=table))
    for d, o, row in zip(docs, out, ids, strict=True):
        score = [math.log((3 - df[t] + 0.5) / (df[t] + 0.5) + 1) for t in row]
        torch.testing.assert_close(o, _naive_keep(d, 3, score, protected=1))
    out = _split(reduce_chunk(_chunk(docs), ReduceSpec("stopwords", ratio=0.5), tokens=table))
    the, comma = tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids(",")
    for d, o, row in zip(docs, out, ids, strict=True):
        stop_rows = [i for i, t in enumerate(row) if t in (the, comma)]
        kept = [i for i in range(len(row)) if any(torch.equal(d[i], v) for v in o)]
        assert not set(stop_rows) & set(kept)
    with pytest.raises(UniprunerError, match="one vector per token"):
        TokenTable.from_texts(texts, tok, lens + 1)
    with pytest.raises(UniprunerError, match="needs the token ids"):
        reduce_chunk(_chunk(docs), ReduceSpec("idf", keep=3))


# ----------------------------------------------------------------------------------------------
# raw format
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, st", [("float32", False), ("float16", False), ("float16", True)])
def test_raw_round_trip_and_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, st: bool) -> None:
    docs = _docs([5, 3, 9, 1], seed=10)
    p = write_raw(tmp_path / "i", docs, ids=["a", "b", "c", "d"], dtype=dtype, safetensors=st)
    assert detect_format(p) is RawIndex and FORMATS["raw"] is RawIndex
    idx = RawIndex.open(p, chunk_vectors=8)
    info = idx.info()
    assert (info.n_docs, info.n_vectors, info.dim, info.n_chunks) == (4, 18, 16, 3)
    assert idx.doc_ids() == ["a", "b", "c", "d"]
    chunks = list(idx.chunks())
    assert [c.doc_offset for c in chunks] == [0, 2, 3]
    assert [c.doclens.tolist() for c in chunks] == [[5, 3], [9], [1]]
    tol = 1e-3 if dtype == "float16" else 0.0
    torch.testing.assert_close(torch.cat([c.vectors for c in chunks]), torch.cat(docs), atol=tol, rtol=tol)
    if not st:
        arr = np.load(p / "vectors.npy", allow_pickle=False)
        assert arr.dtype == np.dtype(dtype) and arr.shape == (18, 16)


def _bad(tmp_path: Path, what: str) -> Path:
    p = write_raw(tmp_path / what, _docs([4, 2], seed=11), ids=["x", "y"])
    man = json.loads((p / "manifest.json").read_text())
    if what == "missing_doclens":
        (p / "doclens.npy").unlink()
    elif what == "doclens_mismatch":
        np.save(p / "doclens.npy", np.array([4, 3]))
    elif what == "empty_doc":
        np.save(p / "doclens.npy", np.array([6, 0]))
    elif what == "wrong_dim":
        man["dim"] = 32
    elif what == "pickle":
        np.save(p / "vectors.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif what == "truncated":
        data = (p / "vectors.npy").read_bytes()
        (p / "vectors.npy").write_bytes(data[: len(data) // 2])
    elif what == "ids":
        (p / "ids.json").write_text(json.dumps(["x"]))
    elif what == "manifest":
        (p / "manifest.json").write_text("{not json")
        return p
    elif what == "nan":
        arr = np.load(p / "vectors.npy")
        arr[3, 0] = np.nan
        np.save(p / "vectors.npy", arr)
    (p / "manifest.json").write_text(json.dumps(man))
    return p


@pytest.mark.parametrize("what, match", [
    ("missing_doclens", "doclens.npy is missing"),
    ("doclens_mismatch", "doclens sum to 7"),
    ("empty_doc", "at least one"),
    ("wrong_dim", "dimension 16"),
    ("pickle", "not a pickle"),
    ("truncated", "truncated"),
    ("ids", "ids.json has 1"),
    ("manifest", "not valid JSON"),
])
def test_raw_rejects_broken_index(tmp_path: Path, what: str, match: str) -> None:
    p = _bad(tmp_path, what)
    with pytest.raises(IndexFormatError, match=match):
        RawIndex.open(p)
    with pytest.raises(UniprunerError, match=match):
        compress(p, tmp_path / "out", ReduceSpec("ward_pool", factor=2))
    assert not (tmp_path / "out").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out")]


def test_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("hello")
    with pytest.raises(IndexFormatError, match="not a known multi-vector index"):
        detect_format(tmp_path / "stuff")
    with pytest.raises(IndexFormatError, match="does not exist"):
        detect_format(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------


def test_compress_is_atomic_and_leaves_src_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_mod, "CHUNK_VECTORS", 64)
    docs = _docs([int(n) for n in np.random.default_rng(0).integers(1, 40, size=60)], seed=12)
    src = write_raw(tmp_path / "src", docs, dtype="float16")
    before = _tree_hash(src)
    res = compress(src, tmp_path / "dst", ReduceSpec("ward_pool", factor=2, protected=1))
    assert _tree_hash(src) == before
    assert res.src.n_chunks > 5 and res.dst.format == "raw" and res.dst.n_docs == 60
    assert res.dst.n_vectors == int(target_counts(res.src.doclens, res.spec).sum())
    assert res.dst.n_bytes < res.src.n_bytes
    assert json.loads((tmp_path / "dst" / "manifest.json").read_text())["dtype"] == "float16"
    ref = reduce_chunk(_chunk([d.half().float() for d in docs]), res.spec)
    got = torch.cat([c.vectors for c in open_index(tmp_path / "dst").chunks()])
    torch.testing.assert_close(got, ref.vectors, atol=2e-3, rtol=2e-3)
    with pytest.raises(UniprunerError, match="already exists"):
        compress(src, tmp_path / "dst", ReduceSpec("first", keep=1))
    res2 = compress(src, tmp_path / "dst", ReduceSpec("first", keep=1), force=True)
    assert res2.dst.n_vectors == 60
    with pytest.raises(UniprunerError, match="must not be SRC"):
        compress(src, src / "inner", ReduceSpec("first", keep=1))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dst", "src"]


def test_compress_failure_midway_removes_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_mod, "CHUNK_VECTORS", 4)
    p = _bad(tmp_path, "nan")  # NaN in the second chunk: found while streaming, after the writer started
    with pytest.raises(IndexFormatError, match="NaN"):
        compress(p, tmp_path / "out", ReduceSpec("ward_pool", factor=2))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["nan"]


def test_workers_give_identical_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_mod, "CHUNK_VECTORS", 200)
    docs = _docs([int(n) for n in np.random.default_rng(1).integers(1, 30, size=80)], seed=13)
    src = write_raw(tmp_path / "src", docs)
    a = compress(src, tmp_path / "a", ReduceSpec("hidden_norm", ratio=0.5, scope="global"), workers=1)
    b = compress(src, tmp_path / "b", ReduceSpec("hidden_norm", ratio=0.5, scope="global"), workers=2)
    assert a.src.n_chunks > 2
    assert a.dst.n_vectors == b.dst.n_vectors == round(a.src.n_vectors * 0.5)
    assert np.array_equal(np.load(tmp_path / "a" / "vectors.npy"), np.load(tmp_path / "b" / "vectors.npy"))
    assert np.array_equal(np.load(tmp_path / "a" / "doclens.npy"), np.load(tmp_path / "b" / "doclens.npy"))


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


def test_maxsim_search_matches_naive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_mod, "CHUNK_VECTORS", 50)
    docs = _docs([int(n) for n in np.random.default_rng(2).integers(1, 20, size=40)], seed=14)
    idx = RawIndex.open(write_raw(tmp_path / "i", docs))
    queries = _docs([3, 5, 1], seed=15)
    scores, pos = maxsim_search(idx, queries, k=7, block_bytes=4 * 9 * 16)
    naive = torch.stack([torch.stack([(q @ d.T).max(1).values.sum() for d in docs]) for q in queries])
    ref = torch.sort(naive, dim=1, descending=True, stable=True)
    assert np.array_equal(pos, ref.indices[:, :7].numpy())
    np.testing.assert_allclose(scores, ref.values[:, :7].numpy(), rtol=1e-5)
    with pytest.raises(UniprunerError, match="dimension"):
        maxsim_search(idx, [torch.randn(2, 8)])


def test_metrics_by_hand() -> None:
    r = metrics([["d1", "d2", "d3"], ["x"]], [{"d3": 3, "d9": 1}, {"y": 1}])
    idcg = 3 + 1 / math.log2(3)
    assert r.ndcg10 == pytest.approx((3 / 2) / idcg / 2)
    assert r.recall100 == pytest.approx(0.25)
    assert r.mrr10 == pytest.approx(1 / 3 / 2)
