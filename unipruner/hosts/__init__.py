"""Host-library knowledge shared by the model-resident adapters (``vit``, ``kv``, ``vlm``, ``diffusion``).

Nothing here imports a host library at module load: the modules that need ``transformers`` or
``diffusers`` import it inside the functions that use it, so ``import unipruner.hosts`` stays
torch-only.

* :mod:`unipruner.hosts.patching` — the handle contract every ``patch(...)`` returns (a context
  manager with ``configure`` / ``stats`` / ``describe`` / ``unpatch``), hooks that know their
  handle (so :func:`~unipruner.hosts.patching.find_handle` needs nothing stored on the model) and
  per-call state that keeps concurrent calls on one patched model apart.
"""
