"""Visual-token pruning for Hugging Face vision-language models (``unipruner.vlm``).

Usage::

    import unipruner
    with unipruner.vlm.patch(model, "divprune", keep=64) as h:          # at the LLM input
        out = model.generate(**inputs, max_new_tokens=16)
        print(h.stats())
    unipruner.vlm.patch(model, "fastv", stage="llm", layer=2, keep=64)  # inside the LLM (FastV)

* :func:`patch` / :func:`unpatch` / :func:`find` — per-instance hooks on the model's language
  model and decoder layers; the handle (:class:`VLMHandle`) is a context manager with
  ``configure`` / ``stats`` / ``describe`` / ``unpatch``. Works through ``generate()``, with
  batches of different images and left padding, several images per prompt, and keeps original
  position ids (1-D or M-RoPE) by default.
* :func:`stage` — one step of a schedule: ``patch(model, [stage("dart", keep=192),
  stage("fastv", "llm", layer=2, keep=64)])``.
* :func:`visualize` — kept / merged patches of one image drawn per stage (PNG).
* :mod:`.scenes` — the synthetic scenes of the fixture model (``unipruner.models.load_vlm_fixture``).

``ratio`` is the fraction of the visual tokens **kept** by a stage, as everywhere in unipruner;
``keep`` counts visual tokens per image (``per_image=True``) or per row.
"""

from __future__ import annotations

from ...models import require

require("transformers", "vision")

from ._demo import demo_section  # noqa: E402
from ._hosts import SUPPORTED_HOSTS, VLMHost, find_host  # noqa: E402
from ._patch import VLMHandle, find, patch, unpatch  # noqa: E402
from ._settings import VLM_METHODS, Stage, VLMSettings, stage  # noqa: E402
from ._stats import StageStats, VLMStats  # noqa: E402
from ._visualize import visualize  # noqa: E402

__all__ = [
    "SUPPORTED_HOSTS",
    "VLM_METHODS",
    "Stage",
    "StageStats",
    "VLMHandle",
    "VLMHost",
    "VLMSettings",
    "VLMStats",
    "demo_section",
    "find",
    "find_host",
    "patch",
    "stage",
    "unpatch",
    "visualize",
]
