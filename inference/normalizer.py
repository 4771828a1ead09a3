"""XLM-R's character normalisation exactly as the ``tokenizers`` library applies it.

The ``Precompiled`` normaliser of ``tokenizers`` maps text grapheme by grapheme: a grapheme
cluster shorter than 6 UTF-8 bytes whose start is in the map is replaced *as a whole* by
that start's replacement (so "µ" + ZWJ gives "μ", the ZWJ dropped); any other grapheme is
mapped codepoint by codepoint.  Runs of spaces then collapse to one (the ``Replace``
normaliser of our tokenizer.json).  Grapheme clusters come from the ``regex`` module (UAX #29),
whose Unicode is newer than that of ``tokenizers`` (16.0): characters that join a cluster only
since Unicode 17.0 start a new one here, as they do there (tests/test_inference_unigram.py
sweeps every BMP character, so a change of either library's tables shows).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

import regex

GRAPHEME = regex.compile(r"\X")
# A text without these characters has only single-codepoint graphemes (CR joins a following LF).
_JOINING = regex.compile(
    r"[^\p{Grapheme_Cluster_Break=Other}\p{Grapheme_Cluster_Break=Control}\p{Grapheme_Cluster_Break=LF}]"
)
# BMP grapheme extenders new in Unicode 17.0 (unassigned, so "Other", for tokenizers); only the BMP
# matters, as only a cluster shorter than 6 bytes is replaced whole
_LATE_EXTENDERS = re.compile("[\u05c8\u05c9\u0b53\u0b54\u1ade\u1adf\u1aec-\u1af0]")
_SPACE_RUNS = re.compile(" {2,}")
_GRAPHEME_BYTES = 6  # tokenizers maps whole graphemes only when they are shorter than this


class Normalizer:
    """``normalize(text)``: the per-codepoint map applied as described above, space runs collapsed."""

    def __init__(self, mapping: Mapping[int, str]) -> None:
        self._table = dict(mapping)
        # a cut between two of these characters splits neither a grapheme nor a space run
        mapped = "".join(f"\\U{codepoint:08x}" for codepoint in sorted(mapping))
        plain = r"[\p{Grapheme_Cluster_Break=Other}--\p{Extended_Pictographic}--[ " + mapped + "]]"
        self._plain_pair = regex.compile(f"{plain}{plain}", regex.V1)

    def normalize(self, text: str) -> str:
        return _SPACE_RUNS.sub(" ", self._map(text))

    def _map(self, text: str) -> str:
        table = self._table
        if (text.isascii() and "\r\n" not in text) or not _JOINING.search(text):
            return text.translate(table)
        parts = []
        for grapheme in _graphemes(text):
            start = ord(grapheme[0])
            if len(grapheme) > 1 and start in table and len(grapheme.encode("utf-8")) < _GRAPHEME_BYTES:
                parts.append(table[start])
            else:
                parts.append(grapheme.translate(table))
        return "".join(parts)

    def safe_cut(self, text: str, position: int) -> int:
        """A cut at or after ``position`` where normalising both sides apart equals normalising
        ``text`` whole (a boundary between two unmapped, non-space, plainly segmented characters);
        ``len(text)`` if there is none."""
        found = self._plain_pair.search(text, max(position - 1, 0))
        return found.start() + 1 if found else len(text)



def _graphemes(text: str) -> list[str]:
    """Grapheme clusters as ``tokenizers`` sees them: ``regex``'s, split before late extenders."""
    clusters = GRAPHEME.findall(text)
    if not _LATE_EXTENDERS.search(text):
        return clusters
    split = []
    for cluster in clusters:
        cuts = [0, *(m.start() for m in _LATE_EXTENDERS.finditer(cluster, 1)), len(cluster)]
        split += [cluster[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    return split
