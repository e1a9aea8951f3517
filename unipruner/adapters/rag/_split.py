"""Offline text units: sentences (regex), words and chunks, as character spans.

No nltk download, no model: a regular-expression sentence splitter in the spirit of the Punkt
heuristics (Kiss & Strunk, "Unsupervised Multilingual Sentence Boundary Detection",
Computational Linguistics 2006) with a fixed abbreviation list. Every unit is a ``(start, end)``
character span into the original text, so pruned text is always a subsequence of the input and
no character is rewritten.
"""

from __future__ import annotations

import re

from ...errors import UniprunerError

__all__ = ["GRANULARITIES", "split_sentences", "split_units", "unit_spans"]

GRANULARITIES = ("sentence", "token", "chunk")

# Words that end with a period without ending a sentence (lower-cased, without the period).
_ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft vs etc al fig figs eq no nos vol vols ed eds rev gen col lt
    sgt capt cmdr gov sen rep pres inc ltd co corp dept univ approx est jan feb mar apr jun jul
    aug sep sept oct nov dec e.g i.e u.s u.k u.n a.m p.m ca cf
    """.split()
)

# Candidate boundary: sentence punctuation, optional closing quotes/brackets, whitespace, then
# something that can start a sentence (capital, digit, opening quote/bracket).
_BOUNDARY = re.compile(r"""([.!?…]+["'”’)\]]*)(\s+)(?=["'“‘(\[]?[A-Z0-9À-Þ])""")
_WORD_BEFORE = re.compile(r"""(\S+)$""")
_WORD = re.compile(r"\S+\s*")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _is_abbreviation(text: str, punct_start: int) -> bool:
    m = _WORD_BEFORE.search(text, 0, punct_start + 1)
    if m is None:
        return False
    word = m.group(1).rstrip(".").lstrip("\"'“‘([").lower()
    if word in _ABBREVIATIONS:
        return True
    # single letters ("F. Hugh Herbert", initials) and dotted acronyms ("U.S.")
    return bool(re.fullmatch(r"[a-z]|([a-z]\.)+[a-z]?", word))


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        punct = m.group(1)
        if punct.startswith(".") and len(punct.rstrip("\"'”’)]")) == 1 and _is_abbreviation(text, m.start(1)):
            continue
        end = m.end(2)  # the sentence owns its trailing whitespace
        if end > start:
            spans.append((start, end))
        start = end
    if start < len(text):
        spans.append((start, len(text)))
    return _merge_blank(text, spans)


def _merge_blank(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Fold whitespace-only spans into their predecessor (or successor when first)."""
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if not text[s:e].strip():
            if out:
                out[-1] = (out[-1][0], e)
                continue
        if out and not text[out[-1][0]:out[-1][1]].strip():
            s = out.pop()[0]
        out.append((s, e))
    return out


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _PARAGRAPH.finditer(text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return _merge_blank(text, spans)


def unit_spans(text: str, granularity: str = "sentence") -> list[tuple[int, int]]:
    """Character spans of the units of ``text``; they tile the text exactly.

    Parameters
    ----------
    text : str
    granularity : {"sentence", "token", "chunk"}
        ``"sentence"``: regex sentences (Kiss & Strunk 2006 style heuristics); ``"token"``:
        whitespace-delimited words; ``"chunk"``: paragraphs separated by a blank line (a text
        without blank lines is one chunk).

    Returns
    -------
    list of (start, end)
        Contiguous spans covering ``text`` (each unit owns its trailing whitespace).

    Examples
    --------
    >>> t = "Dr. Smith left. He came back!  Done"
    >>> [t[s:e] for s, e in unit_spans(t)]
    ['Dr. Smith left. ', 'He came back!  ', 'Done']
    >>> w = "a  b"
    >>> [w[s:e] for s, e in unit_spans(w, "token")]
    ['a  ', 'b']
    """
    if not isinstance(text, str):
        raise UniprunerError(f"text must be a str, got {type(text).__name__}")
    if granularity not in GRANULARITIES:
        raise UniprunerError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not text:
        return []
    if granularity == "sentence":
        spans = _sentence_spans(text)
    elif granularity == "chunk":
        spans = _paragraph_spans(text)
    else:
        lead = len(text) - len(text.lstrip())
        spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        if spans and lead:
            spans[0] = (0, spans[0][1])
        if not spans:
            spans = [(0, len(text))]
    return spans


def split_units(text: str, granularity: str = "sentence") -> list[str]:
    """The units of ``text`` as strings (``"".join(split_units(t)) == t``).

    >>> split_units("One. Two.", "sentence")
    ['One. ', 'Two.']
    """
    return [text[s:e] for s, e in unit_spans(text, granularity)]


def split_sentences(text: str) -> list[str]:
    """Split text into sentences offline, keeping every character (no nltk data needed).

    Regex boundaries after ``. ! ? …`` (plus closing quotes/brackets) followed by whitespace and
    a capital, digit or opening quote, skipping common abbreviations, initials and dotted
    acronyms, after the Punkt heuristics of Kiss & Strunk (Computational Linguistics, 2006).

    Parameters
    ----------
    text : str

    Returns
    -------
    list of str
        The sentences with their trailing whitespace; joined they give back ``text``.

    Examples
    --------
    >>> split_sentences('It stars Shirley Temple. It was by F. Hugh Herbert in the U.S. in 1945.')
    ['It stars Shirley Temple. ', 'It was by F. Hugh Herbert in the U.S. in 1945.']
    """
    return split_units(text, "sentence")
