"""Compress a context, then answer a question about it: batched, ragged, through ``generate()``."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import UniprunerError
from ...methods import Method
from ._patch import find, patch
from ._stats import KVStats

__all__ = ["Answers", "generate", "left_pad"]


@dataclass(frozen=True)
class Answers:
    """What :func:`generate` returns.

    Attributes
    ----------
    texts : list[str]
        One decoded answer per context (special tokens skipped, stripped).
    tokens : Tensor ``[B, T]``
        The generated token ids (right-padded with the pad id after an end-of-sequence).
    stats : KVStats
        Cache sizes after generation (per layer, before vs after compression).
    prefill_seconds, total_seconds : float
        Wall time of compressing the context(s), and of the whole call.
    description : str
        What was compressed (and which layers were left alone, e.g. Gemma 3's sliding layers).
    """

    texts: list[str]
    tokens: Tensor
    stats: KVStats
    prefill_seconds: float
    total_seconds: float
    description: str


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into ``(ids [B, L], mask [B, L])``.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # input conversion only
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _texts(value: str | Sequence[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise UniprunerError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    return list(value)


def _positions(mask: Tensor) -> Tensor:
    """Position ids from a (left-padded) mask, exactly as ``generate()`` derives them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def generate(model: Any, tokenizer: Any, contexts: str | Sequence[str], questions: str | Sequence[str] | None = None,
             *, method: str | Method = "snapkv", ratio: float | None = 0.5, max_new_tokens: int = 32,
             query_aware: bool = False, generation_kwargs: dict[str, Any] | None = None,
             **settings: Any) -> Answers:
    """Compress each context's KV cache, then answer its question with greedy ``generate()``.

    Query-agnostic by default (the kvpress protocol): the context is prefilled and compressed
    alone, then the question is fed on top of the compressed cache and the answer generated, so
    one compressed context can serve any question. ``query_aware=True`` compresses context +
    question together (SnapKV's observation window is then the question, as in the paper).

    A list of contexts of different lengths runs as one batch: left padding, per-row masks and
    per-row positions (the cache keeps each row's real tokens only).

    Parameters
    ----------
    model, tokenizer
        A supported Hugging Face causal LM and its tokenizer (not modified).
    contexts : str or list[str]
    questions : str or list[str], optional
        One per context (or one for all); None generates a continuation of the context.
    method, ratio
        As in :func:`unipruner.kv.patch` (``ratio`` = fraction kept); ``settings`` are passed on
        (``window=``, ``keep=``, ``evict=``...).
    max_new_tokens : int
    query_aware : bool
    generation_kwargs : dict, optional
        Extra ``generate()`` arguments (greedy decoding is the default).

    Returns
    -------
    Answers

    Examples
    --------
    With real weights: ``model, tok = unipruner.models.load_smollm2()``. Here a tiny random
    Llama and a whitespace tokenizer (what ``generate`` needs from one) keep it fast:

    >>> import torch, transformers
    >>> import unipruner
    >>> class Words:
    ...     pad_token_id, eos_token_id = 0, None
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": [1 + sum(map(ord, w)) % 49 for w in text.split()]}
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return " ".join(map(str, ids))
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
    ...     intermediate_size=64, vocab_size=50)).eval()
    >>> model.generation_config.eos_token_id = None
    >>> ans = unipruner.kv.generate(model, Words(), ["a b c d e f g h i j k l", "m n o p"], ["who?", "when?"],
    ...                             method="snapkv", ratio=0.5, window=2, max_new_tokens=3)
    >>> ans.tokens.shape, [s.tokens_kept for s in ans.stats.layers]  # 6 + 2 kept, then 1 + 2 fed per row
    (torch.Size([2, 3]), [14.0, 14.0])
    """
    t0 = time.perf_counter()
    ctx = _texts(contexts, "contexts")
    if not ctx:
        raise UniprunerError("contexts is empty")
    if questions is None:
        qs = [""] * len(ctx)
    else:
        qs = _texts(questions, "questions")
        if len(qs) == 1 and len(ctx) > 1:
            qs = qs * len(ctx)
        if len(qs) != len(ctx):
            raise UniprunerError(f"{len(ctx)} contexts but {len(qs)} questions; give one question per context")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UniprunerError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    ctx_ids = [list(tokenizer(c)["input_ids"]) for c in ctx]
    q_ids = [list(tokenizer(q, add_special_tokens=False)["input_ids"]) if q else [] for q in qs]
    for i, c in enumerate(ctx_ids):
        if not c:
            raise UniprunerError(f"context {i} is empty after tokenisation")
    device = next(model.parameters()).device
    gen = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
           "temperature": None, "top_p": None, "top_k": None}
    gen.update(generation_kwargs or {})
    two_step = not query_aware and any(q_ids)
    if two_step and not all(q_ids):
        raise UniprunerError("every context needs a non-empty question (or pass questions=None)")
    if find(model) is not None:
        raise UniprunerError(
            "unipruner.kv.generate patches the model itself (and unpatches it afterwards); this model is already "
            "patched by unipruner.kv: call unipruner.kv.unpatch(model) first, or run model.generate() under your patch"
        )
    with patch(model, method, ratio, **settings) as kv:
        with torch.inference_mode():
            if two_step:
                ids_c, mask_c = left_pad(ctx_ids, pad_id, device)
                ids_q, mask_q = left_pad(q_ids, pad_id, device)
                cache = kv.new_cache()
                fwd: dict[str, Any] = {"input_ids": ids_c, "attention_mask": mask_c,
                                       "position_ids": _positions(mask_c), "cache": cache, "use_cache": True}
                if "logits_to_keep" in inspect.signature(model.forward).parameters:
                    fwd["logits_to_keep"] = 1
                model(**fwd)
                t_prefill = time.perf_counter() - t0
                ids, mask = torch.cat([ids_c, ids_q], dim=1), torch.cat([mask_c, mask_q], dim=1)
                out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **gen)
            else:
                ids, mask = left_pad([c + q for c, q in zip(ctx_ids, q_ids, strict=True)], pad_id, device)
                out = model.generate(input_ids=ids, attention_mask=mask, **gen)
                t_prefill = float("nan")  # prefill happens inside generate()
            new = out[:, ids.shape[1]:]
            report = kv.stats()
            description = kv.describe()
    eos = tokenizer.eos_token_id
    texts = []
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return Answers(texts, new, report, t_prefill, time.perf_counter() - t0, description)
