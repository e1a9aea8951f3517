"""The handle contract of every model-resident adapter (``vit``, ``kv``, ``vlm``, ``diffusion``).

``unipruner.<domain>.patch(model, method, ...)`` registers hooks on *one* model instance and
returns a :class:`PatchHandle`:

* it is a context manager (leaving the ``with`` block unpatches);
* ``configure(**same_keywords)`` changes settings, validated exactly like ``patch``;
* ``stats()`` reports what the last call kept, ``describe()`` what was patched and what was left
  alone (and why), ``unpatch()`` restores the exact original model;
* patching the same model again with identical settings returns the same handle; with other
  settings it raises, pointing at ``configure``;
* nothing is stored on the model: every hook registered through :meth:`PatchHandle.add_hook`
  is a :class:`Hook` that knows its handle, so :func:`find_handle` finds the handle by walking
  the model's hooks (as diffusers' ``HookRegistry`` keeps hooks per module, not in a global);
* state that lives for one forward call (token maps, sizes, captured queries) belongs in a
  per-call object kept by :meth:`PatchHandle.begin_call` / :meth:`PatchHandle.call_state` in a
  :class:`contextvars.ContextVar`, so two threads (or asyncio tasks) running one patched model
  at once never see each other's state. Settings are an immutable value swapped whole by
  ``configure``; a call reads them once, when it begins.

>>> import torch
>>> class Handle(PatchHandle):
...     domain = "demo"
...     def configure(self, **kw): return self
...     def stats(self): return self.last_stats
...     def describe(self): return "patched one linear layer"
>>> lin = torch.nn.Linear(2, 2)
>>> with Handle(lin, settings=("scale", 2.0)) as h:
...     _ = h.add_hook(lin, "forward", lambda m, a, out: out * 2)
...     find_handle(lin, Handle) is h
True
>>> find_handle(lin, Handle) is None, h.active
(True, False)
"""

from __future__ import annotations

import contextvars
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UniprunerError

__all__ = ["Hook", "PatchHandle", "find_handle", "modules_of", "reuse_or_refuse"]

H = TypeVar("H", bound="PatchHandle")

#: per-context map ``id(handle) -> that handle's state for the call running in this context``
_CALLS: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar("unipruner_calls", default=None)

_KINDS = ("forward_pre", "forward")


class Hook:
    """A module hook that knows the handle that registered it (see :func:`find_handle`).

    Parameters
    ----------
    owner : PatchHandle
    fn : callable
        The hook function, called with the arguments PyTorch passes.
    """

    __slots__ = ("fn", "owner")

    def __init__(self, owner: PatchHandle, fn: Callable[..., Any]) -> None:
        self.owner = owner
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def modules_of(model: Any) -> Iterator[nn.Module]:
    """Every module of ``model`` (an ``nn.Module``, or a pipeline-like object with module attributes)."""
    if isinstance(model, nn.Module):
        yield from model.modules()
        return
    seen: set[int] = set()
    for value in vars(model).values() if hasattr(model, "__dict__") else ():
        if isinstance(value, nn.Module) and id(value) not in seen:
            seen.add(id(value))
            yield from value.modules()


def find_handle(model: Any, cls: type[H]) -> H | None:
    """The active handle of type ``cls`` patching ``model``, or None.

    Found through the model's own hooks (nothing is stored on the model or in a global table).
    """
    for module in modules_of(model):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for fn in hooks.values():
                if isinstance(fn, Hook) and isinstance(fn.owner, cls) and fn.owner.active:
                    return fn.owner
    return None


def reuse_or_refuse(model: Any, cls: type[H], settings: Hashable) -> H | None:
    """The rule for patching a model twice: the existing handle when ``settings`` are identical,
    None when the model is not patched by ``cls``, else a :class:`UniprunerError` pointing at
    ``configure``."""
    existing = find_handle(model, cls)
    if existing is None:
        return None
    if existing.same_as(settings):
        return existing
    raise existing.refuse_repatch()


class PatchHandle(ABC):
    """Base of every adapter handle: lifecycle, hook bookkeeping, per-call state, settings.

    Subclasses set :attr:`domain`, implement :meth:`configure`, :meth:`stats` and
    :meth:`describe`, and register their hooks with :meth:`add_hook`.

    Parameters
    ----------
    model : object
        The patched model (or pipeline).
    settings : Hashable
        An immutable value with ``==`` (a frozen dataclass): what ``patch`` was asked for.
        Identical re-patching compares it.
    """

    domain: ClassVar[str] = ""

    def __init__(self, model: Any, settings: Hashable) -> None:
        self.model = model
        self._settings = settings
        self._hooks: list[RemovableHandle] = []
        self._lock = threading.Lock()
        self._last_stats: Any = None

    # -- settings ---------------------------------------------------------------------------------
    @property
    def settings(self) -> Any:
        """The current settings (immutable; replaced whole by :meth:`configure`)."""
        return self._settings

    def _set_settings(self, settings: Hashable) -> None:
        self._settings = settings  # one reference assignment: a running call keeps its snapshot

    def same_as(self, settings: Hashable) -> bool:
        """Whether ``settings`` equal this handle's (identical re-patch)."""
        return bool(self._settings == settings)

    def refuse_repatch(self) -> UniprunerError:
        """The error for patching an already patched model with other settings."""
        return UniprunerError(
            f"this {type(self.model).__name__} is already patched by unipruner.{self.domain} with other settings "
            f"({self._settings!r}); change them with handle.configure(...) (unipruner.{self.domain}.find(model) "
            f"returns the handle) or call unipruner.{self.domain}.unpatch(model) first"
        )

    @abstractmethod
    def configure(self: H, **settings: Any) -> H:
        """Change settings between calls, validated like ``patch``; returns ``self``."""

    @abstractmethod
    def stats(self) -> Any:
        """What the last call kept (tokens per stage / layer, bytes where known)."""

    @abstractmethod
    def describe(self) -> str:
        """What was patched and what was left alone, and why."""

    # -- hooks ------------------------------------------------------------------------------------
    def add_hook(self, module: nn.Module, kind: str, fn: Callable[..., Any], *, with_kwargs: bool = False,
                 always_call: bool = False) -> RemovableHandle:
        """Register ``fn`` on ``module`` as a ``kind`` hook (``"forward_pre"`` or ``"forward"``)."""
        hook = Hook(self, fn)
        if kind == "forward_pre":
            handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        elif kind == "forward":
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs, always_call=always_call)
        else:
            raise UniprunerError(f"hook kind must be one of {_KINDS}, got {kind!r}")
        self._hooks.append(handle)
        return handle

    @property
    def active(self) -> bool:
        """Whether this handle's hooks are installed."""
        return bool(self._hooks)

    def unpatch(self) -> bool:
        """Remove every hook this handle installed; the model is exactly as before. False if already done."""
        if not self._hooks:
            return False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._on_unpatch()
        return True

    def _on_unpatch(self) -> None:
        """Subclass cleanup after the hooks are gone (optional)."""
        return None

    def __enter__(self: H) -> H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    # -- per-call state ---------------------------------------------------------------------------
    def begin_call(self, state: Any) -> contextvars.Token[dict[int, Any] | None]:
        """Make ``state`` this handle's state for the call running in the current context."""
        calls = dict(_CALLS.get() or {})
        calls[id(self)] = state
        return _CALLS.set(calls)

    def end_call(self, token: contextvars.Token[dict[int, Any] | None] | None = None) -> None:
        """Forget this handle's call state in the current context (restore ``token`` when given)."""
        if token is not None:
            _CALLS.reset(token)
            return
        calls = _CALLS.get()
        if calls and id(self) in calls:
            rest = dict(calls)
            del rest[id(self)]
            _CALLS.set(rest)

    def call_state(self) -> Any:
        """This handle's state for the call running in the current context, or None outside a call."""
        calls = _CALLS.get()
        return None if calls is None else calls.get(id(self))

    @contextmanager
    def calling(self, state: Any) -> Iterator[Any]:
        """``with handle.calling(state):`` — :meth:`begin_call` / :meth:`end_call` around a block."""
        token = self.begin_call(state)
        try:
            yield state
        finally:
            self.end_call(token)

    def publish(self, stats: Any) -> None:
        """Record what a finished call kept (read by :meth:`stats`)."""
        with self._lock:
            self._last_stats = stats

    @property
    def last_stats(self) -> Any:
        """What the most recently finished call published (None before the first call)."""
        with self._lock:
            return self._last_stats
