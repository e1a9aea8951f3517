"""The method registry: one small frozen dataclass per method from the literature.

Every method answers "which tokens survive?" through the same interface:

* ``score(tokens, *, mask=None, **signals) -> [B, N]`` (scoring methods only; higher = keep),
* ``select(tokens, *, mask=None, **signals) -> LongTensor [B, K]`` (sorted keep indices,
  right-padded with ``-1`` in ragged batches),
* ``reduce(tokens, *, mask=None, sizes=None, **signals) -> Reduced`` (the reduced sequence:
  kept, merged, pooled or fused tokens, their sizes and the plan to unmerge them),
* merging methods also expose ``match(metric, r) -> (merge, unmerge)`` closures.

Signals are passed by name: ``attn=`` (``[B, H, N, N]``, ``[B, N, N]`` or the last rows
``[B, H, Q, N]``), ``query=`` (``[B, D]``), ``keys=``, ``values=``, ``sizes=``, ``previous=``
(hidden states before the layer), ``token_ids=``, ``hw=`` (``(h, w)`` grid for 2-D methods).

Methods hold only their settings (no state), so one instance can serve many models at once.

>>> import torch, unipruner
>>> m = unipruner.method("divprune", keep=4)
>>> m.select(torch.randn(2, 16, 8)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _pooling
from . import reduce as _reduce
from ._merge import MergeFn, MergePlan, UnmergeFn
from ._validate import check_grid, check_mask, check_tokens, valid_counts
from .errors import UniprunerError
from .scorers import diversity, graph, importance, similarity, temporal
from .select import Budget, topk

__all__ = [
    "MergingMethod",
    "Method",
    "MethodInfo",
    "Reduced",
    "ScoringMethod",
    "TextMethod",
    "method",
    "methods",
    "resolve",
]

DOMAINS = ("vit", "vlm", "kv", "rag", "colbert", "diffusion")
FAMILIES = ("importance", "similarity", "graph", "diversity")
REDUCTIONS = ("drop", "merge", "fuse")


@dataclass(frozen=True, eq=False)
class Reduced:
    """A reduced token sequence.

    Attributes
    ----------
    tokens : Tensor ``[B, K, D]``
    mask : Tensor ``[B, K]`` or None
        Validity of each output slot (``None`` = all valid).
    indices : Tensor ``[B, K]``
        Original position each output token stands for (its representative); ``-1`` for
        padding and for aggregate (fused/recycled) tokens.
    sizes : Tensor ``[B, K, 1]``
        How many original tokens each output token stands for.
    plan : MergePlan or None
        Maps every input token to its output slot (``None`` for pure dropping); use
        ``plan.unmerge(y)`` to spread per-slot outputs back over the input tokens.
    """

    tokens: Tensor
    mask: Tensor | None
    indices: Tensor
    sizes: Tensor
    plan: MergePlan | None = None


def _metric(tokens: Tensor, signals: Mapping[str, Any]) -> Tensor:
    """The similarity metric of matching / diversity methods: the keys when given, else the tokens."""
    keys = signals.get("keys")
    if keys is None:
        return tokens
    if not isinstance(keys, Tensor) or keys.shape[:2] != tokens.shape[:2]:
        raise UniprunerError(f"keys must be a tensor [B, N, Dk] matching the tokens {tuple(tokens.shape[:2])}")
    return keys


def _budget_default() -> Budget:
    return Budget(ratio=0.5)


@dataclass(frozen=True)
class Method(ABC):
    """Base class of every registered method: a budget, protected leading tokens, a reduction."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    domains: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    #: scores comparable across sequences, so one budget may be spent over a whole collection by
    #: score (ColBERT ``scope="global"``, Lassance et al. 2021); scoring methods only
    global_scope: ClassVar[bool] = False

    budget: Budget = field(default_factory=_budget_default)
    protected: int = 0
    reduction: str = "drop"

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.coerce(self.budget))
        if not isinstance(self.protected, int) or self.protected < 0:
            raise UniprunerError(f"protected must be a non-negative int, got {self.protected!r}")
        if self.reduction not in REDUCTIONS:
            raise UniprunerError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    # -- signals -----------------------------------------------------------------------------
    def _need(self, signals: Mapping[str, Any], key: str) -> Any:
        value = signals.get(key)
        if value is None:
            raise UniprunerError(
                f"method {self.name!r} needs the signal {key}= (it uses {', '.join(self.requires)})"
            )
        return value

    @abstractmethod
    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        """Sorted keep indices ``[B, K]`` (``-1``-padded in ragged batches)."""

    def reduce(self, tokens: Tensor, *, mask: Tensor | None = None, sizes: Tensor | None = None,
               **signals: Any) -> Reduced:
        """Select, then drop / merge / fuse the rest according to ``self.reduction``."""
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        keep = self.select(tokens, mask=mask, **signals)
        return _apply_reduction(self.reduction, tokens, keep, mask=mask, sizes=sizes,
                                scores=self._fuse_weights(tokens, mask, signals))

    def _fuse_weights(self, tokens: Tensor, mask: Tensor | None,
                      signals: Mapping[str, Any]) -> Tensor | None:
        return None


def _apply_reduction(reduction: str, tokens: Tensor, keep: Tensor, *, mask: Tensor | None,
                     sizes: Tensor | None, scores: Tensor | None) -> Reduced:
    b = tokens.shape[0]
    if sizes is None:
        sizes = torch.ones_like(tokens[..., :1])
    if reduction == "drop":
        kept, kmask = _reduce.drop(tokens, keep, mask)
        ksizes, _ = _reduce.drop(sizes, keep, mask)
        return Reduced(kept, kmask, keep, ksizes)
    if reduction == "merge":
        merged, msizes, plan = _reduce.merge_pruned(tokens, keep, size=sizes, mask=mask)
        return Reduced(merged, plan.out_mask, keep, msizes, plan)
    # fuse: EViT folds every inattentive token into one extra token, weighted by its score (its
    # CLS attention); scores that are not non-negative weights (e.g. -||k||) give a plain mean
    weights = None
    if scores is not None:
        w = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
        weights = w if bool((w >= 0).all()) else None
    out, omask, osizes = _reduce.recycle(tokens, keep, 1, size=sizes, mask=mask, weights=weights)
    idx = torch.cat([keep, torch.full((b, 1), -1, dtype=keep.dtype, device=keep.device)], dim=1)
    return Reduced(out, omask, idx, osizes)


@dataclass(frozen=True)
class ScoringMethod(Method):
    """A method that scores tokens and keeps the top ones (in original order)."""

    @abstractmethod
    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        """Scores ``[B, N]`` (higher = keep; masked positions are ``-inf``)."""

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        s = self.score(tokens, mask=mask, **signals)
        return topk(s, self.budget, mask=mask, protected=self.protected)

    def _fuse_weights(self, tokens: Tensor, mask: Tensor | None,
                      signals: Mapping[str, Any]) -> Tensor | None:
        return self.score(tokens, mask=mask, **signals)


# ----------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLSAttention(ScoringMethod):
    """EViT: keep the tokens the CLS token attends to most; optionally fuse the rest into one."""

    name: ClassVar[str] = "evit"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Liang et al., Not All Patches are What You Need (EViT), ICLR 2022"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm")
    requires: ClassVar[tuple[str, ...]] = ("attn",)
    summary: ClassVar[str] = "CLS-token attention, top-k; inattentive tokens fused (reduction='fuse')"
    protected: int = 1
    cls_index: int = 0

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.cls_attention(self._need(signals, "attn"), cls_index=self.cls_index,
                                        mask=mask)


@dataclass(frozen=True)
class LastQueryAttention(ScoringMethod):
    """FastV: keep the tokens the last query attends to most (mean over heads)."""

    name: ClassVar[str] = "fastv"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024"
    domains: ClassVar[tuple[str, ...]] = ("vlm", "kv")
    requires: ClassVar[tuple[str, ...]] = ("attn",)
    summary: ClassVar[str] = "attention from the last query row (or the last n rows)"
    n_queries: int = 1

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.query_attention(self._need(signals, "attn"), queries=self.n_queries,
                                          mask=mask)


@dataclass(frozen=True)
class TOVA(LastQueryAttention):
    """TOVA: evict the token the current (last) query attends to least."""

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Oren et al., Transformers are Multi-State RNNs (TOVA), EMNLP 2024"
    domains: ClassVar[tuple[str, ...]] = ("kv",)
    summary: ClassVar[str] = "last-token attention, applied as a fixed-size eviction policy"


@dataclass(frozen=True)
class TextAttention(ScoringMethod):
    """SparseVLM: keep the visual tokens the selected text tokens attend to most."""

    name: ClassVar[str] = "sparsevlm"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Zhang et al., SparseVLM: Visual Token Sparsification for VLMs, ICML 2025"
    domains: ClassVar[tuple[str, ...]] = ("vlm",)
    requires: ClassVar[tuple[str, ...]] = ("attn", "text_queries")
    summary: ClassVar[str] = "text-to-token attention (rows of chosen text tokens)"

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.query_attention(self._need(signals, "attn"),
                                          queries=self._need(signals, "text_queries"), mask=mask)


@dataclass(frozen=True)
class H2O(ScoringMethod):
    """H2O heavy hitters: accumulated attention per key (optionally / number of attending rows)."""

    name: ClassVar[str] = "h2o"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference, NeurIPS 2023"
    domains: ClassVar[tuple[str, ...]] = ("kv", "vlm")
    requires: ClassVar[tuple[str, ...]] = ("attn",)
    summary: ClassVar[str] = "column sums of the causal attention map (normalize: / (n - j))"
    normalize: bool = False

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.accumulated_attention(self._need(signals, "attn"),
                                                normalize=self.normalize, mask=mask)


@dataclass(frozen=True)
class SnapKV(ScoringMethod):
    """SnapKV: observation-window attention, pooled, window always kept."""

    name: ClassVar[str] = "snapkv"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"
    domains: ClassVar[tuple[str, ...]] = ("kv", "vlm")
    requires: ClassVar[tuple[str, ...]] = ("attn",)
    summary: ClassVar[str] = "window queries' attention summed per key, 1-D pooled (kernel 5)"
    window: int = 32
    kernel: int = 5
    pool: str = "avg"

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        attn = self._need(signals, "attn")
        if attn.ndim == 4:
            attn = attn.mean(dim=1)
        s = importance.snapkv(attn, window=self.window, kernel=self.kernel, pool=self.pool)
        return s if mask is None else s.masked_fill(~mask, -math.inf)


@dataclass(frozen=True)
class VATP(ScoringMethod):
    """VATP: accumulated attention times the value norm; the first sink tokens are kept."""

    name: ClassVar[str] = "vatp"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Guo et al., Attention Score is not All You Need for Token Importance (VATP), EMNLP 2024"
    domains: ClassVar[tuple[str, ...]] = ("kv",)
    requires: ClassVar[tuple[str, ...]] = ("attn", "values")
    summary: ClassVar[str] = "accumulated attention x ||v||_1, sinks forced"
    protected: int = 4

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        acc = importance.accumulated_attention(self._need(signals, "attn"), mask=mask)
        values = self._need(signals, "values")
        if values.ndim == 4:  # [B, H, N, D] -> mean value norm over heads
            return importance.value_aware(acc.unsqueeze(1).expand(-1, values.shape[1], -1),
                                          values).mean(dim=1)
        return importance.value_aware(acc, values)


@dataclass(frozen=True)
class KNorm(ScoringMethod):
    """KNorm: keep the keys with the lowest L2 norm."""

    name: ClassVar[str] = "knorm"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = (
        "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, EMNLP 2024"
    )
    domains: ClassVar[tuple[str, ...]] = ("kv",)
    requires: ClassVar[tuple[str, ...]] = ("keys",)
    summary: ClassVar[str] = "-||k_j||_2 (uses the tokens when no keys are given)"

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        keys = signals.get("keys")
        s = importance.key_norm(tokens if keys is None else keys)
        if s.ndim == 3:
            s = s.mean(dim=1)
        return s if mask is None else s.masked_fill(~mask, -math.inf)


@dataclass(frozen=True)
class HiddenNorm(ScoringMethod):
    """Keep the tokens whose hidden state has the largest L2 norm."""

    name: ClassVar[str] = "hidden_norm"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = (
        "Hidden-state magnitude baseline (e.g. Kobayashi et al., Attention is Not Only a Weight, EMNLP 2020)"
    )
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm", "kv", "colbert")
    summary: ClassVar[str] = "||h_j||_2"
    global_scope: ClassVar[bool] = True

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.hidden_norm(tokens, mask=mask)


@dataclass(frozen=True)
class TokenTransition(ScoringMethod):
    """TransPrune: keep the tokens whose representation changed most across the layer."""

    name: ClassVar[str] = "transprune"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Li et al., TransPrune: Token Transition Pruning for Efficient LVLMs, 2025"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm")
    requires: ClassVar[tuple[str, ...]] = ("previous",)
    summary: ClassVar[str] = "change of h_j between layers (magnitude and/or direction)"
    mode: str = "both"

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.token_transition(self._need(signals, "previous"), tokens,
                                           mode=self.mode, mask=mask)


@dataclass(frozen=True)
class StreamingLLM(ScoringMethod):
    """StreamingLLM: the first ``n_sink`` tokens plus the most recent ones."""

    name: ClassVar[str] = "streamingllm"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    domains: ClassVar[tuple[str, ...]] = ("kv",)
    summary: ClassVar[str] = "positional: n_sink sinks + most recent tokens"
    n_sink: int = 4

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        b, n = tokens.shape[:2]
        return importance.positional(b, n, n_sink=self.n_sink, mask=mask, device=tokens.device)


@dataclass(frozen=True, eq=False)
class IDF(ScoringMethod):
    """Keep rare tokens: inverse document frequency of each token id in a collection."""

    name: ClassVar[str] = "idf"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Lassance et al., A Study on Token Pruning for ColBERT, 2021"
    domains: ClassVar[tuple[str, ...]] = ("colbert", "rag")
    requires: ClassVar[tuple[str, ...]] = ("token_ids", "doc_freq", "n_docs")
    summary: ClassVar[str] = "BM25 idf of the token id (needs the collection's document frequencies)"
    global_scope: ClassVar[bool] = True

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.idf(self._need(signals, "token_ids"), self._need(signals, "doc_freq"),
                              self._need(signals, "n_docs"), mask=mask)


@dataclass(frozen=True)
class QuerySimilarity(ScoringMethod):
    """Keep the tokens most similar to a query embedding (cosine; MaxSim for query matrices)."""

    name: ClassVar[str] = "query_similarity"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = (
        "Chen et al., Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by "
        "Text Information, 2024"
    )
    domains: ClassVar[tuple[str, ...]] = ("vlm", "rag")
    requires: ClassVar[tuple[str, ...]] = ("query",)
    summary: ClassVar[str] = "cos(token, query)"

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.query_similarity(tokens, self._need(signals, "query"), mask=mask)


@dataclass(frozen=True)
class RandomPrune(ScoringMethod):
    """Uniformly random selection: the baseline every method must beat."""

    name: ClassVar[str] = "random"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "random baseline"
    domains: ClassVar[tuple[str, ...]] = DOMAINS
    summary: ClassVar[str] = "uniform random scores (seeded)"
    seed: int = 0

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        s = importance.random_scores(tokens.shape[0], tokens.shape[1], generator=g).to(tokens.device)
        return s if mask is None else s.masked_fill(~mask, -math.inf)


# ----------------------------------------------------------------------------------------------
# graph
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroTPrune(ScoringMethod):
    """Zero-TPrune: weighted PageRank importance over the attention graph."""

    name: ClassVar[str] = "zero_tprune"
    family: ClassVar[str] = "graph"
    paper: ClassVar[str] = "Wang et al., Zero-TPrune: Zero-Shot Token Pruning through the Attention Graph, CVPR 2024"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm")
    requires: ClassVar[tuple[str, ...]] = ("attn",)
    summary: ClassVar[str] = "weighted PageRank over the head-averaged attention graph"
    protected: int = 1
    damping: float = 0.85
    tol: float = 1e-6
    max_iter: int = 100

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return graph.pagerank(self._need(signals, "attn"), damping=self.damping, tol=self.tol,
                              max_iter=self.max_iter, mask=mask)


@dataclass(frozen=True)
class GPrune(ScoringMethod):
    """G-Prune: importance propagated over a k-NN token similarity graph."""

    name: ClassVar[str] = "gprune"
    family: ClassVar[str] = "graph"
    paper: ClassVar[str] = "Jiang et al., What Kind of Visual Tokens Do We Need? (G-Prune), AAAI 2025"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm", "colbert")
    summary: ClassVar[str] = "similarity-graph propagation of (given or uniform) importance"
    k: int = 8
    alpha: float = 0.5
    n_iter: int = 10

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return graph.similarity_propagation(tokens, signals.get("scores"), k=self.k,
                                            alpha=self.alpha, n_iter=self.n_iter, mask=mask)


# ----------------------------------------------------------------------------------------------
# diversity (set-valued selectors)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DivPrune(Method):
    """DivPrune: max-min diverse subset (distance 1 - cos)."""

    name: ClassVar[str] = "divprune"
    family: ClassVar[str] = "diversity"
    paper: ClassVar[str] = "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for LMMs, CVPR 2025"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm", "kv", "colbert")
    summary: ClassVar[str] = "greedy max-min diversity on 1 - cos"

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        metric = _metric(tokens, signals)
        return diversity.divprune(metric, self.budget, mask=mask, protected=self.protected or None)


@dataclass(frozen=True)
class KCenter(Method):
    """Greedy k-center (farthest-first traversal) on L2-normalised tokens."""

    name: ClassVar[str] = "kcenter"
    family: ClassVar[str] = "diversity"
    paper: ClassVar[str] = "Gonzalez 1985; ToDRE: Li et al., Beyond Attention or Similarity, 2025"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm", "kv", "colbert")
    summary: ClassVar[str] = "farthest-first traversal starting from the most central token"

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return diversity.kcenter(tokens, self.budget, scores=signals.get("scores"), mask=mask,
                                 protected=self.protected or None)


@dataclass(frozen=True)
class MMR(Method):
    """Maximal marginal relevance: relevance to the query minus redundancy with the picks."""

    name: ClassVar[str] = "mmr"
    family: ClassVar[str] = "diversity"
    paper: ClassVar[str] = "Carbonell & Goldstein, The Use of MMR, Diversity-Based Reranking, SIGIR 1998"
    domains: ClassVar[tuple[str, ...]] = ("rag", "vlm")
    requires: ClassVar[tuple[str, ...]] = ("query",)
    summary: ClassVar[str] = "lambda * cos(q, d) - (1 - lambda) * max cos(d, chosen)"
    lambda_: float = 0.5

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return diversity.mmr(tokens, self._need(signals, "query"), self.budget,
                             lambda_=self.lambda_, mask=mask, protected=self.protected or None)


# ----------------------------------------------------------------------------------------------
# similarity (duplication, matching, pooling)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DART(Method):
    """DART: keep the tokens least duplicated with a few pivot tokens."""

    name: ClassVar[str] = "dart"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = (
        "Wen et al., Stop Looking for Important Tokens in MLLMs: Duplication Matters More (DART), 2025"
    )
    domains: ClassVar[tuple[str, ...]] = ("vlm", "kv", "vit")
    summary: ClassVar[str] = "pivots by key L1 norm; keep the tokens least similar to each pivot"
    n_pivots: int = 8

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return similarity.dart(tokens, self.budget, keys=signals.get("keys"),
                               n_pivots=self.n_pivots, pivot_tokens=signals.get("pivot_tokens"),
                               mask=mask, protected=self.protected or None)


@dataclass(frozen=True)
class MergingMethod(Method):
    """A method that merges tokens (size-weighted) instead of dropping them."""

    reduction: str = "merge"

    def match(self, metric: Tensor, r: int, **signals: Any) -> tuple[MergeFn, UnmergeFn]:
        """One matching round that removes ``r`` tokens: ``(merge, unmerge)`` closures."""
        raise UniprunerError(
            f"{self.name!r} has no pairwise matching round (it clusters whole sequences); use reduce()"
        )

    def _rounds(self, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]
                ) -> tuple[MergePlan, Tensor]:
        """Compose matching rounds until the budget is met: ``(plan over the input, representative index)``."""
        b, n = tokens.shape[:2]
        if mask is not None and not bool(mask.all()):
            raise UniprunerError(
                f"{self.name!r} merges whole batches: ragged (masked) batches are not supported; "
                "reduce each sequence separately"
            )
        target = int(self.budget.counts(valid_counts(None, b, n, torch.device("cpu")), n_max=n,  # counts: CPU
                                        scores=None if not self.budget.data_dependent else
                                        torch.zeros(b, n))[0])
        target = max(target, self.protected, 1)
        metric = _metric(tokens, signals)
        dst = torch.arange(n, device=tokens.device).expand(b, n).clone()  # input -> current slot
        rep = dst.clone()  # current slot -> representative input position
        cur = n
        while cur > target:
            r = self._round_size(cur, target)
            if r <= 0:
                break
            merge, _ = self.match(metric, r, **signals)
            plan = MergePlan.from_fn(merge)
            metric = merge(metric, mode="mean")
            # representative of each new slot: the smallest member position (the destination
            # token keeps its place in original order)
            rep = plan.merge(rep.unsqueeze(-1).double(), mode="amin").squeeze(-1).long()
            dst = plan.dst.gather(1, dst)
            cur = plan.n_out
        return MergePlan(dst, cur), rep

    def _round_size(self, cur: int, target: int) -> int:
        return min(cur - target, (cur - self.protected) // 2)

    def plan(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> tuple[MergePlan, Tensor]:
        """The merge map over ``tokens [B, N, D]`` that meets the budget, and each output slot's
        representative input position ``[B, n_out]`` (what adapters merge / unmerge around an op)."""
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        return self._rounds(tokens, mask, signals)

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        """Original positions of the surviving (representative) tokens, sorted."""
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        _, rep = self._rounds(tokens, mask, signals)
        return torch.sort(rep, dim=1).values

    def reduce(self, tokens: Tensor, *, mask: Tensor | None = None, sizes: Tensor | None = None,
               **signals: Any) -> Reduced:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        plan, rep = self._rounds(tokens, mask, signals)
        merged, msizes = _reduce.merge_wavg(plan, tokens, sizes)
        return Reduced(merged, None, rep, msizes, plan)


@dataclass(frozen=True)
class ToMe(MergingMethod):
    """ToMe: bipartite soft matching, size-weighted merging, order kept."""

    name: ClassVar[str] = "tome"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    domains: ClassVar[tuple[str, ...]] = ("vit", "vlm", "diffusion")
    summary: ClassVar[str] = "bipartite soft matching on keys; merge top-r edges; sizes tracked"

    def match(self, metric: Tensor, r: int, **signals: Any) -> tuple[MergeFn, UnmergeFn]:
        return similarity.bipartite_soft_matching(metric, r, protected=self.protected)


@dataclass(frozen=True)
class ToMeSD(MergingMethod):
    """ToMeSD: one destination per sx x sy window, merge the most similar sources."""

    name: ClassVar[str] = "tomesd"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "Bolya & Hoffman, Token Merging for Fast Stable Diffusion, CVPRW 2023"
    domains: ClassVar[tuple[str, ...]] = ("diffusion",)  # its 2-D windows need an intact grid at every layer
    requires: ClassVar[tuple[str, ...]] = ("hw",)
    summary: ClassVar[str] = "2-D stride matching (random or fixed destinations per window)"
    sx: int = 2
    sy: int = 2
    random_dst: bool = True
    seed: int = 0

    def _rounds(self, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]
                ) -> tuple[MergePlan, Tensor]:
        # one round only: the merged sequence is no longer a grid
        b, n = tokens.shape[:2]
        if mask is not None and not bool(mask.all()):
            raise UniprunerError("'tomesd' works on full latent grids; masks are not supported")
        target = self.budget.count(n) if not self.budget.data_dependent else n
        h, w = self._need(signals, "hw")
        cap = n - math.ceil(h / self.sy) * math.ceil(w / self.sx)
        if n - target > cap:
            raise UniprunerError(
                f"tomesd can remove at most {cap} of {n} tokens with {self.sx}x{self.sy} windows "
                f"(one destination per window); the budget asks to remove {n - target}"
            )
        metric = _metric(tokens, signals)
        merge, _ = self.match(metric, n - target, hw=(h, w), generator=signals.get("generator"))
        plan = MergePlan.from_fn(merge)
        if plan.rep is not None:
            return plan, plan.rep
        pos = torch.arange(n, device=tokens.device).expand(b, n).unsqueeze(-1).double()
        return plan, plan.merge(pos, mode="amin").squeeze(-1).long()

    def match(self, metric: Tensor, r: int, **signals: Any) -> tuple[MergeFn, UnmergeFn]:
        """One stride-matching round; ``generator=`` (a seeded ``torch.Generator``) overrides
        ``seed`` for the destination draw (the diffusion adapter derives one per block and step)."""
        h, w = self._need(signals, "hw")
        g = signals.get("generator")
        if g is None:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
        return similarity.stride_matching_2d(metric, w, h, self.sx, self.sy, r,
                                             random_dst=self.random_dst, generator=g)


@dataclass(frozen=True)
class _Pooling(MergingMethod):
    """Pool tokens by clustering: each cluster becomes its mean (protected leading tokens kept)."""

    family: ClassVar[str] = "similarity"
    domains: ClassVar[tuple[str, ...]] = ("colbert", "vit", "vlm")
    paper: ClassVar[str] = (
        "Clavié et al., Reducing the Footprint of Multi-Vector Retrieval with Minimal Performance "
        "Impact via Token Pooling, 2024"
    )
    _labels: ClassVar[Callable[..., Tensor]]

    def _rounds(self, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]
                ) -> tuple[MergePlan, Tensor]:
        b, n = tokens.shape[:2]
        p = min(self.protected, n)
        nv = valid_counts(mask, b, n, tokens.device)
        if self.budget.data_dependent:
            raise UniprunerError(f"{self.name!r} needs a ratio, keep or pool-factor budget")
        valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device) if mask is None else mask
        prot = valid.clone()
        prot[:, p:] = False  # the first `protected` positions, where valid, stay as they are
        n_prot = prot.sum(dim=1)
        k = torch.maximum(self.budget.counts(nv, n_max=n, protected=n_prot), n_prot)
        rest_mask = valid & ~prot
        n_clusters = (k - n_prot).clamp(min=1)
        labels = self._cluster(tokens, n_clusters, rest_mask)
        labels = torch.where(rest_mask, labels + p, labels)
        labels[:, :p] = torch.where(prot[:, :p], torch.arange(p, device=tokens.device), -1)
        plan = _reduce.plan_from_labels(labels, int((n_clusters + p).max()))
        pos = torch.arange(n, device=tokens.device).expand(b, n).unsqueeze(-1).double()
        pos = torch.where(labels.unsqueeze(-1) < 0, torch.full_like(pos, math.inf), pos)
        rep = plan.merge(pos, mode="amin").squeeze(-1)
        rep = torch.where(torch.isfinite(rep), rep, torch.full_like(rep, -1)).long()
        return plan, rep

    @abstractmethod
    def _cluster(self, tokens: Tensor, n_clusters: Tensor, mask: Tensor) -> Tensor:
        """Cluster labels ``[B, N]`` (``-1`` outside ``mask``) with ``n_clusters`` per row."""

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        _, rep = self._rounds(tokens, mask, signals)
        big = torch.iinfo(torch.long).max
        out = torch.sort(rep.masked_fill(rep < 0, big), dim=1).values
        return out.masked_fill(out == big, -1)

    def reduce(self, tokens: Tensor, *, mask: Tensor | None = None, sizes: Tensor | None = None,
               **signals: Any) -> Reduced:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        plan, rep = self._rounds(tokens, mask, signals)
        if sizes is None:
            sizes = torch.ones_like(tokens[..., :1])
        if mask is not None:
            sizes = sizes * mask.unsqueeze(-1)
        merged, msizes = _reduce.merge_wavg(plan, tokens, sizes)
        return Reduced(merged, plan.out_mask, rep, msizes, plan)


@dataclass(frozen=True)
class WardPool(_Pooling):
    """Hierarchical (Ward) token pooling on L2-normalised vectors.

    Clavié, Chaffin & Adams 2024 token pooling with exact Euclidean Ward on unit vectors
    (:func:`unipruner.reduce.ward_labels`); PyLate's own criterion is :class:`WardCosinePool`.
    Budgets: :meth:`Budget.pool_factor` for PyLate's ``pool_factor`` count, or a ratio / keep.
    """

    name: ClassVar[str] = "ward_pool"
    summary: ClassVar[str] = "Ward clustering (Euclidean on unit vectors) -> cluster means"

    def _cluster(self, tokens: Tensor, n_clusters: Tensor, mask: Tensor) -> Tensor:
        return _reduce.ward_labels(tokens, n_clusters, mask=mask)


@dataclass(frozen=True)
class KMeansPool(_Pooling):
    """k-means token pooling on L2-normalised vectors (Clavié et al. 2024).

    Parameters
    ----------
    seed : int
        Seed of the initialisation.
    backend : {"torch", "faiss"}
        ``"torch"``: batched Lloyd iterations with k-means++ seeding, all documents at once.
        ``"faiss"``: one ``faiss.Kmeans`` per document (needs faiss-cpu). Both solve the same
        problem (same normalisation, same ``k`` per document, same protected tokens, 20 Lloyd
        iterations); results differ only by the solver's initialisation
        (:func:`unipruner.reduce.kmeans_labels`).
    """

    name: ClassVar[str] = "kmeans_pool"
    summary: ClassVar[str] = "k-means clustering -> cluster means (torch or faiss)"
    seed: int = 0
    backend: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in _pooling.KMEANS_BACKENDS:
            raise UniprunerError(f"kmeans_pool backend must be one of {_pooling.KMEANS_BACKENDS}, "
                                 f"got {self.backend!r}")

    def _cluster(self, tokens: Tensor, n_clusters: Tensor, mask: Tensor) -> Tensor:
        return _reduce.kmeans_labels(tokens, n_clusters, mask=mask, seed=self.seed, backend=self.backend)


# ----------------------------------------------------------------------------------------------
# vision-tower methods (VLM): CLS / received attention of a late tower layer, merged or spread
# ----------------------------------------------------------------------------------------------


def _vision_scores(m: Method, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]) -> Tensor:
    """Received attention ``[B, N]`` of the tokens (the CLS row, or the mean row when ``cls_index`` is None)."""
    s = importance.received_attention(m._need(signals, "attn"), cls_index=getattr(m, "cls_index", 0), mask=mask)
    if tuple(s.shape) != tuple(tokens.shape[:2]):
        raise UniprunerError(f"{m.name!r}: attn covers {tuple(s.shape)} (batch, tokens) but the tokens are "
                             f"{tuple(tokens.shape[:2])}")
    return s


def _positions(chosen: Tensor) -> Tensor:
    """Chosen mask ``[B, N]`` -> sorted positions ``[B, K]``, right-padded with ``-1``."""
    b, n = chosen.shape
    k = int(chosen.sum(dim=1).max()) if b else 0
    pos = torch.arange(n, device=chosen.device).expand(b, n)
    idx = torch.sort(pos.masked_fill(~chosen, n), dim=1).values[:, :k]
    return idx.masked_fill(idx == n, -1)


def _round_half_up(x: Tensor) -> Tensor:
    return torch.floor(x + 0.5).long()


def _check_cls_index(m: Method, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise UniprunerError(f"{m.name!r}: cls_index must be an int (the CLS row) or None (mean received "
                             f"attention, for towers without CLS), got {value!r}")


@dataclass(frozen=True)
class VisionZip(MergingMethod):
    """VisionZip: dominant tokens by CLS attention, the rest merged into a few contextual tokens.

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025. The budget is the number of output tokens, dominant plus contextual (``ratio`` the
    fraction of the valid tokens, as everywhere). ``contextual`` of them (a fraction of that count,
    rounded half up, or an int count; default ``10 / 64``, the paper's 54 + 10 at 64 tokens,
    108 + 20 at 128 and 162 + 30 at 192 are the same fraction) are contextual tokens; the others
    are the dominant tokens: the highest received attention
    (:func:`~unipruner.scorers.importance.received_attention`; the CLS row ``cls_index``, or
    ``cls_index=None`` for the mean attention a token receives, for towers without CLS such as
    SigLIP), protected tokens first. The
    remaining valid tokens are split into uniformly spaced targets and the rest, which join their
    most similar target (cosine on ``keys`` when given, else on the tokens); each target becomes
    the (size-weighted) mean of its group (:func:`unipruner.reduce.contextual_merge`).

    ``reduce`` returns the dominant tokens in original order and then the contextual ones, with
    sizes summing to the valid count and a plan over the input; ``select`` returns the kept
    representatives (dominant tokens and targets), sorted. ``reduction="drop"`` / ``"fuse"``
    apply to those representatives instead.

    Signals: ``attn`` (``[B, H, N, N]`` / ``[B, N, N]`` map, ``[B, H, Q, N]`` rows such as the CLS
    row ``Q = 1``, or a ``[B, N]`` importance vector) and optional ``keys`` ``[B, N, Dk]``.

    Deviations: a budget that keeps every valid token keeps them as they are (no contextual
    tokens), so keep-all is the identity; counts are per row on the valid tokens (ragged rows);
    the CLS token is kept only when protected (``protected=1``, the released code always keeps it).
    """

    name: ClassVar[str] = "visionzip"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = ("Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language "
                            "Models, CVPR 2025")
    domains: ClassVar[tuple[str, ...]] = ("vlm",)
    requires: ClassVar[tuple[str, ...]] = ("attn", "keys")
    summary: ClassVar[str] = "top CLS attention (dominant) + the rest merged into uniform targets (contextual)"
    cls_index: int | None = 0
    contextual: float | int = 10 / 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_cls_index(self, self.cls_index)
        c = self.contextual
        if isinstance(c, bool) or not isinstance(c, (int, float)) or (
                isinstance(c, float) and not 0.0 <= c < 1.0) or (isinstance(c, int) and c < 0):
            raise UniprunerError(f"visionzip: contextual is a fraction in [0, 1) of the kept tokens or a count "
                                 f">= 0, got {c!r}")

    def _parts(self, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``(dominant [B, N] bool, contextual count [B], scores [B, N])``."""
        a = _vision_scores(self, tokens, mask, signals)
        b, n = a.shape
        nv = valid_counts(mask, b, n, a.device)
        n_prot = nv.clamp(max=min(self.protected, n)) if mask is None else mask[:, :self.protected].sum(dim=1)
        total = torch.maximum(self.budget.counts(nv, n_max=n, scores=a, mask=mask), n_prot)
        if isinstance(self.contextual, float):
            c = _round_half_up(total.double() * self.contextual)
        else:
            c = torch.full_like(total, self.contextual)
        c = torch.minimum(c, total - n_prot)
        c = torch.where(total >= nv, torch.zeros_like(c), c)
        keep = topk(a, total - c, mask=mask, protected=self.protected or None)
        dominant = torch.zeros(b, n + 1, dtype=torch.bool, device=a.device)
        dominant.scatter_(1, torch.where(keep < 0, n, keep), True)
        return dominant[:, :n], c, a

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        dominant, c, _ = self._parts(tokens, mask, signals)
        valid = dominant.new_ones(dominant.shape) if mask is None else mask
        return _positions(dominant | _reduce.uniform_picks(valid & ~dominant, c))

    def reduce(self, tokens: Tensor, *, mask: Tensor | None = None, sizes: Tensor | None = None,
               **signals: Any) -> Reduced:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        if self.reduction != "merge":
            return _apply_reduction(self.reduction, tokens, self.select(tokens, mask=mask, **signals), mask=mask,
                                    sizes=sizes, scores=self._fuse_weights(tokens, mask, signals))
        dominant, c, _ = self._parts(tokens, mask, signals)
        out, omask, idx, osizes, plan = _reduce.contextual_merge(tokens, dominant, c, metric=_metric(tokens, signals),
                                                                 size=sizes, mask=mask)
        return Reduced(out, omask, idx, osizes, plan)

    def _fuse_weights(self, tokens: Tensor, mask: Tensor | None,
                      signals: Mapping[str, Any]) -> Tensor | None:
        return _vision_scores(self, tokens, mask, signals)


@dataclass(frozen=True)
class PruMerge(MergingMethod):
    """LLaVA-PruMerge: adaptive CLS-attention outliers, each updated with its key-nearest tokens.

    Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", 2024. Scores are the received attention
    (:func:`~unipruner.scorers.importance.received_attention`: the CLS row, or ``cls_index=None``
    for the mean received attention).

    Budget: with **no budget** (the default, ``unipruner.method("prumerge")``) the count is
    adaptive: the tokens above ``Q3 + factor * IQR`` of their row's scores
    (:func:`~unipruner.scorers.importance.iqr_outliers`; at least one per row), so rows keep
    different counts (``-1`` / mask padding). An explicit budget (``ratio=`` / ``keep=``) **fixes**
    the count, as the released code's non-adaptive path (top scores); ``adaptive=True`` with a
    budget makes it a **cap** on the adaptive count. Protected tokens are kept on top and take no
    part in the IQR rule or the merging.

    Merging (:func:`unipruner.reduce.knn_merge`): every kept token ``p`` becomes
    ``x_p + sum_{j in N_k(p)} a_j x_j`` over its ``k`` most key-similar pruned tokens
    (``neighbours="all"``: any other token, kept or pruned, as the released code does), weighted
    by their attention ``a`` (cosine on ``keys`` when given, else on the tokens).
    ``extra_token=True`` appends the released code's extra token ``sum_{j pruned} a_j x_j`` (one
    more than the budget). The plan / sizes partition the input by nearest kept token (or into
    the extra token).

    Signals: ``attn`` (``[B, H, N, N]`` map, ``[B, H, Q, N]`` rows such as the CLS row, or a
    ``[B, N]`` vector; non-negative) and optional ``keys`` ``[B, N, Dk]``.

    Deviations: neighbours are drawn from the pruned tokens by default, so a budget that keeps
    every token leaves them unchanged (keep-all is the identity); head-averaged attention (the
    released code attends once over the concatenated heads); the IQR count is used directly
    (the released code rounds ``N * count / N`` down); a row always keeps at least one token;
    the merge weights are not renormalised, as released (the paper writes a weighted average).
    """

    name: ClassVar[str] = "prumerge"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = ("Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large "
                            "Multimodal Models, 2024")
    domains: ClassVar[tuple[str, ...]] = ("vlm",)
    requires: ClassVar[tuple[str, ...]] = ("attn", "keys")
    summary: ClassVar[str] = "CLS-attention IQR outliers (adaptive count) + their k key-nearest tokens merged in"
    budget: Budget | None = None  # type: ignore[assignment]
    adaptive: bool | None = None
    cls_index: int | None = 0
    k: int = 32
    factor: float = 1.5
    extra_token: bool = False
    neighbours: str = "pruned"

    def __post_init__(self) -> None:
        if self.budget is None:
            if self.adaptive is False:
                raise UniprunerError(f"{self.name}: adaptive=False needs a budget (ratio= or keep=)")
            object.__setattr__(self, "budget", Budget(ratio=1.0))  # validate the rest like any method
            super().__post_init__()
            object.__setattr__(self, "budget", None)
        else:
            super().__post_init__()
        _check_cls_index(self, self.cls_index)
        if self.adaptive is not None and not isinstance(self.adaptive, bool):
            raise UniprunerError(f"{self.name}: adaptive must be True, False or None, got {self.adaptive!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise UniprunerError(f"{self.name}: k (neighbours merged per kept token) must be an int >= 1, "
                                 f"got {self.k!r}")
        if self.neighbours not in ("pruned", "all"):
            raise UniprunerError(f"{self.name}: neighbours must be 'pruned' or 'all', got {self.neighbours!r}")
        if not isinstance(self.extra_token, bool):
            raise UniprunerError(f"{self.name}: extra_token must be a bool, got {self.extra_token!r}")
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
            raise UniprunerError(f"{self.name}: factor (the IQR multiple) must be a finite number >= 0, got {f!r}")

    @property
    def is_adaptive(self) -> bool:
        """Whether the count comes from the IQR rule (no budget, or ``adaptive=True``)."""
        return self.budget is None if self.adaptive is None else self.adaptive

    def _adaptive_total(self, outliers: Tensor) -> Tensor:
        return outliers

    def _choose(self, a: Tensor, cand: Tensor, total: Tensor) -> Tensor:
        return _chosen(topk(a, total, mask=cand), cand.shape[1])

    def _parts(self, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``(kept [B, N] bool, protected [B, N] bool, scores [B, N])``."""
        a = _vision_scores(self, tokens, mask, signals)
        b, n = a.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=a.device) if mask is None else mask
        prot = torch.zeros_like(valid)
        prot[:, :min(self.protected, n)] = True
        prot &= valid
        cand = valid & ~prot
        n_cand = cand.sum(dim=1)
        cap = n_cand
        if self.budget is not None:
            n_prot = prot.sum(dim=1)
            cap = torch.maximum(self.budget.counts(valid.sum(dim=1), n_max=n, scores=a, mask=mask), n_prot) - n_prot
        total = cap
        if self.is_adaptive:
            m = importance.iqr_outliers(a, mask=cand, factor=self.factor).sum(dim=1).clamp(min=1)
            total = torch.minimum(self._adaptive_total(m), cap)
        total = torch.minimum(total, n_cand)
        return self._choose(a, cand, total) | prot, prot, a

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        return _positions(self._parts(tokens, mask, signals)[0])

    def reduce(self, tokens: Tensor, *, mask: Tensor | None = None, sizes: Tensor | None = None,
               **signals: Any) -> Reduced:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        kept, prot, a = self._parts(tokens, mask, signals)
        keep = _positions(kept)
        if self.reduction != "merge":
            return _apply_reduction(self.reduction, tokens, keep, mask=mask, sizes=sizes, scores=a)
        valid = torch.isfinite(a) if mask is None else mask
        weights = torch.where(valid, a, torch.zeros_like(a)).to(tokens.dtype)
        update = (keep >= 0) & ~prot.gather(1, keep.clamp(min=0))
        pool = valid & ~prot & (~kept if self.neighbours == "pruned" else torch.ones_like(kept))
        out, omask, idx, osizes, plan = _reduce.knn_merge(
            tokens, keep, weights, k=self.k, metric=_metric(tokens, signals), neighbours=pool,
            update=update, size=sizes, mask=mask, extra=self.extra_token)
        return Reduced(out, omask, idx, osizes, plan)

    def _fuse_weights(self, tokens: Tensor, mask: Tensor | None,
                      signals: Mapping[str, Any]) -> Tensor | None:
        return _vision_scores(self, tokens, mask, signals)


def _chosen(idx: Tensor, n: int) -> Tensor:
    """Sorted ``-1``-padded indices ``[B, K]`` -> chosen mask ``[B, N]``."""
    out = torch.zeros(idx.shape[0], n + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(1, torch.where(idx < 0, n, idx), True)
    return out[:, :n]


@dataclass(frozen=True)
class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge's outliers plus spatially uniform tokens, then the same merging.

    Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", 2024 (PruMerge+, about 25% of the tokens in the paper). Of the ``T`` kept
    (unprotected) tokens, ``u = round(T * spatial / (1 + spatial))`` are evenly spaced over the
    remaining tokens in row-major order (:func:`unipruner.reduce.uniform_picks`) and the other
    ``T - u`` (at least one) are the top scores. Adaptive (no budget): ``T = m + round(spatial * m)``
    for ``m`` IQR outliers (``spatial = 3``: the released code's stride of a third of
    ``N / m``, about four times PruMerge's count); a budget fixes ``T`` (or caps it with
    ``adaptive=True``), exactly as for :class:`PruMerge`.

    Deviations: the uniform tokens are spaced over the tokens left after the outliers, so the
    count is exact (the released code strides over all tokens and skips the outliers it hits).
    """

    name: ClassVar[str] = "prumerge_plus"
    summary: ClassVar[str] = "PruMerge + spatially uniform tokens (about 4x the outliers), merged alike"
    spatial: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.spatial
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise UniprunerError(f"prumerge_plus: spatial (uniform tokens per outlier) must be a finite number "
                                 f">= 0, got {s!r}")

    def _adaptive_total(self, outliers: Tensor) -> Tensor:
        return outliers + _round_half_up(outliers.double() * float(self.spatial))

    def _choose(self, a: Tensor, cand: Tensor, total: Tensor) -> Tensor:
        u = _round_half_up(total.double() * float(self.spatial) / (1.0 + float(self.spatial)))
        o = torch.maximum(total - u, total.clamp(max=1))
        top = _chosen(topk(a, o, mask=cand), cand.shape[1])
        return top | _reduce.uniform_picks(cand & ~top, total - o)


@dataclass(frozen=True)
class HoloV(Method):
    """HoloV: the budget spread over spatial crops by their holistic score, the best tokens of each kept.

    Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic
    Context Retention" (HoloV), NeurIPS 2025 (:func:`unipruner.scorers.diversity.crop_balanced`).
    With ``hw=(h, w)`` the last ``h * w`` tokens are the patch grid, cut into ``crops`` windows
    (tokens before the grid must be protected); without it the tokens are cut into
    ``crops[0] * crops[1]`` contiguous runs (the released code). Each crop's share of the budget
    is ``softmax(log S_c / temperature)`` of its mean holistic score ``alpha * attention + beta *
    diversity``, and each crop keeps its best tokens by that score (``beta=0``: by attention, as
    released). The budget is the total kept (``ratio`` the fraction of the valid tokens).

    Signals: ``attn`` (``[B, H, N, N]`` map, ``[B, H, Q, N]`` rows such as the CLS row, or a
    ``[B, N]`` vector; non-negative), ``hw`` (optional), optional ``keys`` ``[B, N, Dk]`` (the
    similarities; default the tokens, which the released code uses).
    """

    name: ClassVar[str] = "holov"
    family: ClassVar[str] = "diversity"
    paper: ClassVar[str] = ("Zou et al., Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual "
                            "Holistic Context Retention (HoloV), NeurIPS 2025")
    domains: ClassVar[tuple[str, ...]] = ("vlm",)
    requires: ClassVar[tuple[str, ...]] = ("attn", "hw")
    summary: ClassVar[str] = "budget spread over spatial crops by holistic score; best tokens of each crop"
    cls_index: int | None = 0
    crops: tuple[int, int] = (4, 4)
    alpha: float = 1.0
    beta: float = 0.09
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_cls_index(self, self.cls_index)
        diversity.crop_balanced(torch.zeros(1, 1, 1), torch.ones(1, 1), 1, crops=self.crops, alpha=self.alpha,
                                beta=self.beta, temperature=self.temperature)  # validates the settings

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        a = _vision_scores(self, tokens, mask, signals)
        return diversity.crop_balanced(_metric(tokens, signals), a, self.budget, hw=signals.get("hw"),
                                       crops=self.crops, alpha=self.alpha, beta=self.beta,
                                       temperature=self.temperature, mask=mask, protected=self.protected or None)

    def _fuse_weights(self, tokens: Tensor, mask: Tensor | None,
                      signals: Mapping[str, Any]) -> Tensor | None:
        return _vision_scores(self, tokens, mask, signals)


# ----------------------------------------------------------------------------------------------
# ColBERT: pooling and static pruning of multi-vector documents (unipruner.adapters.colbert)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WardCosinePool(_Pooling):
    """Token pooling with PyLate's criterion: Ward fed the cosine distances ``1 - cos``.

    Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal
    Performance Impact via Token Pooling", 2024, as in PyLate's ``pool_factor``: scipy's Ward
    linkage on ``1 - cos`` of the normalised vectors, i.e. Lance–Williams on ``(1 - cos)^2``
    (:func:`unipruner.reduce.ward_cosine_labels`, batched on the core's Ward merge loop); each
    cluster becomes the mean of its members. With ``Budget.pool_factor(f)`` and ``protected=p``
    a document keeps ``p + max((n - p) // f, 1)`` vectors, exactly PyLate's count.
    """

    name: ClassVar[str] = "ward_cosine_pool"
    summary: ClassVar[str] = "Ward on (1 - cos)^2 (PyLate's pool_factor criterion) -> cluster means"

    def _cluster(self, tokens: Tensor, n_clusters: Tensor, mask: Tensor) -> Tensor:
        return _reduce.ward_cosine_labels(tokens, n_clusters, mask=mask)


@dataclass(frozen=True)
class SequentialPool(_Pooling):
    """1-D token pooling: runs of consecutive vectors of (almost) equal length become their means.

    The sequential baseline of Clavié, Chaffin & Adams 2024 token pooling
    (:func:`unipruner.reduce.sequential_labels`).
    """

    name: ClassVar[str] = "sequential_pool"
    domains: ClassVar[tuple[str, ...]] = ("colbert",)
    summary: ClassVar[str] = "equal runs of consecutive tokens -> their means"

    def _cluster(self, tokens: Tensor, n_clusters: Tensor, mask: Tensor) -> Tensor:
        return _reduce.sequential_labels(n_clusters, mask)


@dataclass(frozen=True)
class First(ScoringMethod):
    """Keep the first k vectors of every document (positional).

    Lassance et al., "A Study on Token Pruning for ColBERT", 2021: first-k pruning
    (:func:`unipruner.scorers.importance.leading`); strong on collections that open with a title.
    """

    name: ClassVar[str] = "first"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Lassance et al., A Study on Token Pruning for ColBERT, 2021"
    domains: ClassVar[tuple[str, ...]] = ("colbert",)
    summary: ClassVar[str] = "positional: the first k tokens"

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.leading(tokens.shape[0], tokens.shape[1], mask=mask, device=tokens.device)


@dataclass(frozen=True)
class Duplicates(ScoringMethod):
    """Drop near-duplicate vectors first: score ``1 - max cos`` to the vectors before each one.

    Acquavia et al., "Static Pruning for Multi-Representation Dense Retrieval", DocEng 2023
    (:func:`unipruner.scorers.similarity.novelty`); scores are comparable across documents.
    """

    name: ClassVar[str] = "duplicates"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "Acquavia et al., Static Pruning for Multi-Representation Dense Retrieval, DocEng 2023"
    domains: ClassVar[tuple[str, ...]] = ("colbert",)
    summary: ClassVar[str] = "1 - max cos to the earlier tokens (near-duplicates go first)"
    global_scope: ClassVar[bool] = True

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return similarity.novelty(tokens, mask=mask)


@dataclass(frozen=True)
class Centroid(ScoringMethod):
    """Keep the vectors most similar to the document's centroid direction.

    Acquavia et al., "Static Pruning for Multi-Representation Dense Retrieval", DocEng 2023
    (:func:`unipruner.scorers.importance.centroid_similarity`).
    """

    name: ClassVar[str] = "centroid"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Acquavia et al., Static Pruning for Multi-Representation Dense Retrieval, DocEng 2023"
    domains: ClassVar[tuple[str, ...]] = ("colbert",)
    summary: ClassVar[str] = "cos(token, normalised mean of the unit tokens)"
    global_scope: ClassVar[bool] = True

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.centroid_similarity(tokens, mask=mask)


@dataclass(frozen=True)
class Stopwords(ScoringMethod):
    """Prune stopwords and punctuation first, then the most frequent tokens (lowest IDF).

    Lassance et al., "A Study on Token Pruning for ColBERT", 2021
    (:func:`unipruner.scorers.importance.stopword_idf`). Signals: ``token_ids`` ``[B, N]``,
    ``doc_freq`` / ``n_docs`` (:func:`~unipruner.scorers.importance.idf_table`) and ``stop_ids``
    (the vocabulary ids of stopwords and punctuation).
    """

    name: ClassVar[str] = "stopwords"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Lassance et al., A Study on Token Pruning for ColBERT, 2021"
    domains: ClassVar[tuple[str, ...]] = ("colbert",)
    requires: ClassVar[tuple[str, ...]] = ("token_ids", "doc_freq", "n_docs", "stop_ids")
    summary: ClassVar[str] = "stopwords and punctuation first, then by IDF"
    global_scope: ClassVar[bool] = True

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return importance.stopword_idf(self._need(signals, "token_ids"), self._need(signals, "doc_freq"),
                                       self._need(signals, "n_docs"), self._need(signals, "stop_ids"),
                                       mask=mask)


# ----------------------------------------------------------------------------------------------
# text units (RAG): scores that need a tokenizer or a language model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextMethod(Method):
    """Base of the methods that score units of *text* (sentences, words, chunks) against a query.

    Their scores need a tokenizer or a language model, which only the RAG adapter loads (the core
    never imports transformers), so they run through :class:`unipruner.rag.ContextPruner`, which
    takes the registry name or the instance: ``ContextPruner(unipruner.method("bm25", k1=1.2))``.
    On tensors they refuse with an error that says so.
    """

    requires: ClassVar[tuple[str, ...]] = ("text", "query")

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        raise UniprunerError(
            f"{self.name!r} scores text units against a query, not tensors: use "
            f"unipruner.rag.ContextPruner({self.name!r}, ...)"
        )


@dataclass(frozen=True)
class BM25(TextMethod):
    """Okapi BM25 of each unit against the query, the query's units being the collection."""

    name: ClassVar[str] = "bm25"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Robertson & Zaragoza, The Probabilistic Relevance Framework: BM25 and Beyond, 2009"
    domains: ClassVar[tuple[str, ...]] = ("rag",)
    summary: ClassVar[str] = "BM25(query, unit) over the retrieved units"
    k1: float = 1.5
    b: float = 0.75


@dataclass(frozen=True)
class Hybrid(TextMethod):
    """BM25 and embedding similarity fused by reciprocal rank."""

    name: ClassVar[str] = "hybrid"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Cormack et al., Reciprocal Rank Fusion outperforms Condorcet, SIGIR 2009"
    domains: ClassVar[tuple[str, ...]] = ("rag",)
    summary: ClassVar[str] = "RRF of BM25 and cos(unit, query) ranks"
    k: float = 60.0


@dataclass(frozen=True)
class FocalAttention(TextMethod):
    """Attention of a causal LM's focal token (end of question + answer prefix) to each context token."""

    name: ClassVar[str] = "focal_attention"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Fang et al., AttentionRAG: Attention-Guided Context Pruning in RAG, 2025"
    domains: ClassVar[tuple[str, ...]] = ("rag",)
    summary: ClassVar[str] = "LM attention of the focal token to the unit"
    layers: tuple[int, ...] | None = None
    answer_prefix: str = "Answer:"


@dataclass(frozen=True)
class SelfInformation(TextMethod):
    """Self-information (surprisal) of each context token under a causal LM, after the question."""

    name: ClassVar[str] = "self_information"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = "Li et al., Compressing Context to Enhance Inference Efficiency of LLMs, EMNLP 2023"
    domains: ClassVar[tuple[str, ...]] = ("rag",)
    summary: ClassVar[str] = "-log p(token | question, context before it)"


@dataclass(frozen=True)
class Multihop(TextMethod):
    """Structure-aware: documents whose title is in the question (hop 1) or in a hop-1 document (hop 2), then BM25."""

    name: ClassVar[str] = "multihop"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = ("Fang et al., Hierarchical Graph Network for Multi-hop QA, EMNLP 2020 (title-based "
                            "paragraph selection); Xiong et al., Multi-Hop Dense Retrieval, ICLR 2021")
    domains: ClassVar[tuple[str, ...]] = ("rag",)
    summary: ClassVar[str] = "question/bridge title match per document, then lead sentence and BM25 per unit"
    hop_weight: float = 2.0
    bridge_weight: float = 1.5
    doc_weight: float = 2.0
    lead_bonus: float = 1.0
    k1: float = 1.5
    b: float = 0.75
    dense_weight: float = 0.0
    named_lead_bonus: float = 5.0
    rerank: str = "none"
    rerank_top_k: int = 16
    rerank_weight: float = 1.0
    rerank_cache_dir: str | None = None


# ----------------------------------------------------------------------------------------------
# diffusion: K/V downsampling (ToDo), G-WPR pruning with copy recovery (AT-EDM), cross-step
# reuse (CAT); the core pieces, applied inside a denoiser by unipruner.diffusion
# ----------------------------------------------------------------------------------------------


def _unit_real(m: Method, name: str, low: float, high: float, *, open_low: bool = False) -> None:
    v = getattr(m, name)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
    if ok:
        ok = (low < v if open_low else low <= v) and v <= high
    if not ok:
        lo = "(" if open_low else "["
        raise UniprunerError(f"{m.name!r}: {name} must be a number in {lo}{low}, {high}], got {v!r}")


def _full_grid(m: Method, tokens: Tensor, mask: Tensor | None, signals: Mapping[str, Any]) -> tuple[int, int]:
    if mask is not None and not bool(mask.all()):
        raise UniprunerError(f"{m.name!r} works on full latent grids; masks are not supported")
    return check_grid(m._need(signals, "hw"), tokens.shape[1])


@dataclass(frozen=True)
class ToDo(Method):
    """ToDo: self-attention reads keys / values from a downsampled token grid; every query stays.

    Smith, Saxena & Saha, "ToDo: Token Downsampling for Efficient Generation of High-Resolution
    Images", IJCAI 2024. The ``h x w`` grid of a self-attention layer's tokens is resized to
    ``h2 x w2`` (:func:`unipruner.reduce.downsample_grid`) and only the keys and values are taken
    from it, so attention costs ``N * h2 * w2`` instead of ``N^2`` and nothing needs unmerging.

    The grid: with ``factor=f``, ``(ceil(h / f), ceil(w / f))`` and the budget is not used;
    otherwise the budget (``ratio`` = fraction of the key / value tokens kept, or ``keep``) gives a
    target count ``t`` and the grid is the one with ``h2 * w2`` closest to ``t`` (each side between
    1 and the grid's), ties to the aspect ratio closest to ``h / w`` (by the factor between them,
    compared exactly), then to the smaller ``h2``.
    :meth:`kv_tokens` is what an attention processor calls; :meth:`select` returns the positions a
    nearest-neighbour resampling reads (the cell centres, ``"nearest-exact"``, for the other
    modes) and :meth:`reduce` returns the downsampled grid itself (sizes 1: ToDo attends to it
    without proportional attention).

    Parameters
    ----------
    mode : str
        Resampling: ``"nearest"`` (the released code's default, torch's floor rule),
        ``"nearest-exact"``, ``"area"``, ``"bilinear"`` or ``"bicubic"``.
    factor : int, optional
        Downsampling factor per side (the released code's ``downsample_factor``, 2 by default
        there); overrides the budget.

    Notes
    -----
    The released code downsamples to ``(h // f, w // f)``; we round up, so an odd grid keeps its
    last row / column and no side reaches 0 (the same grid whenever ``f`` divides the sides).
    Which layers (the released code: the highest-resolution ones) and which steps are reduced is
    the adapter's schedule.

    Examples
    --------
    >>> m = ToDo(factor=2)
    >>> kv, grid = m.kv_tokens(torch.randn(2, 64, 8), (8, 8))
    >>> kv.shape, grid
    (torch.Size([2, 16, 8]), (4, 4))
    >>> ToDo(budget=0.5).grid((4, 6))
    (3, 4)
    """

    name: ClassVar[str] = "todo"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = (
        "Smith et al., ToDo: Token Downsampling for Efficient Generation of High-Resolution Images, IJCAI 2024"
    )
    domains: ClassVar[tuple[str, ...]] = ("diffusion",)
    requires: ClassVar[tuple[str, ...]] = ("hw",)
    summary: ClassVar[str] = "self-attention K/V from a downsampled grid (queries full)"
    mode: str = "nearest"
    factor: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in _reduce.GRID_MODES:
            raise UniprunerError(f"'todo': mode must be one of {_reduce.GRID_MODES}, got {self.mode!r}")
        f = self.factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
            raise UniprunerError(f"'todo': factor must be an int >= 1 (2 halves each side) or None, got {f!r}")
        if self.reduction != "drop":
            raise UniprunerError("'todo' resamples the grid itself: reduction must be 'drop'")
        if f is None and self.budget.data_dependent:
            raise UniprunerError("'todo' needs a ratio or keep budget (or factor=) to size the key/value grid")

    def grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The key / value grid ``(h2, w2)`` for a token grid ``hw``."""
        h, w = check_grid(hw)
        if self.factor is not None:
            return -(-h // self.factor), -(-w // self.factor)
        t = max(1, self.budget.count(h * w))
        best = min(
            (abs(h2 * w2 - t), Fraction(max(h2 * w, w2 * h), min(h2 * w, w2 * h)), h2, w2)
            for h2 in range(1, h + 1)
            for w2 in {min(max(t // h2, 1), w), min(max(-(-t // h2), 1), w)}
        )
        return best[2], best[3]

    def kv_tokens(self, tokens: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Keys / values source ``[B, h2*w2, C]`` from the row-major grid ``tokens [B, h*w, C]``, and ``(h2, w2)``."""
        size = self.grid(check_grid(hw, check_tokens(tokens).shape[1]))
        return _reduce.downsample_grid(tokens, hw, size, self.mode), size

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        tokens = check_tokens(tokens)
        hw = _full_grid(self, tokens, check_mask(mask, tokens.shape[0], tokens.shape[1]), signals)
        rule = self.mode if self.mode in ("nearest", "nearest-exact") else "nearest-exact"
        idx = _reduce.grid_indices(hw, self.grid(hw), rule, device=tokens.device)
        return idx.expand(tokens.shape[0], -1).clone()

    def reduce(self, tokens: Tensor, *, mask: Tensor | None = None, sizes: Tensor | None = None,
               **signals: Any) -> Reduced:
        keep = self.select(tokens, mask=mask, **signals)
        kv, _ = self.kv_tokens(tokens, signals["hw"])
        return Reduced(kv, None, keep, torch.ones_like(kv[..., :1]))


ATEDM_RECOVERY = ("copy", "residual")


@dataclass(frozen=True)
class ATEDM(ScoringMethod):
    """AT-EDM: G-WPR importance over self-attention, top-k, pruned tokens recovered by similarity copy.

    Wang et al., "Attention-Driven Training-Free Efficiency Enhancement of Diffusion Models"
    (AT-EDM), CVPR 2024. Scores: :func:`unipruner.scorers.graph.gwpr` on the self-attention map
    (``attn=``, ``[B, H, N, N]``). The top tokens by the budget survive the block; before the next
    convolution :meth:`recover` restores the pruned ones from their most similar kept token
    (:func:`unipruner.reduce.copy_recover`; ``recovery="residual"`` copies the kept token's
    *update* onto the pruned token's own input instead).

    DSAP (denoising-steps-aware pruning) prunes less in the early steps, where the attention maps
    are still changing: :meth:`ratio_at` gives the fraction kept at a point of the run
    (``progress`` in ``[0, 1]``, 0 = first step): ``max(ratio, dsap_ratio)`` while
    ``progress < dsap_early``, the budget's ``ratio`` after. ``select`` / ``reduce`` apply it when
    given the signal ``progress=``.

    Parameters
    ----------
    damping, max_iter, tol, heads
        G-WPR settings (:func:`~unipruner.scorers.graph.gwpr`).
    dsap_early : float
        Fraction of the run, in ``[0, 1]``, counted as early (0 disables DSAP).
    dsap_ratio : float, optional
        Fraction kept in the early steps, in ``(0, 1]``; default ``(1 + ratio) / 2`` (half as many
        tokens pruned).
    recovery : str
        ``"copy"`` (the paper's) or ``"residual"``.

    Notes
    -----
    The paper's DSAP leaves some attention blocks unpruned in the early steps; a step-wise ratio is
    the per-call equivalent the core can express (which blocks to leave alone is the adapter's
    schedule), and the split point and early ratio are our defaults, not the paper's numbers.

    Examples
    --------
    >>> m = ATEDM(budget=0.5)
    >>> m.ratio_at(0.0), m.ratio_at(0.9)
    (0.75, 0.5)
    >>> attn = torch.randn(1, 2, 6, 6).softmax(-1)
    >>> keep = m.select(torch.randn(1, 6, 4), attn=attn)
    >>> keep.shape
    torch.Size([1, 3])
    """

    name: ClassVar[str] = "atedm"
    family: ClassVar[str] = "graph"
    paper: ClassVar[str] = (
        "Wang et al., Attention-Driven Training-Free Efficiency Enhancement of Diffusion Models (AT-EDM), CVPR 2024"
    )
    domains: ClassVar[tuple[str, ...]] = ("diffusion",)
    requires: ClassVar[tuple[str, ...]] = ("attn",)
    summary: ClassVar[str] = "G-WPR on self-attention; pruned tokens copied back (DSAP)"
    damping: float = 1.0
    max_iter: int = 30
    tol: float = 1e-6
    heads: str = "mean"
    dsap_early: float = 0.3
    dsap_ratio: float | None = None
    recovery: str = "copy"

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit_real(self, "dsap_early", 0.0, 1.0)
        if self.dsap_ratio is not None:
            _unit_real(self, "dsap_ratio", 0.0, 1.0, open_low=True)
        if self.heads not in graph.GWPR_HEADS:
            raise UniprunerError(f"'atedm': heads must be one of {graph.GWPR_HEADS}, got {self.heads!r}")
        if self.recovery not in ATEDM_RECOVERY:
            raise UniprunerError(f"'atedm': recovery must be one of {ATEDM_RECOVERY}, got {self.recovery!r}")

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return graph.gwpr(self._need(signals, "attn"), damping=self.damping, max_iter=self.max_iter,
                          tol=self.tol, heads=self.heads, mask=mask)

    def ratio_at(self, progress: float) -> float:
        """DSAP: the fraction kept at ``progress`` in ``[0, 1]`` of the denoising run (0 = first step)."""
        ratio = self.budget.ratio
        if ratio is None or self.budget.data_dependent:
            raise UniprunerError(f"'atedm': DSAP schedules a ratio budget, got {self.budget!r}")
        if (isinstance(progress, bool) or not isinstance(progress, (int, float))
                or not 0.0 <= float(progress) <= 1.0):
            raise UniprunerError(f"progress must be a number in [0, 1] (0 = first step), got {progress!r}")
        if float(progress) >= self.dsap_early:
            return float(ratio)
        early = (1.0 + ratio) / 2.0 if self.dsap_ratio is None else float(self.dsap_ratio)
        return max(float(ratio), early)

    def select(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        progress = signals.get("progress")
        if progress is None:
            return super().select(tokens, mask=mask, **signals)
        tokens = check_tokens(tokens)
        mask = check_mask(mask, tokens.shape[0], tokens.shape[1])
        s = self.score(tokens, mask=mask, **signals)
        return topk(s, Budget(ratio=self.ratio_at(progress)), mask=mask, protected=self.protected)

    def recover(self, kept: Tensor, keep: Tensor, features: Tensor, inputs: Tensor | None = None) -> Tensor:
        """Dense ``[B, N, C]`` outputs from the kept tokens' ``kept [B, K, C]`` (``recovery`` decides how).

        ``features [B, N, D]``: what similarity is measured on; ``inputs [B, N, C]``: the block
        inputs, needed by ``recovery="residual"``.
        """
        if self.recovery == "residual":
            if inputs is None:
                raise UniprunerError("'atedm' with recovery='residual' needs inputs= (the block inputs [B, N, C])")
            return _reduce.copy_recover(kept, keep, features, base=inputs)
        return _reduce.copy_recover(kept, keep, features)


@dataclass(frozen=True)
class CAT(ScoringMethod):
    """CAT pruning: recompute the tokens whose noise changed most since the last step; reuse the rest.

    Cheng, Chen & Jia, "CAT Pruning: Cluster-Aware Token Pruning For Text-to-Image Diffusion
    Models", 2025. The kept tokens are the ones recomputed at this step; the others reuse their
    cached outputs. Scores: :func:`unipruner.scorers.temporal.cat_scores` of the tokens (the
    current noise prediction or latent) against ``previous=`` (the same at the last step), with
    ``staleness=`` (steps since each token was recomputed; default 0) and ``hw=`` (spatial
    clusters; default runs of consecutive tokens).

    Parameters
    ----------
    staleness_weight : float
        Score added per step of staleness (in units of the average relative change).
    cluster : int
        Side of the spatial windows the selection is balanced over.
    balance : float
        Strength of the balance, in ``[0, 1]``.

    Examples
    --------
    >>> m = CAT(budget=0.25)
    >>> prev = torch.ones(1, 16, 4); cur = prev.clone(); cur[0, 5] += 1.0; cur[0, 10] += 0.5
    >>> m.select(cur, previous=prev, hw=(4, 4)).shape, int(m.score(cur, previous=prev, hw=(4, 4)).argmax())
    (torch.Size([1, 4]), 5)
    """

    name: ClassVar[str] = "cat"
    family: ClassVar[str] = "importance"
    paper: ClassVar[str] = (
        "Cheng et al., CAT Pruning: Cluster-Aware Token Pruning For Text-to-Image Diffusion Models, 2025"
    )
    domains: ClassVar[tuple[str, ...]] = ("diffusion",)
    requires: ClassVar[tuple[str, ...]] = ("previous", "staleness")
    summary: ClassVar[str] = "recompute the most changed tokens (+ staleness, clusters)"
    staleness_weight: float = 0.1
    cluster: int = 4
    balance: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit_real(self, "staleness_weight", 0.0, math.inf)
        _unit_real(self, "balance", 0.0, 1.0)
        if isinstance(self.cluster, bool) or not isinstance(self.cluster, int) or self.cluster < 1:
            raise UniprunerError(f"'cat': cluster must be an int >= 1 (the window side), got {self.cluster!r}")

    def scores(self, current: Tensor, previous: Tensor, staleness: Tensor | None = None, *,
               hw: tuple[int, int] | None = None, mask: Tensor | None = None) -> Tensor:
        """Scores ``[B, N]`` of ``current`` against ``previous`` (``[B, N, C]``), with ``staleness [B, N]``."""
        return temporal.cat_scores(current, previous, staleness, hw=hw, staleness_weight=self.staleness_weight,
                                   cluster=self.cluster, balance=self.balance, mask=mask)

    def score(self, tokens: Tensor, *, mask: Tensor | None = None, **signals: Any) -> Tensor:
        return self.scores(tokens, self._need(signals, "previous"), signals.get("staleness"),
                           hw=signals.get("hw"), mask=mask)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

_CLASSES: tuple[type[Method], ...] = (
    CLSAttention, LastQueryAttention, TOVA, TextAttention, H2O, SnapKV, VATP, KNorm, HiddenNorm,
    TokenTransition, StreamingLLM, IDF, QuerySimilarity, RandomPrune,
    ToMe, ToMeSD, DART, WardPool, KMeansPool,
    WardCosinePool, SequentialPool, First, Duplicates, Centroid, Stopwords,  # ColBERT
    ZeroTPrune, GPrune,
    DivPrune, KCenter, MMR,
    VisionZip, PruMerge, PruMergePlus, HoloV,  # vision-tower (VLM)
    BM25, Hybrid, FocalAttention, SelfInformation, Multihop,
    ToDo, ATEDM, CAT,  # diffusion
)

REGISTRY: Mapping[str, type[Method]] = MappingProxyType({c.name: c for c in _CLASSES})


@dataclass(frozen=True)
class MethodInfo:
    """One row of :func:`methods`: what a method is and where it applies."""

    name: str
    family: str
    paper: str
    domains: tuple[str, ...]
    requires: tuple[str, ...]
    summary: str
    cls: type[Method]


def methods(family: str | None = None, domain: str | None = None) -> list[MethodInfo]:
    """Every registered method, optionally filtered by family or domain.

    >>> import unipruner
    >>> len(unipruner.methods()) >= 20
    True
    >>> sorted({m.family for m in unipruner.methods()})
    ['diversity', 'graph', 'importance', 'similarity']
    """
    if family is not None and family not in FAMILIES:
        raise UniprunerError(f"unknown family {family!r}; choose from {FAMILIES}")
    if domain is not None and domain not in DOMAINS:
        raise UniprunerError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    out = []
    for c in _CLASSES:
        if family is not None and c.family != family:
            continue
        if domain is not None and domain not in c.domains:
            continue
        out.append(MethodInfo(c.name, c.family, c.paper, c.domains, c.requires, c.summary, c))
    return out


def method(name: str, budget: Budget | float | int | None = None, *, ratio: float | None = None,
           keep: int | None = None, threshold: float | None = None, **params: Any) -> Method:
    """Build a registered method by name.

    ``method("dart", keep=128)`` and ``method("dart", budget=Budget(keep=128))`` are the same
    as ``DART(budget=Budget(keep=128))``.

    >>> import unipruner
    >>> unipruner.method("divprune", budget=unipruner.Budget(keep=64))
    DivPrune(budget=Budget(keep=64), protected=0, reduction='drop')
    """
    cls = REGISTRY.get(name)
    if cls is None:
        close = [n for n in REGISTRY if name.lower().replace("-", "_") in n or n in name.lower()]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UniprunerError(f"unknown method {name!r}{hint}; `unipruner methods` lists them all")
    if any(v is not None for v in (budget, ratio, keep, threshold)):
        params["budget"] = Budget.coerce(budget, ratio=ratio, keep=keep, threshold=threshold)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UniprunerError(f"method {name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
    return cls(**params)


def resolve(method_: str | Method, budget: Budget | None = None, *, ratio: float | None = None,
            keep: int | None = None, hint: str = "ratio= (fraction kept), keep= or budget=", **params: Any) -> Method:
    """The method an adapter's ``patch(model, method, ratio=|keep=|budget=, **params)`` asks for.

    ``method_`` is a registry name (built with :func:`method`; a budget is required unless the
    method's own default is adaptive, e.g. PruMerge's IQR rule) or an instance (its parameters
    are its own; a budget keyword replaces its budget). At most one budget keyword; ``hint`` says
    in the error what the adapter's budget keywords mean.

    >>> resolve("divprune", keep=8).budget
    Budget(keep=8)
    """
    given = sum(x is not None for x in (ratio, keep, budget))
    if given > 1:
        raise UniprunerError("give one budget: ratio=, keep= or budget=")
    if isinstance(method_, Method):
        if params:
            raise UniprunerError(f"parameters {sorted(params)} go into the Method itself when passing an instance")
        return dataclasses.replace(method_, budget=Budget.coerce(budget, ratio=ratio, keep=keep)) if given else method_
    if isinstance(method_, str):
        cls = REGISTRY.get(method_)
        adaptive = cls is not None and any(f.name == "budget" and f.default is None for f in dataclasses.fields(cls))
        if not given and not adaptive:
            raise UniprunerError(f"no budget for {method_!r}: pass {hint}")
        return method(method_, budget, ratio=ratio, keep=keep, **params)
    raise UniprunerError(f"method must be a registry name or a unipruner Method, got {type(method_).__name__}")

