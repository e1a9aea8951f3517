"""The ColBERTv2 / PLAID residual codec and IVF building, shared by the colbert-ai PLAID and fast-plaid formats.

Santhanam et al., "ColBERTv2: Effective and Efficient Retrieval via Lightweight Late Interaction" (NAACL 2022) and
"PLAID: An Efficient Engine for Late Interaction Retrieval" (CIKM 2022): a vector is stored as its nearest centroid
plus ``nbits`` residual bucket indices per dimension; the inverted file lists the documents of every centroid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import IndexFormatError

__all__ = ["ResidualCodec", "build_ivf_pairs", "check_codec", "check_codes_residuals", "ivf_from_pairs",
           "ivf_to_file"]


@dataclass(frozen=True)
class ResidualCodec:
    """The ColBERTv2 / PLAID residual codec: a centroid id per vector plus ``nbits`` per dimension.

    Santhanam et al., "ColBERTv2: Effective and Efficient Retrieval via Lightweight Late Interaction" (NAACL 2022):
    a vector is stored as its nearest centroid (by dot product) and, per dimension, the bucket of its residual
    ``x - centroid`` among ``2^nbits`` buckets (``bucket_cutoffs``); it is reconstructed as
    ``normalize(centroid + bucket_weights[bucket])``. Bits of each dimension's bucket index are stored least
    significant first and packed eight to a byte, most significant bit first (``numpy.packbits``).

    Attributes
    ----------
    centroids : torch.Tensor
        float32 ``[P, dim]``.
    bucket_cutoffs : torch.Tensor
        float32 ``[2^nbits - 1]``, ascending.
    bucket_weights : torch.Tensor
        float32 ``[2^nbits]``.
    nbits : int
        Bits per dimension (``8 % nbits == 0`` and ``dim % (8 * nbits) == 0``).
    """

    centroids: torch.Tensor
    bucket_cutoffs: torch.Tensor
    bucket_weights: torch.Tensor
    nbits: int

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.centroids.shape[1])

    @property
    def packed_dim(self) -> int:
        """Bytes per vector in the packed residuals, ``dim * nbits / 8``."""
        return self.dim * self.nbits // 8

    def _byte_table(self) -> torch.Tensor:
        """int64 ``[256, 8 / nbits]``: the bucket indices of the dimensions one packed byte holds."""
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        bits = (byte >> torch.arange(7, -1, -1)) & 1  # [256, 8], most significant bit first
        per = bits.reshape(256, 8 // self.nbits, self.nbits)
        return (per * (1 << torch.arange(self.nbits))).sum(-1)  # least significant bit first within a dimension

    def decode(self, codes: torch.Tensor, residuals: torch.Tensor, batch: int = 1 << 16) -> torch.Tensor:
        """Reconstruct float32 unit vectors from centroid ids and packed residuals (ColBERTv2 decompression).

        Parameters
        ----------
        codes : torch.Tensor
            Integer ``[n]`` centroid ids.
        residuals : torch.Tensor
            uint8 ``[n, dim * nbits / 8]``.
        batch : int
            Vectors decoded at a time (bounds the temporaries to ``batch * dim`` int64).

        Returns
        -------
        torch.Tensor
            float32 ``[n, dim]``, L2-normalised.
        """
        n = int(codes.shape[0])
        table = self._byte_table()
        out = torch.empty(n, self.dim, dtype=torch.float32)
        for a in range(0, n, batch):
            b = min(n, a + batch)
            buckets = table[residuals[a:b].long()].reshape(b - a, self.dim)
            x = self.centroids[codes[a:b].long()] + self.bucket_weights[buckets]
            out[a:b] = torch.nn.functional.normalize(x, p=2.0, dim=-1)
        return out

    def encode(self, vectors: torch.Tensor, batch: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress vectors: nearest centroid by dot product, bucketised and bit-packed residuals (ColBERTv2).

        Parameters
        ----------
        vectors : torch.Tensor
            float ``[n, dim]``; they are L2-normalised first (the codec stores directions; decoding normalises).
        batch : int
            Vectors per batch (bounds the ``[batch, P]`` score matrix and the bit temporaries).

        Returns
        -------
        codes : torch.Tensor
            int64 ``[n]``.
        residuals : torch.Tensor
            uint8 ``[n, dim * nbits / 8]``.
        """
        n = int(vectors.shape[0])
        step = max(1, min(batch, (1 << 24) // max(1, int(self.centroids.shape[0]))))
        codes = torch.empty(n, dtype=torch.int64)
        packed = torch.empty(n, self.packed_dim, dtype=torch.uint8)
        shifts = torch.arange(self.nbits, dtype=torch.uint8)
        place = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        for a in range(0, n, step):
            b = min(n, a + step)
            x = torch.nn.functional.normalize(vectors[a:b].to(torch.float32), p=2.0, dim=-1)
            c = (x @ self.centroids.T).argmax(dim=1)
            buckets = torch.bucketize(x - self.centroids[c], self.bucket_cutoffs).to(torch.uint8)  # [m, dim]
            bits = ((buckets.unsqueeze(-1) >> shifts) & 1).reshape(b - a, self.packed_dim, 8)  # LSB first per dim
            codes[a:b] = c
            packed[a:b] = (bits * place).sum(-1, dtype=torch.uint8)  # most significant bit first per byte
        return codes, packed


def check_codec(centroids: Any, cutoffs: Any, weights: Any, nbits: int, dim: int, partitions: int,
                where: Path) -> ResidualCodec:
    """Validate codec tensors (shapes, dtypes, nbits/dim compatibility) and build a :class:`ResidualCodec`."""
    if nbits not in (1, 2, 4, 8):
        raise IndexFormatError(f"{where}: nbits must be 1, 2, 4 or 8, got {nbits}")
    if dim % (8 * nbits) != 0:
        raise IndexFormatError(f"{where}: dim {dim} is not a multiple of 8 * nbits = {8 * nbits}")
    for name, t in (("centroids", centroids), ("bucket_cutoffs", cutoffs), ("bucket_weights", weights)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise IndexFormatError(f"{where}: {name} must be a floating tensor, got {type(t).__name__}")
    if centroids.dim() != 2 or centroids.shape[1] != dim:
        raise IndexFormatError(f"{where}: centroids have shape {tuple(centroids.shape)}, expected [P, {dim}] "
                               f"(dim {dim} from the metadata)")
    if centroids.shape[0] != partitions:
        raise IndexFormatError(f"{where}: {centroids.shape[0]} centroids but the metadata says "
                               f"num_partitions = {partitions}")
    if tuple(cutoffs.shape) != (2**nbits - 1,) or tuple(weights.shape) != (2**nbits,):
        raise IndexFormatError(f"{where}: buckets have shapes {tuple(cutoffs.shape)} / {tuple(weights.shape)}, "
                               f"expected ({2**nbits - 1},) / ({2**nbits},) for nbits = {nbits}")
    return ResidualCodec(centroids.to(torch.float32).contiguous(), cutoffs.to(torch.float32).contiguous(),
                         weights.to(torch.float32).contiguous(), nbits)


def check_codes_residuals(codes: Any, residuals: Any, n: int, codec: ResidualCodec, chunk: int,
                          where: Path) -> None:
    """Validate one chunk's codes and residuals against its doclens total ``n`` and the codec."""
    int_dtypes = (torch.int32, torch.int64, np.dtype(np.int32), np.dtype(np.int64))
    if not isinstance(codes, (torch.Tensor, np.ndarray)) or codes.ndim != 1 or codes.dtype not in int_dtypes:
        raise IndexFormatError(f"{where}: chunk {chunk} codes must be a 1-D integer array")
    if not isinstance(residuals, (torch.Tensor, np.ndarray)) or residuals.ndim != 2:
        raise IndexFormatError(f"{where}: chunk {chunk} residuals must be a 2-D uint8 array")
    if str(residuals.dtype) not in ("torch.uint8", "uint8"):
        raise IndexFormatError(f"{where}: chunk {chunk} residuals have dtype {residuals.dtype}, expected uint8")
    if int(codes.shape[0]) != n:
        raise IndexFormatError(f"{where}: chunk {chunk} has {int(codes.shape[0])} codes but its doclens sum to {n} "
                               "(doclens do not match the codes)")
    if int(residuals.shape[0]) != n or int(residuals.shape[1]) != codec.packed_dim:
        raise IndexFormatError(f"{where}: chunk {chunk} residuals have shape {tuple(residuals.shape)}, expected "
                               f"({n}, {codec.packed_dim}) = (vectors, dim * nbits / 8)")
    if n:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= codec.centroids.shape[0]:
            raise IndexFormatError(f"{where}: chunk {chunk} codes range over [{lo}, {hi}] but there are "
                                   f"{codec.centroids.shape[0]} centroids")


def build_ivf_pairs(codes: torch.Tensor, doclens: np.ndarray, doc_offset: int, live: np.ndarray | None) -> torch.Tensor:
    """Unique ``code << 32 | document`` keys of one chunk (documents absent from ``live`` left out), sorted."""
    pids = torch.repeat_interleave(torch.arange(doc_offset, doc_offset + len(doclens), dtype=torch.int64),
                                   torch.from_numpy(np.ascontiguousarray(doclens, dtype=np.int64)))
    keys = (codes.to(torch.int64) << 32) | pids
    if live is not None:
        keys = keys[torch.from_numpy(live[doc_offset:doc_offset + len(doclens)])[pids - doc_offset]]
    return torch.unique(keys)


def ivf_from_pairs(keys: list[torch.Tensor], partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global IVF from per-chunk pair keys: (document ids sorted per centroid, lengths ``[partitions]``)."""
    allk = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.int64)
    centroid = allk >> 32
    pids = allk & 0xFFFFFFFF
    lengths = torch.bincount(centroid, minlength=partitions)
    return pids, lengths


def ivf_to_file(pairs: Callable[[int], torch.Tensor], n_chunks: int, partitions: int, out: Path, dtype: Any,
                padding: Callable[[np.ndarray], int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The global IVF of :func:`ivf_from_pairs`, built without holding every chunk's pairs: a two-pass counting sort
    into a memory-mapped ``.npy`` file (PLAID's inverted file, Santhanam et al., CIKM 2022).

    Pass 1 counts the (centroid, document) pairs of every centroid chunk by chunk; pass 2 places each chunk's
    document ids at its centroids' cursors. Chunks hold contiguous documents in order and ``pairs(i)`` is sorted,
    so every list comes out sorted and equal, entry for entry, to :func:`ivf_from_pairs`.

    Parameters
    ----------
    pairs : callable
        ``pairs(i)``: chunk ``i``'s sorted unique ``code << 32 | document`` keys (:func:`build_ivf_pairs`); called
        twice per chunk.
    n_chunks, partitions : int
    out : Path
        The ``.npy`` file to create (memory: one chunk's keys plus ``[partitions]`` counters; the ids live in the
        file's pages).
    dtype : numpy dtype
        Of the document ids in ``out``.
    padding : callable, optional
        ``padding(lengths)``: zeros to append after the lists (colbert-ai's padded layout).

    Returns
    -------
    ivf : numpy.memmap
        The ids per centroid, concatenated (then the padding), backed by ``out``.
    lengths : numpy.ndarray
        int64 ``[partitions]``.
    """
    lengths = np.zeros(partitions, dtype=np.int64)
    for i in range(n_chunks):
        lengths += np.bincount((pairs(i) >> 32).numpy(), minlength=partitions)
    total = int(lengths.sum())
    extra = padding(lengths) if padding is not None else 0
    ivf = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(total + extra,))  # zero-filled
    cursor = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    for i in range(n_chunks):
        keys = pairs(i).numpy()
        code = keys >> 32
        counts = np.bincount(code, minlength=partitions)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # each centroid's first key in this chunk
        ivf[cursor[code] + np.arange(keys.size) - first[code]] = keys & 0xFFFFFFFF
        cursor += counts
    ivf.flush()
    return ivf, lengths
