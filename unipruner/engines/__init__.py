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

:func:`make_engine` builds one from the command-line options; :func:`commit_dir` puts a finished output directory in
place with renames.
"""

from __future__ import annotations

from ..errors import UniprunerError
from ._base import ENGINES, Engine, EngineStats, LocalEngine, commit_dir
from ._ray import RayEngine, require_ray

__all__ = ["ENGINES", "Engine", "EngineStats", "LocalEngine", "RayEngine", "commit_dir", "make_engine",
           "require_ray"]


def make_engine(name: str = "local", *, workers: int | None = None, address: str | None = None,
                cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0) -> Engine:
    """The engine of the command-line options ``--engine --workers --address --cpus-per-worker --gpus-per-worker``.

    Parameters
    ----------
    name : {"local", "ray"}
    workers : int, optional
        Items at once (local default 1; Ray default: the cluster's CPUs / ``cpus_per_worker``, one CPU left free).
    address : str, optional
        Ray only: ``"auto"`` (a running cluster), ``"HOST:PORT"`` or ``"ray://HOST:10001"``; None starts a local
        Ray instance (or uses the one this process already joined).
    cpus_per_worker, gpus_per_worker : float
        Ray only: resources each task asks for.

    Raises
    ------
    UniprunerError
        An unknown engine, or Ray options given to the local engine.
    """
    if name == "local":
        if address is not None or cpus_per_worker != 1.0 or gpus_per_worker != 0.0:
            raise UniprunerError("--address, --cpus-per-worker and --gpus-per-worker are options of --engine ray")
        return LocalEngine(1 if workers is None else workers)
    if name == "ray":
        return RayEngine(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                         gpus_per_worker=gpus_per_worker)
    raise UniprunerError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
