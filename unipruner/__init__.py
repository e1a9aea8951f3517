"""unipruner: one token-pruning and merging core for transformer inference.

Score tokens (:mod:`unipruner.scorers`), select the survivors under a :class:`Budget`
(:mod:`unipruner.select`), reduce the rest (:mod:`unipruner.reduce`: drop, merge, pool, recycle).
Every method from the literature is a small frozen dataclass in the registry:

>>> import unipruner
>>> m = unipruner.method("tome", ratio=0.5)
>>> m.family, m.paper.split(",")[0]
('similarity', 'Bolya et al.')
"""

from __future__ import annotations

from .errors import MissingDependencyError, UniprunerError
from .methods import Method, MethodInfo, Reduced, method, methods
from .select import Budget, Schedule, topk

__version__ = "0.1.0"

# Domain adapters are imported lazily so the core stays torch + numpy only. Each adapter adds
# its entry here when it lands (e.g. "vit": "unipruner.adapters.vit").
_ADAPTERS: dict[str, str] = {
    "kv": "unipruner.adapters.kv_cache",
    "vit": "unipruner.adapters.vit",
    "rag": "unipruner.adapters.rag",
    "colbert": "unipruner.adapters.colbert",
    "vlm": "unipruner.adapters.vlm",
    "diffusion": "unipruner.adapters.diffusion",
}


def __getattr__(name: str) -> object:
    if name in _ADAPTERS:
        import importlib

        return importlib.import_module(_ADAPTERS[name])
    raise AttributeError(f"module 'unipruner' has no attribute {name!r}")

__all__ = [
    "Budget",
    "Method",
    "MethodInfo",
    "MissingDependencyError",
    "Reduced",
    "Schedule",
    "UniprunerError",
    "__version__",
    "method",
    "methods",
    "topk",
]
