"""Texts of the speed benchmarks, from the corpus: short (~20 tokens) and long (~200 tokens), each handed out with a
running number, so that no engine can answer from a cache."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.common import load_corpus
from bench.runners import PREFIX, load_tokenizer

if TYPE_CHECKING:
    from inference.model_dir import ModelFiles

SHORT_RANGE = (14, 28)  # tokens per text, counted with <s>, </s> and the "passage: " prefix
LONG_RANGE = (185, 215)
TAG_TOKENS = 5  # room left for the appended " (12345)"


def build(n: int, token_range: tuple[int, int], count: Callable[[str], int], seed: int = 7) -> list[str]:
    """`n` texts whose token counts (by `count`) fall in `token_range` once tagged: corpus sentences of the right
    length, else (long ones) randomly chosen sentences joined."""
    rng = random.Random(seed)
    sentences = [r["text"] for r in load_corpus()]
    lo, hi = token_range[0], token_range[1] - TAG_TOKENS
    fitting = [s for s in sentences if lo <= count(s) <= hi]
    out: list[str] = []
    while len(out) < n:
        if fitting:
            out.append(rng.choice(fitting))
            continue
        text = ""
        while count(text) < lo:
            candidate = (text + " " + rng.choice(sentences)).strip()
            if count(candidate) <= hi:
                text = candidate
            elif text:
                break
        if lo <= count(text) <= hi:
            out.append(text)
    return out


class Pool:
    """Cycles through base texts, tagging each handed-out text with a process-wide running number."""

    _serial = itertools.count()

    def __init__(self, base: list[str]) -> None:
        self._base = itertools.cycle(base)

    def take(self, n: int) -> list[str]:
        return [f"{next(self._base)} ({next(self._serial)})" for _ in range(n)]


def short_texts(files: ModelFiles) -> list[str]:
    """256 short texts, counted by the model's own tokenizer."""
    tokenizer = load_tokenizer(files)
    return build(256, SHORT_RANGE, lambda s: len(tokenizer.encode_batch([PREFIX + s])[0]))
