"""What the VLM adapter applies: one or more stages, each a registry method at a place in the model.

:func:`make_settings` validates the keywords of :func:`unipruner.vlm.patch` (and of
:meth:`~unipruner.adapters.vlm.VLMHandle.configure`) into a frozen :class:`VLMSettings`.
A budget (``ratio`` = fraction of the visual tokens that reach a stage **kept** by it, ``keep``
= visual tokens kept, per image or per row) is the method's own :class:`~unipruner.Budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import UniprunerError
from ...methods import REGISTRY, Method, resolve
from ...select import Budget

__all__ = ["POSITIONS", "SIGNALS", "STAGES", "VLM_METHODS", "Stage", "VLMSettings", "make_settings", "stage"]

#: Registry methods the VLM adapter runs: exactly those whose domains include "vlm".
VLM_METHODS: tuple[str, ...] = tuple(sorted(n for n, c in REGISTRY.items() if "vlm" in c.domains))

STAGES = ("vision", "input", "llm")
POSITIONS = ("original", "compact")

#: signals each stage can give a method (besides the tokens themselves)
SIGNALS: dict[str, frozenset[str]] = {
    # the vision tower's features before the projector; the attention each patch receives in the tower's
    # feature layer (CLS row, or mean received attention without CLS) and that layer's keys
    "vision": frozenset({"attn", "keys", "hw"}),
    # projected visual features at the LLM input; the text of the row as a query
    "input": frozenset({"query", "hw"}),
    # hidden states entering decoder layer K; attention rows recomputed from layer K-1's q/k
    "llm": frozenset({"attn", "keys", "query", "hw", "text_queries", "previous", "pivot_tokens"}),
}
_OPTIONAL = frozenset({"keys", "pivot_tokens", "hw"})


@dataclass(frozen=True)
class Stage:
    """One pruning step: a registry method applied to the visual tokens at one place.

    Attributes
    ----------
    method : Method
        The registry method, with its budget (fraction or count of the visual tokens that reach
        this stage that it keeps).
    where : str
        ``"vision"``: on the vision tower's features before the projector, scored with the
        attention each patch receives in the tower's feature layer (VisionZip, PruMerge /
        PruMerge+, HoloV, EViT-style CLS attention; merged there, dropped at the LLM input);
        ``"input"``: on the projected visual tokens entering the language model (DivPrune,
        DART, random, k-center, G-Prune, text-guided similarity); ``"llm"``: on the hidden
        states entering decoder layer ``layer`` (FastV, SparseVLM, DART at layer K, TransPrune,
        H2O / SnapKV-style attention), with attention rows of layer ``layer - 1`` recomputed from
        its queries and keys.
    layer : int or None
        The decoder layer (``where="llm"`` only; ``1 <= layer < n_layers``).
    """

    method: Method
    where: str = "input"
    layer: int | None = None

    @property
    def order(self) -> int:
        """Where the stage runs in the forward pass (input = 0, layer K = K)."""
        return {"vision": -1, "input": 0}.get(self.where, int(self.layer or 0))

    def describe(self) -> str:
        at = {"vision": "on the vision tower's features", "input": "at the LLM input"}.get(
            self.where, f"before decoder layer {self.layer}")
        return f"{self.method.name} ({self.method.budget!r}) {at}"


@dataclass(frozen=True)
class VLMSettings:
    """The handle's settings: stages in forward order, positions, how budgets split over images."""

    stages: tuple[Stage, ...]
    positions: str = "original"
    per_image: bool = True


def _check_ratio(ratio: Any) -> None:
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0.0 < float(ratio) <= 1.0):
        raise UniprunerError(
            f"ratio is the fraction of the visual tokens kept (as everywhere in unipruner) and must be in (0, 1], "
            f"got {ratio!r}"
        )


def stage(method: str | Method, where: str = "input", *, keep: int | None = None, ratio: float | None = None,
          budget: Budget | None = None, layer: int | None = None, **params: Any) -> Stage:
    """Build one :class:`Stage` (validated): ``stage("fastv", "llm", layer=2, keep=64)``.

    ``keep`` counts visual tokens (per image by default, see ``per_image`` of :func:`patch`);
    ``ratio`` is the fraction of the visual tokens reaching the stage that it keeps.
    """
    _check_ratio(ratio)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise UniprunerError(f"keep is the number of visual tokens kept and must be an int >= 1, got {keep!r}")
    if where not in STAGES:
        raise UniprunerError(f"stage must be one of {STAGES}, got {where!r}")
    m = resolve(method, budget, ratio=ratio, keep=keep,
                hint="keep= (visual tokens kept, e.g. 64 of 576) or ratio= (fraction kept)", **params)
    if "vlm" not in m.domains:
        raise UniprunerError(
            f"method {m.name!r} does not serve the vlm domain (its domains: {', '.join(m.domains)}); "
            f"unipruner.vlm runs: {', '.join(VLM_METHODS)}"
        )
    needs = set(m.requires) - _OPTIONAL
    missing = sorted(needs - SIGNALS[where])
    if missing:
        can = sorted(s for s, sig in SIGNALS.items() if needs <= sig)
        raise UniprunerError(
            f"method {m.name!r} needs {missing}, which stage={where!r} does not have"
            + (f"; run it at stage={can[0]!r}" + (", layer=K" if can[0] == "llm" else "") if can else "")
        )
    if where == "llm":
        if layer is None or isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise UniprunerError(
                f"stage='llm' needs layer=K >= 1 (prune the hidden states entering decoder layer K, scored "
                f"with layer K-1's attention), got {layer!r}; for pruning before the first layer use stage='input'"
            )
    elif layer is not None:
        raise UniprunerError(f"layer= applies to stage='llm' only (got stage={where!r}, layer={layer})")
    return Stage(m, where, layer)


def make_settings(method: str | Method | Stage | Sequence[Stage], *, keep: int | None = None,
                  ratio: float | None = None, budget: Budget | None = None, stage_: str = "input",
                  layer: int | None = None, positions: str = "original", per_image: bool = True,
                  **params: Any) -> VLMSettings:
    """Validate :func:`patch`'s keywords into :class:`VLMSettings` (see there)."""
    if isinstance(method, Stage):
        stages: tuple[Stage, ...] = (method,)
    elif isinstance(method, (list, tuple)):
        if not method or not all(isinstance(s, Stage) for s in method):
            raise UniprunerError("a schedule is a non-empty list of unipruner.vlm.stage(...) values")
        stages = tuple(method)
    else:
        if not isinstance(method, (str, Method)):
            raise UniprunerError(f"method must be a registry name, a Method, a stage or a list of stages, got "
                                 f"{type(method).__name__}")
        stages = (stage(method, stage_, keep=keep, ratio=ratio, budget=budget, layer=layer, **params),)
    budgets = (keep, ratio, budget, layer)
    if isinstance(method, (Stage, list, tuple)) and (params or any(x is not None for x in budgets)):
        raise UniprunerError("with a schedule of stages, give budgets and parameters inside each stage(...)")
    stages = tuple(sorted(stages, key=lambda s: s.order))
    orders = [s.order for s in stages]
    if len(set(orders)) != len(orders):
        raise UniprunerError(f"two stages at the same place ({orders}); combine them into one method per place")
    if positions not in POSITIONS:
        raise UniprunerError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "compact" and any(s.where == "llm" for s in stages):
        raise UniprunerError(
            "positions='compact' renumbers the sequence entering the language model (stage='input'); in-LLM "
            "pruning keeps the original positions, which the layers before K have already used"
        )
    if not isinstance(per_image, bool):
        raise UniprunerError(f"per_image must be True or False, got {per_image!r}")
    if not per_image and any(s.where == "vision" for s in stages):
        raise UniprunerError("stage='vision' works image by image (the tower sees one image at a time): "
                             "use per_image=True")
    return VLMSettings(stages, positions, per_image)
