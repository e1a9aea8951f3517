"""unipruner.diffusion end to end through real diffusers denoisers (tiny configs, random weights)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import unipruner
from unipruner import UniprunerError
from unipruner.models import diffusion_inputs, diffusion_model

HOSTS = ("sd15", "sdxl", "pixart", "dit", "sd3", "flux")
MERGES = ("tomesd", "tome")


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: diffusion_model(name, "tiny", seed=0) for name in HOSTS}


def _latent(name: str) -> int:
    return 16


def _run(model: nn.Module, kw: dict, *, positional: bool = False) -> torch.Tensor:
    with torch.no_grad():
        if positional:
            kw = dict(kw)
            first = kw.pop("sample" if "sample" in kw else "hidden_states")
            return model(first, **kw)[0]
        return model(**kw)[0]


def _run_hooked(model: nn.Module, kw: dict, handles: list) -> torch.Tensor:
    """The unpatched model's output with hand-written reference hooks, removed afterwards."""
    try:
        return _run(model, kw)
    finally:
        for hk in handles:
            hk.remove()


def _flops(model: nn.Module, kw: dict) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(**kw)
    return int(fc.get_total_flops())


@pytest.mark.parametrize("name", HOSTS)
@pytest.mark.parametrize("method", MERGES)
def test_merge_every_host(models, name, method):
    m = models[name]
    kw = diffusion_inputs(name, m, batch=2, latent=_latent(name))
    ref = _run(m, kw)
    with unipruner.diffusion.patch(m, method, ratio=0.5) as h:
        out = _run(m, kw)
        st = h.stats()
        assert st is not None and st.reduced and st.flops_ratio < 0.6
        assert all(s.queries < s.tokens for s in st.sites)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert not torch.equal(out, ref)
        # positional and keyword calls are the same call
        assert torch.equal(_run(m, kw, positional=True), out)
    assert unipruner.diffusion.find(m) is None
    assert torch.equal(_run(m, kw), ref)  # unpatch restores the original exactly


@pytest.mark.parametrize("name", HOSTS)
def test_keep_all_is_bit_exact(models, name):
    m = models[name]
    kw = diffusion_inputs(name, m, batch=3, latent=_latent(name))  # odd batch
    ref = _run(m, kw)
    with unipruner.diffusion.patch(m, "tomesd", ratio=1.0):
        assert torch.equal(_run(m, kw), ref)


@pytest.mark.parametrize("name", HOSTS)
def test_batch_rows_are_independent(models, name):
    """A CFG-style batch gives each row what it gets alone (per-row merge maps), except on Flux,
    whose rotary frequencies force one map per batch (documented)."""
    m = models[name]
    kw = diffusion_inputs(name, m, batch=3, latent=_latent(name))
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5, random_dst=False):
        full = _run(m, kw)
        one = _run(m, _row(kw, 1, name))
    if name == "flux":
        assert one.shape[0] == 1
    else:
        torch.testing.assert_close(full[1:2], one, rtol=1e-4, atol=1e-5)


def _row(kw: dict, i: int, name: str) -> dict:
    out: dict = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == kw[_sample(kw)].shape[0] \
                and k not in ("img_ids", "txt_ids"):
            out[k] = v[i:i + 1]
        elif isinstance(v, dict):
            out[k] = {a: (b[i:i + 1] if isinstance(b, torch.Tensor) else b) for a, b in v.items()}
        else:
            out[k] = v
    return out


def _sample(kw: dict) -> str:
    return "sample" if "sample" in kw else "hidden_states"


def _naive_tomesd_block_hooks(block: nn.Module, r: int, hw: tuple[int, int]):
    """ToMeSD written plainly (top-left destinations, 2x2 windows): metric = the block input,
    merge (mean) -> attn1 -> unmerge (copy back); loops over tokens on purpose."""
    h, w = hw
    store: dict = {}

    def block_pre(mod, args, kwargs):
        store["x"] = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach()

    def attn_pre(mod, args, kwargs):
        x = store["x"]
        b, n, _ = x.shape
        dst = [row * w + col for row in range(0, h, 2) for col in range(0, w, 2)]
        src = [i for i in range(n) if i not in dst]
        maps = []
        for bi in range(b):
            xn = torch.nn.functional.normalize(x[bi], dim=-1)
            best = []
            for s in src:
                sims = [float(xn[s] @ xn[d]) for d in dst]
                j = max(range(len(dst)), key=lambda k: (sims[k], -k))
                best.append((sims[j], s, dst[j]))
            order = sorted(range(len(best)), key=lambda k: (-best[k][0], k))
            merged = {best[k][1]: best[k][2] for k in order[:r]}
            groups: dict[int, list[int]] = {}
            for i in range(n):
                if i in merged:
                    continue
                groups[i] = [i]
            for s, d in merged.items():
                groups[d].append(s)
            maps.append(groups)
        store["maps"] = maps
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rows = []
        for bi, groups in enumerate(maps):
            rows.append(torch.stack([hs[bi, members].mean(0) for _, members in sorted(groups.items())]))
        new = torch.stack(rows)
        return (new, *args[1:]), kwargs

    def attn_post(mod, args, kwargs, out):
        maps = store["maps"]
        b, _, c = out.shape
        n = sum(len(v) for v in maps[0].values())
        full = out.new_zeros(b, n, c)
        for bi, groups in enumerate(maps):
            for slot, (_, members) in enumerate(sorted(groups.items())):
                for i in members:
                    full[bi, i] = out[bi, slot]
        return full

    return [block.register_forward_pre_hook(block_pre, with_kwargs=True),
            block.attn1.register_forward_pre_hook(attn_pre, with_kwargs=True),
            block.attn1.register_forward_hook(attn_post, with_kwargs=True)]


def test_tomesd_equals_naive_reference(models):
    """The patched UNet equals the unpatched UNet with ToMeSD written plainly on every level-1 block."""
    m = models["sd15"]
    kw = diffusion_inputs("sd15", m, batch=2, latent=8)
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5, random_dst=False) as h:
        ours = _run(m, kw)
        sites = [s for s in h.stats().sites]
    assert sites and all(s.factor == 1 for s in sites)
    n = 64
    r = n - round(n * 0.5)
    blocks = [mod for name, mod in m.named_modules() if name in {s.name for s in sites}]
    ref = _run_hooked(m, kw, [hk for b in blocks for hk in _naive_tomesd_block_hooks(b, r, (8, 8))])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_sdxl_is_really_reduced(models):
    """SDXL has no attention at full resolution: the default patches its finest attention level (x2)
    and the FLOPs drop; asking for full resolution only is an error, never a silent no-op."""
    m = models["sdxl"]
    kw = diffusion_inputs("sdxl", m, batch=2, latent=16)
    base = _flops(m, kw)
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5) as h:
        reduced = _flops(m, kw)
        assert h.stats().reduced
        assert {s.factor for s in h.stats().sites} == {2}
        assert "left alone" in h.describe() or all("merge" in line for line in h.describe().splitlines()[1:])
    assert reduced < base
    with pytest.raises(UniprunerError, match="nothing to reduce"):
        unipruner.diffusion.patch(m, "tomesd", ratio=0.5, max_downsample=1)


def test_flux_rope_consistency(models):
    """Merging fewer tokens moves the Flux output less; keeping all is exact (rotary gathered right)."""
    m = models["flux"]
    kw = diffusion_inputs("flux", m, batch=2, latent=16)
    ref = _run(m, kw)

    def err(r: float) -> float:
        with unipruner.diffusion.patch(m, "tome", ratio=r):
            return float((_run(m, kw) - ref).norm() / ref.norm())

    e = [err(r) for r in (0.5, 0.8, 0.97)]
    assert e[0] > e[1] > e[2] > 0.0
    with unipruner.diffusion.patch(m, "tome", ratio=1.0):
        assert torch.equal(_run(m, kw), ref)


def test_seeded_determinism_and_global_rng(models):
    m = models["sd15"]
    kw = diffusion_inputs("sd15", m, batch=2, latent=16)
    state = torch.get_rng_state()
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5, seed=3):
        a = _run(m, kw)
        b = _run(m, kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5, seed=4):
        c = _run(m, kw)
    assert not torch.equal(a, c)


def test_todo_keys_from_downsampled_grid(models):
    m = models["sd15"]
    kw = diffusion_inputs("sd15", m, batch=2, latent=16)
    ref = _run(m, kw)
    with unipruner.diffusion.patch(m, "todo", ratio=0.25) as h:
        out = _run(m, kw)
        st = h.stats()
    assert all(s.queries == s.tokens and s.keys == s.tokens // 4 for s in st.sites)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    # the reference: the unpatched model whose level-1 self-attentions get nearest-downsampled K/V
    names = {s.name for s in st.sites}
    handles = []
    for name, mod in m.named_modules():
        if name in names:
            def pre(attn, args, kwargs):
                x = args[0]
                b, n, c = x.shape
                side = int(n ** 0.5)
                grid = x.transpose(1, 2).reshape(b, c, side, side)
                kv = torch.nn.functional.interpolate(grid, size=(side // 2, side // 2), mode="nearest")
                kw2 = dict(kwargs)
                kw2["encoder_hidden_states"] = kv.flatten(2).transpose(1, 2)
                return args, kw2
            handles.append(mod.attn1.register_forward_pre_hook(pre, with_kwargs=True))
    expected = _run_hooked(m, kw, handles)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(_run(m, kw), ref)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_todo_refused_on_joint_attention(models, name):
    with pytest.raises(UniprunerError, match="jointly"):
        unipruner.diffusion.patch(models[name], "todo", ratio=0.25)


def test_pipeline_path_and_step_schedule():
    from unipruner.models import build_sd_pipeline

    pipe = build_sd_pipeline("tiny", seed=0)

    def gen(**kw):
        g = torch.Generator().manual_seed(0)
        return pipe("a red square", num_inference_steps=3, generator=g, output_type="latent", **kw).images

    ref = gen()
    seen = []
    with unipruner.diffusion.patch(pipe, "tomesd", schedule=[1.0, 1.0, 1.0]) as h:
        assert torch.equal(gen(), ref)
        h.configure(schedule=[1.0, 0.5, 0.5])
        out = gen()
        seen.append(h.stats().step)
        assert h.stats().reduced
    assert seen == [2]
    assert not torch.equal(out, ref)
    with unipruner.diffusion.patch(pipe, "tomesd", schedule=[0.5] * 5):
        with pytest.raises(UniprunerError, match="schedule has 5 ratios"):
            gen()
    assert torch.equal(gen(), ref)


def test_progress_schedule_on_bare_denoiser(models):
    m = models["dit"]
    kw = diffusion_inputs("dit", m, batch=2, latent=16)
    calls = []

    def sched(p: float) -> float:
        calls.append(p)
        return 0.5 if p > 0.4 else 1.0

    with unipruner.diffusion.patch(m, "tome", schedule=sched) as h:
        kw["timestep"] = torch.tensor([900, 900])
        _run(m, kw)
        assert not h.stats().reduced
        kw["timestep"] = torch.tensor([100, 100])
        _run(m, kw)
        assert h.stats().reduced
    assert calls == pytest.approx([0.1, 0.9])
    with pytest.raises(UniprunerError, match="timesteps"):
        with unipruner.diffusion.patch(m, "tome", schedule=[0.5, 0.7]):
            _run(m, kw)


def test_handle_contract(models):
    m = models["pixart"]
    h = unipruner.diffusion.patch(m, "tomesd", ratio=0.5)
    try:
        assert unipruner.diffusion.patch(m, "tomesd", ratio=0.5) is h
        with pytest.raises(UniprunerError, match="configure"):
            unipruner.diffusion.patch(m, "tomesd", ratio=0.7)
        assert unipruner.diffusion.find(m) is h
        h.configure(ratio=0.75)
        _run(m, diffusion_inputs("pixart", m, batch=2, latent=16))
        assert {s.ratio for s in h.stats().sites} == {0.75}
        with pytest.raises(UniprunerError):
            h.configure(ratio=1.5)
        assert h.settings.ratio == 0.75
        with pytest.raises(UniprunerError, match="re-wires"):
            h.configure(blocks=[0])
        assert "tomesd (merge)" in h.describe()
    finally:
        assert unipruner.diffusion.unpatch(m)
    assert not unipruner.diffusion.unpatch(m)


def test_blocks_and_levels(models):
    m = models["dit"]
    kw = diffusion_inputs("dit", m, batch=2, latent=16)
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5, blocks=[1]) as h:
        _run(m, kw)
        assert [s.name for s in h.stats().sites] == ["transformer_blocks.1"]
    u = models["sd15"]
    kw = diffusion_inputs("sd15", u, batch=2, latent=16)
    with unipruner.diffusion.patch(u, "tomesd", ratio=0.5, max_downsample=2, levels={2: 0.75}) as h:
        _run(u, kw)
        by = {s.factor: s.ratio for s in h.stats().sites}
    assert by == {1: 0.5, 2: 0.75}


def test_threads_do_not_share_state(models):
    m = models["sd15"]
    inputs = [diffusion_inputs("sd15", m, batch=2, latent=16, seed=s) for s in range(4)]
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5, random_dst=False):
        expected = [_run(m, kw) for kw in inputs]
        got: list = [None] * 4

        def work(i: int) -> None:
            got[i] = _run(m, inputs[i])

        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_merge_map_for_drawing(models):
    m = models["sd15"]
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5) as h:
        _run(m, diffusion_inputs("sd15", m, batch=2, latent=16))
        dst, hw = h.stats().merge_map()
    assert hw == (16, 16) and dst.shape == (256,) and int(dst.max()) + 1 == 128
    assert "block" in h.stats().table()


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input(models):
    m = models["sd15"]
    with pytest.raises(UniprunerError, match="diffusers denoiser"):
        unipruner.diffusion.patch(object(), "tomesd", ratio=0.5)
    with pytest.raises(UniprunerError, match="does not support"):
        unipruner.diffusion.patch(nn.Linear(2, 2), "tomesd", ratio=0.5)
    for bad in (0.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(UniprunerError, match=r"\(0, 1\]"):
            unipruner.diffusion.patch(m, "tomesd", ratio=bad)
    with pytest.raises(UniprunerError, match="at least one token per 2x2 window"):
        unipruner.diffusion.patch(m, "tomesd", ratio=0.2)
    with pytest.raises(UniprunerError, match="does not serve the diffusion domain"):
        unipruner.diffusion.patch(m, "snapkv", ratio=0.5)
    with pytest.raises(UniprunerError, match="no budget"):
        unipruner.diffusion.patch(m, "tomesd")
    with pytest.raises(UniprunerError, match="power of two"):
        unipruner.diffusion.patch(m, "tomesd", ratio=0.5, max_downsample=3)
    with pytest.raises(UniprunerError, match="blocks"):
        unipruner.diffusion.patch(m, "tomesd", ratio=0.5, blocks=[99])
    with pytest.raises(UniprunerError, match="schedule"):
        unipruner.diffusion.patch(m, "tomesd", schedule=[])
    # a latent whose grid the windows do not tile
    kw = diffusion_inputs("sd15", m, batch=1, latent=16)
    kw["sample"] = torch.randn(1, 4, 15, 15)
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5):
        with pytest.raises(UniprunerError, match="do not tile"):
            _run(m, kw)
        assert unipruner.diffusion.find(m).call_state() is None  # the failed call left no state behind


def test_unknown_block_type_is_refused(models):
    m = diffusion_model("dit", "tiny", seed=0)

    class MyTransformerBlock(nn.Module):
        def forward(self, x):
            return x

    m.transformer_blocks.append(MyTransformerBlock())
    with pytest.raises(UniprunerError, match="MyTransformerBlock"):
        unipruner.diffusion.patch(m, "tomesd", ratio=0.5)


def test_registry_lists_the_adapter_methods():
    names = {i.name for i in unipruner.methods(domain="diffusion")}
    assert {"tomesd", "tome", "todo"} <= names
    assert set(unipruner.diffusion.DIFFUSION_METHODS) == names


@pytest.mark.parametrize("name", ["sd15", "pixart", "dit"])
@pytest.mark.parametrize("method", ["atedm", "random"])
def test_block_pruning(models, name, method):
    m = models[name]
    kw = diffusion_inputs(name, m, batch=2, latent=16)
    ref = _run(m, kw)
    with unipruner.diffusion.patch(m, method, ratio=0.5) as h:
        out = _run(m, kw)
        st = h.stats()
        assert st.reduced and all(s.queries == s.keys < s.tokens for s in st.sites)
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
        dst, _ = st.merge_map()
        assert int((dst >= 0).sum()) == st.sites[0].queries
    with unipruner.diffusion.patch(m, method, ratio=1.0):
        assert torch.equal(_run(m, kw), ref)
    assert torch.equal(_run(m, kw), ref)


def test_atedm_equals_reference(models):
    """AT-EDM through the adapter == G-WPR on the block's self-attention map, the block on the kept
    tokens, similarity copy of the pruned ones (built here from the core pieces, by hand)."""
    from unipruner.methods import ATEDM

    m = models["dit"]
    kw = diffusion_inputs("dit", m, batch=2, latent=16)
    kw["timestep"] = torch.tensor([100, 100])  # late step: no DSAP
    with unipruner.diffusion.patch(m, "atedm", ratio=0.5, blocks=[0]):
        ours = _run(m, kw)
    block = m.transformer_blocks[0]
    meth = ATEDM(budget=0.5)
    store: dict = {}

    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        xn = torch.nn.functional.layer_norm(x, (x.shape[-1],))
        a = mod.attn1
        q = a.to_q(xn).view(2, 64, a.heads, -1).transpose(1, 2)
        k = a.to_k(xn).view(2, 64, a.heads, -1).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) * a.scale, dim=-1)
        keep = meth.select(x, attn=attn, progress=0.9)
        store.update(x=x, keep=keep)
        kept = torch.stack([x[b, keep[b]] for b in range(2)])
        if args:
            return (kept, *args[1:]), kwargs
        kw2 = dict(kwargs)
        kw2["hidden_states"] = kept
        return args, kw2

    def post(mod, args, kwargs, out):
        return meth.recover(out, store["keep"], store["x"])

    ref = _run_hooked(m, kw, [block.register_forward_pre_hook(pre, with_kwargs=True),
                              block.register_forward_hook(post, with_kwargs=True)])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_block_pruning_refused_on_joint_hosts(models):
    with pytest.raises(UniprunerError, match="BasicTransformerBlock"):
        unipruner.diffusion.patch(models["flux"], "atedm", ratio=0.5)


def test_cat_reuse_across_steps():
    """CAT-style reuse through a pipeline: the first step computes everything, later steps recompute
    only part of the tokens; a second run starts afresh (same result), keep-all is exact."""
    from unipruner.models import build_sd_pipeline

    pipe = build_sd_pipeline("tiny", seed=0)

    def gen():
        return pipe("a blue circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images

    ref = gen()
    with unipruner.diffusion.patch(pipe, "cat", ratio=1.0):
        assert torch.equal(gen(), ref)
    steps = []
    with unipruner.diffusion.patch(pipe, "cat", ratio=0.5) as h:
        a = gen()
        steps.append(h.stats())
        b = gen()
    assert torch.equal(a, b)  # each run starts with an empty cache
    last = steps[0]
    assert last.reduced and all(s.queries == s.tokens // 2 for s in last.sites)
    assert torch.isfinite(a).all() and not torch.equal(a, ref)
    rel = float((a - ref).norm() / ref.norm())
    assert rel < 0.5


def test_cat_first_call_of_a_run_is_full(models):
    m = models["sd15"]
    kw = diffusion_inputs("sd15", m, batch=2, latent=16)
    ref = _run(m, kw)
    with unipruner.diffusion.patch(m, "cat", ratio=0.5) as h:
        assert torch.equal(_run(m, kw), ref)  # no cache yet: every token computed
        assert not h.stats().reduced
        kw2 = dict(kw, timestep=torch.tensor(400))
        _run(m, kw2)
        assert h.stats().reduced
        assert torch.equal(_run(m, kw), ref)  # timestep went up: a new run


def test_sd35_dual_attention_blocks():
    """SD3.5's image-only attn2 is merged with the joint attention; keep-all stays exact; todo is refused."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32,
                              dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    kw = diffusion_inputs("sd3", m, batch=2, latent=16)
    ref = _run(m, kw)
    with unipruner.diffusion.patch(m, "tomesd", ratio=0.5) as h:
        out = _run(m, kw)
        assert h.stats().reduced and not torch.equal(out, ref)
    with unipruner.diffusion.patch(m, "tomesd", ratio=1.0):
        assert torch.equal(_run(m, kw), ref)
    with pytest.raises(UniprunerError, match="jointly"):
        unipruner.diffusion.patch(m, "todo", ratio=0.25)


def test_flops_on_the_meta_device():
    """Full SDXL without weights: the patched call runs on the meta device, so FLOPs count in seconds."""
    m = diffusion_model("sdxl", "full", device="meta")
    kw = diffusion_inputs("sdxl", m, batch=1, latent=64)
    base = _flops(m, kw)
    for method, r in (("tomesd", 0.5), ("tome", 0.5), ("todo", 0.25)):
        with unipruner.diffusion.patch(m, method, ratio=r):
            assert _flops(m, kw) < base
