"""unipruner.kv on tiny random models of every supported family (fast, no weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from _tiny_lm import FAMILIES, VOCAB, tiny_lm
from _tiny_lm import left_padded_batch as _batch
from transformers.cache_utils import DynamicCache

import unipruner
import unipruner.adapters.kv_cache as kv
from unipruner.hosts.hf_attention import queries
from unipruner.scorers.importance import window_attention

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def models() -> dict[str, transformers.PreTrainedModel]:
    return {f: tiny_lm(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def llama(models: dict[str, transformers.PreTrainedModel]) -> transformers.PreTrainedModel:
    return models["llama"]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _greedy_loop(model: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """Hand-written decoding with explicit position_ids and a growing 2-D mask."""
    cache = kv.CompressedCache(model.config)
    pos = _positions(mask)
    out = model(ids, attention_mask=mask, position_ids=pos, cache=cache)
    tokens = []
    nxt = out.logits[:, -1].argmax(-1)
    last = pos[:, -1]
    for _ in range(steps):
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        out = model(nxt[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache)
        nxt = out.logits[:, -1].argmax(-1)
    return torch.stack(tokens, dim=1)


def _ref_mask(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """4-D reference mask: causal + padding; queries after the context see only its kept tokens."""
    b, n_all = mask.shape
    n = keep.shape[1]
    i = torch.arange(n_all)[:, None]
    j = torch.arange(n_all)[None, :]
    allowed = (j <= i) & mask.bool()[:, None, :]
    ctx_ok = torch.cat([keep, torch.ones(b, n_all - n, dtype=torch.bool)], 1)[:, None, :]
    allowed = allowed & ((i < n) | ctx_ok)
    return (allowed | torch.eye(n_all, dtype=torch.bool))[:, None]


# ----------------------------------------------------------------------------------- correctness


@torch.no_grad()
def test_keep_everything_equals_unpatched(llama: transformers.PreTrainedModel) -> None:
    ids, mask = _batch([40, 40])
    ref = llama(ids, attention_mask=mask)
    ref_gen = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with kv.compress(llama, "snapkv", ratio=1.0, window=8):
        out = llama(ids, attention_mask=mask)
        gen = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    assert torch.equal(gen, ref_gen)
    # ragged rows: padding slots are dropped, the real tokens all kept -> same next-token logits
    ids, mask = _batch([40, 29])
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with kv.compress(llama, "knorm", ratio=1.0):
        got = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_generate_equals_manual_decode_loop(models: dict[str, transformers.PreTrainedModel], family: str) -> None:
    """Greedy generate() on a compressed cache == a decode loop with explicit position_ids, token for token."""
    model = models[family]
    ids, mask = _batch([48, 33])
    with kv.compress(model, "snapkv", ratio=0.5, window=8) as h:
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
        loop = _greedy_loop(model, ids, mask, 8)
        st = h.stats()
    assert torch.equal(gen, loop)
    kinds = {s.kind for s in st.layers}
    assert "compressed" in kinds
    compressed = [s for s in st.layers if s.kind == "compressed"]
    # row 0 keeps 24 of 48, row 1 keeps 17 of 33 (rounded half up); then the loop feeds 8 tokens each
    assert all(s.tokens_kept == 24 + 17 + 2 * 8 for s in compressed)
    assert all(s.bytes_after < s.bytes_before for s in compressed)
    if family == "gemma3":
        assert kinds == {"compressed", "sliding"} and sorted(h.skipped) == [0, 1, 3]
        assert "sliding-window" in h.describe()


@torch.no_grad()
def test_plain_dynamic_cache_pruned_is_wrong_but_ours_is_right(llama: transformers.PreTrainedModel) -> None:
    """The bug the adapter fixes: shortening a DynamicCache shifts positions; CompressedCache does not."""
    ids, _ = _batch([30])
    with kv.compress(llama, "streamingllm", ratio=0.5, evict=False) as h:
        ours = llama.generate(ids, max_new_tokens=5, do_sample=False)
        cache = h.last_cache
    assert cache is not None and cache.get_seq_length() == 30 + 4
    assert cache.layers[0].stored == 15 + 4
    # reference: the full model, where only the *new* tokens' queries cannot see the dropped tokens
    keep = torch.zeros(1, 30, dtype=torch.bool)
    keep[:, :4] = True
    keep[:, 30 - 11:] = True
    seq = ids
    for _ in range(5):
        logits = llama(seq, attention_mask=_ref_mask(torch.ones_like(seq), keep)).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, seq)
    # a plain DynamicCache shortened the same way (what kvpress-style pruning leaves to generate()) goes wrong:
    # generate() would restart from the shortened length and place new tokens at wrong positions
    plain = llama(ids, use_cache=True).cache
    for layer in plain.layers:
        layer.keys, layer.values = layer.keys[:, :, keep[0]], layer.values[:, :, keep[0]]
    assert plain.get_seq_length() == 15  # the positions generate() would use: 15 instead of 30


@torch.no_grad()
def test_streaming_decode_matches_masked_reference(llama: transformers.PreTrainedModel) -> None:
    """StreamingLLM keeps the same tokens in every layer and head: compare logits with a masked full model."""
    ids, mask = _batch([36, 27])
    n = ids.shape[1]
    with kv.compress(llama, "streamingllm", ratio=0.5, evict=False, n_sink=2):
        cache = kv.CompressedCache(llama.config)
        pos = _positions(mask)
        llama(ids, attention_mask=mask, position_ids=pos, cache=cache)
        nxt = torch.tensor([[5], [7]])
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got = llama(nxt, attention_mask=full_mask, position_ids=pos[:, -1:] + 1, cache=cache).logits
    keep = torch.zeros(2, n, dtype=torch.bool)
    for row, length in enumerate([36, 27]):
        k = math.floor(length * 0.5 + 0.5)
        start = n - length
        keep[row, start:start + 2] = True
        keep[row, n - (k - 2):n] = True
    seq = torch.cat([ids, nxt], 1)
    ref = llama(seq, attention_mask=_ref_mask(full_mask, keep),
                position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).logits[:, -1:]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_window_rows_equal_the_models_own_attention(family: str) -> None:
    """Queries recomputed inside the hook (q_norm, fused qkv, Gemma scaling) give the model's attention rows."""
    model = tiny_lm(family, attn="eager")
    ids, mask = _batch([20, 20])
    seen = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"], seen["pe"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = kv.patch(model, "snapkv", ratio=1.0, window=4)
    spec = handle._specs[handle.layers[0]]
    hook = spec.module.register_forward_pre_hook(grab, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    out = model(ids, attention_mask=mask, output_attentions=True, cache=cache)
    hook.remove()
    handle.unpatch()
    cos, sin = seen["pe"]
    q = queries(spec, seen["hidden"][:, -4:], cos[:, -4:], sin[:, -4:])
    keys = out.cache.layers[spec.index].keys
    rows = window_attention(q, keys, scale=spec.scale)
    torch.testing.assert_close(rows, out.attentions[spec.index][:, :, -4:, :].float(), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_snapkv_keeps_what_a_naive_per_head_snapkv_keeps() -> None:
    """Per-KV-head SnapKV (kvpress's formula written naively on the eager attention map)."""
    model = tiny_lm("llama", attn="eager")
    ids, _ = _batch([40])
    w, kernel, ratio = 8, 5, 0.5
    full = model(ids, output_attentions=True, use_cache=True)
    with kv.compress(model, "snapkv", ratio=ratio, window=w, kernel=kernel):
        comp = model(ids, use_cache=True).cache
    for li in range(2):
        attn = full.attentions[li][0]  # [H, N, N]
        keys = full.cache.layers[li].keys[0]  # [H_kv, N, D]
        hkv, n = keys.shape[0], keys.shape[1]
        votes = attn[:, -w:, : n - w].mean(1)  # [H, N - w]
        votes = F.avg_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        votes = votes.view(hkv, -1, n - w).mean(1)
        budget = int(n * ratio)
        for h in range(hkv):
            top = set(votes[h].topk(budget - w).indices.tolist()) | set(range(n - w, n))
            stored = comp.layers[li].keys[0, h]
            got = {int((keys[h] - k).abs().sum(-1).argmin()) for k in stored}
            assert got == top


@torch.no_grad()
def test_ragged_batch_equals_rows_one_by_one(llama: transformers.PreTrainedModel) -> None:
    ids, mask = _batch([44, 30, 37])
    with kv.compress(llama, "snapkv", ratio=0.4, window=6):
        batched = _greedy_loop(llama, ids, mask, 6)
        for row in range(3):
            keep = mask[row].bool()
            single = _greedy_loop(llama, ids[row:row + 1, keep], mask[row:row + 1, keep], 6)
            assert torch.equal(batched[row:row + 1], single)


@pytest.mark.parametrize("name", ["h2o", "tova", "streamingllm"])
@torch.no_grad()
def test_fixed_budget_eviction_while_decoding(llama: transformers.PreTrainedModel, name: str) -> None:
    ids, mask = _batch([40, 31])
    with kv.compress(llama, name, ratio=0.5) as h:
        gen = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
        loop = _greedy_loop(llama, ids, mask, 10)
        cache = h.last_cache
    assert torch.equal(gen, loop)
    assert cache is not None
    for layer in cache.layers:
        counts = layer.slot_valid().sum(-1)
        assert torch.equal(counts, torch.tensor([[20, 20], [16, 16]]))  # the prefill budget, held fixed
        assert layer.stored == 20
    if name == "h2o":  # the recent half of the budget always holds the latest tokens
        last = cache.layers[0]
        full = llama(torch.cat([ids, gen], 1)[:1], use_cache=True).cache.layers[0].keys[0]
        for head in range(2):
            stored = last.keys[0, head][last.slot_valid()[0, head]]
            recent = full[head, -10:]
            assert all(bool((stored - k).abs().sum(-1).min() < 1e-4) for k in recent)


@torch.no_grad()
def test_streamingllm_rerotation(llama: transformers.PreTrainedModel) -> None:
    ids, _ = _batch([32])
    hidden = llama(ids, output_hidden_states=True).hidden_states[0]
    with kv.compress(llama, "streamingllm", ratio=0.5, rerotate=True, evict=False) as h:
        gen = llama.generate(ids, max_new_tokens=6, do_sample=False)[:, 32:]
        loop = _greedy_loop(llama, ids, torch.ones_like(ids), 6)
        layer = h.last_cache.layers[0]
    assert torch.equal(gen, loop)
    assert layer.offset.tolist() == [16]  # 32 seen, 16 kept: new tokens continue at position 16
    # kept token j (original position p) now carries RoPE(i) of its pre-RoPE key: recompute independently
    attn = llama.model.layers[0].self_attn
    pre = attn.k_proj(llama.model.layers[0].input_layernorm(hidden)).view(1, 32, 2, 16).transpose(1, 2)
    kept = list(range(4)) + list(range(20, 32))
    cos, sin = llama.model.rotary_emb(pre, torch.arange(16)[None])
    want, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(pre[:, :, kept], pre[:, :, kept],
                                                                              cos, sin)
    torch.testing.assert_close(layer.keys[:, :, :16], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vatp", "random", "divprune", "dart", "fastv", "hidden_norm", "kcenter"])
@torch.no_grad()
def test_every_kv_method_runs_and_halves_the_cache(llama: transformers.PreTrainedModel, name: str) -> None:
    ids, mask = _batch([40, 26])
    with kv.compress(llama, name, ratio=0.5) as h:
        out = llama(ids, attention_mask=mask)
        st = kv.stats(out)
        gen = llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        loop = _greedy_loop(llama, ids, mask, 4)
    assert torch.equal(gen[:, ids.shape[1]:], loop)
    assert all(s.tokens_kept == 20 + 13 for s in st.layers)
    assert st.ratio == pytest.approx(20 / 40)
    assert "on 2 of 2 layers" in h.describe()


@torch.no_grad()
def test_method_instance_and_query_aware_generate(llama: transformers.PreTrainedModel) -> None:
    tok = _Tok()
    m = unipruner.method("snapkv", ratio=0.5, window=4)
    a = kv.generate(llama, tok, ["a b c d e f g h i j k l m n o p", "q r s t u v w"], ["x y", "z"], method=m,
                    ratio=None, max_new_tokens=3)
    b = kv.generate(llama, tok, ["a b c d e f g h i j k l m n o p", "q r s t u v w"], ["x y", "z"], method=m,
                    ratio=None, max_new_tokens=3, query_aware=True)
    assert a.tokens.shape == b.tokens.shape == (2, 3)
    one = kv.generate(llama, tok, "q r s t u v w", "z", method=m, ratio=None, max_new_tokens=3)
    assert torch.equal(one.tokens[0], a.tokens[1])  # batching ragged contexts changes nothing
    assert a.stats.ratio < 1.0 and "snapkv" in a.description


class _Tok:
    """A whitespace tokenizer over the tiny vocabulary (what kv.generate needs from a tokenizer)."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [1 + (sum(map(ord, w)) % (VOCAB - 1)) for w in text.split()]
        return {"input_ids": ([2] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


# ----------------------------------------------------------------------------------- patching


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_patch_is_per_instance_idempotent_and_exactly_undone() -> None:
    a, b = tiny_lm("llama"), tiny_lm("llama")
    ids, _ = _batch([24])
    before = a(ids).logits
    n_hooks = _hook_count(a)
    h1 = kv.patch(a, "knorm", ratio=0.5)
    h2 = kv.patch(a, "knorm", ratio=0.5)
    assert h1 is h2 and kv.find(a) is h1 and kv.find(b) is None
    assert _hook_count(a) == n_hooks + 2 + 2 * 2 and _hook_count(b) == n_hooks
    with pytest.raises(unipruner.UniprunerError, match="already patched"):
        kv.patch(a, "snapkv", ratio=0.5)
    assert isinstance(b(ids, use_cache=True).cache, DynamicCache)
    assert not isinstance(b(ids, use_cache=True).cache, kv.CompressedCache)
    assert isinstance(a(ids, use_cache=True).cache, kv.CompressedCache)
    assert kv.unpatch(a) is True
    assert _hook_count(a) == n_hooks and not h1.active and kv.find(a) is None
    torch.testing.assert_close(a(ids).logits, before, rtol=0, atol=0)
    assert kv.unpatch(a) is False and kv.unpatch(b) is False  # not patched: False, no error


# ----------------------------------------------------------------------------------- bad input


@torch.no_grad()
def test_bad_input_is_a_clear_error(llama: transformers.PreTrainedModel) -> None:
    err = unipruner.UniprunerError
    for ratio in (0, 0.0, 1.5, -0.2, True):
        with pytest.raises(err, match="fraction of the KV cache kept"):
            kv.patch(llama, "snapkv", ratio=ratio)
    with pytest.raises(err, match="no budget"):
        kv.patch(llama, "snapkv")
    with pytest.raises(err, match="unknown method"):
        kv.patch(llama, "snapkvv", ratio=0.5)
    with pytest.raises(err, match="merges tokens"):
        kv.patch(llama, "tome", ratio=0.5)
    with pytest.raises(err, match="does not have"):
        kv.patch(llama, "mmr", ratio=0.5)
    with pytest.raises(err, match="full attention map"):
        kv.patch(llama, "zero_tprune", ratio=0.5)
    with pytest.raises(err, match="evict=True"):
        kv.patch(llama, "snapkv", ratio=0.5, evict=True)
    with pytest.raises(err, match="rerotate"):
        kv.patch(llama, "snapkv", ratio=0.5, rerotate=True)
    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    with pytest.raises(err, match=r"not supported by unipruner\.kv; supported: Llama"):
        kv.patch(bert, "snapkv", ratio=0.5)
    with pytest.raises(err, match="PreTrainedModel"):
        kv.patch(torch.nn.Linear(2, 2), "snapkv", ratio=0.5)
    sliding = transformers.MistralForCausalLM(transformers.MistralConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=50, sliding_window=16))
    with pytest.raises(err, match="nothing to compress"):
        kv.patch(sliding, "snapkv", ratio=0.5)

    ids, mask = _batch([30, 20])
    full = DynamicCache(config=llama.config)
    llama(ids[:, :5], cache=full)  # filled by the unpatched model
    with kv.compress(llama, "snapkv", ratio=0.5, window=4):
        right = mask.flip(-1)
        with pytest.raises(err, match="left padding"):
            llama(ids, attention_mask=right)
        with pytest.raises(err, match="2-D attention mask"):
            llama(ids, attention_mask=mask[:, None, None, :].bool())
        with pytest.raises(err, match="empty DynamicCache"):
            llama(ids[:, 5:], cache=full)
        cache = kv.CompressedCache(llama.config)
        llama(ids, attention_mask=mask, cache=cache)
        with pytest.raises(err, match="must cover all"):
            llama(ids[:, :1], attention_mask=mask, cache=cache)
    with kv.compress(llama, "snapkv", keep=64, window=4):
        with pytest.raises(err, match="more tokens than the sequence has"):
            llama(ids, attention_mask=mask)
    with kv.compress(llama, "knorm", ratio=0.3):
        with pytest.raises(err, match="already compressed"):
            llama(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
    with pytest.raises(err, match=r"patched with unipruner\.kv"):
        llama(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
    with pytest.raises(err, match="CompressedCache"):
        kv.stats(DynamicCache())
    with pytest.raises(err, match="question per context"):
        kv.generate(llama, _Tok(), ["a b", "c d"], ["x", "y", "z"], method="knorm", ratio=0.5)


@torch.no_grad()
def test_deprecated_past_key_values_kwarg_is_the_same_cache(llama: transformers.PreTrainedModel) -> None:
    ids, mask = _batch([24, 17])
    pos = _positions(mask)
    outs = []
    with kv.compress(llama, "snapkv", ratio=0.5, window=4):
        for name in ("cache", "past_key_values"):
            cache = kv.CompressedCache(llama.config)
            first = llama(ids, attention_mask=mask, position_ids=pos, **{name: cache})
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)
            m2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            second = llama(nxt, attention_mask=m2, position_ids=pos[:, -1:] + 1, **{name: cache})
            assert cache.compressed and kv.stats(cache).tokens_after < kv.stats(cache).tokens_before
            outs.append((first.logits[:, -1], second.logits[:, -1], cache.layers[0].k.clone()))
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kv_accepts_exactly_the_registry_kv_methods() -> None:
    """``unipruner methods --domain kv`` lists what ``kv.patch`` accepts, both ways."""
    from unipruner.adapters.kv_cache import KV_METHODS
    from unipruner.adapters.kv_cache._plan import make_plan
    from unipruner.methods import REGISTRY

    assert set(KV_METHODS) == {m.name for m in unipruner.methods(domain="kv")}
    for name in REGISTRY:
        if name in KV_METHODS:
            assert make_plan(name, 0.5).method.name == name
        else:
            refused = r"does not run on KV caches|merges tokens|needs signal|full attention map"
            with pytest.raises(unipruner.UniprunerError, match=refused):
                make_plan(name, 0.5)
