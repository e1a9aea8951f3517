"""Host-library knowledge shared by the model-resident adapters (``vit``, ``kv``, ``vlm``, ``diffusion``).

Nothing here imports a host library at module load: the modules that need ``transformers`` or
``diffusers`` import it inside the functions that use it (or, like :mod:`~unipruner.hosts.cache`,
which subclasses a ``DynamicCache``, only when they are themselves imported), so
``import unipruner.hosts`` stays torch-only.

* :mod:`unipruner.hosts.patching` — the handle contract every ``patch(...)`` returns (a context
  manager with ``configure`` / ``stats`` / ``describe`` / ``unpatch``), hooks that know their
  handle (so :func:`~unipruner.hosts.patching.find_handle` needs nothing stored on the model) and
  per-call state that keeps concurrent calls on one patched model apart.
* :mod:`unipruner.hosts.hf_attention` — attention rows recomputed from a Hugging Face decoder
  layer's input for every supported family (q/k projections, fused qkv, q/k norms, RoPE,
  grouped-query heads, sliding windows; :func:`~unipruner.hosts.hf_attention.register_rope` is the
  M-RoPE extension point), used by ``kv`` and the RAG focal-attention scorer.
* :mod:`unipruner.hosts.masks` — attention masks from a stored-slot layout (torch only).
* :mod:`unipruner.hosts.cache` — :class:`~unipruner.hosts.cache.CompressedCache`, a
  ``DynamicCache`` that keeps the logical length (positions, ``generate()``) apart from what it
  stores (imports ``transformers`` when imported).
"""
