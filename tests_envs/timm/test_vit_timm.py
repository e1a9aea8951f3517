"""unipruner.vit on timm VisionTransformer (run in .venv-timm via scripts/ci_timm.sh).

timm needs torchvision, which cannot live next to the main venv's CPU torch, so these tests run in
their own environment. They fail, never skip, when timm is missing.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import timm  # a hard import on purpose: a missing timm is a failure here
import torch

import unipruner.adapters.vit as vit
from unipruner import UniprunerError
from unipruner.select import Budget

PIX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _build(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _run(model: torch.nn.Module, pix: torch.Tensor = PIX) -> torch.Tensor:
    with torch.no_grad():
        return model(pix)


def test_main_environment_has_no_transformers_and_timm_is_current() -> None:
    assert importlib.util.find_spec("transformers") is None  # the adapter must not need it
    assert int(timm.__version__.split(".")[0]) >= 1


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"global_pool": "avg"}, {"class_token": False,
                                                                                 "global_pool": "avg"}])
def test_keep_everything_is_identical_and_unpatch_restores(kw: dict[str, object]) -> None:
    model = _build(**kw)
    ref, feats = _run(model), model.forward_features(PIX).detach()
    hooks = _n_hooks(model)
    for method in ("tome", "zero_tprune", "random"):
        if method == "zero_tprune" or kw.get("class_token", True):
            with vit.patch(model, method, r=0) as p:
                assert p.protected == model.num_prefix_tokens
                assert torch.equal(_run(model), ref)
    p = vit.patch(model, "tome", r=3)
    out = model.forward_features(PIX)  # calling forward_features directly works too
    assert out.shape[1] == model.num_prefix_tokens + 16 - 9
    assert p.tokens_per_layer()[-1][1] == out.shape[1] == p.stats().n_out
    assert p.call_state() is None  # the last block ended the call (the model's own forward never ran)
    assert _run(model).shape == ref.shape
    assert vit.find(model) is p and "timm VisionTransformer" in p.describe()
    vit.unpatch(model)
    assert _n_hooks(model) == hooks
    assert torch.equal(_run(model), ref) and torch.equal(model.forward_features(PIX), feats)


def _naive_tome(model: torch.nn.Module, pix: torch.Tensor, rs: list[int]) -> torch.Tensor:
    """ToMe over timm blocks with Python lists: bipartite matching, size-weighted merge, log-size bias."""
    outs = []
    for img in pix:
        x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))
        size = torch.ones(x.shape[1])
        for blk, r in zip(model.blocks, rs, strict=True):
            bias = size.log().reshape(1, 1, 1, -1) if bool((size > 1).any()) else None
            n = x.shape[1]
            qkv = blk.attn.qkv(blk.norm1(x)).reshape(1, n, 3, blk.attn.num_heads, -1)
            keys = qkv[0, :, 1].mean(1)
            x = blk(x, attn_mask=bias)[0]
            a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
            edges = []
            for i in a_idx:
                if i < model.num_prefix_tokens:
                    continue
                sims = [float(torch.cosine_similarity(keys[i], keys[j], dim=0))
                        if j >= model.num_prefix_tokens else -math.inf for j in b_idx]
                best = max(range(len(b_idx)), key=lambda t: (sims[t], -t))
                edges.append((sims[best], -i, i, b_idx[best]))
            edges.sort(reverse=True)
            vec = {i: x[i] * size[i] for i in range(n)}
            sz = {i: float(size[i]) for i in range(n)}
            for _, _, i, j in edges[: min(r, (n - model.num_prefix_tokens) // 2)]:
                vec[j] = vec[j] + vec.pop(i)
                sz[j] += sz.pop(i)
            order = sorted(vec)
            x = torch.stack([vec[i] / sz[i] for i in order])[None]
            size = torch.tensor([sz[i] for i in order])
        outs.append(model.norm(x)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}])
def test_tome_matches_naive_reference(kw: dict[str, object]) -> None:
    model = _build(**kw)
    with torch.no_grad():
        ref = _naive_tome(model, PIX, [3, 4, 2])
        with vit.patch(model, "tome", r=[3, 4, 2]):
            out = model.forward_features(PIX)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_evit_rebuilds_cls_attention_from_timm_queries_and_keys() -> None:
    model = _build()
    blk = model.blocks[0]
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(PIX)))
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-1, -2) * blk.attn.scale).softmax(-1)
    scores = attn[:, :, 0].mean(1)
    scores[:, 0] = math.inf
    expected = torch.sort(torch.topk(scores, 7, dim=1).indices, dim=1).values
    with vit.patch(model, "evit", schedule=[Budget(keep=6), None, None]):
        _run(model)
        owner = vit.kept_tokens(model)[0].owner
    kept = torch.stack([torch.nonzero(row >= 0).squeeze(1) for row in owner])
    assert torch.equal(kept, expected)


def test_methods_dense_outputs_and_visualisation(tmp_path: Path) -> None:
    model = _build(global_pool="avg")
    ref = _run(model)
    for name in vit.VIT_METHODS:
        with vit.patch(model, name, r=2):
            assert _run(model).shape == ref.shape, name
    with vit.patch(model, "tome", r=3, return_unmerged=True):
        dense = model.forward_features(PIX)
        assert dense.shape == (2, 17, 32)
        vit.visualize(model, PIX, tmp_path / "timm.png")
    assert (tmp_path / "timm.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs() -> None:
    model = _build()
    with pytest.raises(UniprunerError, match=r"accepts images of 3x32x32.*dynamic_img_size"):
        with vit.patch(model, "tome", r=2):
            _run(model, torch.randn(1, 3, 40, 40))
    with pytest.raises(UniprunerError, match="no CLS token"):
        vit.patch(_build(class_token=False, global_pool="avg"), "evit", r=2)
    with pytest.raises(UniprunerError, match="at most 8"):
        vit.patch(model, "tome", r=9)
    dyn = _build(dynamic_img_size=True)
    with vit.patch(dyn, "tome", r=2):
        assert _run(dyn, torch.randn(1, 3, 48, 48)).shape == (1, 5)
