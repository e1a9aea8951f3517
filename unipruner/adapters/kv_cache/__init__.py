"""KV-cache compression for Hugging Face causal LMs (``unipruner.kv``).

Usage::

    import unipruner
    with unipruner.kv.patch(model, "snapkv", ratio=0.5) as h:
        out = model.generate(**inputs, max_new_tokens=32)
        print(h.stats())

* :func:`patch` (``compress`` is the same function) / :func:`unpatch` / :func:`find` —
  per-instance hooks on the model's attention modules compress the cache once, at prefill, with
  any registry method (SnapKV, H2O, TOVA, KNorm, VATP, StreamingLLM, random, FastV, DivPrune,
  DART, ...), and evict while decoding for the fixed-budget policies (H2O, TOVA, StreamingLLM).
  The handle (:class:`KVCompressor`) is a context manager with ``configure`` / ``stats`` /
  ``describe`` / ``unpatch``, and one patched model serves concurrent calls.
* :class:`CompressedCache` — a ``DynamicCache`` that tracks logical vs stored length, so
  positions, attention masks and ``generate()`` stay right after compression
  (:mod:`unipruner.hosts.cache`, re-exported here).
* :func:`generate` — compress contexts, then answer questions; batched and ragged.
* :func:`stats` — tokens and bytes per layer, before and after.
* :func:`demo_section` — the ``unipruner demo`` KV section.

``ratio`` is the fraction **kept**, as everywhere in unipruner (kvpress's ``compression_ratio``
``c`` is ``ratio = 1 - c``). Supported families: Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3
(text; only its full-attention layers are compressed), with ``sdpa`` or ``eager`` attention.
"""

from __future__ import annotations

from ...models import require

require("transformers", "llm")

from ...hosts.cache import CompressedCache, CompressedLayer  # noqa: E402
from ...hosts.hf_attention import SUPPORTED_MODEL_TYPES  # noqa: E402
from ._demo import demo_prompt, demo_section  # noqa: E402
from ._generate import Answers, generate, left_pad  # noqa: E402
from ._patch import KVCompressor, compress, find, patch, unpatch  # noqa: E402
from ._plan import KV_METHODS, Plan  # noqa: E402
from ._stats import KVStats, LayerStats, stats  # noqa: E402

__all__ = [
    "KV_METHODS",
    "SUPPORTED_MODEL_TYPES",
    "Answers",
    "CompressedCache",
    "CompressedLayer",
    "KVCompressor",
    "KVStats",
    "LayerStats",
    "Plan",
    "compress",
    "demo_prompt",
    "demo_section",
    "find",
    "generate",
    "left_pad",
    "patch",
    "stats",
    "unpatch",
]
