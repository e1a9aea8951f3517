"""RAG context pruning on HotpotQA (distractor, 10 paragraphs) and SQuAD, against LongLLMLingua.

For each scorer (plus random and oracle) and each compression (2x, 4x, 8x = keeping 50 / 25 /
12.5 % of the context's SmolLM2 tokens, one global budget per question, sentence units):
answer survival (a gold answer string still in the pruned context, over the questions whose
answer is in the full context), gold-paragraph recall (HotpotQA: gold paragraphs with at least
one unit kept), achieved compression, and scoring latency per query. On a subset: the answer's
negative log-likelihood under SmolLM2-135M-Instruct given the pruned vs the full context, and
llmlingua 0.2.2 (LongLLMLingua mode, SmolLM2 as its LM, in ``.venv-llmlingua``) on the same
inputs.

    python benchmarks/rag.py                         # defaults as in docs/benchmarks_rag.md
    python benchmarks/rag.py --n 100 --lm-n 12 --llmlingua-n 8
    python benchmarks/rag.py --n 50 --skip-lm --threads 1                  # fast scorers only
    python benchmarks/rag.py --start 100 --n 150 --skip-lm --threads 1     # the dev split (tuning)
    python benchmarks/rag.py --latency                                      # warm latency, demo question

Knobs (context_weight, fusion, feedback) are tuned on the dev split, HotpotQA questions 100-249
(``--start 100``); the reported tables use the first ``--n`` questions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, ROOT, Report, _atomic_write, plot, shared_data

import unipruner
from unipruner import Budget
from unipruner.adapters.rag import ContextPruner, ScoredContext
from unipruner.adapters.rag._pruner import TokenCounter

RATIOS = (0.5, 0.25, 0.125)


def load(name: str, n: int, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    """HotpotQA (``n`` from index ``start``) or a seeded SQuAD sample of ``n`` questions, as benchmark items."""
    if name == "hotpotqa":
        with gzip.open(shared_data("qa", "hotpotqa_distractor_dev250.jsonl.gz"), "rt", encoding="utf-8") as f:
            recs = [json.loads(x) for x in f][start:start + n]
    else:
        with gzip.open(shared_data("qa", "squad_v1.1_dev.jsonl.gz"), "rt", encoding="utf-8") as f:
            recs = [json.loads(x) for x in f]
        recs = random.Random(seed).sample(recs, n)
    items = []
    for r in recs:
        docs = [{"text": f"{c['title']}. {c['text']}" if name == "hotpotqa" else c["text"],
                 "metadata": {"gold": bool(c.get("is_gold", True)),
                              **({"title": c["title"]} if name == "hotpotqa" else {})}} for c in r["contexts"]]
        items.append({"question": r["question"], "answers": r["answers"], "docs": docs})
    return items


def single_hop(n: int, start: int = 0, seed: int = 0, k: int = 9) -> list[dict[str, Any]]:
    """The single-hop check: a SQuAD v1.1 dev question's paragraph among its ``k`` BM25-nearest
    paragraphs of *other* articles (lexical distractors fool lexical scorers), shuffled (seeded).

    Questions ``start .. start + n`` of a seeded permutation of the SQuAD dev questions (``--start
    100`` = the dev split, as for HotpotQA). Paragraphs carry no title (the lead-entity path of
    ``multihop``). BM25 (k1 = 1.5, b = 0.75) over all unique dev paragraphs, in plain Python.
    """
    import math
    import re

    with gzip.open(shared_data("qa", "squad_v1.1_dev.jsonl.gz"), "rt", encoding="utf-8") as f:
        recs = [json.loads(x) for x in f]
    paras: dict[str, str] = {}  # text -> article title
    for r in recs:
        for c in r["contexts"]:
            paras.setdefault(c["text"], c["title"])
    texts = list(paras)
    words = [re.findall(r"\w+", t.lower()) for t in texts]
    lens = [len(w) for w in words]
    avg = sum(lens) / len(lens)
    post: dict[str, dict[int, int]] = {}
    for i, ws in enumerate(words):
        for w in ws:
            post.setdefault(w, {}).setdefault(i, 0)
            post[w][i] += 1
    order = random.Random(seed).sample(range(len(recs)), len(recs))[start:start + n]
    items = []
    for qi in order:
        r = recs[qi]
        gold_text, gold_title = r["contexts"][0]["text"], r["contexts"][0]["title"]
        sc: dict[int, float] = {}
        for w in set(re.findall(r"\w+", r["question"].lower())):
            p = post.get(w, {})
            idf = math.log(1 + (len(texts) - len(p) + 0.5) / (len(p) + 0.5))
            for i, tf in p.items():
                sc[i] = sc.get(i, 0.0) + idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * lens[i] / avg))
        near = [i for i in sorted(sc, key=lambda i: (-sc[i], i)) if paras[texts[i]] != gold_title][:k]
        docs = [{"text": gold_text, "metadata": {"gold": True}}]
        docs += [{"text": texts[i], "metadata": {"gold": False}} for i in near]
        random.Random(seed + qi).shuffle(docs)
        items.append({"question": r["question"], "answers": r["answers"], "docs": docs})
    return items


def yes_no(answers: list[str]) -> bool:
    """A yes/no question (its answer string is in almost any context, so survival says nothing)."""
    return answers[0].strip().lower() in ("yes", "no")


class OracleScorer:
    """Upper bound: units holding an answer string score 2, other units of gold paragraphs 1."""

    name = "oracle"

    def __init__(self, answers: list[str], gold: list[bool]) -> None:
        self.answers, self.gold = answers, gold

    def score(self, query: str, texts: Any, spans: Any) -> list[torch.Tensor]:
        return [torch.tensor([2.0 * any(a in t[s:e] for a in self.answers) + float(self.gold[d])
                              for s, e in sp]) for d, (t, sp) in enumerate(zip(texts, spans, strict=True))]


def survived(text: str, answers: list[str]) -> bool:
    return any(a in text for a in answers)


def answer_nll(model: Any, tok: Any, context: str, question: str, answer: str) -> float:
    """Mean negative log-likelihood per answer token given context + question (completion framing)."""
    prompt = f"{context}\n\nQuestion: {question}\nAnswer:"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(p_ids) - 1:-1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(a_ids)))


def _norm_answer(text: str) -> list[str]:
    """SQuAD's answer normalisation (lower case, no punctuation, no articles), as words."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def em_f1(prediction: str, answers: list[str]) -> tuple[float, float]:
    """Exact match and token F1 of a prediction against the gold answers (the best answer), as SQuAD / HotpotQA.

    >>> em_f1("The Eiffel tower", ["Eiffel Tower"])
    (1.0, 1.0)
    """
    from collections import Counter

    pred = _norm_answer(prediction)
    best_em, best_f1 = 0.0, 0.0
    for a in answers:
        gold = _norm_answer(a)
        best_em = max(best_em, float(pred == gold))
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best_f1 = max(best_f1, 2 * p * r / (p + r))
    return best_em, best_f1


def generate_answer(model: Any, tok: Any, context: str, question: str, max_new_tokens: int = 16) -> str:
    """SmolLM2-Instruct's greedy short answer from a context (chat template, one user turn)."""
    msg = (f"{context}\n\nAnswer the question with a few words taken from the text above.\n"
           f"Question: {question}")
    ids = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return text.split("\n")[0].strip()


def export_smollm2(model: Any, tok: Any, path: Path) -> Path:
    """A plain HF directory of SmolLM2 (for transformers 4.46 in .venv-llmlingua)."""
    import transformers

    plain = transformers.LlamaForCausalLM(model.config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(path)
    tok.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return path


def latency(rounds: int = 5) -> None:
    """Warm latency of one prune on the demo question (10 HotpotQA paragraphs), per scorer setting.

    The model is loaded and warmed first; each setting runs ``rounds`` times with the scorer's
    token-state cache cleared before every run (a new question on new documents), and reports the
    minimum wall and process-CPU milliseconds (contention from other jobs only adds time).
    """
    from unipruner.adapters.rag import EmbeddingScorer
    from unipruner.adapters.rag._demo import demo_documents

    question, docs, _ = demo_documents()
    # (label, torch threads, scorer); settings the installed unipruner lacks are left out (this also
    # runs against older versions of the adapter, e.g. to measure a change)
    settings: list[tuple[str, int, Any]] = [("embedding", 1, "query_similarity"), ("embedding", 2, "query_similarity")]
    try:
        settings.append(("embedding, dtype=bfloat16", 1, EmbeddingScorer(dtype="bfloat16")))
        settings.append(("hybrid", 1, "hybrid"))
    except TypeError:
        pass
    settings += [("bm25", 1, "bm25"), ("bm25", 2, "bm25"), ("multihop", 1, "multihop")]
    rep = Report("rag_latency", ["scorer", "torch threads", "warm ms/query", "CPU ms/query", "rounds"])
    for label, threads, scorer in settings:
        torch.set_num_threads(threads)
        pruner = ContextPruner(scorer, Budget(ratio=0.25))
        pruner.prune(question, docs)  # load + warm up
        walls, cpus = [], []
        for _ in range(rounds):
            for sc in (pruner.scorer, getattr(pruner.scorer, "dense", None)):
                if sc is not None and hasattr(sc, "_cache"):
                    sc._cache.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            pruner.prune(question, docs)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        rep.add(**{"scorer": label, "torch threads": threads, "warm ms/query": 1e3 * min(walls),
                   "CPU ms/query": 1e3 * min(cpus), "rounds": rounds})
    rep.notes.append(f"demo question ({len(docs)} paragraphs), min over {rounds} warm runs, caches cleared; "
                     f"load average at the end {os.getloadavg()[0]:.2f}")
    rep.print()
    rep.save("python benchmarks/rag.py --latency")


def latency_cold_warm(n: int = 30, start: int = 100) -> None:
    """Latency per HotpotQA question (10 paragraphs) at one thread, cold vs warm caches, default and reranked.

    Each setting is warmed up once (model / ONNX session loaded), then for each of ``n`` questions
    from ``start``: *cold* = the first prune of that question with the embedding LRU emptied (the
    passages are new), *warm* = the same prune again (the passages repeat: every unit embedding
    comes from the LRU). Tokens are counted as words (the default ``TokenCounter``). Also timed
    once: building the ONNX int8 file into an empty cache directory (first use on a machine).
    """
    import shutil

    from unipruner.adapters.rag import MultihopScorer
    from unipruner.adapters.rag import _rerank as rr

    torch.set_num_threads(1)
    items = load("hotpotqa", n, start=start)
    words = statistics.mean(sum(len(d["text"].split()) for d in it["docs"]) for it in items)
    tmp = Path(tempfile.mkdtemp(prefix="rag_onnx_"))
    t0 = time.perf_counter()
    rr.ensure_onnx(tmp)
    build_s = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    settings: list[tuple[str, Any]] = [
        ("multihop (default, no model)", "multihop"),
        ("multihop + rerank, ONNX int8", unipruner.method("multihop", rerank="onnx")),
        ("multihop + rerank, torch fp32", unipruner.method("multihop", rerank="torch")),
        ("multihop + rerank, torch bf16", MultihopScorer(rerank="torch", _encoder=rr.MiniLMEncoder(
            backend="torch", torch_dtype="bfloat16"))),
        ("multihop, dense_weight=0.5 (all units, torch)", unipruner.method("multihop", dense_weight=0.5)),
    ]
    rep = Report("rag_latency_cold_warm", ["setting", "n", "cold ms median", "cold ms p90", "cold CPU ms median",
                                           "warm ms median", "warm ms p90", "warm CPU ms median"])
    for label, scorer in settings:
        pruner = ContextPruner(scorer, Budget(ratio=0.25))
        pruner.prune(items[0]["question"], items[0]["docs"])  # load + warm up
        enc = getattr(pruner.scorer, "_encoder", None)
        dense = getattr(pruner.scorer, "_dense", None)
        cold, warm, cold_cpu, warm_cpu = [], [], [], []
        for it in items:
            if enc is not None:
                enc.clear_cache()
            if dense is not None:
                dense._cache.clear()
            for wall, cpu in ((cold, cold_cpu), (warm, warm_cpu)):  # first-seen passages, then the same again
                t0, c0 = time.perf_counter(), time.process_time()
                pruner.prune(it["question"], it["docs"])
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        q = statistics.quantiles
        rep.add(**{"setting": label, "n": len(items), "cold ms median": 1e3 * statistics.median(cold),
                   "cold ms p90": 1e3 * q(cold, n=10)[-1], "cold CPU ms median": 1e3 * statistics.median(cold_cpu),
                   "warm ms median": 1e3 * statistics.median(warm), "warm ms p90": 1e3 * q(warm, n=10)[-1],
                   "warm CPU ms median": 1e3 * statistics.median(warm_cpu)})
        print(json.dumps(rep.rows[-1]), flush=True)
    rep.notes.append(f"HotpotQA questions {start}-{start + n - 1}: 10 paragraphs, {words:.0f} words on average; "
                     f"1 torch / onnxruntime thread; building the ONNX int8 file once took {build_s:.1f} s; "
                     f"load average at the end {os.getloadavg()[0]:.2f}")
    rep.print()
    rep.save(f"python benchmarks/rag.py --latency-cold-warm --n {n} --start {start}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="HotpotQA and SQuAD questions for the fast scorers")
    ap.add_argument("--lm-n", type=int, default=12, help="HotpotQA questions for SmolLM2 scorers and NLL")
    ap.add_argument("--llmlingua-n", type=int, default=8, help="HotpotQA questions for LLMLingua (0 = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--e2e-n", type=int, default=None,
                    help="HotpotQA questions for the end-to-end SmolLM2 table (answer EM / F1 / NLL from the full "
                         "vs the 4x-pruned context; default --lm-n, or 0 with --skip-lm)")
    ap.add_argument("--llmlingua-json", default=None,
                    help="reuse the output of an earlier llmlingua run on the same first --llmlingua-n questions")
    ap.add_argument("--scorers", default=None,
                    help="comma-separated scorer rows to run (default: all), e.g. bm25,embedding,hybrid")
    ap.add_argument("--skip-lm", action="store_true",
                    help="skip the SmolLM2 scorers, the answer-NLL table and running LLMLingua "
                         "(--llmlingua-json still adds the side-by-side table)")
    ap.add_argument("--start", type=int, default=0,
                    help="first HotpotQA question (100 = the dev split used for tuning; no SQuAD, no LLMLingua)")
    ap.add_argument("--no-single-hop", dest="single_hop", action="store_false",
                    help="skip the single-hop check (SQuAD question among its 9 BM25-nearest paragraphs)")
    ap.add_argument("--latency", action="store_true",
                    help="only the warm-latency table (demo question, min of 5 runs per scorer setting)")
    ap.add_argument("--latency-cold-warm", action="store_true",
                    help="only the cold / warm latency table per HotpotQA question at one thread (--n, --start)")
    args = ap.parse_args()
    if args.latency_cold_warm:
        latency_cold_warm(args.n, args.start)
        return
    if args.latency:
        latency()
        return
    torch.set_num_threads(args.threads)
    command = "python benchmarks/rag.py " + " ".join(sys.argv[1:])

    shared_data("qa", "hotpotqa_distractor_dev250.jsonl.gz")  # missing data: one line and exit 1 before the model
    if args.start == 0 or args.single_hop:
        shared_data("qa", "squad_v1.1_dev.jsonl.gz")

    from unipruner.models import load_smollm2

    model, tok = load_smollm2()
    counter = TokenCounter(tok)
    hot = load("hotpotqa", max(args.n, args.lm_n, args.llmlingua_n), start=args.start)
    squad = load("squad", args.n) if args.start == 0 else []
    one_hop = single_hop(args.n, start=args.start) if args.single_hop else []
    if args.start:
        args.llmlingua_n = 0
        args.llmlingua_json = None

    # LLMLingua runs first in its own venv (it is by far the slowest), on the first llmlingua-n questions
    ll_out: list[dict[str, Any]] | None = None
    ll_proc = None
    tmpdir = Path(tempfile.mkdtemp(prefix="rag_bench_"))
    venv_py = ROOT / ".venv-llmlingua" / "bin" / "python"
    if args.llmlingua_json:
        ll_out = json.loads(Path(args.llmlingua_json).read_text())[: args.llmlingua_n]
    elif args.llmlingua_n and venv_py.exists() and not args.skip_lm:
        export_smollm2(model, tok, tmpdir / "smollm2")
        job = {"model_dir": str(tmpdir / "smollm2"),
               "items": [{"question": it["question"], "docs": [d["text"] for d in it["docs"]], "ratios": [0.25]}
                         for it in hot[: args.llmlingua_n]]}
        (tmpdir / "in.json").write_text(json.dumps(job))
        env = dict(os.environ, RAG_THREADS="1")
        ll_proc = subprocess.Popen([str(venv_py), str(ROOT / "benchmarks" / "_rag_llmlingua.py"),
                                    str(tmpdir / "in.json"), str(tmpdir / "out.json")], env=env)

    scorers: dict[str, dict[str, Any]] = {
        "random": {"scorer": "random"},
        "multihop": {"scorer": "multihop"},
        "multihop+minilm1.0": {"scorer": unipruner.method("multihop", dense_weight=1.0)},
        "multihop+minilm0.5": {"scorer": unipruner.method("multihop", dense_weight=0.5)},
        "multihop+rerank": {"scorer": unipruner.method("multihop", rerank="onnx")},
        "multihop+rerank_torch": {"scorer": unipruner.method("multihop", rerank="torch")},
        "bm25": {"scorer": "bm25"},
        "bm25+prf": {"scorer": "bm25", "feedback": 1},
        "embedding": {"scorer": "query_similarity"},
        "embedding+prf": {"scorer": "query_similarity", "feedback": 1},
        "hybrid": {"scorer": "hybrid"},
        "hybrid+prf": {"scorer": "hybrid", "feedback": 1},
        "focal_attention": {"scorer": "focal_attention"},
        "self_information": {"scorer": "self_information"},
    }
    lm_scorers = {"focal_attention", "self_information"}
    if args.scorers:
        wanted = [x.strip() for x in args.scorers.split(",") if x.strip()]
        unknown = sorted(set(wanted) - set(scorers))
        if unknown:
            ap.error(f"unknown --scorers {unknown}; choose from {sorted(scorers)}")
        scorers = {k: v for k, v in scorers.items() if k in wanted}
    if args.skip_lm:
        scorers = {k: v for k, v in scorers.items() if k not in lm_scorers}
    dev = "_dev" if args.start else ""
    surv_rows = Report(f"rag_survival{dev}", ["dataset", "scorer", "n", "compression", "achieved", "survival",
                                              "survival_no_yesno", "gold_recall", "ms_per_query",
                                              "cpu_ms_per_query"])
    nll_rows = Report(f"rag_e2e{dev}", ["scorer", "n", "compression", "achieved", "survival", "exact_match", "f1",
                                        "answer_nll"])
    plots: dict[str, tuple[list[float], list[float]]] = {}
    kept_texts: dict[str, list[str]] = {}
    score_seconds: dict[str, float] = {}
    for ds_name, items in (("hotpotqa", hot[: args.n]), ("squad", squad), ("single_hop", one_hop)):
        if not items:
            continue
        answerable = [it for it in items if survived(" ".join(d["text"] for d in it["docs"]), it["answers"])]
        for label in ["oracle", *scorers]:
            subset = answerable[: args.lm_n] if label in lm_scorers else answerable
            if ds_name != "hotpotqa" and label in lm_scorers:
                continue
            ctxs: list[tuple[dict[str, Any], ScoredContext]] = []
            times, cpu_times = [], []
            pruner = None
            for it in subset:
                if label == "oracle":
                    pruner = ContextPruner(OracleScorer(it["answers"], [d["metadata"]["gold"] for d in it["docs"]]),
                                           Budget(ratio=0.25), tokenizer=tok, context_weight=0.0)
                elif pruner is None:
                    pruner = ContextPruner(budget=Budget(ratio=0.25), tokenizer=tok, **scorers[label])
                    pruner.prune("warm up", ["Warm up the model."], 1.0)
                t0, c0 = time.perf_counter(), time.process_time()
                ctxs.append((it, pruner.score(it["question"], it["docs"])))
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            assert pruner is not None
            if ds_name == "hotpotqa":
                score_seconds[label] = statistics.median(times)
            for r in RATIOS:
                res = [(it, pruner.select(c, Budget(ratio=r))) for it, c in ctxs]
                surv = statistics.mean(survived(p.text(), it["answers"]) for it, p in res)
                no_yn = [survived(p.text(), it["answers"]) for it, p in res if not yes_no(it["answers"])]
                gold = statistics.mean(
                    sum(it["docs"][d.index]["metadata"]["gold"] for d in p.documents)
                    / max(1, sum(x["metadata"]["gold"] for x in it["docs"])) for it, p in res)
                achieved = statistics.mean(p.stats.compression for _, p in res)
                surv_rows.add(dataset=ds_name, scorer=label, n=len(res), compression=f"{1 / r:.0f}x",
                              achieved=achieved, survival=surv,
                              survival_no_yesno=statistics.mean(no_yn) if no_yn else float("nan"), gold_recall=gold,
                              ms_per_query=1e3 * statistics.median(times),
                              cpu_ms_per_query=1e3 * statistics.median(cpu_times))
                if ds_name == "hotpotqa":
                    plots.setdefault(label, ([], []))[0].append(achieved)
                    plots[label][1].append(surv)
                    if r == 0.25:
                        kept_texts[label] = [p.text() for _, p in res]
            print(f"{ds_name} {label} done", flush=True)
            for row in surv_rows.rows[-len(RATIOS):]:
                print(json.dumps(row), flush=True)
        if ds_name == "hotpotqa":
            hot_answerable = answerable

    # end to end under SmolLM2-135M-Instruct, pruned (4x) vs full, on the first e2e-n answerable questions:
    # greedy short answer (exact match / F1) and the gold answer's NLL
    e2e_n = args.e2e_n if args.e2e_n is not None else (0 if args.skip_lm else args.lm_n)
    sub = hot_answerable[:e2e_n] if e2e_n else []
    rows: list[tuple[str, list[str]]] = [("full context", ["\n\n".join(d["text"] for d in it["docs"]) for it in sub])]
    rows += [(label, kept_texts[label][: len(sub)]) for label in ["oracle", *scorers]
             if sub and len(kept_texts.get(label, [])) >= len(sub)]
    for label, texts in rows if sub else []:
        nll = [answer_nll(model, tok, t, it["question"], it["answers"][0]) for t, it in zip(texts, sub, strict=True)]
        scores = [em_f1(generate_answer(model, tok, t, it["question"]), it["answers"])
                  for t, it in zip(texts, sub, strict=True)]
        ach = statistics.mean(counter.count("\n\n".join(d["text"] for d in it["docs"])) / max(1, counter.count(t))
                              for t, it in zip(texts, sub, strict=True))
        nll_rows.add(scorer=label, n=len(sub), compression="1x" if label == "full context" else "4x", achieved=ach,
                     survival=statistics.mean(survived(t, it["answers"]) for t, it in zip(texts, sub, strict=True)),
                     exact_match=statistics.mean(e for e, _ in scores), f1=statistics.mean(f for _, f in scores),
                     answer_nll=statistics.mean(nll))
        print(json.dumps(nll_rows.rows[-1]), flush=True)
    print("nll done", flush=True)

    # LLMLingua side by side on its subset
    ll_rows = Report("rag_llmlingua", ["method", "n", "compression", "achieved", "survival", "seconds_per_query"])
    if ll_proc is not None:
        ll_proc.wait()
        if ll_proc.returncode == 0:
            ll_text = (tmpdir / "out.json").read_text()
            ll_out = json.loads(ll_text)
            RESULTS.mkdir(parents=True, exist_ok=True)  # kept for --llmlingua-json in later runs
            _atomic_write(RESULTS / f"rag_llmlingua_{args.llmlingua_n}.json", ll_text)
        else:
            ll_rows.notes.append(f"llmlingua subprocess failed with exit code {ll_proc.returncode}")
    if ll_out is not None:
        items = hot[: args.llmlingua_n]
        keep = [i for i, it in enumerate(items) if survived(" ".join(d["text"] for d in it["docs"]), it["answers"])]
        texts = [ll_out[i]["0.25"]["text"] for i in keep]
        ach = statistics.mean(counter.count("\n\n".join(d["text"] for d in items[i]["docs"])) / max(1, counter.count(t))
                              for i, t in zip(keep, texts, strict=True))
        ll_rows.add(method="llmlingua (LongLLMLingua, SmolLM2)", n=len(keep), compression="4x", achieved=ach,
                    survival=statistics.mean(survived(t, items[i]["answers"])
                                             for i, t in zip(keep, texts, strict=True)),
                    seconds_per_query=statistics.mean(ll_out[i]["0.25"]["seconds"] for i in keep))
        for label in ["oracle", *scorers]:  # the first answerable questions: a prefix of each scorer's run
            texts = kept_texts[label][: len(keep)]
            if len(texts) < len(keep):
                continue
            ll_rows.add(method=f"unipruner {label}", n=len(texts), compression="4x",
                        achieved=statistics.mean(
                            counter.count("\n\n".join(d["text"] for d in items[i]["docs"])) / max(1, counter.count(t))
                            for i, t in zip(keep, texts, strict=True)),
                        survival=statistics.mean(survived(t, items[i]["answers"])
                                                 for i, t in zip(keep, texts, strict=True)),
                        seconds_per_query=score_seconds[label])
    for rep in (surv_rows, nll_rows, ll_rows):
        if not rep.rows:
            continue
        rep.notes.append(f"threads={args.threads}; survival over questions whose answer string is in the full context")
        rep.print()
        rep.save(command)
    out_png = ROOT / "docs" / "img" / "rag_survival.png"
    if args.start:
        out_png = ROOT / "benchmarks" / "results" / "rag_survival_dev.png"
    plot(out_png, plots, xlabel="achieved compression (x)",
         ylabel="answer survival", title="HotpotQA: answer survival vs compression (sentence units)")


if __name__ == "__main__":
    main()
