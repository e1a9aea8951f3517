"""KV-cache compression benchmark on SmolLM2-135M-Instruct (CPU): retrieval, perplexity, cost.

1. ``kv_passkey`` — passkey retrieval in Paul Graham essays (``../shared/data/haystack/essays``) at
   several context lengths and needle depths, plain completion framing ("There is a pass key hidden in
   the following text ... What is the pass key? The pass key is"). Query-agnostic protocol (as kvpress):
   the context is prefilled and compressed alone, then the question is fed on the compressed cache and
   8 tokens are generated greedily; a row counts when the 5-digit key appears in the answer. Every
   method at ratio (fraction **kept**) 0.25 / 0.5 / 0.75 against the full cache. All depths of one
   length run as one batch: one prefill per (length, method, ratio) — that is the cost.
2. ``kv_ppl`` — compress-then-continue on WikiText-2 (test): prefill ``--ppl-prefill`` tokens,
   compress, teacher-force the next ``--ppl-cont`` tokens in one chunk on the compressed cache;
   perplexity and mean KL(full || compressed) of the next-token distributions.
3. ``kv_cost`` — prefill time, decode tokens/s, peak RSS growth and cache bytes at batch 1 and 8,
   as ratios to the uncompressed model in the same process.

4. ``kv_overhead`` — time overhead of SnapKV, StreamingLLM, TOVA and KNorm at ratio 0.5 as a ratio
   within this process: (prefill under ``kv.patch``) / (plain prefill), batch 1, on the token ids of
   the 1,024-token passkey prompts of ``kv_prompts.json``, interleaved rounds (plain, method, plain,
   method, ...; ``--rounds``, default 5, after a warm-up round), min over rounds of the wall and the
   process CPU time. ``kvpress_side.py --overhead`` measures kvpress's presses the same way in its own
   venv; when its ``kvpress_overhead.json`` exists both are printed side by side (``kv_overhead_vs_kvpress``;
   ``--part overhead-compare`` prints it again from the saved runs). Both sides also time the inside of
   their hooks during one prefill of every prompt (``_overhead.hook_seconds``), a finer measure than the
   end-to-end ratios.

Also writes ``benchmarks/results/kv_prompts.json`` (the exact prompts, for ``kvpress_side.py``) and,
when ``benchmarks/results/kvpress_side.json`` exists, prints kvpress's accuracy next to ours and the
overlap of kept token sets per layer and KV head (``--part compare``).

Run: ``python benchmarks/kv_cache.py`` (``--quick`` for a 2-minute smoke run; ``--part passkey|long|ppl|cost|
compare|plot|overhead``; ``all`` leaves out ``overhead``, about 7 min on its own). Defaults are sized for a
loaded 2-core CPU (about 30 min with the kvpress side): the grid at 1,024 tokens and depths 0/50/100 %, the
2k/4k sweep at ratio 0.5 only, perplexity on 1,024 + 128 tokens, cost at 512 tokens.
``torch.set_num_threads(1)`` by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, ROOT, Report, shared_data
from _overhead import hook_seconds, interleaved_overhead

import unipruner.adapters.kv_cache as kv
from unipruner.models import load_smollm2, model_path

IMG = ROOT / "docs" / "img"
# (label, method, extra settings); ratio is the fraction kept
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("streamingllm", "streamingllm", {}),
    ("h2o", "h2o", {}),
    ("snapkv", "snapkv", {}),
    ("tova", "tova", {}),
    ("knorm", "knorm", {}),
    ("vatp", "vatp", {}),
    ("random", "random", {}),
    ("divprune", "divprune", {}),
    ("dart", "dart", {}),
]
RATIOS = (0.25, 0.5, 0.75)
INTRO = ("There is a pass key hidden in the following text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "


# ------------------------------------------------------------------------------------ data


def essays_ids(tok: Any) -> list[int]:
    """All essays, concatenated and tokenised (no special tokens)."""
    files = sorted(shared_data("haystack", "essays").glob("*.txt"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def passkey_prompts(tok: Any, filler: list[int], length: int, depths: list[float], seed: int
                    ) -> list[dict[str, Any]]:
    """One prompt per depth: about ``length`` tokens of context with the key at ``depth`` of the filler."""
    rng = random.Random(seed)
    overhead = len(tok(INTRO + NEEDLE.format(key="00000") + QUESTION)["input_ids"])
    n = length - overhead
    out = []
    for i, depth in enumerate(depths):
        key = str(rng.randint(10000, 99999))
        start = (seed * 7919 + i * 1543) % (len(filler) - n)
        hay = tok.decode(filler[start:start + n])
        cut = int(len(hay) * depth)
        # the needle goes at a sentence boundary near the requested depth
        dot = hay.rfind(". ", 0, cut) if 0 < depth < 1 else -1
        cut = dot + 1 if dot > 0 else cut
        context = INTRO + hay[:cut] + NEEDLE.format(key=key) + hay[cut:]
        out.append({"length": length, "depth": depth, "key": key, "context": context, "question": QUESTION})
    return out


def wikitext_ids(tok: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the WikiText-2 test split (raw, LF line ends)."""
    raw = shared_data("wikitext2", "raw", "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    ids = tok(raw[: n * 8], add_special_tokens=False)["input_ids"][:n]
    if len(ids) < n:
        raise RuntimeError(f"WikiText-2 gave only {len(ids)} tokens, need {n}")
    return torch.tensor([ids])


# ------------------------------------------------------------------------------------ parts


def run_passkey(model: Any, tok: Any, lengths: list[int], depths: list[float], methods: list[tuple[str, str,
                dict[str, Any]]], ratios: tuple[float, ...], name: str = "kv_passkey"
                ) -> tuple[Report, list[dict[str, Any]]]:
    filler = essays_ids(tok)
    prompts: list[dict[str, Any]] = []
    for j, length in enumerate(lengths):
        prompts += passkey_prompts(tok, filler, length, depths, seed=j + 1)
    cols = ["method", "ratio", *[f"acc@{n}" for n in lengths], "acc", "kept", "s/prefill"]
    rep = Report(name, cols)
    configs: list[tuple[str, str, dict[str, Any], float]] = [("full", "knorm", {}, 1.0)]  # ratio 1 keeps everything
    configs += [(label, name, extra, r) for label, name, extra in methods for r in ratios]
    for label, name, extra, ratio in configs:
        accs, kept, t_pre = [], [], 0.0
        hits_all = 0
        for length in lengths:
            rows = [p for p in prompts if p["length"] == length]
            ans = kv.generate(model, tok, [p["context"] for p in rows], QUESTION, method=name, ratio=ratio,
                              max_new_tokens=8, **extra)
            hits = [p["key"] in t for p, t in zip(rows, ans.texts, strict=True)]
            for p, t, h in zip(rows, ans.texts, hits, strict=True):
                p.setdefault("answers", {})[f"{label}@{ratio}"] = [t, h]
            accs.append(sum(hits) / len(hits))
            hits_all += sum(hits)
            kept.append(ans.stats.ratio)
            t_pre += ans.prefill_seconds
        rep.add(method=label, ratio=ratio, **{f"acc@{n}": a for n, a in zip(lengths, accs, strict=True)},
                acc=hits_all / len(prompts), kept=sum(kept) / len(kept), **{"s/prefill": t_pre / len(lengths)})
        print(f"  {label} {ratio}: {[round(a, 2) for a in accs]}", flush=True)
    rep.notes.append(f"lengths {lengths} tokens, depths {depths}, {len(prompts)} prompts; query-agnostic "
                     "(context compressed alone, question fed afterwards); ratio = fraction kept; "
                     "'full' is the uncompressed cache")
    return rep, prompts


def _continuation(model: Any, cache: Any, prefix: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """Log-probabilities for ``cont`` given ``prefix``: prefill (compressing if patched), then one chunk."""
    n = prefix.shape[1]
    out = model(prefix, cache=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:]
    feed = cont[:, :-1]
    pos = torch.arange(n, n + feed.shape[1])[None]
    mask = torch.ones(1, n + feed.shape[1], dtype=torch.long)
    rest = model(feed, cache=cache, position_ids=pos, attention_mask=mask, use_cache=True).logits
    return torch.log_softmax(torch.cat([first, rest], 1).float(), -1)[0]


def run_ppl(model: Any, tok: Any, prefill: int, cont: int, methods: list[tuple[str, str, dict[str, Any]]],
            ratios: tuple[float, ...]) -> Report:
    ids = wikitext_ids(tok, prefill + cont)
    prefix, target = ids[:, :prefill], ids[:, prefill:]
    with torch.inference_mode():
        from transformers import DynamicCache

        ref = _continuation(model, DynamicCache(config=model.config), prefix, target)
    nll_full = -ref.gather(-1, target[0, :, None]).mean().item()
    rep = Report("kv_ppl", ["method", "ratio", "ppl", "ppl/full", "KL"])
    rep.add(method="full", ratio=1.0, ppl=float(torch.tensor(nll_full).exp()), **{"ppl/full": 1.0}, KL=0.0)
    for label, name, extra in methods:
        for r in ratios:
            with kv.patch(model, name, r, **extra) as h, torch.inference_mode():
                lp = _continuation(model, h.new_cache(), prefix, target)
            nll = -lp.gather(-1, target[0, :, None]).mean().item()
            kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
            rep.add(method=label, ratio=r, ppl=float(torch.tensor(nll).exp()),
                    **{"ppl/full": float(torch.tensor(nll - nll_full).exp())}, KL=kl)
            print(f"  {label} {r}: ppl x{torch.tensor(nll - nll_full).exp():.3f} KL {kl:.4f}", flush=True)
    rep.notes.append(f"WikiText-2 test, first {prefill} tokens prefilled and compressed, next {cont} teacher-forced "
                     "in one chunk (fixed-budget eviction of H2O/TOVA/StreamingLLM applies once per forward, so "
                     "the chunk's own tokens are not evicted); KL = mean KL(full || compressed) per token")
    return rep


class _PeakRSS:
    """Samples the process RSS every 2 ms in a thread; ``peak - start`` after the block."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> _PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _cost_once(model: Any, ids: torch.Tensor, mask: torch.Tensor, n_new: int, cache: Any
               ) -> tuple[float, float, int, Any]:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        out = model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        last, m = pos[:, -1], mask
        for _ in range(n_new):
            nxt = out.logits[:, -1].argmax(-1)
            m, last = torch.cat([m, torch.ones_like(m[:, :1])], 1), last + 1
            out = model(nxt[:, None], attention_mask=m, position_ids=last[:, None], cache=cache, use_cache=True)
        t2 = time.perf_counter()
    return t1 - t0, n_new * ids.shape[0] / (t2 - t1), mem.growth, cache


def run_cost(model: Any, tok: Any, length: int, batches: list[int], n_new: int, ratio: float,
             methods: list[tuple[str, str, dict[str, Any]]], repeat: int) -> Report:
    from transformers import DynamicCache

    filler = essays_ids(tok)
    rep = Report("kv_cost", ["batch", "method", "prefill x", "decode tok/s x", "peak mem x", "cache bytes x",
                             "prefill s", "decode tok/s", "cache MB"])
    with torch.inference_mode():
        for b in batches:
            rows = [filler[i * 911: i * 911 + length] for i in range(b)]
            ids, mask = kv.left_pad(rows, tok.pad_token_id or 0)
            base: dict[str, float] = {}
            res: dict[str, list[tuple[float, float, int, int]]] = {}
            # interleave the runs (one of each per round) so load from other processes hits all alike
            for _ in range(repeat):
                for label, name, extra in [("full", "", {}), *methods]:
                    if not name:
                        cache = DynamicCache(config=model.config)
                        pre, dec, mem, c = _cost_once(model, ids, mask, n_new, cache)
                        nbytes = sum(x.keys.numel() * x.keys.element_size() * 2 for x in c.layers)
                    else:
                        with kv.patch(model, name, ratio, **extra) as h:
                            pre, dec, mem, c = _cost_once(model, ids, mask, n_new, h.new_cache())
                            nbytes = sum(x.k.numel() * x.k.element_size() * 2 for x in c.layers)
                    res.setdefault(label, []).append((pre, dec, mem, nbytes))
            best = {k: (min(r[0] for r in v), max(r[1] for r in v), min(r[2] for r in v), v[-1][3])
                    for k, v in res.items()}
            base = dict(zip(("pre", "dec", "mem", "bytes"), best["full"], strict=True))
            for label, (pre, dec, mem, nbytes) in best.items():
                rep.add(batch=b, method=label, **{"prefill x": pre / base["pre"], "decode tok/s x": dec / base["dec"],
                        "peak mem x": mem / max(base["mem"], 1), "cache bytes x": nbytes / base["bytes"],
                        "prefill s": pre, "decode tok/s": dec, "cache MB": nbytes / 2**20})
    rep.notes.append(f"{length}-token contexts, ratio {ratio} kept, {n_new} greedy decode steps after the prefill; "
                     f"best of {repeat} interleaved rounds; peak mem = growth of process RSS during prefill + decode "
                     "(sampled every 2 ms); cache bytes = stored K+V at the end (padding slots included)")
    return rep


# ------------------------------------------------------------------------------------ time overhead

OVERHEAD_METHODS = ("snapkv", "streamingllm", "tova", "knorm")


def run_overhead(model: Any, tok: Any, prompts: list[dict[str, Any]], rounds: int, ratio: float = 0.5
                 ) -> tuple[Report, dict[str, Any]]:
    """Our time overhead per method (see ``interleaved_overhead``), on each prompt's context at batch 1."""
    from transformers import DynamicCache

    # the token ids kvpress_side.py feeds (add_special_tokens=False; 5.24's tokenizer adds none anyway)
    ids = [torch.tensor([tok(p["context"], add_special_tokens=False)["input_ids"]]) for p in prompts]

    def plain(x: torch.Tensor) -> Any:
        return model(x, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    def with_method(name: str) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            with kv.patch(model, name, ratio) as h:
                return model(x, cache=h.new_cache(), use_cache=True, logits_to_keep=1)
        return run

    with torch.inference_mode():
        res = interleaved_overhead(plain, {m: with_method(m) for m in OVERHEAD_METHODS}, ids, rounds)
        for m in OVERHEAD_METHODS:  # time inside our hooks (all four: masks, scoring, compression)
            fn = with_method(m)
            res["methods"][m]["hook_s"] = hook_seconds(
                kv.KVCompressor, ("_model_pre", "_model_post", "_attn_pre", "_attn_post"),
                lambda fn=fn: [fn(x) for x in ids])
    rep = Report("kv_overhead", ["method", "wall x", "CPU x", "wall x (median)", "plain s", "method s", "hook s"])
    for name, r in res["methods"].items():
        rep.add(method=name, **{"wall x": r["wall"], "CPU x": r["cpu"], "wall x (median)": r["wall_median"],
                "plain s": r["plain_s"], "method s": r["method_s"], "hook s": r["hook_s"]})
    rep.notes.append(f"prefill only, batch 1, ratio {ratio} kept, {len(ids)} prompts of {res['tokens']} tokens "
                     f"(ids sha1 {res['ids_sha1'][:12]}), {rounds} interleaved rounds after a warm-up; x = sum over "
                     "prompts of min-over-rounds time with the method / the same for the plain prefill run just "
                     f"before it; plain/plain spread (noise) {res['noise']:.3f}; threads {torch.get_num_threads()}")
    return rep, res


def compare_overhead(ours: dict[str, Any], theirs: dict[str, Any]) -> Report:
    """Side by side: our overhead ratios vs kvpress's, each measured within its own process."""
    rep = Report("kv_overhead_vs_kvpress", ["method", "ours wall x", "ours CPU x", "kvpress wall x",
                                            "kvpress CPU x", "verdict", "ours hook ms", "kvpress hook ms",
                                            "hook diff % of prefill"])
    noise = max(ours["noise"], theirs["noise"])
    for name, o in ours["methods"].items():
        t = theirs["methods"].get(name)
        if t is None:
            continue
        worse = max(o["wall"] - t["wall"], o["cpu"] - t["cpu"])
        verdict = ("met" if worse <= 0 else f"within noise (+{worse:.3f})" if worse <= noise
                   else f"missed (+{worse:.3f})")
        hooks = "hook_s" in o and "hook_s" in t
        rep.add(method=name, **{"ours wall x": o["wall"], "ours CPU x": o["cpu"], "kvpress wall x": t["wall"],
                "kvpress CPU x": t["cpu"], "verdict": verdict,
                "ours hook ms": 1e3 * o["hook_s"] if hooks else float("nan"),
                "kvpress hook ms": 1e3 * t["hook_s"] if hooks else float("nan"),
                "hook diff % of prefill": 100 * (o["hook_s"] / o["plain_s"] - t["hook_s"] / t["plain_s"])
                if hooks else float("nan")})
    same = ours["ids_sha1"] == theirs["ids_sha1"]
    plain_ours = min(m["plain_s"] for m in ours["methods"].values())
    plain_theirs = min(m["plain_s"] for m in theirs["methods"].values())
    rep.notes.append(f"x = prefill time with the method / plain prefill time in the same process (min over "
                     f"{ours['rounds']} / {theirs['rounds']} interleaved rounds, ours / kvpress); target: ours <= "
                     f"kvpress's; noise = max plain/plain spread {noise:.3f} (ours {ours['noise']:.3f}, kvpress "
                     f"{theirs['noise']:.3f}); token ids {'identical' if same else 'DIFFER'} (sha1); absolute plain "
                     f"prefill: ours {plain_ours:.2f} s, kvpress {plain_theirs:.2f} s (sum over "
                     f"{len(ours['tokens'])} prompts); hook ms = time inside the hooks during one prefill of "
                     "every prompt (min of 2; ours: the model and attention pre/post hooks, kvpress: "
                     "BasePress.forward_hook); hook diff = ours - kvpress as a share of each side's plain prefill")
    return rep


# ------------------------------------------------------------------------------------ kvpress comparison


def kept_indices(full_keys: torch.Tensor, kept_keys: torch.Tensor, valid: torch.Tensor | None = None) -> list[set[int]]:
    """Recover which positions a compressed layer kept by matching its keys to the full cache's keys.

    ``full_keys [H, T, D]``, ``kept_keys [H, S, D]`` (post-RoPE keys of one row); returns one set per head.
    """
    d = torch.cdist(kept_keys.float(), full_keys.float())  # [H, S, T]
    idx = d.argmin(-1)
    out = []
    for h in range(full_keys.shape[0]):
        sel = idx[h] if valid is None else idx[h][valid[h]]
        out.append(set(sel.tolist()))
    return out


def our_kept_sets(model: Any, ids: torch.Tensor, methods: list[tuple[str, str, dict[str, Any]]],
                  ratio: float) -> dict[str, list[list[list[int]]]]:
    """Per method: per layer, per KV head, the kept positions of our adapter on ``ids`` (one row)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        full = DynamicCache(config=model.config)
        model(ids, cache=full, use_cache=True, logits_to_keep=1)
        out: dict[str, list[list[list[int]]]] = {}
        for label, name, extra in methods:
            with kv.patch(model, name, ratio, **extra) as h:
                c = h.new_cache()
                model(ids, cache=c, use_cache=True, logits_to_keep=1)
            out[label] = [[sorted(s) for s in kept_indices(f.keys[0], lay.k[0], lay.slot_valid()[0])]
                          for f, lay in zip(full.layers, c.layers, strict=True)]
    return out


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> Report:
    rep = Report("kv_vs_kvpress", ["method", "ratio", "ours acc", "kvpress acc", "ours s/prefill",
                                   "kvpress s/prefill", "time x", "kept overlap", "min layer", "max layer"])
    for key, t in theirs["accuracy"].items():
        label, ratio = key.rsplit("@", 1)
        o = ours["accuracy"].get(key)
        if o is None:
            continue
        ov = [[len(set(a) & set(b)) / max(len(set(a) | set(b)), 1) for a, b in zip(la, lb, strict=True)]
              for la, lb in zip(ours["kept"].get(label, []), theirs["kept"].get(label, []), strict=True)]
        per_layer = [sum(x) / len(x) for x in ov] if ov else [float("nan")]
        rep.add(method=label, ratio=float(ratio), **{"ours acc": o["acc"], "kvpress acc": t["acc"],
                "ours s/prefill": o["s"], "kvpress s/prefill": t["s"], "time x": t["s"] / o["s"],
                "kept overlap": sum(per_layer) / len(per_layer), "min layer": min(per_layer),
                "max layer": max(per_layer)})
    rep.notes.append("kept overlap = Jaccard of the kept position sets, averaged over KV heads then layers, on one "
                     f"{theirs.get('overlap_length', '?')}-token prompt at ratio {theirs.get('overlap_ratio', '?')}; "
                     "time x = kvpress prefill time / ours (same prompts, separate processes)")
    return rep


# ------------------------------------------------------------------------------------ main


def plot(rep: Report) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = next(r["acc"] for r in rep.rows if r["method"] == "full")
    labels = list(dict.fromkeys(r["method"] for r in rep.rows if r["method"] != "full"))
    markers, styles = "osD^vP*Xh", ["-", "--", ":", "-."]
    for i, label in enumerate(labels):
        rows = sorted((r for r in rep.rows if r["method"] == label), key=lambda r: r["ratio"])
        dx = (i - (len(labels) - 1) / 2) * 0.008  # small offsets so equal accuracies stay visible
        ax.plot([r["ratio"] + dx for r in rows] + [1.0], [r["acc"] for r in rows] + [full],
                marker=markers[i % len(markers)], ls=styles[i % len(styles)], label=label, alpha=0.85)
    ax.axhline(full, color="k", ls="--", lw=0.8)
    ax.set_xlabel("fraction of the KV cache kept")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("SmolLM2-135M passkey retrieval, 1k tokens (query-agnostic)")
    ax.legend(fontsize=8, ncol=2)
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / "kv_passkey_accuracy.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-minute smoke run")
    ap.add_argument("--part", choices=["all", "passkey", "long", "ppl", "cost", "compare", "plot", "overhead",
                                           "overhead-compare"],
                    default="all")
    ap.add_argument("--lengths", default="1024", help="context lengths of the full method x ratio grid")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--long-lengths", default="2048,4096", help="lengths of the ratio-0.5 sweep (--part long)")
    ap.add_argument("--long-depths", default="0.5", help="needle depths of the long sweep")
    ap.add_argument("--ppl-prefill", type=int, default=1024)
    ap.add_argument("--ppl-cont", type=int, default=128)
    ap.add_argument("--cost-length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --part overhead")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a loaded 2-core machine, 2 threads spin and run ~10x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cmd = "python benchmarks/kv_cache.py " + " ".join(sys.argv[1:])
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    methods, ratios = METHODS, RATIOS
    if args.quick:
        lengths, depths, methods, ratios = [384], [0.5], [m for m in METHODS if m[0] in ("snapkv", "knorm")], (0.5,)
    parts = ["passkey", "long", "ppl", "cost", "compare"] if args.part == "all" else [args.part]
    if "plot" in parts:  # re-plot the saved passkey table
        saved = json.loads((RESULTS / "kv_passkey.json").read_text())
        print(plot(Report(saved["name"], saved["columns"], saved["rows"])))
        return
    if {"passkey", "long", "cost"} & set(parts):
        shared_data("haystack", "essays")  # missing data: one line and exit 1 before the model loads
    if "ppl" in parts:
        shared_data("wikitext2", "raw", "wiki.test.raw")
    model, tok = load_smollm2() if set(parts) - {"compare"} else (None, None)
    if "passkey" in parts:
        t0 = time.time()
        rep, prompts = run_passkey(model, tok, lengths, depths, methods, ratios)
        rep.notes.append(f"wall time {time.time() - t0:.0f} s")
        rep.print()
        print(rep.save(cmd))
        if not args.quick:
            print(plot(rep))
        over = next(p for p in prompts if p["length"] == lengths[min(1, len(lengths) - 1)])
        ids = tok(over["context"], return_tensors="pt")["input_ids"]
        side = [m for m in methods if m[0] in ("snapkv", "streamingllm", "tova", "knorm")]
        ours = {"accuracy": {f"{r['method']}@{r['ratio']}": {"acc": r["acc"], "s": r["s/prefill"]} for r in rep.rows},
                "kept": our_kept_sets(model, ids, side, 0.5)}
        payload = {"ratios": list(ratios), "lengths": lengths, "prompts": [
            {k: p[k] for k in ("length", "depth", "key", "context", "question")} for p in prompts],
            "overlap_context": over["context"], "overlap_ratio": 0.5, "ours": ours,
            "gguf": str(model_path("smollm2")), "eos_token_id": tok.eos_token_id}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "kv_prompts.json"
        path.with_suffix(".tmp").write_text(json.dumps(payload))
        os.replace(path.with_suffix(".tmp"), path)
    if "long" in parts:
        t0 = time.time()
        long_lengths = [768] if args.quick else [int(x) for x in args.long_lengths.split(",")]
        sub = [m for m in methods if m[0] in ("snapkv", "streamingllm", "knorm")]
        depths_long = [0.5] if args.quick else [float(x) for x in args.long_depths.split(",")]
        rep, _ = run_passkey(model, tok, long_lengths, depths_long, sub, (0.5,), name="kv_passkey_long")
        rep.notes.append(f"wall time {time.time() - t0:.0f} s")
        rep.print()
        print(rep.save(cmd))
    if "ppl" in parts:
        t0 = time.time()
        pre, cont = (256, 32) if args.quick else (args.ppl_prefill, args.ppl_cont)
        rep = run_ppl(model, tok, pre, cont, methods, ratios if args.quick else (0.25, 0.5))
        rep.notes.append(f"wall time {time.time() - t0:.0f} s")
        rep.print()
        print(rep.save(cmd))
    if "cost" in parts:
        t0 = time.time()
        cm = [m for m in methods if m[0] in ("streamingllm", "knorm", "snapkv", "tova", "h2o")]
        batches = [1, 2] if args.quick else [1, 8]
        rep = run_cost(model, tok, 256 if args.quick else args.cost_length, batches, 8 if args.quick else 16, 0.25,
                       cm, 1)
        rep.notes.append(f"wall time {time.time() - t0:.0f} s")
        rep.print()
        print(rep.save(cmd))
    if "compare" in parts:
        side = RESULTS / "kvpress_side.json"
        mine = RESULTS / "kv_prompts.json"
        if side.exists() and mine.exists():
            rep = compare(json.loads(mine.read_text())["ours"], json.loads(side.read_text()))
            rep.print()
            print(rep.save(cmd))
        else:
            print(f"no {side.name}: run benchmarks/kvpress_side.py in .venv-kvpress first")
    if "overhead" in parts:
        t0 = time.time()
        src = json.loads((RESULTS / "kv_prompts.json").read_text())
        prompts = src["prompts"][:1] if args.quick else src["prompts"]
        rep, res = run_overhead(model, tok, prompts, 2 if args.quick else args.rounds)
        rep.notes.append(f"wall time {time.time() - t0:.0f} s")
        rep.print()
        print(rep.save(cmd))
        raw = RESULTS / "kv_overhead_raw.json"
        raw.with_suffix(".tmp").write_text(json.dumps(res, indent=2))
        os.replace(raw.with_suffix(".tmp"), raw)
    if "overhead" in parts or "overhead-compare" in parts:
        side, raw = RESULTS / "kvpress_overhead.json", RESULTS / "kv_overhead_raw.json"
        if side.exists() and raw.exists() and not args.quick:
            both = compare_overhead(json.loads(raw.read_text()), json.loads(side.read_text()))
            both.print()
            print(both.save(cmd))
        elif not side.exists():
            print(f"no {side.name}: run .venv-kvpress/bin/python benchmarks/kvpress_side.py --overhead for kvpress's")


if __name__ == "__main__":
    main()
