"""ColBERT / multi-vector index compression: pool or prune the vectors of an index that already exists.

Token pooling (Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal Performance
Impact via Token Pooling", 2024) and ColBERT pruning (Lassance et al., "A Study on Token Pruning for ColBERT", 2021)
applied to an existing index, in place of re-encoding the collection. Formats: raw arrays (``formats.raw``),
colbert-ai PLAID, fast-plaid and PyLate Voyager (``formats.plaid`` / ``fast_plaid`` / ``voyager``).

>>> import torch, tempfile
>>> from pathlib import Path
>>> from unipruner.adapters import colbert
>>> d = Path(tempfile.mkdtemp())
>>> src = colbert.write_raw(d / "src", [torch.randn(8, 16), torch.randn(3, 16)])
>>> res = colbert.compress(src, d / "dst", colbert.ReduceSpec("ward_cosine_pool", factor=2))
>>> res.src.n_vectors, res.dst.n_vectors
(11, 5)

Methods are registry methods (``unipruner methods --domain colbert``, :func:`accepted_methods`): give
:class:`ReduceSpec` a name and a budget, or a :class:`unipruner.Method` instance.

Public API (imported lazily): :func:`compress`, :class:`ReduceSpec`, :func:`reduce_chunk`, :func:`open_index`,
:func:`write_raw`, :func:`evaluate_index`, :func:`load_beir`, :func:`encode_tokens`, :func:`maxsim_search`,
:func:`metrics`, :class:`TokenTable`, :func:`accepted_methods`, :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FORMATS",
    "BeirData",
    "Chunk",
    "CompressResult",
    "EvalResult",
    "IndexFormat",
    "IndexFormatError",
    "IndexInfo",
    "RawIndex",
    "ReduceSpec",
    "TokenTable",
    "accepted_methods",
    "compress",
    "detect_format",
    "encode_tokens",
    "evaluate_index",
    "load_beir",
    "load_encoder",
    "maxsim_search",
    "metrics",
    "open_index",
    "reduce_chunk",
    "target_counts",
    "write_raw",
]

_WHERE = {
    "FORMATS": "formats", "Chunk": "formats", "IndexFormat": "formats", "IndexFormatError": "formats",
    "IndexInfo": "formats", "detect_format": "formats",
    "RawIndex": "formats.raw", "write_raw": "formats.raw",
    "accepted_methods": "_methods", "ReduceSpec": "_methods", "TokenTable": "_methods", "reduce_chunk": "_methods",
    "target_counts": "_methods",
    "CompressResult": "_compress", "compress": "_compress", "open_index": "_compress",
    "BeirData": "_eval", "EvalResult": "_eval", "encode_tokens": "_eval", "evaluate_index": "_eval",
    "load_beir": "_eval", "load_encoder": "_eval", "maxsim_search": "_eval", "metrics": "_eval",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
