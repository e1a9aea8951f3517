"""Engines: run one per-item function of a data adapter in this process, in local processes, or on Ray.

A data adapter (``colbert compress``, ``rag prune``) splits its job into items (a PLAID chunk, a batch of rows) and
writes one module-level function ``fn(context, item) -> summary``; an engine maps it over the items and hands each
summary back to the driver as it arrives (:meth:`Engine.map`). The context (codec, method, paths) is shipped to every
worker once; items and summaries stay small, the bulk data goes through shared storage. The local and the Ray engine
call the very same function, so their outputs are the same byte for byte.

* :class:`LocalEngine` — serially in this process, or ``workers`` spawned processes (one thread each);
* :class:`RayEngine` — Ray Core tasks (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications",
  OSDI 2018) on a local or remote cluster, ``workers`` in flight, system failures (a killed worker, a lost node)
  resubmitted, user errors raised; ``pip install 'unipruner[ray]'``.

:func:`make_engine` builds one from the command-line options.
"""

from __future__ import annotations

from ._base import ENGINES, Engine, EngineStats, LocalEngine, make_engine
from ._ray import RayEngine, require_ray

__all__ = ["ENGINES", "Engine", "EngineStats", "LocalEngine", "RayEngine", "make_engine", "require_ray"]
