"""The Ray engine: one Ray Core task per item, ``workers`` in flight, system failures resubmitted.

Ray (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018) is imported lazily:
``import unipruner.engines`` works without it, and :func:`require_ray` names the extra to install.

Failure model: a task whose worker process died (SIGKILL, the OOM killer), whose node left the cluster, or whose
result was lost is a *system* failure and is resubmitted, up to ``max_retries`` times per item (the summary counts
them); an exception raised by the per-item function is a *user* error: the map stops, the tasks still running are
cancelled and the error is raised in the driver. Per-item functions must therefore be idempotent (write their output
under a fixed name with ``os.replace``), which is what a resubmission relies on.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import MissingDependencyError, UniprunerError
from ._base import Engine, EngineStats, Fn, _check_count, call_item

__all__ = ["RayEngine", "require_ray"]

#: ray.exceptions classes that mean "the system lost the task", not "the task raised"
_SYSTEM_FAILURES = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "LocalRayletDiedError",
                    "RaySystemError", "OutOfMemoryError", "ObjectFetchTimedOutError")


def require_ray() -> Any:
    """Import and return ``ray``, or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise MissingDependencyError("the Ray engine needs Ray (Ray Core + Ray Data): "
                                     "pip install 'unipruner[ray]'") from err
    return ray


def _ray_call(fn: Fn, context: Any, item: Any, threads: int) -> Any:
    return call_item(fn, context, item, threads)


class RayEngine(Engine):
    """Run the items as Ray tasks on a local or remote Ray cluster.

    Parameters
    ----------
    address : str, optional
        ``"auto"`` (the cluster ``ray start`` runs on this machine), ``"HOST:PORT"`` (a head node's GCS) or
        ``"ray://HOST:10001"`` (Ray Client). None: the cluster this process already joined (``ray.init`` was
        called), else a new local Ray instance, shut down again by :meth:`close`.
    workers : int, optional
        Tasks in flight (default: the cluster's CPUs / ``cpus_per_worker``).
    cpus_per_worker, gpus_per_worker : float
        Resources of every task; each task runs with ``max(1, int(cpus_per_worker))`` torch threads.
    max_retries : int
        Resubmissions per item after a system failure.
    no_progress_s : float, optional
        Raise when no task finished for this long (a guard against a job that can never be scheduled).
    init_kwargs : dict, optional
        Extra ``ray.init`` arguments when this engine starts or joins the cluster.
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, max_retries: int = 3, no_progress_s: float | None = None,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        if workers is not None:
            _check_count("workers", workers, 1)
        _check_count("cpus_per_worker", cpus_per_worker, 0, integer=False)
        _check_count("gpus_per_worker", gpus_per_worker, 0, integer=False)
        _check_count("max_retries", max_retries, 0)
        if cpus_per_worker == 0 and gpus_per_worker == 0:
            raise UniprunerError("a Ray worker needs some resource: cpus_per_worker or gpus_per_worker > 0")
        if no_progress_s is not None:
            _check_count("no_progress_s", no_progress_s, 0, integer=False)
        self.address = address
        self._workers = workers
        self.cpus_per_worker = float(cpus_per_worker)
        self.gpus_per_worker = float(gpus_per_worker)
        self.max_retries = max_retries
        self.no_progress_s = no_progress_s
        self.init_kwargs = dict(init_kwargs or {})
        self._started = False

    def __repr__(self) -> str:
        return (f"RayEngine(address={self.address!r}, workers={self._workers}, "
                f"cpus_per_worker={self.cpus_per_worker:g}, gpus_per_worker={self.gpus_per_worker:g})")

    # -- the cluster ------------------------------------------------------------------------------
    def connect(self) -> Any:
        """Join (or start) the cluster once; return the ``ray`` module."""
        ray = require_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            if self.address is not None:
                kwargs.pop("include_dashboard")
            try:
                ray.init(address=self.address, **kwargs)
            except ConnectionError as err:
                raise UniprunerError(f"cannot reach a Ray cluster at {self.address!r}: {err} (start one with "
                                     "`ray start --head`, or leave --address out for a local instance)") from err
            self._started = True
        return ray

    def close(self) -> None:
        """Shut down the Ray instance this engine started (a cluster it joined is left running)."""
        if self._started:
            require_ray().shutdown()
            self._started = False

    @property
    def workers(self) -> int:
        if self._workers is not None:
            return self._workers
        ray = self.connect()
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        if self.cpus_per_worker == 0:
            return max(1, int(ray.cluster_resources().get("GPU", 0.0) // max(self.gpus_per_worker, 1e-9)))
        return max(1, int(cpus // self.cpus_per_worker))

    def _check_feasible(self, ray: Any) -> None:
        """Refuse a task shape no node can run (Ray would queue it forever)."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0.0) >= self.cpus_per_worker and r.get("GPU", 0.0) >= self.gpus_per_worker
                   for r in nodes):
            best = max((f"{r.get('CPU', 0.0):g} CPUs / {r.get('GPU', 0.0):g} GPUs" for r in nodes), default="none")
            raise UniprunerError(f"no node of the Ray cluster has {self.cpus_per_worker:g} CPUs and "
                                 f"{self.gpus_per_worker:g} GPUs for one worker (largest node: {best}); lower "
                                 "--cpus-per-worker / --gpus-per-worker")

    # -- the map ---------------------------------------------------------------------------------
    def map(self, fn: Fn, context: Any, items: Sequence[Any], on_result: Callable[[int, Any], None]) -> EngineStats:
        t0 = time.perf_counter()
        ray = self.connect()
        self._check_feasible(ray)
        workers = self.workers
        system = tuple(getattr(ray.exceptions, n) for n in _SYSTEM_FAILURES if hasattr(ray.exceptions, n))
        task = ray.remote(_ray_call).options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                             max_retries=0)
        threads = max(1, math.floor(self.cpus_per_worker))
        ctx = ray.put(context)
        queue: deque[tuple[int, int]] = deque((k, 0) for k in range(len(items)))
        pending: dict[Any, tuple[int, int]] = {}
        retries = 0
        try:
            while queue or pending:
                while queue and len(pending) < workers:
                    k, attempt = queue.popleft()
                    pending[task.remote(fn, ctx, items[k], threads)] = (k, attempt)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.no_progress_s)
                if not ready:
                    raise UniprunerError(f"no task finished in {self.no_progress_s:g} s ({len(pending)} running, "
                                         f"{len(queue)} waiting): is the cluster out of resources?")
                for ref in ready:
                    k, attempt = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:  # the function raised: not retried
                        cause = getattr(err, "cause", None)
                        if isinstance(cause, Exception):
                            raise cause from err
                        raise UniprunerError(f"item {k} failed on Ray: {err}") from err
                    except system as err:
                        if attempt >= self.max_retries:
                            raise UniprunerError(f"item {k} was lost {attempt + 1} times (last: "
                                                 f"{type(err).__name__}); giving up") from err
                        retries += 1
                        queue.appendleft((k, attempt + 1))
                        continue
                    on_result(k, out)
        finally:
            if pending:  # stop the rest, and wait until they stopped: none may write after the driver cleaned up
                for ref in pending:
                    ray.cancel(ref, force=True)
                ray.wait(list(pending), num_returns=len(pending), timeout=60)
        return EngineStats(self.name, workers, len(items), retries, time.perf_counter() - t0)
