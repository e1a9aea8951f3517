"""The host matrix of unipruner.vlm: every supported VLM (tiny offline configs), the input and llm stages.

For each host of :mod:`tests._tiny_vlm`: keep-all is the unpatched model (bit-identical logits and greedy
tokens); ``unpatch()`` restores the model exactly (outputs and every module's hooks); a left-padded
batch of two different images equals each row alone; the KV cache after a pruned prefill holds the kept
length (input stage: every layer; ``llm`` stage at layer K: layers >= K only); ``stats()`` reports the
visual tokens per image before and after the budget; pruned ``generate()`` is deterministic.

Gemma 3 (``gemma3``: a sliding window of 8, smaller than every prompt; ``gemma3_wide``: 512) also runs
against a hand-written reference: the language model layer by layer on the kept rows at their original
positions, with its own dict of masks (causal or same image block; local layers within the window) built
plainly, an explicit ``DynamicCache`` and a greedy decode loop.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from _tiny_vlm import GEMMA_WINDOW, HOSTS, IMAGE, inputs, row_inputs, tiny_vlm, visual_counts
from test_vlm import _naive_divprune
from transformers.cache_utils import DynamicCache
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

import unipruner
from unipruner import Budget
from unipruner.errors import UniprunerError

NEW = 4  # greedy tokens generated per check

#: (method, patch keywords) per stage: DivPrune (Alvar et al., CVPR 2025) and random at the LLM
#: input, FastV (Chen et al., ECCV 2024) inside the LLM at layer 2 (after Qwen3-VL's 2 deepstack layers)
PRUNED: dict[str, tuple[str, dict[str, Any]]] = {
    "divprune-input": ("divprune", {"ratio": 0.5}),
    "random-input": ("random", {"ratio": 0.5}),
    "fastv-llm2": ("fastv", {"stage": "llm", "layer": 2, "ratio": 0.5}),
    "fastv-llm1-keep": ("fastv", {"stage": "llm", "layer": 1, "keep": 4}),
    "divprune-input-keep": ("divprune", {"keep": 6}),
}
#: the cases whose kept set is a function of each row alone (random draws depend on the batch)
ROW_WISE = ["divprune-input", "divprune-input-keep", "fastv-llm2", "fastv-llm1-keep"]
KEEP_ALL: dict[str, tuple[str, dict[str, Any]]] = {
    "divprune-input": ("divprune", {"ratio": 1.0}),
    "random-input": ("random", {"ratio": 1.0}),
    "fastv-llm2": ("fastv", {"stage": "llm", "layer": 2, "ratio": 1.0}),
}
#: Qwen3-VL adds deepstack features after decoder layers 0 and 1 (its tiny config): llm stages need K >= 2
DEEPSTACK = {"qwen3_vl": 2}


@functools.cache
def _model(host: str) -> Any:
    return tiny_vlm(host)


def _case(host: str, name: str, table: dict[str, tuple[str, dict[str, Any]]] = PRUNED) -> tuple[str, dict[str, Any]]:
    method, kw = table[name]
    layer = kw.get("layer")
    if layer is not None and layer < DEEPSTACK.get(host, 0):
        kw = {**kw, "layer": DEEPSTACK[host]}  # same case one layer deeper (layer 1 is refused: see below)
    return method, kw


def _generate(model: Any, x: dict[str, Any], n: int = NEW) -> torch.Tensor:
    out = model.generate(**x, max_new_tokens=n, do_sample=False)
    return out[:, x["input_ids"].shape[1]:]


def _forward(model: Any, x: dict[str, Any], **kw: Any) -> Any:
    with torch.no_grad():
        return model(**x, **kw)


def _expected_kept(kw: dict[str, Any], counts: list[int]) -> list[int]:
    budget = Budget.coerce(None, ratio=kw.get("ratio"), keep=kw.get("keep"))
    return [budget.count(n) for n in counts]


def _hooks(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Every hook dict of every module, by module name (the hook objects and their flags)."""
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")
    return {name: tuple(tuple(getattr(mod, a, {}).items()) for a in attrs) for name, mod in model.named_modules()}


hosts = pytest.mark.parametrize("host", list(HOSTS))


def test_matrix_covers_every_supported_host() -> None:
    assert set(HOSTS.values()) == set(unipruner.vlm.SUPPORTED_HOSTS)


@hosts
def test_tiny_inputs_match_the_model(host: str) -> None:
    """The fixture itself: rows differ in images and lengths, are left-padded, and run unpatched."""
    model = _model(host)
    x = inputs(model, 2)
    mask = x["attention_mask"]
    assert mask.ndim == 2 and bool(mask[:, -1].all()) and not bool(mask.all())  # left padding
    assert (x["input_ids"] == IMAGE).sum(-1).tolist() == visual_counts(model, 2)
    assert unipruner.vlm.find_host(model).image_token_id == IMAGE
    alone = [row_inputs(model, i) for i in range(2)]
    assert not torch.equal(alone[0]["pixel_values"].flatten()[:8], alone[1]["pixel_values"].flatten()[:8])
    out = _forward(model, x)
    for i, r in enumerate(alone):
        n = r["input_ids"].shape[1]
        torch.testing.assert_close(out.logits[i, -n:], _forward(model, r).logits[0], atol=1e-5, rtol=0)


@hosts
@pytest.mark.parametrize("case", list(KEEP_ALL))
def test_keep_all_is_the_unpatched_model(host: str, case: str) -> None:
    model = _model(host)
    x = inputs(model, 2)
    ref_logits = _forward(model, x).logits
    ref_tokens = _generate(model, x)
    method, kw = _case(host, case, KEEP_ALL)
    with unipruner.vlm.patch(model, method, **kw) as h:
        logits = _forward(model, x).logits
        tokens = _generate(model, x)
        stats = h.stats()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert stats.visual_kept == tuple(visual_counts(model, 2))


@hosts
def test_unpatch_restores_exactly(host: str) -> None:
    model = _model(host)
    x = inputs(model, 2)
    ref_logits = _forward(model, x).logits
    ref_tokens = _generate(model, x)
    # after the first forward: transformers installs its own output-capturing hooks lazily on the first call
    # (so a snapshot taken before it differs whenever this test is the first to run this model)
    before_hooks = _hooks(model)
    assert unipruner.vlm.find(model) is None
    for case in ("divprune-input", "fastv-llm2"):
        method, kw = _case(host, case)
        h = unipruner.vlm.patch(model, method, **kw)
        assert unipruner.vlm.find(model) is h
        assert _hooks(model) != before_hooks
        pruned = _forward(model, x).logits
        assert pruned.shape[1] < ref_logits.shape[1]
        _generate(model, x)
        h.unpatch()
        assert unipruner.vlm.find(model) is None
        assert _hooks(model) == before_hooks
        assert torch.equal(_forward(model, x).logits, ref_logits)
        assert torch.equal(_generate(model, x), ref_tokens)


@hosts
@pytest.mark.parametrize("case", ROW_WISE)
def test_padded_batch_equals_each_row_alone(host: str, case: str) -> None:
    model = _model(host)
    x = inputs(model, 2)
    alone = [row_inputs(model, i) for i in range(2)]
    method, kw = _case(host, case)
    with unipruner.vlm.patch(model, method, **kw):
        batch = _forward(model, x).logits
        tokens = _generate(model, x)
        for i, r in enumerate(alone):
            own = _forward(model, r).logits[0]
            n = own.shape[0]  # the row's kept tokens (left padding comes first in the batch)
            torch.testing.assert_close(batch[i, -n:], own, atol=1e-5, rtol=0)
            assert torch.equal(tokens[i], _generate(model, r)[0])


#: more registry methods, one stage each (ratio 0.5), one per signal path: DART's pivots, G-Prune, a text
#: query (MMR), a merge (k-means pooling), SparseVLM's text raters, SnapKV's window rows, TransPrune's
#: previous layer, VisionZip's contextual aggregates, DivPrune inside the LLM
MORE_METHODS: list[tuple[str, dict[str, Any]]] = [
    *((m, {}) for m in ("dart", "gprune", "mmr", "kmeans_pool")),
    *((m, {"stage": "llm", "layer": 2}) for m in ("sparsevlm", "snapkv", "transprune", "visionzip", "divprune")),
    # per-block methods in the LLM: received attention over the valid rows only, DART's keys before RoPE,
    # one grid per image (HoloV), ragged images merged one shape at a time (ToMe)
    *((m, {"stage": "llm", "layer": 2}) for m in ("dart", "prumerge", "prumerge_plus", "holov")),
    ("tome", {}),
]


@hosts
def test_more_methods_batch_equals_each_row_alone(host: str) -> None:
    model = _model(host)
    x = inputs(model, 2)
    alone = [row_inputs(model, i) for i in range(2)]
    counts = visual_counts(model, 2)
    for method, kw in MORE_METHODS:
        with unipruner.vlm.patch(model, method, ratio=0.5, **kw) as h:
            batch = _forward(model, x).logits
            assert h.stats().visual_kept == tuple(_expected_kept({"ratio": 0.5}, counts)), method
            for r, row in zip(alone, batch, strict=True):
                own = _forward(model, r).logits[0]
                torch.testing.assert_close(row[-own.shape[0]:], own, atol=1e-5, rtol=0, msg=lambda m, n=method: n + m)


@hosts
@pytest.mark.parametrize("case", list(PRUNED))
def test_kv_cache_holds_the_kept_length(host: str, case: str) -> None:
    model = _model(host)
    x = inputs(model, 2)
    width = x["input_ids"].shape[1]
    counts = visual_counts(model, 2)
    text = [int(n) - v for n, v in zip(x["attention_mask"].sum(-1).tolist(), counts, strict=True)]
    method, kw = _case(host, case)
    kept = _expected_kept(kw, counts)
    # the longest row's kept tokens (shorter rows are left-padded to it)
    packed = max(t + k for t, k in zip(text, kept, strict=True))
    first = kw.get("layer", 0)
    n_layers = len(unipruner.vlm.find_host(model).layers)
    expected = tuple(width if i < first else packed for i in range(n_layers))
    text_cfg = model.config.get_text_config()
    if host in GEMMA_WINDOW:  # local layers store the last window - 1 slots, as Hugging Face's sliding layers do
        window = text_cfg.sliding_window
        expected = tuple(min(n, window - 1) if text_cfg.layer_types[i] == "sliding_attention" else n
                         for i, n in enumerate(expected))
    with unipruner.vlm.patch(model, method, **kw) as h:
        out = _forward(model, x, use_cache=True)
        stats = h.stats()
    cache = out.cache  # transformers 5.24 names the output field `cache` (past_key_values is a deprecated alias)
    assert stats.kv_slots == expected
    assert tuple(int(layer.keys.shape[-2]) for layer in cache.layers) == expected
    assert [cache.get_seq_length(i) for i in range(n_layers)] == [width] * n_layers  # logical length: all tokens
    assert out.logits.shape[1] == packed


@hosts
@pytest.mark.parametrize("case", list(PRUNED))
@pytest.mark.parametrize("per_image", [True, False])
def test_stats_report_the_budget_per_image(host: str, case: str, per_image: bool) -> None:
    model = _model(host)
    x = inputs(model, 2)
    counts = visual_counts(model, 2)  # one image a row: per image == per row
    method, kw = _case(host, case)
    with unipruner.vlm.patch(model, method, per_image=per_image, **kw) as h:
        _forward(model, x)
        stats = h.stats()
    assert len(stats.stages) == 1
    st = stats.stages[0]
    assert (st.where, st.layer, st.method) == (kw.get("stage", "input"), kw.get("layer"), method)
    assert st.before == tuple(counts)
    assert st.after == tuple(_expected_kept(kw, counts))
    assert stats.visual_kept == st.after
    assert stats.sequence == tuple(x["attention_mask"].sum(-1).tolist())


@hosts
@pytest.mark.parametrize("case", list(PRUNED))
def test_pruned_generate_is_deterministic(host: str, case: str) -> None:
    model = _model(host)
    x = inputs(model, 2)
    method, kw = _case(host, case)
    with unipruner.vlm.patch(model, method, **kw):
        first = _generate(model, x, 8)
        second = _generate(model, x, 8)
    assert first.shape == (2, 8)
    assert torch.equal(first, second)


@hosts
def test_same_length_rows_without_padding(host: str) -> None:
    """``pad=False``: equal rows (different pixels) with an all-ones mask, pruned at both stages."""
    model = _model(host)
    x = inputs(model, 2, pad=False)
    assert bool(x["attention_mask"].all())
    for case in ("divprune-input", "fastv-llm2"):
        method, kw = _case(host, case)
        with unipruner.vlm.patch(model, method, **kw) as h:
            tokens = _generate(model, x)
            assert h.stats().visual_kept == tuple(_expected_kept(kw, visual_counts(model, 2, pad=False)))
            alone = [_generate(model, row_inputs(model, i, pad=False))[0] for i in range(2)]
        assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


def test_qwen3_vl_llm_stage_must_follow_the_deepstack_layers() -> None:
    model = _model("qwen3_vl")
    with pytest.raises(UniprunerError, match="deepstack"):
        unipruner.vlm.patch(model, "fastv", stage="llm", layer=1, keep=4)
    assert unipruner.vlm.find(model) is None


def test_methods_without_their_signal_are_refused_at_patch_time() -> None:
    model = _model("llava")
    for method in ("mmr", "query_similarity"):
        with pytest.raises(UniprunerError, match="stage='vision' does not have"):
            unipruner.vlm.patch(model, method, stage="vision", ratio=0.5)
    assert unipruner.vlm.find(model) is None


# ------------------------------------------------------------------------------ Gemma 3: a plain reference


def _gemma_block(ids: list[int], types: list[int]) -> list[int]:
    """Image block of every token (runs of token_type_ids == 1), -1 for text."""
    out, block = [], -1
    for i, t in enumerate(types):
        if t == 1 and (i == 0 or types[i - 1] != 1):
            block += 1
        out.append(block if t == 1 else -1)
    return out


def _gemma_masks(keep: list[int], block: list[int], window: int) -> dict[str, torch.Tensor]:
    """Gemma 3's prefill masks over the kept tokens (original indices): causal or same image block; local: in window."""
    n = len(keep)
    full = torch.zeros(1, 1, n, n, dtype=torch.bool)
    local = torch.zeros(1, 1, n, n, dtype=torch.bool)
    for i, p in enumerate(keep):
        for j, r in enumerate(keep):
            see = r <= p or (block[p] >= 0 and block[p] == block[r])
            full[0, 0, i, j] = see
            local[0, 0, i, j] = see and r > p - window
    return {"full_attention": full, "sliding_attention": local}


def _gemma_run(model: Any, h: torch.Tensor, pos: list[int], masks: dict[str, torch.Tensor] | list[torch.Tensor],
               cache: DynamicCache, fed: list[list[int]], start: int, stop: int) -> torch.Tensor:
    """Decoder layers ``start:stop`` on ``h`` at positions ``pos`` (masks per layer type, or per layer).

    ``fed[l]`` records the positions layer ``l`` saw.
    """
    lm = model.model.language_model
    types = lm.config.layer_types
    p = torch.tensor([pos])
    pe = {t: lm.rotary_emb(h, p, t) for t in set(types)}
    for i in range(start, stop):
        mask = masks[types[i]] if isinstance(masks, dict) else masks[i]
        h = lm.layers[i](h, attention_mask=mask, position_embeddings=pe[types[i]], cache=cache, use_cache=True)
        fed[i] += pos
    return h


def _gemma_fastv_scores(model: Any, h: torch.Tensor, pos: list[int], mask: torch.Tensor, layer: int) -> torch.Tensor:
    """FastV (Chen et al., ECCV 2024): the last query's attention in ``layer`` under its own mask, mean over heads."""
    lm = model.model.language_model
    blk = lm.layers[layer]
    attn = blk.self_attn
    x = blk.input_layernorm(h)
    t = x.shape[1]
    q = attn.q_norm(attn.q_proj(x).view(1, t, -1, attn.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(1, t, -1, attn.head_dim)).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, torch.tensor([pos]), lm.config.layer_types[layer])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:] @ k.transpose(-1, -2)) * attn.scaling
    row = torch.softmax(logits.masked_fill(~mask[:, :, -1:], float("-inf")), dim=-1)
    return row[0, :, 0].mean(0)


@torch.no_grad()
def _gemma_reference(model: Any, row: dict[str, Any], method: str, kw: dict[str, Any]) -> list[int]:
    """Greedy tokens of one row (batch 1, no padding) pruned by ``method`` at the input or at layer K, plainly."""
    lm = model.model.language_model
    types = lm.config.layer_types
    window = lm.config.sliding_window
    ids = row["input_ids"][0].tolist()
    block = _gemma_block(ids, row["token_type_ids"][0].tolist())
    emb = lm.embed_tokens(row["input_ids"])[0].clone()  # Gemma scales the text embeddings by sqrt(hidden)
    feats = model.model.get_image_features(row["pixel_values"]).pooler_output
    vis = [i for i, t in enumerate(ids) if t == IMAGE]
    emb[vis] = feats.reshape(-1, feats.shape[-1])
    text = [i for i, t in enumerate(ids) if t != IMAGE]
    n_keep = _expected_kept(kw, [len(vis)])[0]
    cache = DynamicCache(config=lm.config)
    fed: list[list[int]] = [[] for _ in types]
    everything = list(range(len(ids)))
    if kw.get("stage", "input") == "input":
        kept = sorted(text + [vis[j] for j in _naive_divprune(emb[vis], n_keep)])
        h = _gemma_run(model, emb[kept][None], kept, _gemma_masks(kept, block, window), cache, fed, 0, len(types))
    else:
        k_layer = kw["layer"]
        masks = _gemma_masks(everything, block, window)
        h = _gemma_run(model, emb[None], everything, masks, cache, fed, 0, k_layer - 1)
        scores = _gemma_fastv_scores(model, h, everything, masks[types[k_layer - 1]], k_layer - 1)
        h = _gemma_run(model, h, everything, masks, cache, fed, k_layer - 1, k_layer)
        v = torch.tensor(vis)
        top = v[torch.argsort(scores[v], descending=True, stable=True)[:n_keep]].tolist()
        kept = sorted(text + top)
        h = _gemma_run(model, h[:, kept], kept, _gemma_masks(kept, block, window), cache, fed, k_layer, len(types))
    out = []
    for step in range(NEW):
        tok = int(model.lm_head(lm.norm(h[:, -1:]))[0, -1].argmax())
        out.append(tok)
        if step == NEW - 1:
            break
        p = len(ids) + step
        # a new token sees every stored key of a global layer, and those within the window of a local one (the
        # local layers store their last window - 1 keys)
        step_masks = []
        for layer, t in enumerate(types):
            stored = fed[layer][-(window - 1):] if t == "sliding_attention" else fed[layer]
            see = [r > p - window or t == "full_attention" for r in stored] + [True]
            step_masks.append(torch.tensor(see)[None, None, None])
        h = _gemma_run(model, lm.embed_tokens(torch.tensor([[tok]])), [p], step_masks, cache, fed, 0, len(types))
    return out


GEMMA_CASES = ["divprune-input", "divprune-input-keep", "fastv-llm2", "fastv-llm1-keep"]


@pytest.mark.parametrize("host", list(GEMMA_WINDOW))
@pytest.mark.parametrize("case", GEMMA_CASES)
def test_gemma3_pruned_generate_matches_the_plain_reference(host: str, case: str) -> None:
    """A left-padded batch of two images through ``generate()`` == each row by the plain reference, token for token."""
    model = _model(host)
    x = inputs(model, 2)
    assert max(x["attention_mask"].sum(-1).tolist()) > GEMMA_WINDOW["gemma3"]  # the small window is exercised
    method, kw = _case(host, case)
    with unipruner.vlm.patch(model, method, **kw):
        tokens = _generate(model, x)
    for i in range(2):
        assert tokens[i].tolist() == _gemma_reference(model, row_inputs(model, i), method, kw), f"row {i}"


def test_gemma3_refuses_the_vision_stage_and_a_cache_without_sliding_positions() -> None:
    model = _model("gemma3")
    with pytest.raises(UniprunerError, match="average-pools"):
        unipruner.vlm.patch(model, "visionzip", stage="vision", keep=4)
    assert unipruner.vlm.find(model) is None
    x = inputs(model, 2)
    with unipruner.vlm.patch(model, "divprune", keep=4):
        with pytest.raises(UniprunerError, match="sliding=True"):
            _forward(model, x, cache=unipruner.kv.CompressedCache(model.config.get_text_config()))
