"""ColBERT index compression on Cranfield with all-MiniLM-L6-v2 token embeddings (issue #5).

Parts (``--part``, default all):

* ``retention``: nDCG@10 / recall@100 / MRR@10 of exact MaxSim search before and after compressing the index with
  every method at 50 / 33 / 25 % of the vectors kept (pool factor 2 / 3 / 4), plus pruning 30 % (70 % kept).
  Every row goes through the real pipeline (raw index on disk -> ``compress`` -> evaluation of the written index).
  ``--quick``: only pool factor 2 and 50 % kept (one row per method, the global rows at 50 %), a few minutes.
* ``pylate``: PyLate 1.6.0's own ``pool_embeddings_hierarchical`` (``pool_factor``, scipy Ward per document), run in
  ``.venv-pylate`` as a subprocess on the same saved embeddings: retention at the same vector count and time per
  document, next to our Ward pooling (batched torch; both single-threaded).
* ``scale``: time and peak memory (ru_maxrss of a fresh process) to compress synthetic raw indexes of 250k, 500k
  and 1M vectors (dim 128, float16) with Ward pool factor 2: memory stays flat because chunks are bounded.

nDCG@10 uses Cleverdon's Cranfield codes as gains ``5 - code`` (1 = complete answer is the best): ``load_beir``
detects them by the dataset's ``cranqrel.readme`` (numbers before that fix used the codes as gains, inverted).

Run: ``python benchmarks/colbert.py`` (about 15 min on 2 cores; ``--part retention`` etc. for one part;
``python benchmarks/colbert.py --part retention --quick`` for the quick check).
Embeddings are encoded once and cached under ``benchmarks/results/cache/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, ROOT, Report, shared_data

import unipruner
from unipruner.adapters.colbert._compress import compress, open_index
from unipruner.adapters.colbert._eval import (
    BeirData,
    encode_tokens,
    evaluate_index,
    load_beir,
    load_encoder,
)
from unipruner.adapters.colbert._methods import ReduceSpec, reduce_chunk
from unipruner.adapters.colbert.formats import Chunk
from unipruner.adapters.colbert.formats.raw import write_raw

CACHE = RESULTS / "cache" / "cranfield_minilm.safetensors"
IMG = ROOT / "docs" / "img"
PYLATE_PY = ROOT / ".venv-pylate" / "bin" / "python"
POOLING = ("ward_pool", "ward_cosine_pool", "kmeans_pool", "sequential_pool")
PRUNING = ("first", "hidden_norm", "duplicates", "divprune", "centroid", "idf", "stopwords")
GLOBAL = ("idf", "duplicates")
LEVELS = ((2.0, 0.5), (3.0, 1 / 3), (4.0, 0.25))
#: registry parameters of a benchmark row (the published kmeans rows were measured with faiss)
PARAMS: dict[str, dict[str, Any]] = {"kmeans_pool": {"backend": "faiss"}}


def _spec(name: str, *, factor: float | None = None, ratio: float | None = None, scope: str = "document"
          ) -> ReduceSpec:
    budget = unipruner.Budget.pool_factor(factor) if factor is not None else unipruner.Budget(ratio=ratio)
    return ReduceSpec(unipruner.method(name, budget=budget, protected=1, **PARAMS.get(name, {})), scope=scope)


def embeddings(data: BeirData) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
    """Query token vectors, flat document vectors and doclens (encoded once, cached)."""
    from safetensors.torch import load_file, save_file

    if not CACHE.exists():
        model = load_encoder("minilm")
        t0 = time.perf_counter()
        q = encode_tokens(model, data.query_texts)
        d = encode_tokens(model, data.doc_texts)
        print(f"encoded {len(d)} documents and {len(q)} queries in {time.perf_counter() - t0:.0f} s")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        save_file({"q": torch.cat(q), "qlens": torch.tensor([x.shape[0] for x in q]), "d": torch.cat(d),
                   "dlens": torch.tensor([x.shape[0] for x in d])}, str(tmp))
        os.replace(tmp, CACHE)
    e = load_file(str(CACHE))
    q = list(torch.split(e["q"], e["qlens"].tolist()))
    return q, e["d"], e["dlens"].numpy().astype(np.int64)


def retention_part(data: BeirData, q: list[torch.Tensor], flat: torch.Tensor, lens: np.ndarray,
                   work: Path, quick: bool = False) -> tuple[Report, dict[str, Any]]:
    src = write_raw(work / "src", flat, doclens=lens.tolist(), ids=data.doc_ids)
    base = evaluate_index(open_index(src), data, q)
    tok_model = load_encoder("minilm")
    tok, maxlen = tok_model.tokenizer, int(tok_model.max_seq_length)
    rep = Report("colbert_retention", ["method", "budget", "kept", "nDCG@10", "retention", "recall@100",
                                       "MRR@10", "compress_s"])
    rep.add(method="none (full index)", budget="-", kept=1.0, **{"nDCG@10": base.ndcg10, "retention": 1.0,
            "recall@100": base.recall100, "MRR@10": base.mrr10, "compress_s": 0.0})
    curves: dict[str, tuple[list[float], list[float]]] = {}
    runs: list[tuple[str, ReduceSpec, str]] = []
    levels = LEVELS[:1] if quick else LEVELS
    for m in POOLING:
        for f, _ in levels:
            label = m + "".join(f" ({v})" for v in PARAMS.get(m, {}).values())
            runs.append((label, _spec(m, factor=f), f"factor {f:g}"))
    ratios = (0.5,) if quick else (0.7, *(x for _, x in LEVELS))  # most important first: pruning 30 % is a target
    for r in ratios:
        for m in PRUNING:
            runs.append((m, _spec(m, ratio=r), f"ratio {r:.2f}"))
    for r in (0.5,) if quick else (0.7, 0.5):
        for m in GLOBAL:
            runs.append((f"{m} (global)", _spec(m, ratio=r, scope="global"), f"ratio {r:.2f}"))
    # rows already measured by an interrupted run of this same command are reused (delete the file to start over);
    # rows without the current qrels convention (e.g. from before the Cleverdon-grade fix) are measured again
    done_file = RESULTS / "colbert_retention_rows.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            row = json.loads(line)
            if row.get("grades") == data.grades:
                done[f"{row['method']}|{row['budget']}"] = row
    for i, (label, spec, budget) in enumerate(runs):
        row = done.get(f"{label}|{budget}")
        if row is None:
            dst = work / f"dst{i}"
            t0 = time.perf_counter()
            res = compress(src, dst, spec, texts=data.doc_texts, tokenizer=tok, max_length=maxlen)
            sec = time.perf_counter() - t0
            ev = evaluate_index(open_index(dst), data, q)
            row = {"method": label, "budget": budget, "kept": res.dst.n_vectors / res.src.n_vectors,
                   "nDCG@10": ev.ndcg10, "retention": ev.ndcg10 / base.ndcg10, "recall@100": ev.recall100,
                   "MRR@10": ev.mrr10, "compress_s": sec, "grades": data.grades}
            with open(done_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            import shutil

            shutil.rmtree(dst)
        rep.add(**row)
        xs, ys = curves.setdefault(label, ([], []))
        xs.append(row["kept"])
        ys.append(row["retention"])
        print(f"{time.strftime('%H:%M:%S')} {label:22s} {budget:12s} kept {row['kept']:.3f} "
              f"nDCG@10 {row['nDCG@10']:.4f} ({row['retention']:.2%}) compress {row['compress_s']:.1f} s", flush=True)
    rep.notes.append(f"Cranfield, {len(data.doc_ids)} documents, {len(data.query_ids)} judged queries, "
                     f"{int(lens.sum()):,} all-MiniLM-L6-v2 token vectors (L2-normalised, [CLS] protected); "
                     "exact MaxSim; retention = nDCG@10 after / before.")
    return rep, {"base": base, "curves": curves}


_PYLATE_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from pylate.models.colbert import ColBERT
    flat = torch.from_numpy(np.load(sys.argv[1])); lens = np.load(sys.argv[2]); out = sys.argv[3]
    docs = list(torch.split(flat, lens.tolist()))
    res = {}
    for f in (2, 3, 4):
        t0 = time.perf_counter()
        pooled = ColBERT.pool_embeddings_hierarchical(None, docs, pool_factor=f, protected_tokens=1)
        sec = time.perf_counter() - t0
        np.save(f"{out}/pooled{f}.npy", torch.cat(pooled).numpy())
        np.save(f"{out}/lens{f}.npy", np.array([p.shape[0] for p in pooled], dtype=np.int64))
        res[f] = sec
    print(json.dumps(res))
''')


def pylate_part(data: BeirData, q: list[torch.Tensor], flat: torch.Tensor, lens: np.ndarray, work: Path,
                base_ndcg: float) -> Report:
    if not PYLATE_PY.exists():
        raise SystemExit(f"{PYLATE_PY} is missing: build .venv-pylate first (scripts/ci_pylate.sh)")
    np.save(work / "flat.npy", flat.numpy())
    np.save(work / "lens.npy", lens)
    proc = subprocess.run([str(PYLATE_PY), "-c", _PYLATE_SCRIPT, str(work / "flat.npy"), str(work / "lens.npy"),
                           str(work)], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"PyLate subprocess failed:\n{proc.stderr[-3000:]}")
    pylate_s = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    rep = Report("colbert_pylate", ["pool_factor", "impl", "vectors", "nDCG@10", "retention", "ms_per_doc",
                                    "speedup"])
    n_docs = len(lens)
    chunk = Chunk(0, 0, lens, flat)
    for f in (2, 3, 4):
        pl_flat = torch.from_numpy(np.load(work / f"pooled{f}.npy"))
        pl_lens = np.load(work / f"lens{f}.npy")
        pl_idx = write_raw(work / f"pylate{f}", pl_flat, doclens=pl_lens.tolist(), ids=data.doc_ids)
        pl_ev = evaluate_index(open_index(pl_idx), data, q)
        rep.add(pool_factor=f, impl="PyLate 1.6.0 (scipy Ward per doc)", vectors=int(pl_lens.sum()),
                **{"nDCG@10": pl_ev.ndcg10, "retention": pl_ev.ndcg10 / base_ndcg,
                   "ms_per_doc": 1e3 * pylate_s[f] / n_docs, "speedup": 1.0})
        for method in ("ward_cosine_pool", "ward_pool"):
            spec = _spec(method, factor=f)
            reduce_chunk(Chunk(0, 0, lens[:50], flat[: int(lens[:50].sum())]), spec)  # warm-up
            t0 = time.perf_counter()
            ours = reduce_chunk(chunk, spec)
            our_s = time.perf_counter() - t0
            our_idx = write_raw(work / f"{method}{f}", ours.vectors, doclens=ours.doclens.tolist(), ids=data.doc_ids)
            our_ev = evaluate_index(open_index(our_idx), data, q)
            rep.add(pool_factor=f, impl=f"unipruner {method} (batched torch)", vectors=int(ours.doclens.sum()),
                    **{"nDCG@10": our_ev.ndcg10, "retention": our_ev.ndcg10 / base_ndcg,
                       "ms_per_doc": 1e3 * our_s / n_docs, "speedup": pylate_s[f] / our_s})
            print(f"factor {f}: PyLate {pl_ev.ndcg10:.4f} {pylate_s[f]:.2f}s | {method} {our_ev.ndcg10:.4f} "
                  f"{our_s:.2f}s", flush=True)
    rep.notes.append("Same embeddings, protected_tokens=1, one CPU thread each (PyLate in .venv-pylate as a "
                     "subprocess). Time = pooling all documents, divided by the number of documents.")
    return rep


_SCALE_SCRIPT = textwrap.dedent('''
    import json, sys, time, torch
    torch.set_num_threads(int(sys.argv[4]))
    from unipruner.adapters.colbert._compress import compress
    from unipruner.adapters.colbert._methods import ReduceSpec

    def status(key):  # VmHWM / VmRSS of this process image (ru_maxrss would include the parent's, kept across exec)
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    base = status("VmRSS")
    t0 = time.perf_counter()
    ticks = []
    r = compress(sys.argv[1], sys.argv[2], ReduceSpec("ward_pool", factor=2, protected=1), workers=int(sys.argv[3]),
                 progress=lambda d, a, b: ticks.append(round(time.perf_counter() - t0, 1)))
    sec = time.perf_counter() - t0
    print(json.dumps({"seconds": sec, "peak_mib": status("VmHWM"), "base_mib": base, "chunk_times": ticks,
                      "chunks": r.src.n_chunks, "n_in": r.src.n_vectors, "n_out": r.dst.n_vectors,
                      "bytes_in": r.src.n_bytes, "bytes_out": r.dst.n_bytes}))
''')


def scale_part(work: Path, sizes: tuple[int, ...] = (250_000, 500_000, 1_000_000)) -> Report:
    rep = Report("colbert_scale", ["vectors", "documents", "chunks", "seconds", "vectors_per_s", "peak_rss_mib",
                                   "rss_after_imports_mib", "bytes_in", "bytes_out"])
    rng = np.random.default_rng(0)
    for n in sizes:
        lens = rng.integers(32, 161, size=n // 60 + 10)
        lens = lens[: int(np.searchsorted(np.cumsum(lens), n)) + 1]
        lens[-1] -= int(lens.sum()) - n
        if lens[-1] < 1:
            lens = lens[:-1]
            lens[-1] += n - int(lens.sum())
        src = work / f"syn{n}"
        # random unit vectors (the pooling cost does not depend on the content)
        g = torch.Generator().manual_seed(n)
        vecs = torch.empty(n, 128, dtype=torch.float16)
        for a in range(0, n, 2**18):  # generate in slices to keep this process small too
            b = min(n, a + 2**18)
            vecs[a:b] = torch.nn.functional.normalize(torch.randn(b - a, 128, generator=g), dim=1).half()
        write_raw(src, vecs, doclens=lens.tolist(), dtype="float16")
        del vecs
        proc = subprocess.run([sys.executable, "-c", _SCALE_SCRIPT, str(src), str(work / f"out{n}"), "1", "2"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"scale run failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rep.add(vectors=n, documents=len(lens), chunks=r["chunks"], seconds=r["seconds"],
                vectors_per_s=n / r["seconds"], peak_rss_mib=r["peak_mib"], rss_after_imports_mib=r["base_mib"],
                bytes_in=r["bytes_in"], bytes_out=r["bytes_out"])
        print(f"{n:,} vectors: {r['seconds']:.1f} s, peak RSS {r['peak_mib']:.0f} MiB, chunks done at "
              f"{r['chunk_times']} s", flush=True)
        import shutil

        shutil.rmtree(src)
        shutil.rmtree(work / f"out{n}")
    rep.notes.append("Synthetic raw index (dim 128, float16, 32-160 vectors per document), Ward pool factor 2, "
                     "protected 1, workers=1, 2 torch threads, chunks of <= 2^18 vectors; peak RSS = VmHWM of a "
                     "fresh process (includes the RSS after importing torch and unipruner, shown separately).")
    return rep


def plot_retention() -> Path:
    """Retention vs fraction kept from the saved results (pooling solid, pruning dashed, global dotted, PyLate x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((RESULTS / "colbert_retention.json").read_text())["rows"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["budget"] != "-":
            curves.setdefault(r["method"], []).append((r["kept"], r["retention"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap = plt.get_cmap("tab20")
    for i, (label, pts) in enumerate(curves.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        style = ":" if "global" in label else ("-" if label.split()[0] in POOLING else "--")
        ax.plot(xs, ys, style, marker="o", ms=4, color=cmap(i % 20), label=label)
    pl = RESULTS / "colbert_pylate.json"
    if pl.exists():
        prow = [r for r in json.loads(pl.read_text())["rows"] if r["impl"].startswith("PyLate")]
        # PyLate keeps exactly as many vectors as our pooling at the same factor
        kept = {r["budget"]: r["kept"] for r in rows if r["method"] == "ward_pool"}
        pts = [(kept[f"factor {r['pool_factor']:g}"], r["retention"]) for r in prow
               if f"factor {r['pool_factor']:g}" in kept]
        if pts:
            ax.plot(*zip(*pts, strict=True), "kx", ms=9, label="PyLate pool_factor")
    ax.axhline(0.99, color="grey", lw=0.6)
    ax.axhline(0.97, color="grey", lw=0.6)
    ax.set_xlabel("fraction of vectors kept")
    ax.set_ylabel("nDCG@10 retention")
    ax.set_title("Cranfield, all-MiniLM-L6-v2 token vectors: retention vs vectors kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    out = IMG / "colbert_retention.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "retention", "pylate", "scale", "plot"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="retention at pool factor 2 / 50 %% kept only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = ("python benchmarks/colbert.py" + ("" if args.part == "all" else f" --part {args.part}")
           + (" --quick" if args.quick else ""))
    with tempfile.TemporaryDirectory(prefix="colbert-bench-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "retention", "pylate"):
            data = load_beir(shared_data("ir", "cranfield"))
            q, flat, lens = embeddings(data)
        if args.part in ("all", "retention"):
            rep, _ = retention_part(data, q, flat, lens, work, quick=args.quick)
            rep.print()
            if args.quick:  # a check, not the published table: saved under its own name
                rep.name = "colbert_retention_quick"
            rep.save(cmd)
            if not args.quick:
                plot_retention()
        if args.part in ("all", "pylate"):
            base = evaluate_index(open_index(write_raw(work / "base", flat, doclens=lens.tolist(),
                                                       ids=data.doc_ids)), data, q)
            torch.set_num_threads(1)
            rep = pylate_part(data, q, flat, lens, work, base.ndcg10)
            torch.set_num_threads(args.threads)
            rep.print()
            rep.save(cmd)
        if args.part in ("all", "scale"):
            rep = scale_part(work)
            rep.print()
            rep.save(cmd)
        if args.part == "plot":
            print(plot_retention())


if __name__ == "__main__":
    main()
