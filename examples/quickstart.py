"""Quickstart: score -> select -> reduce on a batch of token embeddings.

Run with ``python examples/quickstart.py``. Uses random tokens so it needs only torch.
"""

from __future__ import annotations

import torch

import unipruner
from unipruner import Budget
from unipruner.reduce import drop, merge_wavg
from unipruner.scorers import similarity

torch.manual_seed(0)
tokens = torch.randn(4, 197, 768)  # a ViT-B/16 batch: CLS + 196 patches
attn = torch.randn(4, 12, 197, 197).softmax(-1)  # attention probabilities of one layer

# 1. Any registered method by name, with a budget.
evit = unipruner.method("evit", budget=Budget(ratio=0.25))  # keeps CLS (protected=1)
keep = evit.select(tokens, attn=attn)  # sorted keep indices [4, 49]
kept, _ = drop(tokens, keep)
print("EViT keeps", tuple(kept.shape), "first index", keep[0, 0].item())

# 2. Set-valued selectors need no attention at all.
div = unipruner.method("divprune", keep=64)
print("DivPrune keeps", tuple(div.select(tokens).shape))

# 3. ToMe-style merging with size tracking: merge(...) / unmerge(...) closures.
merge, unmerge = similarity.bipartite_soft_matching(tokens, r=16, protected=1)
merged, size = merge_wavg(merge, tokens)
print("ToMe r=16:", tokens.shape[1], "->", merged.shape[1], "tokens; sizes sum", size.sum(1)[0].item())
print("dense again:", tuple(unmerge(merged).shape))

# 4. Ragged batches: a validity mask; rows keep different counts, padded with -1.
mask = torch.ones(4, 197, dtype=torch.bool)
mask[1, 100:] = False
keep = unipruner.topk(torch.rand(4, 197), Budget(ratio=0.5), mask=mask, protected=1)
print("ragged keep counts:", (keep >= 0).sum(1).tolist())

# 5. Pool a ColBERT document's vectors by Ward clustering (factor 2 = half the vectors).
doc = torch.nn.functional.normalize(torch.randn(180, 128), dim=-1)
pooled = unipruner.reduce.pool(doc, factor=2, method="ward", protected=1)
print("Ward pooling:", tuple(doc.shape), "->", tuple(pooled.shape))

print(f"{len(unipruner.methods())} methods registered; `unipruner methods` lists them.")
