"""unipruner.vit on tiny randomly initialised transformers hosts (+ the digits-trained fixture)."""

from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path

import pytest
import torch
import transformers

import unipruner.adapters.vit as vit
from unipruner import UniprunerError
from unipruner.scorers.graph import pagerank
from unipruner.select import Budget, Schedule, r_schedule

T = transformers
KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
          patch_size=8)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        m = T.ViTModel(T.ViTConfig(**KW))
    elif name == "vit_cls":
        m = T.ViTForImageClassification(T.ViTConfig(**KW, num_labels=3))
    elif name == "deit":
        m = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**KW, num_labels=3))
    elif name == "clip":
        m = T.CLIPVisionModel(T.CLIPVisionConfig(**KW))
    elif name == "siglip":
        m = T.SiglipVisionModel(T.SiglipVisionConfig(**KW))
    elif name == "dinov2":
        m = T.Dinov2Model(T.Dinov2Config(**KW))
    elif name == "dinov2_reg":
        m = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**KW, num_register_tokens=3))
    else:  # pragma: no cover
        raise AssertionError(name)
    return m.eval()


HOSTS = ["vit", "vit_cls", "deit", "clip", "siglip", "dinov2", "dinov2_reg"]
PROTECTED = {"vit": 1, "vit_cls": 1, "deit": 2, "clip": 1, "siglip": 0, "dinov2": 1, "dinov2_reg": 4}
PIX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _out(model: torch.nn.Module, pix: torch.Tensor = PIX, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        o = model(pix, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------- identity / undo


@pytest.mark.parametrize("host", HOSTS)
def test_keep_everything_is_bitwise_identical_and_unpatch_restores(host: str) -> None:
    model = _build(host)
    ref = _out(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _n_hooks(model)
    for budget in ({"r": 0}, {"ratio": 1.0}, {"keep": 16}, {"schedule": [None, 1.0, Budget(ratio=1.0)]},
                   {"schedule": Schedule.geometric(final=1.0)}):
        for method in ("tome", "zero_tprune", "divprune"):
            with vit.patch(model, method, **budget) as p:
                assert p.protected == PROTECTED[host]
                assert torch.equal(_out(model), ref), (host, method, budget)
                assert [r.n_out for r in vit.kept_tokens(model)] == [r.n_in for r in vit.kept_tokens(model)]
    assert _n_hooks(model) == hooks
    assert torch.equal(_out(model), ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("host", HOSTS)
def test_every_host_reduces_with_protected_prefix_kept(host: str) -> None:
    model = _build(host)
    ref = _out(model)
    p = vit.patch(model, "tome", r=3)
    n0 = 16 + PROTECTED[host]
    assert p.tokens_per_layer() == [(n0, n0 - 3), (n0 - 3, n0 - 6), (n0 - 6, n0 - 9)]
    out = _out(model)
    if out.ndim == 3:
        assert out.shape[1] == n0 - 9
    rec = vit.kept_tokens(model)
    assert len(rec) == 3 and rec[-1].owner.shape == (2, n0)
    prefix = rec[-1].owner[:, : PROTECTED[host]]
    assert torch.equal(prefix, torch.arange(PROTECTED[host]).expand(2, -1))  # CLS/dist/registers untouched
    for r in rec:  # every slot owned by at least one original token
        assert all(len(set(row.tolist()) - {-1}) == r.n_out for row in r.owner)
    p.configure(r=0)
    assert torch.equal(_out(model), ref)
    assert vit.unpatch(model) and not vit.unpatch(model)
    assert torch.equal(_out(model), ref)


def test_patch_is_idempotent_and_instances_do_not_interfere() -> None:
    a, b = _build("vit"), _build("vit")
    pa = vit.patch(a, "tome", r=2)
    hooks = _n_hooks(a)
    assert vit.patch(a, "tome", r=2) is pa and _n_hooks(a) == hooks  # identical re-patch: the same handle
    with pytest.raises(UniprunerError, match=r"already patched by unipruner\.vit with other settings.*configure"):
        vit.patch(a, "tome", r=4)
    assert pa.configure(r=4) is pa and _n_hooks(a) == hooks and pa.settings.schedule == Schedule.remove(4)
    assert vit.find(a) is pa and vit.find(b) is None
    vit.patch(b, "random", r=1)
    assert _out(a).shape[1] == 17 - 12 and _out(b).shape[1] == 17 - 3
    assert "blocks=3" in repr(pa) and pa.blocks == ["layers.0", "layers.1", "layers.2"]
    assert not any(isinstance(v, vit.ViTHandle) for v in vars(a).values())  # nothing stored on the model
    assert vit.unpatch(a) and vit.find(a) is None and vit.find(b) is not None


def test_handle_is_a_context_manager_with_stats_and_describe() -> None:
    model = _build("deit")
    ref = _out(model)
    hooks = _n_hooks(model)
    with vit.patch(model, "tome", r=3) as h:
        assert isinstance(h, vit.ViTHandle) and vit.find(model) is h
        with pytest.raises(UniprunerError, match="run the patched model once"):
            h.stats()
        _out(model)
        st = h.stats()
        assert isinstance(st, vit.ViTStats) and st.tokens == h.tokens_per_layer() == [(18, 15), (15, 12), (12, 9)]
        assert st.n0 == 18 and st.n_out == 9 and len(st) == 3 and st[0].layer == 0
        assert [r.owner.shape for r in st] == [(2, 18)] * 3
        text = h.describe()
        for part in ("DeiTForImageClassificationWithTeacher", "3 encoder blocks patched", "Schedule.remove(3)",
                     "18->15, 15->12, 12->9", "first 2 token(s)", "left alone"):
            assert part in text, (part, text)
        h.configure(schedule=[None, Budget(keep=8), None])
        assert "blocks [0, 2] remove nothing" in h.describe()
    assert vit.find(model) is None and not h.active and _n_hooks(model) == hooks
    assert torch.equal(_out(model), ref)
    assert not h.unpatch() and not vit.unpatch(model)


def test_a_forward_that_raises_ends_its_call() -> None:
    model = _build("vit")
    h = vit.patch(model, "tome", r=3)
    ref = _out(model)
    boom = model.layers[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _out(model)
    assert h.call_state() is None  # the model's always-called forward hook ended the call
    boom.remove()
    with pytest.raises(UniprunerError, match="accepts images"):
        _out(model, torch.randn(1, 3, 48, 48))
    assert h.call_state() is None
    torch.testing.assert_close(_out(model), ref, atol=0, rtol=0)
    assert h.stats().tokens == h.tokens_per_layer()


@pytest.mark.parametrize("method", ["tome", "zero_tprune"])
def test_two_threads_share_one_patched_model(method: str) -> None:
    """Per-call state lives in each call's context: concurrent calls never see each other's tokens."""
    model = _build("vit")
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randn(1, 3, 32, 32, generator=gen), torch.randn(3, 3, 32, 32, generator=gen)]
    h = vit.patch(model, method, r=[3, 5, 2], return_unmerged=method == "tome")
    refs = [_out(model, x) for x in inputs]  # single-threaded runs
    assert refs[0].shape[0] == 1 and refs[1].shape[0] == 3
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    mismatches: list[int] = []

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(40):
                out = _out(model, inputs[i])
                if not torch.equal(out, refs[i]):
                    mismatches.append(i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches
    assert h.call_state() is None and h.stats().tokens == h.tokens_per_layer()
    assert h.stats()[0].owner.shape[0] in (1, 3)


# ------------------------------------------------------------------------------- reference checks


def _naive_tome(model: torch.nn.Module, pix: torch.Tensor, rs: list[int], prop_attn: bool = True) -> torch.Tensor:
    """ToMe written out token by token with Python lists (bipartite matching, size-weighted merge)."""
    outs = []
    for img in pix:
        x = model.embeddings(img[None])
        size = torch.ones(x.shape[1])
        for layer, r in zip(model.layers, rs, strict=True):
            bias = size.log().reshape(1, 1, 1, -1) if prop_attn and bool((size > 1).any()) else None
            keys = layer.attention.k_proj(layer.layernorm_before(x))[0]
            x = layer(x, bias)[0]
            keys = keys.reshape(keys.shape[0], 2, -1).mean(1)
            n = x.shape[0]
            a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
            edges = []
            for i in a_idx:
                if i == 0:  # CLS never merges
                    continue
                sims = [float(torch.cosine_similarity(keys[i], keys[j], dim=0)) for j in b_idx]
                best = max(range(len(b_idx)), key=lambda t: (sims[t], -t))
                edges.append((sims[best], -i, i, b_idx[best]))
            edges.sort(reverse=True)
            r = min(r, (n - 1) // 2)
            vec = {i: x[i] * size[i] for i in range(n)}
            sz = {i: float(size[i]) for i in range(n)}
            for _, _, i, j in edges[:r]:
                vec[j] = vec[j] + vec.pop(i)
                sz[j] += sz.pop(i)
            order = sorted(vec)
            x = torch.stack([vec[i] / sz[i] for i in order])[None]
            size = torch.tensor([sz[i] for i in order])
        outs.append(model.layernorm(x)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_matches_naive_reference(prop_attn: bool) -> None:
    model = _build("vit")
    with torch.no_grad():
        ref = _naive_tome(model, PIX, [3, 5, 2], prop_attn)
        with vit.patch(model, "tome", r=[3, 5, 2], prop_attn=prop_attn):
            out = model(PIX).last_hidden_state
    assert out.shape == ref.shape == (2, 7, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_proportional_attention_keeps_sdpa_and_matches_eager() -> None:
    model = _build("vit")
    with vit.patch(model, "tome", r=4):
        sdpa = _out(model)
        model.set_attn_implementation("eager")
        eager = _out(model)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
    with vit.patch(model, "tome", r=4, prop_attn=False):
        plain = _out(model)
    assert not torch.allclose(plain, eager, atol=1e-4)


def _eager_attentions(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(PIX, output_attentions=True)
    model.set_attn_implementation("sdpa")
    return out.attentions


def test_evit_and_zero_tprune_rebuild_the_attention_they_need() -> None:
    model = _build("vit")
    attn0 = _eager_attentions(model)[0]  # [B, H, N, N] of block 0, from the host's eager path
    keep = 9
    cls_scores = attn0[:, :, 0, :].mean(1)
    cls_scores[:, 0] = math.inf
    expected_evit = torch.sort(torch.topk(cls_scores, keep, dim=1).indices, dim=1).values
    pr = pagerank(attn0)
    pr[:, 0] = math.inf
    expected_ztp = torch.sort(torch.topk(pr, keep, dim=1).indices, dim=1).values
    for name, expected in (("evit", expected_evit), ("zero_tprune", expected_ztp)):
        with vit.patch(model, name, schedule=[Budget(keep=keep - 1), None, None]):
            _out(model)
            owner = vit.kept_tokens(model)[0].owner
        kept = torch.stack([torch.nonzero(row >= 0).squeeze(1) for row in owner])
        assert torch.equal(kept, expected), name


def test_evit_fuse_folds_the_rest_into_one_token() -> None:
    model = _build("vit")
    with vit.patch(model, "evit", schedule=[Budget(keep=5), None, None], reduction="fuse"):
        out = _out(model)
        owner = vit.kept_tokens(model)[0].owner
    assert out.shape[1] == 1 + 5  # CLS + 4 kept + the fused token: the budget counts the fused token
    assert bool((owner >= 0).all()) and int((owner == 5).sum(1)[0]) == 17 - 5


def test_batch_rows_are_independent() -> None:
    model = _build("clip")
    with vit.patch(model, "zero_tprune", r=3):
        both = _out(model)
        one = torch.cat([_out(model, PIX[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- dense outputs


def test_return_unmerged_spreads_merged_tokens_over_the_grid() -> None:
    model = _build("vit")
    with vit.patch(model, "tome", r=3) as p:
        small = _out(model)
        owner = vit.kept_tokens(model)[-1].owner
        manual = p.unmerge(small)
        p.configure(return_unmerged=True)
        dense = _out(model)
    assert dense.shape == (2, 17, 32)
    torch.testing.assert_close(dense, manual)
    for b in range(2):
        for i in range(17):
            assert torch.equal(dense[b, i], small[b, int(owner[b, i])])


def test_return_unmerged_dropped_tokens_keep_their_state() -> None:
    model = _build("vit")
    with torch.no_grad():
        hidden = model(PIX, output_hidden_states=True).hidden_states[1]  # output of block 0, full
    with vit.patch(model, "random", schedule=[Budget(keep=6), None, None], return_unmerged=True):
        dense = _out(model)
        owner = vit.kept_tokens(model)[-1].owner
    dropped = owner < 0
    assert int(dropped.sum()) == 2 * (16 - 6)
    torch.testing.assert_close(dense[dropped], model.layernorm(hidden)[dropped].detach())


# ------------------------------------------------------------------------------- schedules, knobs


def test_schedules_and_live_knob() -> None:
    model = _build("vit")
    p = vit.patch(model, "tome", r=(4, -1.0))
    assert [a - b for a, b in p.tokens_per_layer()] == r_schedule((4, -1.0), 3) == [8, 4, 0]
    p.configure(r=(4, -1))  # an int inflection means the same
    assert p.settings.schedule == Schedule.remove(4, inflection=-1.0)
    assert [a - b for a, b in p.tokens_per_layer()] == [8, 4, 0]
    p.configure(r=[1, 2, 3])
    assert _out(model).shape[1] == 17 - 6
    p.configure(schedule=Schedule.geometric(final=0.5))  # half of the patches left after the last block
    assert p.settings.schedule.kind == "geometric" and p.tokens_per_layer()[-1][1] == 1 + 8
    with pytest.raises(UniprunerError, match=r"layer 2 to remove 6 of its 9 tokens.*at most 4"):
        p.configure(schedule=Schedule([0.5, None, Budget(keep=2)]))  # bipartite matching halves at most
    p.configure("divprune")
    p.configure(schedule=Schedule([0.5, None, Budget(keep=2)]))
    assert p.tokens_per_layer() == [(17, 9), (9, 9), (9, 3)]
    assert _out(model).shape[1] == 3 and p.settings.method.name == "divprune"
    p.configure(reduction="merge")
    assert p.settings.method.reduction == "merge"
    before = p.settings
    with pytest.raises(UniprunerError, match="r must be >= 0"):
        p.configure(r=-1)
    with pytest.raises(UniprunerError, match="ratio"):
        p.configure(ratio=1.5)
    assert p.settings is before and p.settings.method.name == "divprune"  # failed updates change nothing
    p.configure(enabled=False)
    assert _out(model).shape[1] == 17


def test_ratio_keep_and_budget_are_kept_by_every_block() -> None:
    model = _build("vit")
    with vit.patch(model, "divprune", ratio=0.5) as h:  # every block keeps half of its 16 / 8 / 4 patches
        assert h.tokens_per_layer() == [(17, 9), (9, 5), (5, 3)]
        assert _out(model).shape[1] == 3 and h.stats().tokens == h.tokens_per_layer()
        assert h.configure(budget=Budget(ratio=0.5)).settings == vit.patch(model, "divprune", ratio=0.5).settings
        h.configure(keep=4)  # a count: the first block keeps 4 patches, the next ones all of them
        assert h.tokens_per_layer() == [(17, 5), (5, 5), (5, 5)]
        h.configure("tome", ratio=0.5)  # ToMe merges at most half of the unprotected tokens per block: fits
        assert h.tokens_per_layer() == [(17, 9), (9, 5), (5, 3)]
        with pytest.raises(UniprunerError, match=r"layer 0 to remove 10 of its 17 tokens.*'tome' can remove at most 8"):
            h.configure(ratio=0.4)
        assert h.settings.schedule == Schedule.constant(Budget(ratio=0.5), 3)


def test_visualize_writes_a_png(tmp_path: Path) -> None:
    model = _build("vit")
    vit.patch(model, "tome", r=3)
    path = tmp_path / "img" / "merges.png"
    vit.visualize(model, PIX, path, layers=[0, -1], index=1)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert not list(path.parent.glob("*.tmp"))


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(UniprunerError, match=r"ViTModel.*VisionTransformer"):
        vit.patch(torch.nn.Linear(3, 3), r=2)
    bert = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UniprunerError, match="not a supported vision transformer"):
        vit.patch(bert, r=2)
    model = _build("vit")
    with pytest.raises(UniprunerError, match=r"remove 9 of its 17 tokens.*at most 8"):
        vit.patch(model, "tome", r=9)
    with pytest.raises(UniprunerError, match="unknown ViT method 'tomee'; supported: dart, divprune"):
        vit.patch(model, "tomee", r=2)
    with pytest.raises(UniprunerError, match="one of r=, ratio=, keep=, budget= or schedule="):
        vit.patch(model, "tome", r=2, ratio=0.5)
    with pytest.raises(UniprunerError, match=r"one of .*not \['ratio', 'keep'\]"):
        vit.patch(model, "random", ratio=0.5, keep=4)
    with pytest.raises(UniprunerError, match=r"r= \(per block\), ratio="):
        vit.patch(model, "tome")
    with pytest.raises(UniprunerError, match="no CLS token"):
        vit.patch(_build("siglip"), "evit", r=2)
    with pytest.raises(UniprunerError, match="reduction must be 'merge'"):
        vit.patch(model, "tome", r=2, reduction="drop")
    for bad in ({"threshold": 0.5}, {"protected": 2}):
        with pytest.raises(UniprunerError, match="set by the ViT adapter"):
            vit.patch(model, "random", r=2, **bad)
    with pytest.raises(UniprunerError, match="equal token counts"):
        vit.patch(model, "random", schedule=[Budget.auto(), None, None])
    with pytest.raises(UniprunerError, match="one entry per block"):
        vit.patch(model, "random", schedule=[0.5])
    with pytest.raises(UniprunerError, match="not patched"):
        vit.kept_tokens(model)
    p = vit.patch(model, "tome", r=2)
    with pytest.raises(UniprunerError, match="run the patched model once"):
        vit.kept_tokens(model)
    with pytest.raises(UniprunerError, match=r"accepts images of 3x32x32 \(patch 8x8\); got \(3, 48, 48\)"):
        _out(model, torch.randn(1, 3, 48, 48))
    with pytest.raises(UniprunerError, match="accepts images"):
        _out(model, torch.randn(1, 1, 32, 32))
    out = _out(model, torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)  # allowed explicitly
    assert out.shape[1] == 37 - 6
    assert p.settings.schedule == Schedule.remove(2)


# ------------------------------------------------------------------------------- trained fixture


def _fixture() -> object:
    path = Path(__file__).parent / "fixtures" / "vit_digits.py"
    spec = importlib.util.spec_from_file_location("vit_digits_fixture", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_fixture_accuracy_survives_merging_better_than_random() -> None:
    fx = _fixture()  # needs scikit-learn (the vision extra) for the digits
    model = fx.load_model()  # type: ignore[attr-defined]
    _, _, x, y = fx.load_data()  # type: ignore[attr-defined]
    x, y = x[:300], y[:300]
    base = fx.accuracy(model, x, y)  # type: ignore[attr-defined]
    assert base >= 0.9
    acc = {}
    for name in ("tome", "random"):
        with vit.patch(model, name, r=12):  # 65 -> 17 tokens after 4 blocks
            acc[name] = fx.accuracy(model, x, y)  # type: ignore[attr-defined]
    assert acc["tome"] >= base - 0.05
    assert acc["tome"] > acc["random"]
    assert fx.accuracy(model, x, y) == base  # type: ignore[attr-defined]
