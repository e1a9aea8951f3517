"""Physical size of a KV cache, per layer: what a plain cache would hold vs what is stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...errors import UniprunerError
from ...hosts.cache import CompressedCache, CompressedLayer
from ...hosts.patching import PatchHandle

__all__ = ["KVStats", "LayerStats", "stats"]


@dataclass(frozen=True)
class LayerStats:
    """One layer of :class:`KVStats`.

    Attributes
    ----------
    layer : int
    kind : str
        ``"compressed"``, ``"full"`` (a compressible layer not compressed yet) or ``"sliding"``
        (a sliding-window layer, left to Hugging Face).
    tokens_before : int
        Token slots a plain ``DynamicCache`` would hold for the same inputs, summed over the batch
        (padding included, as Hugging Face stores it).
    tokens_after : int
        Token slots stored now, summed over the batch (rectangular tensors: padding slots of
        ragged rows included).
    tokens_kept : float
        Real tokens stored, summed over the batch, averaged over KV heads (heads may keep
        different counts).
    bytes_before, bytes_after : int
        Keys + values bytes for ``tokens_before`` and actually allocated now.
    """

    layer: int
    kind: str
    tokens_before: int
    tokens_after: int
    tokens_kept: float
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class KVStats:
    """Per-layer physical sizes of a cache (:func:`stats`)."""

    layers: tuple[LayerStats, ...]

    @property
    def bytes_before(self) -> int:
        return sum(s.bytes_before for s in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(s.bytes_after for s in self.layers)

    @property
    def tokens_before(self) -> int:
        return sum(s.tokens_before for s in self.layers)

    @property
    def tokens_after(self) -> int:
        return sum(s.tokens_after for s in self.layers)

    @property
    def ratio(self) -> float:
        """Bytes stored / bytes a plain cache would hold (1.0 = no saving)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "ratio": self.ratio,
                "layers": [asdict(s) for s in self.layers]}

    def __str__(self) -> str:
        lines = ["layer  kind        tokens before -> after (kept)     bytes before -> after"]
        for s in self.layers:
            lines.append(f"{s.layer:5d}  {s.kind:10s}  {s.tokens_before:8d} -> {s.tokens_after:6d} "
                         f"({s.tokens_kept:8.1f})  {s.bytes_before:12d} -> {s.bytes_after:10d}")
        lines.append(f"total: {self.bytes_before} -> {self.bytes_after} bytes ({self.ratio:.1%})")
        return "\n".join(lines)


def stats(cache: Any) -> KVStats:
    """Tokens and bytes per layer, before (a plain cache of the same inputs) and after compression.

    Parameters
    ----------
    cache : CompressedCache, the handle of :func:`unipruner.kv.patch`, or a model output with ``.cache``
        A handle reports the cache of its last call (``handle.stats()``).

    Returns
    -------
    KVStats

    Examples
    --------
    >>> import torch, transformers
    >>> import unipruner
    >>> cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
    ...                                num_key_value_heads=1, intermediate_size=64, vocab_size=50)
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> with unipruner.kv.patch(model, "knorm", ratio=0.5), torch.no_grad():
    ...     out = model(torch.randint(0, 50, (1, 20)))
    >>> st = unipruner.kv.stats(out)
    >>> [(s.kind, s.tokens_before, s.tokens_after) for s in st.layers], st.ratio
    ([('compressed', 20, 10), ('compressed', 20, 10)], 0.5)
    """
    if isinstance(cache, PatchHandle):
        got = cache.stats()
        if not isinstance(got, KVStats):
            raise UniprunerError(f"stats() of a unipruner.{cache.domain} handle is not a KV cache report")
        return got
    if not isinstance(cache, CompressedCache) and hasattr(cache, "cache"):
        cache = cache.cache
    if not isinstance(cache, CompressedCache):
        raise UniprunerError(
            f"stats() needs a unipruner CompressedCache (the .cache of a patched model's output, or the handle "
            f"returned by patch()), got {type(cache).__name__}"
        )
    out = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0 or values is None:
            continue
        b, h, s, d = keys.shape
        after = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        if isinstance(layer, CompressedLayer):
            seen = layer.seen
            before = b * h * seen * d * (keys.element_size() + values.element_size())
            kept = float(layer.slot_valid().sum()) / h
            kind = "compressed" if layer.compressed else "full"
        else:  # sliding-window layer: Hugging Face's own storage, untouched
            seen, before, kind = s, after, "sliding"
            kept = float(b * s)
        out.append(LayerStats(i, kind, b * seen, b * s, kept, before, after))
    return KVStats(tuple(out))
