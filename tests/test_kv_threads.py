"""The kv handle contract: concurrent calls on one patched model, configure, re-patch rules, exact unpatch."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from _tiny_lm import left_padded_batch as _batch
from _tiny_lm import tiny_lm

import unipruner
import unipruner.adapters.kv_cache as kv
from unipruner import Budget

torch.set_num_threads(2)


def _generate(model: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, n: int = 8) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)


def _decode_loop(model: transformers.PreTrainedModel, ids: torch.Tensor, steps: int = 6
                 ) -> tuple[torch.Tensor, list[float]]:
    """A hand-written greedy loop on an explicit CompressedCache; returns the tokens and the kept counts."""
    cache = kv.CompressedCache(model.config)
    out = model(ids, cache=cache)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = model(nxt, cache=cache)
    return torch.cat(tokens, 1), [s.tokens_kept for s in kv.stats(cache).layers]


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
@torch.no_grad()
def test_two_threads_on_one_patched_model_equal_single_threaded_runs(method: str) -> None:
    """generate() in one thread and a decode loop on an explicit cache in another, at the same time, on ONE
    patched model: each thread's outputs (and what its cache kept) equal a single-threaded run."""
    model = tiny_lm("llama")
    a_ids, a_mask = _batch([40, 29], seed=1)
    b_ids, _ = _batch([33], seed=2)
    with kv.patch(model, method, ratio=0.5) as h:
        ref_a = _generate(model, a_ids, a_mask)
        ref_b = _decode_loop(model, b_ids)
        barrier = threading.Barrier(2)
        results: dict[str, list] = {}
        errors: list[BaseException] = []

        def run(name: str, fn: object) -> None:
            try:
                with torch.no_grad():
                    barrier.wait()
                    results[name] = [fn() for _ in range(4)]  # type: ignore[operator]
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run, args=("a", lambda: _generate(model, a_ids, a_mask))),
                   threading.Thread(target=run, args=("b", lambda: _decode_loop(model, b_ids)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert kv.find(model) is h
    assert not errors, errors
    assert len(results["a"]) == len(results["b"]) == 4
    for got in results["a"]:
        assert torch.equal(got, ref_a)
    for tokens, kept in results["b"]:
        assert torch.equal(tokens, ref_b[0]) and kept == ref_b[1]


@torch.no_grad()
def test_configure_between_calls_equals_a_fresh_patch() -> None:
    model = tiny_lm("llama")
    ids, mask = _batch([36, 25], seed=3)
    runs = []
    with kv.patch(model, "snapkv", ratio=0.5, window=4) as h:
        runs.append((dict(method="snapkv", ratio=0.5, window=4), _generate(model, ids, mask), h.stats()))
        assert h.configure(ratio=0.25) is h and h.plan.method.window == 4  # parameters kept
        runs.append((dict(method="snapkv", ratio=0.25, window=4), _generate(model, ids, mask), h.stats()))
        h.configure(window=8)
        runs.append((dict(method="snapkv", ratio=0.25, window=8), _generate(model, ids, mask), h.stats()))
        h.configure(method="knorm")  # another method keeps the budget
        assert h.plan.method.name == "knorm" and h.plan.method.budget == Budget(ratio=0.25)
        runs.append((dict(method="knorm", ratio=0.25), _generate(model, ids, mask), h.stats()))
        h.configure(method="h2o", keep=12)  # h2o's own defaults: fixed budget, recent half
        assert h.plan.evict == "accumulate" and h.plan.recent == 0.5
        runs.append((dict(method="h2o", keep=12), _generate(model, ids, mask), h.stats()))
        before = h.plan
        err = unipruner.UniprunerError
        with pytest.raises(err, match="fraction of the KV cache kept"):
            h.configure(ratio=1.5)
        with pytest.raises(err, match="no parameter"):
            h.configure(windw=3)
        with pytest.raises(err, match="evict=True"):
            h.configure(method="knorm", evict=True)
        with pytest.raises(err, match="rerotate"):
            h.configure(rerotate=True)
        assert h.plan is before  # a refused configure changes nothing
        assert "h2o" in h.describe()
    for settings, got, st in runs:
        with kv.patch(model, **settings) as fresh:
            assert torch.equal(_generate(model, ids, mask), got), settings
            assert fresh.stats() == st
    with pytest.raises(unipruner.UniprunerError, match="no cache yet"):
        kv.patch(model, "knorm", ratio=0.5).stats()
    kv.unpatch(model)


@torch.no_grad()
def test_repatch_rules_and_compress_is_patch() -> None:
    model = tiny_lm("llama")
    assert kv.compress is kv.patch
    h = kv.patch(model, "knorm", ratio=0.5)
    assert kv.patch(model, "knorm", ratio=0.5) is h and kv.patch(model, "knorm", 0.5) is h
    assert kv.patch(model, unipruner.method("knorm", ratio=0.5)) is h  # the same settings, spelled otherwise
    with pytest.raises(unipruner.UniprunerError, match=r"already patched by unipruner\.kv.*configure"):
        kv.patch(model, "knorm", ratio=0.25)
    with pytest.raises(unipruner.UniprunerError, match="configure"):
        kv.compress(model, "snapkv", ratio=0.5)
    h.configure(ratio=0.25)
    assert kv.patch(model, "knorm", ratio=0.25) is h  # identical to the configured settings now
    assert kv.unpatch(model) is True and kv.find(model) is None and not h.active
    with kv.compress(model, "snapkv", ratio=0.5) as c:
        assert kv.find(model) is c and c is not h
        model(_batch([20], seed=4)[0])
    assert kv.find(model) is None and kv.unpatch(model) is False
    assert c.last_cache is None and c.stats().ratio == pytest.approx(0.5)  # what the last call kept, no tensors
    assert kv.stats(c) == c.stats()


@torch.no_grad()
def test_unpatch_restores_the_model_bit_for_bit_and_nothing_is_stored_on_it() -> None:
    model = tiny_lm("llama")
    ids, mask = _batch([30, 21], seed=5)
    attrs = set(vars(model))
    module_attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    logits = model(ids, attention_mask=mask).logits
    gen = _generate(model, ids, mask)
    for method, extra in (("h2o", {}), ("streamingllm", {"rerotate": True, "evict": False}), ("tova", {})):
        h = kv.patch(model, method, ratio=0.5, **extra)
        assert set(vars(model)) == attrs  # nothing in model.__dict__ (the handle is found through its hooks)
        assert kv.stats(model(ids, attention_mask=mask)).ratio < 1.0  # the patch does compress
        assert h.unpatch() is True and h.unpatch() is False
        assert {n: set(vars(m)) for n, m in model.named_modules()} == module_attrs
        assert not any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        assert torch.equal(model(ids, attention_mask=mask).logits, logits)
        assert torch.equal(_generate(model, ids, mask), gen)


@pytest.mark.parametrize("method", ["snapkv", "knorm", "h2o", "tova", "streamingllm", "vatp", "random", "divprune"])
@torch.no_grad()
def test_ratio_one_equals_the_unpatched_model_bit_for_bit(method: str) -> None:
    """Keeping everything changes nothing: logits and generated tokens identical (not merely close).
    Fixed-budget policies hold the budget while decoding, so they are checked with evict=False."""
    model = tiny_lm("llama")
    ids, _ = _batch([37, 37], seed=6)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_logits = model(ids).logits
    extra = {"evict": False} if method in ("h2o", "tova", "streamingllm") else {}
    with kv.patch(model, method, ratio=1.0, **extra):
        got = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        logits = model(ids).logits
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits, strict=True))
    assert torch.equal(logits, ref_logits)
