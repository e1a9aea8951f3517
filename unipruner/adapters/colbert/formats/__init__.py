"""Multi-vector index formats: raw arrays, colbert-ai PLAID, fast-plaid, PyLate Voyager.

Each module registers its :class:`~unipruner.adapters.colbert.formats.base.IndexFormat` subclass in
:data:`~unipruner.adapters.colbert.formats.base.FORMATS` on import; importing this package imports every format that
is present.
"""

from __future__ import annotations

import importlib

from .base import (
    FORMATS,
    Chunk,
    ChunkWriter,
    IndexFormat,
    IndexFormatError,
    IndexInfo,
    check_chunk,
    detect_format,
    register,
)

__all__ = [
    "FORMATS",
    "Chunk",
    "ChunkWriter",
    "IndexFormat",
    "IndexFormatError",
    "IndexInfo",
    "check_chunk",
    "detect_format",
    "register",
]

for _mod in ("raw", "plaid", "fast_plaid", "voyager"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as exc:  # a format module not written yet; a missing dependency inside is an error
        if exc.name != f"{__name__}.{_mod}":
            raise
