"""The engine interface and the local engine (this process, or spawned worker processes)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._threads import limit_threads
from ..errors import UniprunerError

__all__ = ["ENGINES", "Engine", "EngineStats", "LocalEngine", "call_item", "commit_dir"]

#: engine names of the ``--engine`` option
ENGINES = ("local", "ray")

Fn = Callable[[Any, Any], Any]
"""A per-item function ``fn(context, item) -> summary``: module-level (picklable), deterministic."""


@dataclass(frozen=True)
class EngineStats:
    """What one :meth:`Engine.map` did.

    Attributes
    ----------
    engine : str
        ``"local"`` or ``"ray"``.
    workers : int
        Items processed at once.
    items : int
        Items mapped in this call.
    retries : int
        Items resubmitted after a system failure (a killed worker process, a lost node).
    seconds : float
        Wall time of the call.
    """

    engine: str
    workers: int
    items: int
    retries: int
    seconds: float


def commit_dir(tmp: Path, dst: Path) -> None:
    """Put the finished directory ``tmp`` at ``dst`` with renames (same file system): an existing ``dst`` is moved
    aside first and deleted after, so ``dst`` is always either the old or the new complete output."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "out")
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def call_item(fn: Fn, context: Any, item: Any, threads: int | None) -> Any:
    """``fn(context, item)`` with ``threads`` torch threads (None: as the process has them)."""
    with limit_threads(threads):
        return fn(context, item)


_CONTEXT: Any = None  # a pool worker's context, shipped once by the pool's initializer


def _init_context(context: Any) -> None:
    global _CONTEXT
    _CONTEXT = context


def _call_pooled(fn: Fn, item: Any) -> Any:
    return call_item(fn, _CONTEXT, item, 1)  # one thread per worker process: the workers are the parallelism


def _check_count(name: str, value: Any, minimum: float, integer: bool = True) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < minimum:
        kind = "an int" if integer else "a number"
        raise UniprunerError(f"{name} must be {kind} >= {minimum:g}, got {value!r}")


class Engine(ABC):
    """Maps a per-item function over items, on one engine (see the package docstring)."""

    name: str = ""

    @property
    @abstractmethod
    def workers(self) -> int:
        """Items processed at once."""

    def close(self) -> None:  # noqa: B027 (optional hook: the local engine holds nothing between maps)
        """Release what the engine started (the Ray engine: a Ray instance it started itself)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def map(self, fn: Fn, context: Any, items: Sequence[Any], on_result: Callable[[int, Any], None]) -> EngineStats:
        """Call ``fn(context, item)`` for every item; ``on_result(position, summary)`` in the driver as each one
        finishes (in completion order, not item order).

        The first user error (an exception raised by ``fn``) stops the map and is raised here, after the items
        still running were cancelled; a system failure of the engine is retried (Ray) or raised (local processes).
        """


class LocalEngine(Engine):
    """Run the items in this process (``workers=1``) or in ``workers`` spawned processes, one thread each.

    Parameters
    ----------
    workers : int
        1: serially, in this process, with its thread settings; more: a process pool (``spawn``), at most
        ``2 * workers`` items submitted at once, each worker limited to one torch thread (the workers are the
        parallelism).
    """

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        _check_count("workers", workers, 1)
        self._workers = workers

    @property
    def workers(self) -> int:
        return self._workers

    def __repr__(self) -> str:
        return f"LocalEngine(workers={self._workers})"

    def map(self, fn: Fn, context: Any, items: Sequence[Any], on_result: Callable[[int, Any], None]) -> EngineStats:
        t0 = time.perf_counter()
        if self._workers == 1 or len(items) <= 1:
            for k, item in enumerate(items):
                on_result(k, fn(context, item))
            return EngineStats(self.name, 1, len(items), 0, time.perf_counter() - t0)
        pool = ProcessPoolExecutor(max_workers=self._workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_context, initargs=(context,))
        try:
            pending: dict[Future[Any], int] = {}
            todo = iter(enumerate(items))
            for k, item in todo:
                pending[pool.submit(_call_pooled, fn, item)] = k
                if len(pending) >= 2 * self._workers:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    k = pending.pop(fut)
                    on_result(k, fut.result())
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending[pool.submit(_call_pooled, fn, nxt[1])] = nxt[0]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return EngineStats(self.name, self._workers, len(items), 0, time.perf_counter() - t0)
