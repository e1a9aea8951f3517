"""unipruner.hosts: attention rows recomputed per family equal the model's own eager attention; masks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from _tiny_lm import FAMILIES, VOCAB, tiny_lm
from transformers.cache_utils import DynamicCache

from unipruner.adapters.rag import FocalAttentionScorer
from unipruner.hosts import hf_attention as hf
from unipruner.hosts.masks import expand_heads, leading, sliding_key_mask, stored_slot_mask, trailing

torch.set_num_threads(2)
N = 20


@pytest.fixture(scope="module")
def eager() -> dict[str, transformers.PreTrainedModel]:
    return {f: tiny_lm(f, attn="eager") for f in FAMILIES}


def _ids(n: int = N, b: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _inputs(model: transformers.PreTrainedModel, ids: torch.Tensor) -> tuple[dict[int, tuple], object]:
    """Each attention module's (hidden_states, position_embeddings) and the eager forward's output."""
    seen: dict[int, tuple] = {}
    hooks = []
    for i, block in enumerate(model.base_model.layers):
        def grab(module: torch.nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            seen[i] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        hooks.append(block.self_attn.register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        out = model(ids, output_attentions=True, cache=DynamicCache(config=model.config), use_cache=True)
    for h in hooks:
        h.remove()
    return seen, out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_rows_equal_eager_attention_in_every_layer(eager: dict, family: str) -> None:
    """input_rows (q and k from the layer input, sliding windows included) == the eager map's last row;
    attention_rows over the cached keys == its last rows; rows='all' == its column sums."""
    model = eager[family]
    ids = _ids()
    seen, out = _inputs(model, ids)
    specs, skipped = hf.attention_layers(model, hf.decoder(model), sliding=True)
    assert not skipped and [s.index for s in specs] == list(range(len(model.base_model.layers)))
    for spec in specs:
        hidden, pe = seen[spec.index]
        ref = out.attentions[spec.index].float()  # [B, H, N, N]
        torch.testing.assert_close(hf.input_rows(spec, hidden, pe, 1), ref[:, :, -1:], rtol=1e-4, atol=1e-5)
        if spec.sliding_window is not None:
            continue  # the cache keeps only the window there; the adapters leave those layers alone
        cached = out.cache.layers[spec.index].keys
        torch.testing.assert_close(hf.keys(spec, hidden, *pe), cached, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hf.input_rows(spec, hidden, pe, 5), ref[:, :, -5:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hf.attention_rows(spec, hidden, pe, cached, 4), ref[:, :, -4:],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hf.attention_rows(spec, hidden, pe, cached, "all")[:, :, 0], ref.sum(-2),
                                   rtol=1e-4, atol=1e-5)
    if family == "gemma3":
        assert [s.sliding_window for s in specs] == [8, 8, None, 8]
        kv_specs, kv_skipped = hf.attention_layers(model, hf.decoder(model))
        assert [s.index for s in kv_specs] == [2] and sorted(kv_skipped) == [0, 1, 3]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_focal_attention_rows_equal_eager_attention(eager: dict, family: str) -> None:
    """AttentionRAG's focal row (the RAG scorer) is right for every family, Qwen3's q/k norms and
    Gemma 3's sliding layers included: heads and layers averaged, last row of the eager map."""
    model = eager[family]
    ids = _ids(b=1)
    n_layers = len(model.base_model.layers)
    layers = list(range(n_layers))
    got = FocalAttentionScorer(model=model, tokenizer=object(), layers=layers)._focal(model, ids)
    att = model(ids, output_attentions=True).attentions
    want = torch.stack([att[i][0, :, -1] for i in layers]).float().mean(dim=(0, 1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not any(len(m._forward_pre_hooks) for m in model.modules())  # the scorer's hooks are gone


@torch.no_grad()
def test_focal_attention_on_qwen3_uses_the_norms() -> None:
    """The old Llama-only copy (no q_norm / k_norm) gives other rows on Qwen3; the hosts one matches eager."""
    model = tiny_lm("qwen3", attn="eager")
    for layer in model.base_model.layers:  # make the norms matter
        torch.nn.init.uniform_(layer.self_attn.q_norm.weight, 0.2, 3.0)
        torch.nn.init.uniform_(layer.self_attn.k_norm.weight, 0.2, 3.0)
    ids = _ids(b=1, seed=5)
    got = FocalAttentionScorer(model=model, tokenizer=object(), layers=[0, 1])._focal(model, ids)
    att = model(ids, output_attentions=True).attentions
    want = torch.stack([att[i][0, :, -1] for i in (0, 1)]).float().mean(dim=(0, 1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    seen, _ = _inputs(model, ids)
    spec = hf.attention_layers(model, hf.decoder(model))[0][0]
    hidden, (cos, sin) = seen[0]
    mod = spec.module
    q = mod.q_proj(hidden[:, -1:]).view(1, 1, -1, 16).transpose(1, 2)  # without q_norm / k_norm
    k = mod.k_proj(hidden).view(1, N, -1, 16).transpose(1, 2)
    q, _ = spec.rope(q, q, cos[:, -1:], sin[:, -1:])
    _, k = spec.rope(k, k, cos, sin)
    no_norm = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * spec.scale, -1)
    assert (no_norm - att[0][:, :, -1:]).abs().max() > 1e-2


def test_rotate_by_a_delta_equals_rope_at_the_new_position(eager: dict) -> None:
    model = eager["llama"]
    spec = hf.attention_layers(model, hf.decoder(model))[0][0]
    rotary = model.base_model.rotary_emb
    pre = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[3, 5, 8, 9, 12, 15]])
    cos, sin = hf.rotary_at(rotary, spec, pre, pos)
    _, at_pos = spec.rope(pre, pre, cos, sin)
    delta = (torch.arange(6) - pos)[:, None, :].expand(1, 2, 6)
    cos0, sin0 = hf.rotary_at(rotary, spec, pre, torch.arange(6)[None])
    _, want = spec.rope(pre, pre, cos0, sin0)
    torch.testing.assert_close(hf.rotate(rotary, spec, at_pos, delta), want, rtol=1e-4, atol=1e-5)
    hf.check_static_rope(rotary)


def test_register_rope_is_the_extension_point(eager: dict) -> None:
    model = eager["qwen2"]
    calls = []

    def factory(attn: torch.nn.Module, cfg: object) -> hf.RopeFn:
        base = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
            calls.append(q.shape)
            return base(q, k, cos, sin)
        return rope

    hf.register_rope("qwen2", factory)
    try:
        specs, _ = hf.attention_layers(model, hf.decoder(model))
        seen, out = _inputs(model, _ids())
        hidden, pe = seen[0]
        torch.testing.assert_close(hf.input_rows(specs[0], hidden, pe), out.attentions[0][:, :, -1:].float(),
                                   rtol=1e-4, atol=1e-5)
        assert calls
    finally:
        del hf._ROPE_FACTORIES["qwen2"]


def test_unsupported_models_are_a_clear_error() -> None:
    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    with pytest.raises(ValueError, match="not supported by the focal_attention scorer; supported: Llama"):
        FocalAttentionScorer(model=bert, tokenizer=object())._focal(bert, _ids(b=1))
    with pytest.raises(ValueError, match="PreTrainedModel"):
        hf.decoder(torch.nn.Linear(2, 2))


def test_import_hosts_is_torch_only() -> None:
    code = ("import sys, unipruner.hosts, unipruner.hosts.hf_attention, unipruner.hosts.masks, "
            "unipruner.hosts.patching; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------- masks


def _naive_slot_mask(old: torch.Tensor, new_valid: torch.Tensor | None, q: int, n_heads: int) -> torch.Tensor:
    b, hkv, s = old.shape
    out = torch.zeros(b, n_heads, q, s + q, dtype=torch.bool)
    for r in range(b):
        for h in range(n_heads):
            for i in range(q):
                for j in range(s):
                    out[r, h, i, j] = bool(old[r, h // (n_heads // hkv), j])
                for j in range(q):
                    real = True if new_valid is None else bool(new_valid[r, j])
                    out[r, h, i, s + j] = (j <= i and real) or j == i
    return out


@pytest.mark.parametrize("q", [1, 3])
def test_stored_slot_mask_equals_a_naive_one(q: int) -> None:
    g = torch.Generator().manual_seed(q)
    old = torch.rand(2, 2, 5, generator=g) > 0.3
    new_valid = torch.tensor([[False] * (q - 1) + [True], [True] * q])
    for nv in (None, new_valid):
        got = stored_slot_mask(old, nv, q, n_heads=4)
        assert got is not None
        torch.testing.assert_close(got.expand(2, 4, q, 5 + q), _naive_slot_mask(old, nv, q, 4))
        add = stored_slot_mask(old, nv, q, n_heads=4, additive=torch.float32)
        assert add is not None and bool(((add == 0) == got).all()) and float(add.min()) == torch.finfo().min
    assert stored_slot_mask(torch.ones(1, 2, 4, dtype=torch.bool), None, 1, n_heads=4) is None


def test_leading_trailing_sliding_and_expand_equal_naive_ones() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 9, generator=g) > 0.4
    counts = torch.tensor([0, 2, 5])
    lead, trail = leading(mask, counts), trailing(mask, counts)
    for r in range(3):
        idx = [j for j in range(9) if mask[r, j]]
        c = int(counts[r])
        assert [j for j in range(9) if lead[r, j]] == idx[:c]
        assert [j for j in range(9) if trail[r, j]] == (idx[len(idx) - c:] if c else [])
    win = sliding_key_mask(10, 3, 4)
    for i in range(3):
        p = 7 + i
        assert win[i].tolist() == [p - 4 < j <= p for j in range(10)]
    assert sliding_key_mask(4, 2, None).tolist() == [[True, True, True, False], [True] * 4]
    x = torch.arange(2 * 2 * 3).reshape(2, 2, 3)
    assert torch.equal(expand_heads(x, 4)[:, [0, 1, 2, 3]], x[:, [0, 0, 1, 1]])
