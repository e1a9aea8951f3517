"""unipruner.vlm on a tiny LLaVA: exactness against hand-written references, the handle contract, bad input.

The references are written plainly, per row (batch 1): the image features scattered into the
embeddings, the kept rows chosen by a naive re-implementation of the paper's rule (DivPrune's
max-min selection; FastV's last-query attention of layer K-1), then the language model run
layer by layer with an explicit ``DynamicCache`` and the original position ids, and a greedy
decode loop. The patched model runs a left-padded batch of two different images through
``generate()``; both must give the same tokens.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import unipruner
from unipruner import UniprunerError
from unipruner.adapters.vlm import stage

IMG = 100  # image placeholder id
N = 16  # visual tokens per image (56 px / patch 14 -> 4 x 4)
NEW = 4  # tokens generated


def _model(seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=120)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return _model()


def _rows(n_images: int = 1) -> list[list[int]]:
    return [[1, 5] + [IMG] * N * n_images + [7, 8, 9, 10],
            [1] + [IMG] * N * n_images + [11, 12]]


def _batch(rows: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_img = sum(r.count(IMG) for r in rows) // N
    pix = torch.randn(n_img, 3, 56, 56, generator=g)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def _generate(model: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


# ------------------------------------------------------------------------------ naive references


@torch.no_grad()
def _row_embeds(model: LlavaForConditionalGeneration, ids: list[int], pix: torch.Tensor) -> torch.Tensor:
    feats = model.model.get_image_features(pixel_values=pix, vision_feature_layer=-2,
                                           vision_feature_select_strategy="default").pooler_output
    emb = model.model.get_input_embeddings()(torch.tensor([ids]))[0].clone()
    vis = torch.tensor(ids) == IMG
    emb[vis] = torch.cat(list(feats), 0)
    return emb


def _naive_divprune(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune (Alvar et al., CVPR 2025), plainly: max-min diversity on 1 - cosine."""
    n = x.shape[0]
    xn = x / x.norm(dim=-1, keepdim=True)
    dist = 1 - xn @ xn.T
    nn_dist = [min(float(dist[i, j]) for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: nn_dist[i])]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(float(dist[i, c]) for c in chosen)))
    return sorted(chosen)


def _layers(model: LlavaForConditionalGeneration, h: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
            start: int, stop: int) -> torch.Tensor:
    lm = model.model.language_model
    pe = lm.rotary_emb(h, pos)
    for layer in lm.layers[start:stop]:
        h = layer(h, attention_mask=None, position_embeddings=pe, cache=cache, use_cache=True)
    return h


def _decode(model: LlavaForConditionalGeneration, h: torch.Tensor, cache: DynamicCache, last_pos: int) -> list[int]:
    lm = model.model.language_model
    out = []
    for step in range(NEW):
        logits = model.lm_head(lm.norm(h[:, -1:]))
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if step == NEW - 1:
            break
        emb = lm.embed_tokens(torch.tensor([[tok]]))
        pos = torch.tensor([[last_pos + 1 + step]])
        h = _layers(model, emb, pos, cache, 0, len(lm.layers))
    return out


def _reference_input(model: LlavaForConditionalGeneration, ids: list[int], pix: torch.Tensor, k: int) -> list[int]:
    """Input-stage DivPrune, then the LM on the kept rows at their original positions."""
    emb = _row_embeds(model, ids, pix)
    vis = torch.nonzero(torch.tensor(ids) == IMG).flatten().tolist()
    kept_vis = [vis[j] for j in _naive_divprune(emb[vis], k)]
    keep = sorted([i for i in range(len(ids)) if ids[i] != IMG] + kept_vis)
    cache = DynamicCache(config=model.config.text_config)
    h = _layers(model, emb[keep][None], torch.tensor([keep]), cache, 0, 4)
    return _decode(model, h, cache, len(ids) - 1)


def _reference_keep(model: LlavaForConditionalGeneration, ids: list[int], pix: torch.Tensor, kept: list[int]
                    ) -> list[int]:
    """The LM on the text plus the kept visual tokens (offsets inside the image), original positions."""
    emb = _row_embeds(model, ids, pix)
    vis = torch.nonzero(torch.tensor(ids) == IMG).flatten().tolist()
    keep = sorted([i for i in range(len(ids)) if ids[i] != IMG] + [vis[j] for j in kept])
    cache = DynamicCache(config=model.config.text_config)
    h = _layers(model, emb[keep][None], torch.tensor([keep]), cache, 0, 4)
    return _decode(model, h, cache, len(ids) - 1)


@torch.no_grad()
def _tower_cls_attention(model: LlavaForConditionalGeneration, pix: torch.Tensor) -> torch.Tensor:
    """The CLS row of the feature layer's attention, read from an eager tower (``output_attentions``)."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        out = tower(pix, output_attentions=True)
    finally:
        tower.set_attn_implementation("sdpa")
    layer = len(out.attentions) + 1 + model.config.vision_feature_layer - 1  # the layer producing the features
    return out.attentions[layer][:, :, 0, 1:].mean(1)


def _fastv_scores(model: LlavaForConditionalGeneration, h_in: torch.Tensor, pos: torch.Tensor, layer: int
                  ) -> torch.Tensor:
    """FastV (Chen et al., ECCV 2024): attention of the last token in layer K-1, mean over heads."""
    lm = model.model.language_model
    blk = lm.layers[layer]
    x = blk.input_layernorm(h_in)
    attn = blk.self_attn
    t = x.shape[1]
    q = attn.q_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
    kk = attn.k_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, pos)
    q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
    kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
    row = torch.softmax((q[:, :, -1:] @ kk.transpose(-1, -2)) / math.sqrt(attn.head_dim), dim=-1)
    return row[0, :, 0].mean(0)


def _reference_fastv(model: LlavaForConditionalGeneration, ids: list[int], pix: torch.Tensor, k: int,
                     layer: int) -> list[int]:
    emb = _row_embeds(model, ids, pix)[None]
    pos = torch.arange(len(ids))[None]
    cache = DynamicCache(config=model.config.text_config)
    h_prev = _layers(model, emb, pos, cache, 0, layer - 1)
    scores = _fastv_scores(model, h_prev, pos, layer - 1)
    h = _layers(model, h_prev, pos, cache, layer - 1, layer)
    vis = torch.nonzero(torch.tensor(ids) == IMG).flatten()
    top = vis[torch.argsort(scores[vis], descending=True, stable=True)[:k]].tolist()
    keep = sorted([i for i in range(len(ids)) if ids[i] != IMG] + top)
    h = _layers(model, h[:, keep], torch.tensor([keep]), cache, layer, 4)
    return _decode(model, h, cache, len(ids) - 1)


# ------------------------------------------------------------------------------ exactness


def test_keep_all_is_bit_identical(model: LlavaForConditionalGeneration) -> None:
    batch = _batch(_rows())
    with torch.no_grad():
        ref_logits = model(**batch).logits
    ref = _generate(model, batch)
    for kw in ({"ratio": 1.0}, {"keep": N, "stage": "llm", "layer": 2, "method": "fastv"}):
        method = kw.pop("method", "divprune")
        with unipruner.vlm.patch(model, method, **kw):
            with torch.no_grad():
                assert torch.equal(model(**batch).logits, ref_logits)
            assert torch.equal(_generate(model, batch), ref)


@pytest.mark.parametrize("k", [3, 6])
def test_input_divprune_matches_reference_per_row(model: LlavaForConditionalGeneration, k: int) -> None:
    rows = _rows()
    batch = _batch(rows)
    with unipruner.vlm.patch(model, "divprune", keep=k) as h:
        got = _generate(model, batch)
        st = h.stats()
    assert st.stages[0].before == (N, N) and st.stages[0].after == (k, k)
    for i, r in enumerate(rows):
        assert got[i].tolist() == _reference_input(model, r, batch["pixel_values"][i:i + 1], k), f"row {i}"


def test_owner_maps_every_patch(model: LlavaForConditionalGeneration) -> None:
    rows = _rows()
    batch = _batch(rows, seed=10)
    with unipruner.vlm.patch(model, "divprune", keep=5) as h:
        _generate(model, batch)
        owner = h.stats().stages[0].owner
    assert owner is not None and owner.shape == (2, N)
    for i, r in enumerate(rows):
        emb = _row_embeds(model, r, batch["pixel_values"][i:i + 1])
        vis = torch.nonzero(torch.tensor(r) == IMG).flatten().tolist()
        assert torch.nonzero(owner[i] >= 0).flatten().tolist() == _naive_divprune(emb[vis], 5)
    with unipruner.vlm.patch(model, [stage("tome", ratio=0.5), stage("fastv", "llm", layer=2, keep=3)]) as h:
        _generate(model, batch)
        merged, pruned = h.stats().stages
    assert bool((merged.owner >= 0).all())  # merging keeps every patch somewhere
    assert [len(set(o.tolist())) for o in merged.owner] == [8, 8]
    assert [len(set(o[o >= 0].tolist())) for o in pruned.owner] == [3, 3]


def test_divprune_kept_set_is_the_papers() -> None:
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(3))
    m = unipruner.method("divprune", keep=7)
    got = m.select(x)
    for i in range(3):
        assert got[i].tolist() == _naive_divprune(x[i], 7)


@pytest.mark.parametrize("layer", [1, 2])
def test_llm_fastv_matches_reference_per_row(model: LlavaForConditionalGeneration, layer: int) -> None:
    rows = _rows()
    batch = _batch(rows, seed=1)
    with unipruner.vlm.patch(model, "fastv", stage="llm", layer=layer, keep=5) as h:
        got = _generate(model, batch)
        st = h.stats()
    width = batch["input_ids"].shape[1]
    longest = max(len(r) - N + 5 for r in rows)
    assert st.kv_slots[:layer] == (width,) * layer  # after the prefill, layers before K hold the whole sequence
    assert st.kv_slots[layer:] == (longest,) * (4 - layer)  # layers >= K the kept one
    for i, r in enumerate(rows):
        assert got[i].tolist() == _reference_fastv(model, r, batch["pixel_values"][i:i + 1], 5, layer), f"row {i}"


def test_llm_dart_kept_set_matches_naive_dart(model: LlavaForConditionalGeneration) -> None:
    """DART at layer K (Wen et al., 2025): pivots by key L1 norm, then the least duplicated tokens."""
    from test_similarity import naive_dart

    rows = _rows()
    batch = _batch(rows, seed=15)
    layer, k = 2, 6
    with unipruner.vlm.patch(model, "dart", stage="llm", layer=layer, keep=k, n_pivots=2) as h:
        _generate(model, batch)
        owner = h.stats().stages[0].owner
    lm = model.model.language_model
    for i, r in enumerate(rows):
        emb = _row_embeds(model, r, batch["pixel_values"][i:i + 1])[None]
        with torch.no_grad():
            hid = _layers(model, emb, torch.arange(len(r))[None], DynamicCache(config=model.config.text_config), 0,
                          layer)
            blk = lm.layers[layer]
            keys = blk.self_attn.k_proj(blk.input_layernorm(hid))[0]  # before RoPE
        vis = torch.nonzero(torch.tensor(r) == IMG).flatten()
        x, kk = hid[0, vis].numpy(), keys[vis].numpy()
        valid = torch.ones(N, dtype=torch.bool).numpy()
        want = naive_dart(x, k, kk, 2, None, valid, ~valid)
        assert torch.nonzero(owner[i] >= 0).flatten().tolist() == want, f"row {i}"


def test_batch_equals_rows_alone(model: LlavaForConditionalGeneration) -> None:
    rows = _rows()
    batch = _batch(rows, seed=2)
    for method, kw in (("divprune", {"keep": 4}), ("dart", {"keep": 6, "stage": "llm", "layer": 1}),
                       ("sparsevlm", {"keep": 4, "stage": "llm", "layer": 2}), ("tome", {"ratio": 0.5})):
        with unipruner.vlm.patch(model, method, **kw):
            together = _generate(model, batch)
            for i, r in enumerate(rows):
                one = _batch([r], seed=2)
                one["pixel_values"] = batch["pixel_values"][i:i + 1]
                assert _generate(model, one)[0].tolist() == together[i].tolist(), (method, i)


def test_eager_equals_sdpa() -> None:
    batch = _batch(_rows(), seed=4)
    outs = []
    for attn in ("sdpa", "eager"):
        m = _model(attn=attn)
        with unipruner.vlm.patch(m, "fastv", stage="llm", layer=2, keep=4):
            outs.append(_generate(m, batch))
    assert torch.equal(outs[0], outs[1])


def test_compact_positions_renumber(model: LlavaForConditionalGeneration) -> None:
    rows = _rows()
    batch = _batch(rows[:1], seed=5)
    with unipruner.vlm.patch(model, "divprune", keep=4, positions="compact"):
        got = _generate(model, batch)[0].tolist()
    emb = _row_embeds(model, rows[0], batch["pixel_values"])
    vis = torch.nonzero(torch.tensor(rows[0]) == IMG).flatten().tolist()
    text = [i for i in range(len(rows[0])) if rows[0][i] != IMG]
    keep = sorted(text + [vis[j] for j in _naive_divprune(emb[vis], 4)])
    cache = DynamicCache(config=model.config.text_config)
    h = _layers(model, emb[keep][None], torch.arange(len(keep))[None], cache, 0, 4)
    assert got == _decode(model, h, cache, len(keep) - 1)


def test_schedule_of_two_stages(model: LlavaForConditionalGeneration) -> None:
    batch = _batch(_rows(), seed=6)
    with unipruner.vlm.patch(model, [stage("fastv", "llm", layer=2, keep=3), stage("divprune", keep=8)]) as h:
        _generate(model, batch)
        st = h.stats()
    assert [(s.where, s.after) for s in st.stages] == [("input", (8, 8)), ("llm", (3, 3))]
    assert st.kv_slots[0] == st.kv_slots[1] > st.kv_slots[2] == st.kv_slots[3]


def _reference_fastv_stages(model: LlavaForConditionalGeneration, ids: list[int], pix: torch.Tensor,
                            stages: list[tuple[int, int]]) -> list[int]:
    """FastV applied at several layers in turn: each stage scores the sequence the previous one left
    (its tokens at their original positions) and keeps its k best visual tokens."""
    h = _row_embeds(model, ids, pix)[None]
    keep = list(range(len(ids)))
    cache = DynamicCache(config=model.config.text_config)
    done = 0
    for layer, k in stages:
        pos = torch.tensor([keep])
        h = _layers(model, h, pos, cache, done, layer - 1)
        scores = _fastv_scores(model, h, pos, layer - 1)
        h = _layers(model, h, pos, cache, layer - 1, layer)
        vis = torch.tensor([j for j, i in enumerate(keep) if ids[i] == IMG])
        top = vis[torch.argsort(scores[vis], descending=True, stable=True)[:k]].tolist()
        sel = sorted([j for j, i in enumerate(keep) if ids[i] != IMG] + top)
        h, keep, done = h[:, sel], [keep[j] for j in sel], layer
    h = _layers(model, h, torch.tensor([keep]), cache, done, 4)
    return _decode(model, h, cache, len(ids) - 1)


def test_two_llm_stages_match_reference(model: LlavaForConditionalGeneration) -> None:
    """A schedule of two in-LLM stages: the second sees the first's pruned sequence at its original positions."""
    rows = _rows()
    batch = _batch(rows, seed=9)
    with unipruner.vlm.patch(model, [stage("fastv", "llm", layer=1, keep=6), stage("fastv", "llm", layer=3, keep=3)]
                             ) as h:
        got = _generate(model, batch)
        st = h.stats()
    assert [s.after for s in st.stages] == [(6, 6), (3, 3)]
    assert st.kv_slots[0] > st.kv_slots[1] == st.kv_slots[2] > st.kv_slots[3]
    for i, r in enumerate(rows):
        assert got[i].tolist() == _reference_fastv_stages(model, r, batch["pixel_values"][i:i + 1],
                                                          [(1, 6), (3, 3)]), f"row {i}"


def test_several_images_per_prompt(model: LlavaForConditionalGeneration) -> None:
    batch = _batch(_rows(n_images=2), seed=7)
    with unipruner.vlm.patch(model, "divprune", keep=3) as h:
        _generate(model, batch)
        assert h.stats().stages[0].after == (3, 3, 3, 3)
    with unipruner.vlm.patch(model, "divprune", keep=3, per_image=False) as h:
        _generate(model, batch)
        assert h.stats().stages[0].before == (2 * N, 2 * N) and h.stats().stages[0].after == (3, 3)


def test_aggregate_tokens_follow_their_image(model: LlavaForConditionalGeneration) -> None:
    """A fused token (reduction='fuse') is placed after its image's last visual token."""
    batch = _batch(_rows(), seed=8)
    m = unipruner.method("query_similarity", keep=4, reduction="fuse")
    with unipruner.vlm.patch(model, m) as h:
        out = _generate(model, batch)
        st = h.stats()
    assert st.stages[0].after == (5, 5) and out.shape == (2, NEW)


def test_no_cache_forward(model: LlavaForConditionalGeneration) -> None:
    batch = _batch(_rows(), seed=9)
    with unipruner.vlm.patch(model, "divprune", keep=4), torch.no_grad():
        out = model(**batch, use_cache=False)
    assert out.logits.shape[1] == max(len(r) - N + 4 for r in _rows())


@pytest.mark.parametrize("k", [4, 7])
def test_vision_evit_matches_tower_attention(model: LlavaForConditionalGeneration, k: int) -> None:
    """EViT at the tower (CLS attention of the feature layer, Liang et al. 2022), then the LM."""
    rows = _rows()
    batch = _batch(rows, seed=11)
    with unipruner.vlm.patch(model, "evit", stage="vision", keep=k) as h:
        got = _generate(model, batch)
        owner = h.stats().stages[0].owner
    cls = _tower_cls_attention(model, batch["pixel_values"])
    for i, r in enumerate(rows):
        top = sorted(torch.argsort(cls[i], descending=True, stable=True)[:k].tolist())
        assert torch.nonzero(owner[i] >= 0).flatten().tolist() == top
        assert got[i].tolist() == _reference_keep(model, r, batch["pixel_values"][i:i + 1], top), f"row {i}"


def test_vision_visionzip_merges_before_the_projector(model: LlavaForConditionalGeneration) -> None:
    rows = _rows()
    batch = _batch(rows, seed=12)
    with unipruner.vlm.patch(model, "visionzip", stage="vision", keep=6, contextual=2) as h:
        together = _generate(model, batch)
        st = h.stats().stages[0]
        for i, r in enumerate(rows):
            one = _batch([r], seed=12)
            one["pixel_values"] = batch["pixel_values"][i:i + 1]
            assert _generate(model, one)[0].tolist() == together[i].tolist()
    assert st.after == (6, 6) and bool((st.owner >= 0).all())  # every patch went into a kept or contextual token
    # the kept set is the core method's, fed with the tower's CLS attention and the layer's keys
    cls = _tower_cls_attention(model, batch["pixel_values"])
    with torch.no_grad():
        hs = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        tower = model.model.vision_tower
        enc = getattr(tower, "vision_model", tower).encoder.layers[0]
        kk = enc.self_attn.k_proj(enc.layer_norm1(hs[0]))[:, 1:]
        feats = hs[-2][:, 1:]
    want = unipruner.method("visionzip", keep=6, contextual=2).reduce(feats, attn=cls, keys=kk)
    groups = [len(set(o.tolist())) for o in st.owner]
    assert groups == [int(x) for x in (want.sizes[..., 0] > 0).sum(-1).tolist()]


def test_vision_keep_all_and_adaptive(model: LlavaForConditionalGeneration) -> None:
    batch = _batch(_rows(), seed=13)
    ref = _generate(model, batch)
    with unipruner.vlm.patch(model, "visionzip", stage="vision", ratio=1.0):
        assert torch.equal(_generate(model, batch), ref)
    with unipruner.vlm.patch(model, "prumerge", stage="vision") as h:  # PruMerge's IQR rule: ragged counts
        _generate(model, batch)
        after = h.stats().stages[0].after
    assert all(1 <= a < N for a in after)


def test_visualize_writes_a_png(model: LlavaForConditionalGeneration, tmp_path: Any) -> None:
    batch = _batch(_rows(), seed=14)
    with unipruner.vlm.patch(model, [stage("visionzip", "vision", keep=6, contextual=2),
                                     stage("fastv", "llm", layer=2, keep=3)]):
        fig = unipruner.vlm.visualize(model, batch, tmp_path / "kept.png", index=1)
    assert (tmp_path / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3
    with pytest.raises(UniprunerError, match="not patched"):
        unipruner.vlm.visualize(model, batch)


# ------------------------------------------------------------------------------ handle contract


def test_handle_contract(model: LlavaForConditionalGeneration) -> None:
    before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    h = unipruner.vlm.patch(model, "divprune", keep=4)
    assert unipruner.vlm.find(model) is h
    assert unipruner.vlm.patch(model, "divprune", keep=4) is h
    with pytest.raises(UniprunerError, match="configure"):
        unipruner.vlm.patch(model, "divprune", keep=5)
    h.configure(keep=6)
    assert h.settings.stages[0].method.budget.keep == 6
    h.configure("fastv", stage="llm", layer=2, keep=3)
    assert "fastv" in h.describe() and "layer 2" in h.describe()
    with pytest.raises(UniprunerError):
        h.configure(keep=0)
    assert h.settings.stages[0].method.name == "fastv"  # a refused configure changes nothing
    assert unipruner.vlm.unpatch(model) is True and unipruner.vlm.unpatch(model) is False
    assert unipruner.vlm.find(model) is None
    after = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert after == before


def test_two_threads_share_one_patched_model(model: LlavaForConditionalGeneration) -> None:
    """Per-call state lives in a context variable and the per-call cache: concurrent calls never mix."""
    import threading

    batches = [_batch(_rows(), seed=20), _batch(_rows()[:1], seed=21)]
    sched = [stage("visionzip", "vision", keep=8, contextual=2), stage("fastv", "llm", layer=2, keep=4)]
    with unipruner.vlm.patch(model, sched):
        want = [_generate(model, b) for b in batches]
        got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

        def work(i: int) -> None:
            for _ in range(4):
                got[i].append(_generate(model, batches[i]))

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in (0, 1):
        assert len(got[i]) == 4 and all(torch.equal(g, want[i]) for g in got[i])


def test_methods_are_the_vlm_domain() -> None:
    assert set(unipruner.vlm.VLM_METHODS) == {m.name for m in unipruner.methods(domain="vlm")}


# ------------------------------------------------------------------------------ bad input


def test_bad_input(model: LlavaForConditionalGeneration) -> None:
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50))
    with pytest.raises(UniprunerError, match=r"unipruner\.kv"):
        unipruner.vlm.patch(lm, "divprune", keep=4)
    with pytest.raises(UniprunerError, match="not a supported"):
        unipruner.vlm.patch(torch.nn.Linear(2, 2), "divprune", keep=4)
    with pytest.raises(UniprunerError, match="keep"):
        unipruner.vlm.patch(model, "divprune", keep=0)
    with pytest.raises(UniprunerError, match="ratio"):
        unipruner.vlm.patch(model, "divprune", ratio=1.5)
    with pytest.raises(UniprunerError, match="outside the language model"):
        unipruner.vlm.patch(model, "fastv", stage="llm", layer=4, keep=4)
    with pytest.raises(UniprunerError, match="stage='llm'"):
        unipruner.vlm.patch(model, "fastv", stage="input", keep=4)
    with pytest.raises(UniprunerError, match="stage must be"):
        unipruner.vlm.patch(model, "divprune", stage="tower", keep=4)
    with pytest.raises(UniprunerError, match="per_image=True"):
        unipruner.vlm.patch(model, "visionzip", stage="vision", keep=4, per_image=False)
    with pytest.raises(UniprunerError, match="vlm domain"):
        unipruner.vlm.patch(model, "knorm", keep=4)
    with pytest.raises(UniprunerError, match="no budget"):
        unipruner.vlm.patch(model, "divprune")
    with pytest.raises(UniprunerError, match="compact"):
        unipruner.vlm.patch(model, "fastv", stage="llm", layer=2, keep=4, positions="compact")
    assert unipruner.vlm.find(model) is None  # nothing was left patched by the refusals
    with unipruner.vlm.patch(model, "divprune", keep=N + 1):
        with pytest.raises(UniprunerError, match="more than the 16 visual tokens"):
            _generate(model, _batch(_rows()))
        text_only = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        with pytest.raises(UniprunerError, match="no image placeholder"), torch.no_grad():
            model(**text_only)
