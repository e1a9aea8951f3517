"""Exceptions raised by unipruner.

Every error the library raises on bad input is a :class:`UniprunerError`, which is also a
:class:`ValueError`, so ``except ValueError`` keeps working for callers who do not know us.
"""

from __future__ import annotations

__all__ = ["MissingDependencyError", "UniprunerError"]


class UniprunerError(ValueError):
    """Bad input to a unipruner function: the message says what was wrong and what to do."""


class MissingDependencyError(ImportError):
    """An optional dependency (an extra or an offline model package) is not installed."""
