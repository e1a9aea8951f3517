"""Safe loading of index files: no pickle is ever executed.

Tensors with ``torch.load(weights_only=True)``, ``.npy`` arrays with ``allow_pickle=False``, JSON with clear errors,
and PyLate's pickled id maps through an unpickler that admits plain data and numpy arrays only (Chaffin & Sourty,
"PyLate", 2025). Every failure is an :class:`~.base.IndexFormatError` naming the file and what it should hold.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import IndexFormatError

__all__ = ["check_doclens", "load_json_file", "load_npy", "load_tensor_file", "read_pylate_doc_ids",
           "require_int", "restricted_pickle_load", "restricted_pickle_loads"]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler admitting plain Python containers/scalars and numpy arrays, nothing else."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.dtypes", "Int64DType"), ("numpy.dtypes", "Int32DType"), ("numpy.dtypes", "Float32DType"),
        ("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only plain types and numpy arrays are "
                                     "allowed in an index's pickled maps")


def restricted_pickle_loads(data: bytes, what: str, where: str) -> Any:
    """Unpickle ``data`` admitting only plain types and numpy arrays (see :func:`restricted_pickle_load`).

    Raises
    ------
    IndexFormatError
        If the data is truncated or references any other class or function; ``where`` names it in the message.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as err:
        raise IndexFormatError(f"{where}: not a plain-data pickle ({what}): {err}. Only dicts/lists of ids and "
                               "numpy arrays are read; rebuild the index if it holds anything else") from err


def restricted_pickle_load(path: Path, what: str) -> Any:
    """Unpickle ``path`` admitting only plain types (dict, list, str, int, ...) and numpy arrays.

    PyLate stores its id maps as pickles (Chaffin & Sourty, "PyLate", 2025); a pickle can run arbitrary code, so
    anything beyond plain data is refused instead of being imported.

    Parameters
    ----------
    path : Path
        The pickle file.
    what : str
        What the file should hold, for the error message.

    Raises
    ------
    IndexFormatError
        If the file is missing, truncated, or references any other class or function.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise IndexFormatError(f"{path}: missing ({what})") from err
    return restricted_pickle_loads(data, what, str(path))


def load_tensor_file(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with a clear :class:`IndexFormatError` for any failure."""
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing ({what}); the index is incomplete")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # mmap needs torch's zip serialization; a legacy-format file is read whole instead.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise IndexFormatError(f"{path}: holds pickled objects where a plain tensor was expected ({what})"
                               f"{f', e.g. {found.group(1)}' if found else ''}; refused (tensors are loaded with "
                               "torch.load(weights_only=True) only). Rebuild the index from a trusted source") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... on truncated or corrupt files
        first = str(err).split(". ")[0].splitlines()[0][:200] if str(err) else type(err).__name__
        raise IndexFormatError(f"{path}: cannot be read as a tensor file ({what}): truncated or corrupt "
                               f"({first})") from err


def load_json_file(path: Path, what: str) -> Any:
    """Read a JSON file, raising :class:`IndexFormatError` when it is missing or malformed."""
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing ({what}); the index is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFormatError(f"{path}: not valid JSON ({what}): {err}") from err


def check_doclens(value: Any, path: Path, allow_empty: bool = False) -> np.ndarray:
    """Validate a ``doclens.{i}.json`` list of integers >= 1 (>= 0 with ``allow_empty``); return an int64 array."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise IndexFormatError(f"{path}: expected a JSON list of integers (vectors per document)")
    arr = np.asarray(value, dtype=np.int64)
    low = 0 if allow_empty else 1
    if arr.size and int(arr.min()) < low:
        j = int(np.argmin(arr))
        raise IndexFormatError(f"{path}: document {j} of this chunk has {int(arr[j])} vectors; every document "
                               "needs at least one" if low else f"{path}: negative document length {int(arr[j])}")
    return arr


def require_int(d: Any, key: str, path: Path, minimum: int = 0) -> int:
    """``d[key]`` as an int >= ``minimum`` or a clear :class:`IndexFormatError`."""
    if not isinstance(d, dict) or key not in d:
        raise IndexFormatError(f"{path}: missing key {key!r}")
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise IndexFormatError(f"{path}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def load_npy(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    """``numpy.load(path, allow_pickle=False)`` with a clear :class:`IndexFormatError` for any failure.

    Parameters
    ----------
    path : Path
        The ``.npy`` file.
    what : str
        What it should hold, for messages.
    mmap : bool
        Memory-map instead of reading (shape checks without reading the data).
    """
    if not path.is_file():
        raise IndexFormatError(f"{path.parent}: {path.name} is missing ({what}); the index is incomplete")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as err:
        if any(k in str(err) for k in ("allow_pickle", "Object arrays", "Python objects")):
            raise IndexFormatError(f"{path}: {what} must be a plain numeric .npy array, not a pickle: it holds "
                                   "pickled objects, and pickles are never loaded") from err
        raise IndexFormatError(f"{path}: not a valid .npy array ({what}; truncated or corrupt): {err}") from err
    except (OSError, EOFError) as err:
        raise IndexFormatError(f"{path}: cannot be read as a .npy array ({what}; truncated or corrupt): "
                               f"{err}") from err
    if not isinstance(arr, np.ndarray):
        raise IndexFormatError(f"{path}: expected a single .npy array ({what})")
    return arr


def read_pylate_doc_ids(path: Path, pids: np.ndarray) -> list[str] | None:
    """Ids of the documents with PLAID ids ``pids`` from PyLate's ``plaid_ids_to_documents_ids.pkl``.

    The map is read with :func:`restricted_pickle_load` (plain data only). Returns None when the map is absent or
    lacks one of ``pids``.
    """
    if not path.is_file():
        return None
    m = restricted_pickle_load(path, "PyLate's map from PLAID ids to document ids")
    if not isinstance(m, dict):
        raise IndexFormatError(f"{path}: expected a dict of PLAID id -> document id, got {type(m).__name__}")
    try:
        return [str(m[int(i)]) for i in pids]
    except KeyError:
        return None
