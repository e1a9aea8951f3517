"""Importance scorers: one score per token, higher = keep.

Every function here is pure and vectorised. Attention inputs are *probabilities* (post-softmax),
shaped ``[B, H, Q, N]`` or ``[B, Q, N]``; when ``Q < N`` the ``Q`` rows are the queries of the
**last** ``Q`` positions (query row ``i`` sits at position ``N - Q + i``), which is what a causal
LM's observation window or last-token row looks like. Masked (padding) positions get ``-inf`` so
that :func:`unipruner.select.topk` never picks them; protection of CLS / sink / window tokens is
the selector's job (``topk(..., protected=...)``), except where a method defines it as part of
the score (SnapKV's window, StreamingLLM's sinks get ``+inf``).

Families
--------
* attention: :func:`cls_attention` (EViT), :func:`query_attention` (FastV, TOVA, SparseVLM),
  :func:`accumulated_attention` (H2O), :func:`snapkv` (+ :func:`group_heads`,
  :func:`window_attention` to get the rows without eager attention), :func:`value_aware` (VATP),
  :func:`received_attention` (CLS or mean received attention of a vision tower: VisionZip, PruMerge,
  HoloV) and :func:`iqr_outliers` (PruMerge's adaptive count);
* attention-free: :func:`key_norm` (KNorm), :func:`hidden_norm`, :func:`token_transition`
  (TransPrune), :func:`positional` (StreamingLLM), :func:`idf` / :func:`idf_table` /
  :func:`stopword_mask` (ColBERT pruning), :func:`query_similarity` (text-guided / RAG),
  :func:`random_scores` (baseline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ops import cosine_matrix, l2_normalize
from .._validate import check_attention, check_finite, check_mask, check_tokens
from ..errors import UniprunerError

__all__ = [
    "accumulated_attention",
    "centroid_similarity",
    "cls_attention",
    "group_heads",
    "hidden_norm",
    "idf",
    "idf_table",
    "iqr_outliers",
    "key_norm",
    "leading",
    "positional",
    "query_attention",
    "query_similarity",
    "random_scores",
    "received_attention",
    "snapkv",
    "stopword_idf",
    "stopword_mask",
    "token_transition",
    "value_aware",
    "window_attention",
]

_EPS = 1e-12


# ----------------------------------------------------------------------------- helpers


def _work(x: Tensor) -> Tensor:
    """Half / bfloat16 inputs are summed in float32; float32 / float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Masked positions -> ``-inf``."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask.to(scores.device), -math.inf)


def _check_int(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UniprunerError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise UniprunerError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float_tensor(x: object, name: str, *, min_ndim: int, shape_doc: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise UniprunerError(
            f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}"
        )
    if x.ndim < min_ndim:
        raise UniprunerError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UniprunerError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_finite(x, name)
    return x


def _broadcast_mask(mask: Tensor | None, lead: tuple[int, ...], n: int,
                    name: str = "mask") -> Tensor | None:
    """A key mask for scores ``[*lead, N]``: either exactly ``[*lead, N]`` or ``[B, N]``.

    ``[B, N]`` (the usual per-sequence padding mask) is reshaped to ``[B, 1, ..., 1, N]`` so
    it broadcasts over heads. Returns a bool tensor or ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise UniprunerError(
            f"{name} must be a torch.Tensor of shape [B, N], got {type(mask).__name__}"
        )
    shape = tuple(mask.shape)
    if shape == (*lead, n):
        out = mask
    elif len(lead) >= 1 and shape == (lead[0], n):
        out = mask.reshape(lead[0], *([1] * (len(lead) - 1)), n)
    else:
        want = f"[B, N] = {(lead[0], n)} or " if lead else ""
        raise UniprunerError(f"{name} must have shape {want}{(*lead, n)}, got {shape}")
    if out.dtype != torch.bool:
        if out.is_floating_point() or not bool(torch.all((out == 0) | (out == 1))):
            raise UniprunerError(f"{name} must be boolean (or 0/1 integers), got dtype {out.dtype}")
        out = out.bool()
    return out


def _query_row_validity(mask: Tensor | None, b: int, q: int, n: int,
                        device: torch.device) -> Tensor:
    """``[B, Q]`` bool: query row ``i`` (position ``N - Q + i``) is a real token."""
    if mask is None:
        return torch.ones(b, q, dtype=torch.bool, device=device)
    return mask[:, n - q:].to(device)


def _check_ids(token_ids: object) -> None:
    if not isinstance(token_ids, Tensor):
        raise UniprunerError(
            f"token_ids must be an integer tensor [B, N], got {type(token_ids).__name__}"
        )
    if token_ids.ndim != 2:
        raise UniprunerError(
            f"token_ids must be an integer tensor [B, N], got shape {tuple(token_ids.shape)}"
        )
    if token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise UniprunerError(f"token_ids must be integer token ids, got dtype {token_ids.dtype}")


# ----------------------------------------------------------------------------- attention


def cls_attention(attn: Tensor, *, cls_index: int = 0, mask: Tensor | None = None) -> Tensor:
    """Attention from the CLS token to every token, averaged over heads.

    EViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via
    Token Reorganizations", ICLR 2022) keeps the patches the CLS token attends to most; FoPru
    (Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models", 2024) and
    VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models", CVPR 2025, "dominant" tokens) use the same signal on the vision tower.

    Parameters
    ----------
    attn : Tensor ``[B, H, N, N]`` or ``[B, N, N]``
        Full (square) attention probabilities of one layer.
    cls_index : int
        Position of the CLS token (negative values count from the end).
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens score ``-inf``.

    Returns
    -------
    Tensor ``[B, N]``
        ``mean_h attn[b, h, cls_index, j]``. The CLS token's own entry is its self-attention;
        keep it with ``topk(..., protected=...)`` rather than relying on its score.

    Examples
    --------
    >>> a = torch.tensor([[[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]])
    >>> cls_attention(a)
    tensor([[0.1000, 0.6000, 0.3000]])
    """
    attn = check_attention(attn, square=True)
    b, _, n, _ = attn.shape
    mask = check_mask(mask, b, n)
    _check_int(cls_index, "cls_index", minimum=-n)
    if cls_index >= n:
        raise UniprunerError(f"cls_index={cls_index} is outside the {n}-token sequence")
    scores = _work(attn)[:, :, cls_index, :].mean(dim=1)
    return _masked(scores, mask)


def _query_weights(queries: int | Tensor | None, valid: Tensor) -> Tensor:
    """Row weights ``[B, Q]`` (selected & valid, normalised to sum 1 per row)."""
    b, q = valid.shape
    if queries is None or (isinstance(queries, int) and not isinstance(queries, bool)):
        n_last = 1 if queries is None else queries
        if n_last < 1 or n_last > q:
            raise UniprunerError(
                f"queries={n_last} asks for the last {n_last} query rows but attn has {q}; "
                f"use 1 <= queries <= {q}"
            )
        # the last n_last *valid* rows: rank rows from the end among the valid ones
        from_end = torch.flip(torch.cumsum(torch.flip(valid.long(), [1]), dim=1), [1])
        sel = valid & (from_end <= n_last)
    elif isinstance(queries, Tensor):
        qt = queries.to(valid.device)
        if qt.dtype == torch.bool:
            if qt.ndim == 1:
                qt = qt.unsqueeze(0).expand(b, -1)
            if tuple(qt.shape) != (b, q):
                raise UniprunerError(
                    f"a boolean queries mask must have shape [Q] or [B, Q] = {(b, q)}, "
                    f"got {tuple(queries.shape)}"
                )
            sel = qt & valid
        elif not qt.is_floating_point() and not qt.is_complex():
            if qt.ndim not in (1, 2) or (qt.ndim == 2 and qt.shape[0] != b):
                raise UniprunerError(
                    f"query row indices must be a long tensor [M] or [B, M] (B={b}), "
                    f"got shape {tuple(queries.shape)}"
                )
            if qt.numel() and (int(qt.min()) < -q or int(qt.max()) >= q):
                raise UniprunerError(
                    f"query row indices must lie in [-{q}, {q}), got {qt.tolist()}"
                )
            qt = qt.long() % q if q > 0 else qt.long()
            if qt.ndim == 1:
                qt = qt.unsqueeze(0).expand(b, -1)
            sel = torch.zeros(b, q, dtype=torch.bool, device=valid.device)
            sel = sel.scatter(1, qt, True) & valid
        else:
            raise UniprunerError(
                f"queries must be None, an int, a long tensor of row indices or a bool mask, "
                f"got dtype {qt.dtype}"
            )
    else:
        raise UniprunerError(
            f"queries must be None, an int, a long tensor of row indices or a bool mask, "
            f"got {type(queries).__name__}"
        )
    count = sel.sum(dim=1)
    if bool((count == 0).any()):
        rows = torch.nonzero(count == 0).flatten().tolist()
        raise UniprunerError(
            f"queries selects no (valid) query row for batch element(s) {rows}; "
            "every sequence needs at least one query row"
        )
    return sel.to(torch.float64) / count.unsqueeze(1).to(torch.float64)


def query_attention(attn: Tensor, *, queries: int | Tensor | None = None,
                    mask: Tensor | None = None) -> Tensor:
    """Attention that chosen query rows pay to each key, averaged over heads and rows.

    * ``queries=None``: the last query row only — FastV (Chen et al., "An Image is Worth 1/2
      Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large Vision-Language
      Models", ECCV 2024) and TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024).
    * ``queries=n`` (int): the last ``n`` rows.
    * a long tensor of row indices (``[M]`` or ``[B, M]``) or a bool mask (``[Q]`` or
      ``[B, Q]``): text-to-token attention from the selected text tokens — SparseVLM (Zhang et
      al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
      Inference", 2024).

    Parameters
    ----------
    attn : Tensor ``[B, H, Q, N]`` or ``[B, Q, N]`` with ``Q <= N``
        Attention rows; row ``i`` is the query at position ``N - Q + i`` (a full map has
        ``Q = N``).
    queries : None, int or Tensor
        Which rows to average (indices refer to the ``Q`` rows of ``attn``).
    mask : Tensor ``[B, N]``, optional
        Validity mask. Masked keys score ``-inf``; query rows at masked positions never count
        (so with right padding "the last row" is the last *real* token's row). A sequence left
        with no selected valid row is an error.

    Returns
    -------
    Tensor ``[B, N]``

    Examples
    --------
    >>> a = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])  # Q=2 rows over N=3 keys
    >>> query_attention(a)
    tensor([[0.2000, 0.3000, 0.5000]])
    >>> query_attention(a, queries=2)
    tensor([[0.3500, 0.4000, 0.2500]])
    """
    attn = check_attention(attn)
    b, _, q, n = attn.shape
    if q > n:
        raise UniprunerError(f"attn has {q} query rows for {n} keys; the rows must be at most N")
    mask = check_mask(mask, b, n)
    valid = _query_row_validity(mask, b, q, n, attn.device)
    w = _query_weights(queries, valid)
    a = _work(attn)
    scores = torch.einsum("bhqn,bq->bn", a, w.to(a.dtype)) / attn.shape[1]
    return _masked(scores, mask)


def accumulated_attention(attn: Tensor, *, normalize: bool = False,
                          mask: Tensor | None = None) -> Tensor:
    """Accumulated attention each key received (column sums), averaged over heads.

    H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", NeurIPS 2023) keeps the "heavy hitters": the keys with the largest sum of
    attention over all query rows of the causal map.

    In a causal map early keys are summed over more rows than late ones, which biases the plain
    sum towards the start. ``normalize=True`` follows kvpress's observed-attention variant and
    divides key ``j``'s sum by the number of (valid) query rows that can attend to it, i.e. the
    rows at positions ``>= j``: ``N - j`` for a full ``N x N`` causal map, and in general
    ``#{i valid : N - Q + i >= j}`` when the ``Q`` rows are the last ``Q`` positions. This makes
    the score the *average* attention a key received while visible. It assumes a causal map;
    keys no valid row can see score 0.

    Parameters
    ----------
    attn : Tensor ``[B, H, Q, N]`` or ``[B, Q, N]`` with ``Q <= N``
        Attention probabilities; row ``i`` is the query at position ``N - Q + i``.
    normalize : bool
        Divide by the number of query rows that can attend to each key (see above).
    mask : Tensor ``[B, N]``, optional
        Validity mask. Masked keys score ``-inf``; rows of masked queries are not summed.

    Returns
    -------
    Tensor ``[B, N]``

    Examples
    --------
    >>> a = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]])
    >>> accumulated_attention(a)
    tensor([[1.7000, 0.7000, 0.6000]])
    >>> accumulated_attention(a, normalize=True)
    tensor([[0.5667, 0.3500, 0.6000]])
    """
    attn = check_attention(attn)
    b, h, q, n = attn.shape
    if q > n:
        raise UniprunerError(f"attn has {q} query rows for {n} keys; the rows must be at most N")
    mask = check_mask(mask, b, n)
    valid = _query_row_validity(mask, b, q, n, attn.device)
    a = _work(attn)
    scores = torch.einsum("bhqn,bq->bn", a, valid.to(a.dtype)) / h
    if normalize:
        # valid query positions laid out over the N positions, then "how many at >= j"
        at_pos = torch.zeros(b, n, dtype=torch.long, device=attn.device)
        at_pos[:, n - q:] = valid.long()
        count = torch.flip(torch.cumsum(torch.flip(at_pos, [1]), dim=1), [1])
        scores = scores / count.clamp(min=1).to(scores.dtype)
    return _masked(scores, mask)


def group_heads(attn: Tensor, n_kv_heads: int) -> Tensor:
    """Average the query heads that share a KV head (grouped-query attention).

    Heads are grouped as Hugging Face's ``repeat_kv`` lays them out: query head ``h`` uses KV
    head ``h // (H // n_kv_heads)``. SnapKV (Li et al., NeurIPS 2024) as implemented for GQA
    models averages the group's scores so each KV head keeps one set of positions.

    Parameters
    ----------
    attn : Tensor ``[B, H, Q, N]`` (or ``[B, Q, N]``, one head)
    n_kv_heads : int
        Number of KV heads; must divide ``H``.

    Returns
    -------
    Tensor ``[B, n_kv_heads, Q, N]``

    Examples
    --------
    >>> a = torch.arange(4.0).reshape(1, 4, 1, 1)
    >>> group_heads(a, 2).flatten().tolist()
    [0.5, 2.5]
    """
    attn = check_attention(attn)
    b, h, q, n = attn.shape
    _check_int(n_kv_heads, "n_kv_heads", minimum=1)
    if h % n_kv_heads != 0:
        raise UniprunerError(
            f"n_kv_heads={n_kv_heads} must divide the number of attention heads ({h})"
        )
    return attn.reshape(b, n_kv_heads, h // n_kv_heads, q, n).mean(dim=2)


def window_attention(queries: Tensor, keys: Tensor, *, scale: float | None = None,
                     causal: bool = True, key_mask: Tensor | None = None) -> Tensor:
    """Attention probabilities of the last ``Q`` queries over ``N`` keys.

    ``softmax(q k^T * scale)`` where query ``i`` sits at position ``N - Q + i``; with
    ``causal=True`` it cannot see keys after its own position. This is how adapters obtain the
    few attention rows SnapKV / FastV / H2O need from the layer's (post-RoPE) queries and keys
    while the model itself runs SDPA or flash attention. The softmax is computed in at least
    float32.

    Grouped-query attention: pass ``queries [B, H, Q, D]`` and ``keys [B, H_kv, N, D]`` with
    ``H`` a multiple of ``H_kv``; each KV head is repeated ``H / H_kv`` times along the head
    dimension (query head ``h`` uses KV head ``h // (H / H_kv)``, as Hugging Face's
    ``repeat_kv``), and the result has ``H`` heads. Use :func:`group_heads` to average back.

    Parameters
    ----------
    queries : Tensor ``[..., Q, D]``
    keys : Tensor ``[..., N, D]`` with ``N >= Q``; leading dims broadcast with the queries'
        (after the GQA repeat of dim ``-3``).
    scale : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    causal : bool
        Hide keys after each query's position.
    key_mask : Tensor ``[B, N]`` or ``[..., N]``, optional
        Keys that exist (False = padding, never attended). A row that can see no key is all 0.

    Returns
    -------
    Tensor ``[..., Q, N]``

    Examples
    --------
    >>> q = torch.zeros(1, 1, 2, 4)
    >>> k = torch.randn(1, 1, 3, 4)
    >>> window_attention(q, k)
    tensor([[[[0.5000, 0.5000, 0.0000],
              [0.3333, 0.3333, 0.3333]]]])
    """
    q = _check_float_tensor(queries, "queries", min_ndim=2, shape_doc="[..., Q, D]")
    k = _check_float_tensor(keys, "keys", min_ndim=2, shape_doc="[..., N, D]")
    if q.ndim != k.ndim:
        raise UniprunerError(
            f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must have the same number of dims"
        )
    if q.shape[-1] != k.shape[-1]:
        raise UniprunerError(
            f"queries have head dim {q.shape[-1]} but keys have {k.shape[-1]}; they must match"
        )
    nq, n, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if nq < 1 or n < 1:
        raise UniprunerError(f"need at least one query and one key, got Q={nq}, N={n}")
    if nq > n:
        raise UniprunerError(
            f"{nq} queries but only {n} keys; the queries are the last Q of the N positions"
        )
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        hq, hk = q.shape[-3], k.shape[-3]
        if hk == 0 or hq % hk != 0:
            raise UniprunerError(
                f"queries have {hq} heads and keys {hk}: for grouped-query attention the number of "
                "query heads must be a multiple of the number of KV heads"
            )
        k = k.repeat_interleave(hq // hk, dim=-3)
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except RuntimeError as err:
        raise UniprunerError(
            f"queries {tuple(q.shape)} and keys {tuple(k.shape)} have incompatible leading dims"
        ) from err
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
        math.isfinite(float(scale)) and float(scale) > 0
    ):
        raise UniprunerError(f"scale must be a positive finite number, got {scale!r}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    logits = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * float(scale)
    visible = torch.ones(nq, n, dtype=torch.bool, device=q.device)
    if causal:
        pos = torch.arange(n - nq, n, device=q.device).unsqueeze(1)
        visible = torch.arange(n, device=q.device).unsqueeze(0) <= pos
    km = _broadcast_mask(key_mask, tuple(lead), n, "key_mask")
    if km is not None:
        visible = visible & km.to(q.device).unsqueeze(-2)
    logits = logits.masked_fill(~visible, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.where(visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))


def snapkv(attn: Tensor, *, window: int = 32, kernel: int = 5, pool: str = "avg",
           reduce: str = "sum", mask: Tensor | None = None) -> Tensor:
    """SnapKV scores: the observation window's attention to each key, pooled along the keys.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.
    The last ``window`` queries of the prompt (the observation window) vote for the prefix
    keys: per key, the sum (or mean) of their attention; the votes are smoothed with a 1-D
    pooling of width ``kernel`` along the keys (stride 1, zero "same" padding, average pooling
    divides by ``kernel`` at the edges too, like ``avg_pool1d(count_include_pad=True)``) so a
    selected key brings its neighbours; the window's own keys score ``+inf`` (always kept).
    Pooling runs over the prefix keys only (the window keys are not part of the vote).

    Leading dims are preserved, so per-KV-head selection is ``snapkv(group_heads(a, H_kv))``
    → ``[B, H_kv, N]``; average over heads first for one selection per sequence.

    Parameters
    ----------
    attn : Tensor ``[..., Q, N]``
        Attention of the window queries (the last ``Q`` positions of the ``N`` keys), e.g. from
        :func:`window_attention`. If ``Q > window`` only the last ``window`` rows are used.
    window : int
        Observation window size (32–64 in the paper).
    kernel : int
        Pooling width, odd (``1`` disables pooling).
    pool : {"avg", "max"}
    reduce : {"sum", "mean"}
        How the window's rows are combined.
    mask : Tensor ``[B, N]`` or ``[..., N]``, optional
        Validity mask (e.g. left padding); masked keys vote 0 in the pooling and score ``-inf``.

    Returns
    -------
    Tensor ``[..., N]``

    Examples
    --------
    >>> a = torch.tensor([[0.6, 0.1, 0.1, 0.2, 0.0], [0.1, 0.5, 0.1, 0.1, 0.2]])
    >>> snapkv(a, window=2, kernel=1)
    tensor([0.7000, 0.6000, 0.2000,    inf,    inf])
    >>> snapkv(a, window=2, kernel=3, pool="max")
    tensor([0.7000, 0.7000, 0.6000,    inf,    inf])
    """
    a = _check_float_tensor(attn, "attn", min_ndim=2, shape_doc="[..., Q, N]")
    _check_int(window, "window", minimum=1)
    _check_int(kernel, "kernel", minimum=1)
    if kernel % 2 == 0:
        raise UniprunerError(f"kernel must be odd (same-length pooling), got {kernel}")
    if pool not in ("avg", "max"):
        raise UniprunerError(f"pool must be 'avg' or 'max', got {pool!r}")
    if reduce not in ("sum", "mean"):
        raise UniprunerError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    q, n = a.shape[-2], a.shape[-1]
    if q < 1 or n < 1:
        raise UniprunerError(
            f"attn must have at least one query row and one key, got {tuple(a.shape)}"
        )
    if q > n:
        raise UniprunerError(f"attn has {q} window rows for {n} keys; the rows must be at most N")
    lead = tuple(a.shape[:-2])
    km = _broadcast_mask(mask, lead, n)
    w = min(q, window)
    rows = _work(a)[..., q - w:, :]
    votes = rows.sum(dim=-2) if reduce == "sum" else rows.mean(dim=-2)
    if km is not None:
        votes = votes.masked_fill(~km.to(votes.device), 0.0)
    m = n - w
    prefix = votes[..., :m]
    if m > 0 and kernel > 1:
        flat = prefix.reshape(-1, 1, m)
        if pool == "avg":
            flat = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
        else:
            padded = F.pad(flat, (kernel // 2, kernel // 2), value=-math.inf)
            flat = padded.unfold(-1, kernel, 1).amax(dim=-1)
        prefix = flat.reshape(*lead, m)
    scores = torch.cat([prefix, torch.full_like(votes[..., m:], math.inf)], dim=-1)
    if km is not None:
        scores = scores.masked_fill(~km.to(scores.device), -math.inf)
    return scores


def value_aware(scores: Tensor, values: Tensor, *, p: int = 1) -> Tensor:
    """Scale attention scores by the norm of each token's value vector.

    VATP (Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV
    Cache Reduction: Value Also Matters", EMNLP 2024): ``score_j * ||v_j||_p`` (``p = 1`` in
    the paper). The paper also always keeps the first attention-sink tokens, whose values are
    tiny; that is not part of this score — pass ``protected=n_sink`` to the selector.
    Infinite scores (``-inf`` padding, ``+inf`` protected windows) are passed through
    unchanged.

    Parameters
    ----------
    scores : Tensor ``[..., N]``
        E.g. :func:`accumulated_attention` ``[B, N]`` or per-KV-head scores ``[B, H_kv, N]``.
    values : Tensor ``[..., N, D]``
        Value vectors with the same leading dims as ``scores``.
    p : int
        Norm order (``>= 1``).

    Returns
    -------
    Tensor ``[..., N]``

    Examples
    --------
    >>> value_aware(torch.tensor([[0.5, 0.25]]), torch.tensor([[[1.0, -1.0], [3.0, 1.0]]]))
    tensor([[1., 1.]])
    """
    s = _check_float_tensor(scores, "scores", min_ndim=1, shape_doc="[..., N]")
    v = _check_float_tensor(values, "values", min_ndim=2, shape_doc="[..., N, D]")
    if tuple(v.shape[:-1]) != tuple(s.shape):
        raise UniprunerError(
            f"values {tuple(v.shape)} must be scores' shape {tuple(s.shape)} plus a feature dim"
        )
    _check_int(p, "p", minimum=1)
    dtype = torch.promote_types(s.dtype, v.dtype)
    norm = torch.linalg.vector_norm(_work(v), ord=p, dim=-1).to(dtype)
    out = _work(s).to(norm.dtype) * norm
    return torch.where(torch.isinf(s), s.to(out.dtype), out)


# ----------------------------------------------------------------------------- attention-free


def key_norm(keys: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Negative L2 norm of each key: low-norm keys are kept.

    KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024) observed that keys with a small L2 norm attract high attention.

    Parameters
    ----------
    keys : Tensor ``[..., N, D]``
        E.g. ``[B, H_kv, N, D]`` (per-KV-head scores) or head-averaged ``[B, N, D]``.
    mask : Tensor ``[B, N]`` or ``[..., N]``, optional
        Masked keys score ``-inf``.

    Returns
    -------
    Tensor ``[..., N]`` = ``-||k_j||_2``.

    Examples
    --------
    >>> key_norm(torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]))
    tensor([[-5., -1.]])
    """
    k = _check_float_tensor(keys, "keys", min_ndim=2, shape_doc="[..., N, D]")
    km = _broadcast_mask(mask, tuple(k.shape[:-2]), k.shape[-2])
    scores = -torch.linalg.vector_norm(_work(k), dim=-1)
    return _masked(scores, km)


def hidden_norm(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """L2 norm of each token's hidden state (higher = keep).

    A cheap attention-free saliency signal: tokens whose residual stream carries more energy
    are usually the informative ones (massive activations / outlier tokens aside, which the
    selector can protect).

    Parameters
    ----------
    hidden : Tensor ``[B, N, D]``
    mask : Tensor ``[B, N]``, optional

    Returns
    -------
    Tensor ``[B, N]``

    Examples
    --------
    >>> hidden_norm(torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]))
    tensor([[5., 1.]])
    """
    x = check_tokens(hidden, "hidden")
    check_finite(x, "hidden")
    mask = check_mask(mask, x.shape[0], x.shape[1])
    return _masked(torch.linalg.vector_norm(_work(x), dim=-1), mask)


def token_transition(before: Tensor, after: Tensor, *, mode: str = "magnitude",
                     mask: Tensor | None = None) -> Tensor:
    """How much each token's hidden state changed between two layers (Token Transition Variation).

    TransPrune (Li et al., "TransPrune: Token Transition Pruning for Efficient Large
    Vision-Language Model", arXiv 2507.20630, 2025) ranks visual tokens by how much their
    representation moves through the model, combining a magnitude change and a direction
    change. Our variant (per pair of states ``h = before``, ``h' = after``):

    * ``"magnitude"``: ``||h' - h||_2 / ||h||_2`` — the relative size of the update (the paper
      measures the change of the vector's length; the relative update norm also counts
      rotations and is scale-free across layers);
    * ``"direction"``: ``1 - cos(h, h')``;
    * ``"both"``: the product of the two.

    The paper accumulates TTV over several middle layers; sum this score over layer pairs to
    do the same.

    Parameters
    ----------
    before, after : Tensor ``[B, N, D]``
    mode : {"magnitude", "direction", "both"}
    mask : Tensor ``[B, N]``, optional

    Returns
    -------
    Tensor ``[B, N]``

    Examples
    --------
    >>> h0 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    >>> h1 = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    >>> token_transition(h0, h1, mode="direction")
    tensor([[0., 1.]])
    """
    h0 = check_tokens(before, "before")
    h1 = check_tokens(after, "after")
    if h0.shape != h1.shape:
        raise UniprunerError(
            f"before {tuple(h0.shape)} and after {tuple(h1.shape)} must have the same shape"
        )
    check_finite(h0, "before")
    check_finite(h1, "after")
    if mode not in ("magnitude", "direction", "both"):
        raise UniprunerError(f"mode must be 'magnitude', 'direction' or 'both', got {mode!r}")
    mask = check_mask(mask, h0.shape[0], h0.shape[1])
    h0, h1 = _work(h0), _work(h1)
    mag = torch.linalg.vector_norm(h1 - h0, dim=-1) / torch.linalg.vector_norm(h0, dim=-1).clamp(
        min=_EPS
    )
    direction = 1.0 - (l2_normalize(h0) * l2_normalize(h1)).sum(dim=-1)
    scores = mag if mode == "magnitude" else direction if mode == "direction" else mag * direction
    return _masked(scores, mask)


def positional(batch: int, n: int, *, n_sink: int = 4, mask: Tensor | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """StreamingLLM scores: attention sinks first, then the most recent tokens.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024: keep
    the first ``n_sink`` tokens and a window of the most recent ones. As a score: the first
    ``n_sink`` *valid* tokens get ``+inf`` and every other valid token scores its rank among the
    valid tokens (0, 1, 2, ...), so ``topk(scores, K)`` keeps the sinks and the ``K - n_sink``
    most recent tokens. With a mask (e.g. left padding) sinks and recency count valid positions
    only; masked positions score ``-inf``. (The paper also re-assigns contiguous positions
    inside the cache; that is the KV adapter's business.)

    Parameters
    ----------
    batch, n : int
        Output shape ``[batch, n]``.
    n_sink : int
        Number of sink tokens (4 in the paper; 0 = pure recency).
    mask : Tensor ``[batch, n]``, optional
    device : torch.device, optional
        Defaults to the mask's device (or CPU).

    Returns
    -------
    Tensor ``[batch, n]`` float32

    Examples
    --------
    >>> positional(1, 6, n_sink=2)
    tensor([[inf, inf, 2., 3., 4., 5.]])
    >>> positional(1, 5, n_sink=1, mask=torch.tensor([[False, True, True, True, True]]))
    tensor([[-inf, inf, 1., 2., 3.]])
    """
    _check_int(batch, "batch", minimum=0)
    _check_int(n, "n", minimum=1)
    _check_int(n_sink, "n_sink", minimum=0)
    mask = check_mask(mask, batch, n)
    if device is None:
        device = mask.device if mask is not None else torch.device("cpu")
    if mask is None:
        rank = torch.arange(n, device=device).unsqueeze(0).expand(batch, n)
    else:
        mask = mask.to(device)
        rank = torch.cumsum(mask.long(), dim=1) - 1
    scores = rank.to(torch.float32)
    scores = scores.masked_fill(rank < n_sink, math.inf)
    return _masked(scores, mask)


def idf_table(documents: Sequence[Sequence[int] | Tensor],
              vocab_size: int) -> tuple[Tensor, int]:
    """Document frequencies of every token id over a collection.

    Parameters
    ----------
    documents : list of list[int] or list of 1-D integer tensors
        Token ids per document (repeats within a document count once).
    vocab_size : int
        Size ``V`` of the id space; every id must lie in ``[0, V)``.

    Returns
    -------
    (doc_freq, n_docs) : (LongTensor ``[V]``, int)
        ``doc_freq[t]`` = number of documents containing ``t``; ``n_docs`` = ``len(documents)``.

    Examples
    --------
    >>> df, n_docs = idf_table([[1, 2, 2], [2, 3], []], vocab_size=5)
    >>> df.tolist(), n_docs
    ([0, 1, 2, 1, 0], 3)
    """
    _check_int(vocab_size, "vocab_size", minimum=1)
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise UniprunerError(
            "documents must be a list of token-id lists or 1-D tensors, "
            f"got {type(documents).__name__}"
        )
    n_docs = len(documents)
    if n_docs == 0:
        raise UniprunerError("idf_table needs at least one document")
    parts: list[Tensor] = []
    for i, doc in enumerate(documents):  # input conversion only: one tensor per document
        t = doc if isinstance(doc, Tensor) else torch.as_tensor(list(doc), dtype=torch.long)
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise UniprunerError(
                f"document {i} must be a 1-D sequence of integer token ids, got "
                f"{t.dtype} of shape {tuple(t.shape)}"
            )
        parts.append(t.long().cpu())
    lengths = torch.tensor([len(t) for t in parts], dtype=torch.long)
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise UniprunerError(
            f"token ids must lie in [0, vocab_size={vocab_size}), got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    doc_of = torch.repeat_interleave(torch.arange(n_docs), lengths)
    pairs = torch.unique(doc_of * vocab_size + ids)
    doc_freq = torch.bincount(pairs % vocab_size, minlength=vocab_size)
    return doc_freq, n_docs


def idf(token_ids: Tensor, doc_freq: Tensor, n_docs: int, *, mask: Tensor | None = None) -> Tensor:
    """Inverse document frequency of each token (rare tokens are kept).

    Lassance et al., "A Study on Token Pruning for ColBERT", arXiv 2112.06540, 2021, prune a
    ColBERT index by keeping each document's highest-IDF tokens. We use BM25's IDF (Robertson &
    Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009) with Lucene's
    ``+ 1`` so it is never negative::

        idf(t) = log((n_docs - df(t) + 0.5) / (df(t) + 0.5) + 1)

    Parameters
    ----------
    token_ids : Tensor ``[B, N]`` integer
    doc_freq : Tensor ``[V]`` integer
        From :func:`idf_table`.
    n_docs : int
        Number of documents in the collection (``>= max(doc_freq)``).
    mask : Tensor ``[B, N]``, optional
        Masked positions score ``-inf`` (their ids are ignored, e.g. ``-1`` padding).

    Returns
    -------
    Tensor ``[B, N]`` float32

    Examples
    --------
    >>> df, nd = idf_table([[1, 2], [2, 3], [2]], vocab_size=4)
    >>> idf(torch.tensor([[2, 1]]), df, nd)
    tensor([[0.1335, 0.9808]])
    """
    _check_ids(token_ids)
    if not isinstance(doc_freq, Tensor) or doc_freq.ndim != 1 or doc_freq.is_floating_point():
        raise UniprunerError("doc_freq must be an integer tensor [V] (see idf_table)")
    _check_int(n_docs, "n_docs", minimum=1)
    v = doc_freq.shape[0]
    if v and (int(doc_freq.min()) < 0 or int(doc_freq.max()) > n_docs):
        raise UniprunerError(
            f"doc_freq must lie in [0, n_docs={n_docs}], got range "
            f"[{int(doc_freq.min())}, {int(doc_freq.max())}]"
        )
    b, n = token_ids.shape
    mask = check_mask(mask, b, n)
    ids = token_ids.long()
    if mask is not None:
        ids = ids.masked_fill(~mask.to(ids.device), 0)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise UniprunerError(
            f"token ids must lie in [0, {v}) (the doc_freq table's vocabulary), got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    table = doc_freq.to(ids.device, torch.float64)
    table = torch.log((n_docs - table + 0.5) / (table + 0.5) + 1.0).to(torch.float32)
    return _masked(table[ids], mask)


def stopword_mask(token_ids: Tensor, stop_ids: Tensor | Sequence[int]) -> Tensor:
    """``True`` where a token is a stopword or punctuation (ids in ``stop_ids``).

    ColBERT pruning (Lassance et al., 2021) drops stopwords and punctuation first; combine
    with a score as ``scores.masked_fill(stopword_mask(ids, stop), -inf)`` or pass
    ``mask & ~stopword_mask(...)`` to the selector.

    Parameters
    ----------
    token_ids : Tensor ``[B, N]`` integer
    stop_ids : Tensor or sequence of int

    Returns
    -------
    Tensor ``[B, N]`` bool

    Examples
    --------
    >>> stopword_mask(torch.tensor([[5, 1, 7]]), [1, 7])
    tensor([[False,  True,  True]])
    """
    _check_ids(token_ids)
    if isinstance(stop_ids, Tensor):
        stop = stop_ids
    else:
        stop = torch.as_tensor(list(stop_ids), dtype=torch.long)
    if stop.is_floating_point() or stop.dtype == torch.bool:
        raise UniprunerError(f"stop_ids must be integer token ids, got dtype {stop.dtype}")
    return torch.isin(token_ids, stop.to(token_ids.device).reshape(-1).to(token_ids.dtype))


def query_similarity(tokens: Tensor, query: Tensor, *, mask: Tensor | None = None,
                     query_mask: Tensor | None = None) -> Tensor:
    """Cosine similarity of each token to a query (text-guided / RAG pruning).

    Recoverable Compression (Chen et al., "Recoverable Compression: A Multimodal Vision Token
    Recovery Mechanism Guided by Text Information", 2024) scores visual tokens by their
    similarity to the text; RAG context pruning scores passage tokens by similarity to the
    question. With a query *matrix* the score is ColBERT's MaxSim (Khattab & Zaharia, SIGIR
    2020): the best cosine over the query tokens.

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
    query : Tensor ``[B, D]`` or ``[B, M, D]``
    mask : Tensor ``[B, N]``, optional
        Masked tokens score ``-inf``.
    query_mask : Tensor ``[B, M]``, optional
        Valid query tokens (ragged queries); each row needs at least one.

    Returns
    -------
    Tensor ``[B, N]`` in ``[-1, 1]`` (or ``-inf``)

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    >>> query_similarity(x, torch.tensor([[3.0, 0.0]]))
    tensor([[ 1.,  0., -1.]])
    """
    x = check_tokens(tokens, "tokens")
    check_finite(x, "tokens")
    b, n, d = x.shape
    mask = check_mask(mask, b, n)
    qv = _check_float_tensor(query, "query", min_ndim=2, shape_doc="[B, D] or [B, M, D]")
    if qv.ndim == 2:
        qv = qv.unsqueeze(1)
        if query_mask is not None:
            raise UniprunerError("query_mask only applies to a query matrix [B, M, D]")
    if qv.ndim != 3 or qv.shape[0] != b or qv.shape[2] != d:
        raise UniprunerError(
            f"query must have shape [B, D] = {(b, d)} or [B, M, D] = ({b}, M, {d}), "
            f"got {tuple(query.shape)}"
        )
    if qv.shape[1] < 1:
        raise UniprunerError("query has no tokens (M = 0)")
    qm = check_mask(query_mask, b, qv.shape[1], "query_mask")
    dtype = torch.promote_types(_work(x).dtype, _work(qv).dtype)
    sim = cosine_matrix(x.to(dtype), qv.to(dtype))  # [B, N, M]
    if qm is not None:
        if bool((qm.sum(dim=1) == 0).any()):
            raise UniprunerError("query_mask leaves a row with no query token")
        sim = sim.masked_fill(~qm.to(sim.device).unsqueeze(1), -math.inf)
    return _masked(sim.amax(dim=-1), mask)


def random_scores(batch: int, n: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, mask: Tensor | None = None) -> Tensor:
    """Uniform random scores in ``[0, 1)``: the baseline every method must beat.

    Parameters
    ----------
    batch, n : int
        Output shape.
    generator : torch.Generator, optional
        Seeded generator for reproducible draws (its device is used when ``device`` is None).
    device : torch.device, optional
    mask : Tensor ``[batch, n]``, optional
        Masked positions score ``-inf``.

    Returns
    -------
    Tensor ``[batch, n]`` float32

    Examples
    --------
    >>> g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    >>> bool(torch.equal(random_scores(2, 3, generator=g1), random_scores(2, 3, generator=g2)))
    True
    """
    _check_int(batch, "batch", minimum=0)
    _check_int(n, "n", minimum=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise UniprunerError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    mask = check_mask(mask, batch, n)
    if device is None:
        device = generator.device if generator is not None else (
            mask.device if mask is not None else torch.device("cpu")
        )
    scores = torch.rand(batch, n, generator=generator, device=device)
    return _masked(scores, mask)


# ----------------------------------------------------------------------------- static pruning of
# multi-vector documents (ColBERT): position, centroid, stopwords


def leading(batch: int, n: int, *, mask: Tensor | None = None,
            device: torch.device | str | None = None) -> Tensor:
    """First-k scores: earlier tokens score higher (``-position``), so ``topk`` keeps the first k.

    The positional baseline of Lassance et al., "A Study on Token Pruning for ColBERT", 2021
    (keep the first tokens of each document), strong on collections that start with a title.

    Parameters
    ----------
    batch, n : int
        Output shape ``[batch, n]``.
    mask : Tensor ``[batch, n]``, optional
        Masked positions score ``-inf``.
    device : torch.device, optional
        Defaults to the mask's device (or CPU).

    Returns
    -------
    Tensor ``[batch, n]`` float32

    Examples
    --------
    >>> leading(1, 4, mask=torch.tensor([[True, True, True, False]]))
    tensor([[-0., -1., -2., -inf]])
    """
    _check_int(batch, "batch", minimum=0)
    _check_int(n, "n", minimum=1)
    mask = check_mask(mask, batch, n)
    if device is None:
        device = mask.device if mask is not None else torch.device("cpu")
    scores = -torch.arange(n, dtype=torch.float32, device=device).expand(batch, n)
    return _masked(scores.clone(), mask)


def centroid_similarity(tokens: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Cosine similarity of each token to its sequence's centroid (higher = more representative).

    Acquavia et al., "Static Pruning for Multi-Representation Dense Retrieval", DocEng 2023
    (keep the embeddings closest to the document's mean direction): the centroid is the mean of
    the L2-normalised valid tokens, normalised again.

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
    mask : Tensor ``[B, N]``, optional

    Returns
    -------
    Tensor ``[B, N]``

    Examples
    --------
    >>> centroid_similarity(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]))
    tensor([[0.8944, 0.8944, 0.4472]])
    """
    x = check_tokens(tokens, "tokens")
    check_finite(x, "tokens")
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    xn = l2_normalize(_work(x))
    m = (torch.ones(b, n, 1, dtype=xn.dtype, device=xn.device) if mask is None
         else mask.to(xn.device).unsqueeze(2).to(xn.dtype))
    centre = l2_normalize((xn * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1))
    return _masked((xn * centre).sum(dim=2), mask)


def stopword_idf(token_ids: Tensor, doc_freq: Tensor, n_docs: int, stop_ids: Tensor | Sequence[int], *,
                 mask: Tensor | None = None, penalty: float = 1e4) -> Tensor:
    """IDF scores with stopwords and punctuation ranked below every other token.

    Lassance et al., "A Study on Token Pruning for ColBERT", 2021: prune stopwords and
    punctuation first, then the most frequent tokens: ``idf(t) - penalty`` for ``t`` in
    ``stop_ids`` (:func:`stopword_mask`), ``idf(t)`` otherwise (:func:`idf`). ``penalty`` must
    exceed the largest IDF (``log(n_docs + 1.5)``) for stopwords to go first.

    Parameters
    ----------
    token_ids : Tensor ``[B, N]`` integer
    doc_freq : Tensor ``[V]`` integer
    n_docs : int
    stop_ids : Tensor or sequence of int
    mask : Tensor ``[B, N]``, optional
    penalty : float

    Returns
    -------
    Tensor ``[B, N]`` float32

    Examples
    --------
    >>> df, nd = idf_table([[1, 2], [2, 3], [2]], vocab_size=4)
    >>> stopword_idf(torch.tensor([[2, 1]]), df, nd, [1]) < 0
    tensor([[False,  True]])
    """
    s = idf(token_ids, doc_freq, n_docs, mask=mask)
    stop = stopword_mask(token_ids, stop_ids)
    return torch.where(stop, s - penalty, s)


# ----------------------------------------------------------------------------- vision-tower signals


def received_attention(attn: Tensor, *, cls_index: int | None = 0, mask: Tensor | None = None) -> Tensor:
    """Attention each token receives: from the CLS token, or on average over the attending rows.

    The importance signal of the vision-stage VLM methods: VisionZip's dominant tokens (Yang et
    al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025),
    LLaVA-PruMerge's outliers (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for
    Efficient Large Multimodal Models", 2024) and HoloV's crop scores (Zou et al., "Don't Just
    Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention", NeurIPS
    2025) all read the CLS row of a late vision-tower layer. Towers without a CLS token (SigLIP)
    use the mean attention each token receives instead (``cls_index=None``).

    Parameters
    ----------
    attn : Tensor
        One of

        * ``[B, N]``: an importance vector already computed (returned as is, masked);
        * ``[B, H, N, N]`` or ``[B, N, N]``: a full attention map; ``cls_index`` picks the row
          of the CLS token, ``None`` averages the rows of the valid tokens;
        * ``[B, H, Q, N]`` or ``[B, Q, N]`` with ``Q < N``: only the attending rows (e.g. the CLS
          row recomputed from the layer's q/k, ``Q = 1``); ``cls_index`` picks one of the ``Q``
          rows, ``None`` averages all of them.

        Heads are averaged.
    cls_index : int or None
        Row of the CLS query (negative values count from the end); ``None``: mean over rows.
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens score ``-inf`` (and their rows are not averaged).

    Returns
    -------
    Tensor ``[B, N]``

    Examples
    --------
    >>> a = torch.tensor([[[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]])
    >>> received_attention(a)
    tensor([[0.1000, 0.6000, 0.3000]])
    >>> received_attention(a, cls_index=None)
    tensor([[0.2000, 0.3667, 0.4333]])
    """
    if isinstance(attn, Tensor) and attn.ndim == 2:
        vec = _check_float_tensor(attn, "attn", min_ndim=2, shape_doc="[B, N]")
        return _masked(_work(vec), check_mask(mask, vec.shape[0], vec.shape[1]))
    attn = check_attention(attn)
    b, _, q, n = attn.shape
    mask = check_mask(mask, b, n)
    a = _work(attn)
    if cls_index is not None:
        _check_int(cls_index, "cls_index", minimum=-q)
        if cls_index >= q:
            raise UniprunerError(f"cls_index={cls_index} is outside the {q} attention rows")
        return _masked(a[:, :, cls_index, :].mean(dim=1), mask)
    if q == n and mask is not None:
        rows = mask.to(device=a.device, dtype=a.dtype)
    else:
        rows = torch.ones(b, q, dtype=a.dtype, device=a.device)
    w = rows / rows.sum(dim=1, keepdim=True).clamp(min=1)
    return _masked(torch.einsum("bhqn,bq->bn", a, w) / attn.shape[1], mask)


def iqr_outliers(scores: Tensor, *, mask: Tensor | None = None, factor: float = 1.5) -> Tensor:
    """Tokens whose score is an upper outlier of its row: ``score > Q3 + factor * (Q3 - Q1)``.

    LLaVA-PruMerge's adaptive selection (Shang et al., "LLaVA-PruMerge: Adaptive Token
    Reduction for Efficient Large Multimodal Models", 2024): the interquartile-range rule on the
    CLS attention keeps a number of tokens that depends on the image. Quartiles are computed per
    row over the valid tokens with linear interpolation (``numpy.percentile`` / ``torch.quantile``
    default), in float64.

    Parameters
    ----------
    scores : Tensor ``[B, N]``
        Finite at valid positions.
    mask : Tensor ``[B, N]``, optional
        The tokens taking part (valid and, for PruMerge, not protected); others are never outliers.
    factor : float
        The IQR multiple (Tukey's fences: 1.5).

    Returns
    -------
    Tensor ``[B, N]`` bool
        A row with fewer than two tokens, or with no spread above Q3, has no outlier.

    Examples
    --------
    >>> iqr_outliers(torch.tensor([[0.1, 0.1, 0.2, 0.1, 0.9, 0.1, 0.2, 0.1]]))
    tensor([[False, False, False, False,  True, False, False, False]])
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2 or not scores.is_floating_point():
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise UniprunerError(f"scores must be a floating-point tensor [B, N], got {shape}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
        raise UniprunerError(f"factor must be a finite number >= 0, got {factor!r}")
    b, n = scores.shape
    mask = check_mask(mask, b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=scores.device) if mask is None else mask.to(scores.device)
    s = scores.double()
    if bool(torch.isnan(s).any()) or not bool(torch.isfinite(s[valid]).all()):
        raise UniprunerError("scores must be finite at the valid positions")
    count = valid.sum(dim=1, keepdim=True)
    ordered = torch.sort(s.masked_fill(~valid, math.inf), dim=1).values

    def quantile(p: float) -> Tensor:
        pos = (count - 1).clamp(min=0).double() * p
        lo = pos.floor().long()
        hi = pos.ceil().long()
        return torch.lerp(ordered.gather(1, lo), ordered.gather(1, hi), pos - lo.double())

    q1, q3 = quantile(0.25), quantile(0.75)
    bound = q3 + float(factor) * (q3 - q1)
    return valid & (count >= 2) & (s > bound)
