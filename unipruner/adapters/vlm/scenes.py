"""Synthetic shape scenes and one-word questions for the VLM fixture model.

The fixture model (``unipruner/data/vlm_fixture``, trained by ``scripts/train_vlm_fixture.py``) is a
small LLaVA-architecture model (Liu et al., *Visual Instruction Tuning*, 2023) that answers questions
about these scenes. A scene is a plain canvas (336 x 336 px, the CLIP ViT-L/14-336 input, so a
patch-14 tower sees 24 x 24 = 576 patches) divided into a 3 x 3 grid of cells; some cells hold one
small coloured shape each (about 3-4 patches across, placed anywhere inside its cell), so most
answers depend on a small region of the image -- which is what visual-token pruning (FastV,
VisionZip, DART, DivPrune, ...) has to keep.

Questions (one-word answers; ``QA.kind`` names the type):

========== ===================================================== ==========================
kind       question                                              answer
========== ===================================================== ==========================
color_at   ``what color is the shape in the top left ?``          a colour
shape_at   ``what shape is in the bottom right ?``                a shape kind
count      ``how many blue shapes are there ?``                   ``0`` ... ``6``
exists     ``is there a green triangle ?``                        ``yes`` / ``no``
left_of    ``what color is the shape left of the red circle ?``   a colour (the shape in the
                                                                 cell just left of it)
========== ===================================================== ==========================

Everything is drawn from an explicit seed (:class:`numpy.random.Generator`), never from a global
random state, so the training stream (:data:`TRAIN_SEED`) and the held-out split
(:data:`HELDOUT_SEED`) are reproducible and disjoint by construction.

Examples
--------
>>> import numpy as np
>>> s = make_scene(np.random.default_rng(0))
>>> draw(s).size
(336, 336)
>>> a = samples(HELDOUT_SEED, 3)
>>> [x.question for x in a] == [x.question for x in samples(HELDOUT_SEED, 3)]
True
>>> all(len(x.answer.split()) == 1 for x in a)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ...errors import UniprunerError

__all__ = [
    "BACKGROUND",
    "CANVAS",
    "COLORS",
    "GRID",
    "HELDOUT_SEED",
    "KINDS",
    "POSITIONS",
    "PROMPT",
    "QA",
    "QUESTION_KINDS",
    "TRAIN_SEED",
    "Sample",
    "Scene",
    "Shape",
    "draw",
    "make_scene",
    "prompt",
    "questions",
    "samples",
    "vocabulary",
]

CANVAS = 336
"""Side of the square canvas in pixels (CLIP ViT-L/14-336: 24 x 24 patches of 14 px)."""
GRID = 3
"""The canvas is a GRID x GRID grid of cells; a cell holds at most one shape."""
BACKGROUND = (235, 235, 235)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
KINDS = ("circle", "square", "triangle")
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
"""Cell ``(row, col)`` -> the words naming it in questions."""
QUESTION_KINDS = ("color_at", "shape_at", "count", "exists", "left_of")
TRAIN_SEED = 0
"""Seed of the training stream (``scripts/train_vlm_fixture.py``)."""
HELDOUT_SEED = 1_000_003
"""Seed of the held-out evaluation split (the fixture's accuracy, the tests, the benchmarks)."""
PROMPT = "USER: <image>\n{question} ASSISTANT:"
"""The fixture's prompt template (LLaVA-1.5 style); the answer is the next word."""

_MIN_SHAPES, _MAX_SHAPES = 3, 6
_MIN_SIZE, _MAX_SIZE = 40, 56  # shape side / diameter in pixels (about 3-4 patches of 14 px)


@dataclass(frozen=True)
class Shape:
    """One shape: colour name, kind, grid cell ``(row, col)`` and pixel box ``(x0, y0, x1, y1)``."""

    color: str
    kind: str
    cell: tuple[int, int]
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """A canvas with shapes, at most one per grid cell (sorted by cell)."""

    shapes: tuple[Shape, ...]

    def at(self, cell: tuple[int, int]) -> Shape | None:
        """The shape in ``cell``, or None when the cell is empty."""
        for s in self.shapes:
            if s.cell == cell:
                return s
        return None


class QA(NamedTuple):
    """A question, its one-word answer and its kind (one of :data:`QUESTION_KINDS`)."""

    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Sample:
    """One evaluation item: the drawn image, a question about it, the answer, the scene and the kind."""

    image: Image.Image
    question: str
    answer: str
    scene: Scene
    kind: str


def make_scene(rng: np.random.Generator, max_shapes: int = _MAX_SHAPES) -> Scene:
    """Draw a random scene: 3-6 shapes in distinct cells, random colour, kind, size and offset.

    Parameters
    ----------
    rng
        The generator every random choice comes from (the caller owns the seed).
    max_shapes
        At most this many shapes (1-9; the count is uniform in ``[min(3, max_shapes), max_shapes]``);
        the training script's curriculum starts with fewer.

    Returns
    -------
    Scene
        Shapes sorted by cell, each fully inside its cell.
    """
    if not isinstance(rng, np.random.Generator):
        raise UniprunerError(f"make_scene needs a numpy.random.Generator, got {type(rng).__name__}")
    if not 1 <= max_shapes <= GRID * GRID:
        raise UniprunerError(f"make_scene needs 1 <= max_shapes <= {GRID * GRID}, got {max_shapes}")
    n = int(rng.integers(min(_MIN_SHAPES, max_shapes), max_shapes + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))
    colors = list(COLORS)
    step = CANVAS // GRID
    shapes = []
    for c in cells:
        row, col = divmod(c, GRID)
        size = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
        x0 = col * step + int(rng.integers(4, step - size - 4 + 1))
        y0 = row * step + int(rng.integers(4, step - size - 4 + 1))
        shapes.append(Shape(color=colors[int(rng.integers(len(colors)))], kind=KINDS[int(rng.integers(len(KINDS)))],
                            cell=(row, col), bbox=(x0, y0, x0 + size, y0 + size)))
    return Scene(shapes=tuple(shapes))


def draw(scene: Scene) -> Image.Image:
    """Render ``scene`` as an RGB :class:`PIL.Image.Image` of ``CANVAS x CANVAS`` pixels (about 1 ms)."""
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.bbox
        fill = COLORS[s.color]
        if s.kind == "circle":
            d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.kind == "square":
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.kind == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            raise UniprunerError(f"unknown shape kind {s.kind!r}; known: {list(KINDS)}")
    return img


def questions(scene: Scene, rng: np.random.Generator, every: bool = False) -> list[QA]:
    """Every question type that applies to ``scene``, one random instance of each, in random order.

    With ``every=True``: every instance instead (``color_at`` and ``shape_at`` for each shape,
    ``count`` for each colour, one ``exists`` yes and one no, ``left_of`` for each anchor) --
    the dense supervision the training script uses.

    ``color_at`` and ``shape_at`` ask about an occupied cell; ``count`` about a random colour
    (present or not); ``exists`` is yes or no with equal probability (a "no" names a colour-kind
    pair absent from the scene); ``left_of`` names a shape whose colour-kind pair is unique in the
    scene and whose left neighbour cell is occupied (skipped when no shape qualifies).

    Parameters
    ----------
    scene
        The scene asked about.
    rng
        The generator every random choice comes from.
    every
        All instances rather than one random instance of each kind.

    Returns
    -------
    list of QA
        ``(question, answer, kind)`` triples; every answer is a single word.
    """
    shapes = scene.shapes
    if every:
        return _every_question(scene, rng)
    out: list[QA] = []
    s = shapes[int(rng.integers(len(shapes)))]
    out.append(QA(f"what color is the shape in the {POSITIONS[s.cell]} ?", s.color, "color_at"))
    s = shapes[int(rng.integers(len(shapes)))]
    out.append(QA(f"what shape is in the {POSITIONS[s.cell]} ?", s.kind, "shape_at"))
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    out.append(QA(f"how many {color} shapes are there ?", str(sum(x.color == color for x in shapes)), "count"))
    present = {(x.color, x.kind) for x in shapes}
    if rng.random() < 0.5:
        pair = sorted(present)[int(rng.integers(len(present)))]
        out.append(QA(f"is there a {pair[0]} {pair[1]} ?", "yes", "exists"))
    else:
        absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        pair = absent[int(rng.integers(len(absent)))]
        out.append(QA(f"is there a {pair[0]} {pair[1]} ?", "no", "exists"))
    pairs = [(x.color, x.kind) for x in shapes]
    anchors = [x for x in shapes if pairs.count((x.color, x.kind)) == 1 and x.cell[1] > 0
               and scene.at((x.cell[0], x.cell[1] - 1)) is not None]
    if anchors:
        a = anchors[int(rng.integers(len(anchors)))]
        left = scene.at((a.cell[0], a.cell[1] - 1))
        assert left is not None
        out.append(QA(f"what color is the shape left of the {a.color} {a.kind} ?", left.color, "left_of"))
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order]


def _every_question(scene: Scene, rng: np.random.Generator) -> list[QA]:
    shapes = scene.shapes
    out = [QA(f"what color is the shape in the {POSITIONS[s.cell]} ?", s.color, "color_at") for s in shapes]
    out += [QA(f"what shape is in the {POSITIONS[s.cell]} ?", s.kind, "shape_at") for s in shapes]
    out += [QA(f"how many {c} shapes are there ?", str(sum(x.color == c for x in shapes)), "count") for c in COLORS]
    present = {(x.color, x.kind) for x in shapes}
    absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
    yes = sorted(present)[int(rng.integers(len(present)))]
    no = absent[int(rng.integers(len(absent)))]
    out += [QA(f"is there a {yes[0]} {yes[1]} ?", "yes", "exists"), QA(f"is there a {no[0]} {no[1]} ?", "no", "exists")]
    pairs = [(x.color, x.kind) for x in shapes]
    for a in shapes:
        left = scene.at((a.cell[0], a.cell[1] - 1)) if a.cell[1] > 0 else None
        if left is not None and pairs.count((a.color, a.kind)) == 1:
            out.append(QA(f"what color is the shape left of the {a.color} {a.kind} ?", left.color, "left_of"))
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order]


def samples(seed: int, n: int, kinds: tuple[str, ...] = QUESTION_KINDS) -> list[Sample]:
    """``n`` evaluation samples from ``seed``: one scene per sample, question kinds in turn.

    Sample ``i`` asks a question of kind ``kinds[i % len(kinds)]`` (a scene without a
    ``left_of`` anchor is redrawn), so every kind is equally represented.

    Parameters
    ----------
    seed
        Seed of the split (:data:`HELDOUT_SEED` for the fixture's held-out split).
    n
        Number of samples.
    kinds
        Question kinds to cycle through (a subset of :data:`QUESTION_KINDS`).

    Returns
    -------
    list of Sample
    """
    if n < 0:
        raise UniprunerError(f"samples needs n >= 0, got {n}")
    bad = [k for k in kinds if k not in QUESTION_KINDS]
    if bad or not kinds:
        raise UniprunerError(f"unknown question kinds {bad}; known: {list(QUESTION_KINDS)}")
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    while len(out) < n:
        want = kinds[len(out) % len(kinds)]
        scene = make_scene(rng)
        qa = [q for q in questions(scene, rng) if q.kind == want]
        if qa:
            out.append(Sample(image=draw(scene), question=qa[0].question, answer=qa[0].answer, scene=scene,
                              kind=want))
    return out


def prompt(question: str) -> str:
    """The fixture's prompt for ``question`` (:data:`PROMPT`; the processor expands ``<image>``)."""
    return PROMPT.format(question=question)


def vocabulary() -> list[str]:
    """Every word the questions, answers and prompt use (the fixture tokenizer's word vocabulary)."""
    words = {"USER", ":", "ASSISTANT", "?", "what", "color", "is", "the", "shape", "in", "how", "many",
             "shapes", "are", "there", "a", "left", "of", "yes", "no"}
    words.update(COLORS)
    words.update(KINDS)
    words.update(w for p in POSITIONS.values() for w in p.split())
    words.update(str(i) for i in range(GRID * GRID + 1))
    return sorted(words)
