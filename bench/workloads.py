"""Texts of the speed benchmarks, from the corpus: short (~20 tokens) or long (~200 tokens), counted by the model's
own tokenizer with <s>, </s> and the `passage: ` prefix, and handed out with a running number, so that no engine
can answer from a cache."""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING

from bench.common import load_corpus
from bench.runners import PREFIX, load_tokenizer

if TYPE_CHECKING:
    from inference.model_dir import ModelFiles

RANGES = {"short": (14, 28), "long": (185, 215)}  # tokens per text
TAG_TOKENS = 5  # room left for the appended " (12345)"


class Pool:
    """Cycles through base texts, tagging each handed-out text with a process-wide running number."""

    _serial = itertools.count()

    def __init__(self, base: list[str]) -> None:
        self._base = itertools.cycle(base)

    def take(self, n: int) -> list[str]:
        return [f"{next(self._base)} ({next(self._serial)})" for _ in range(n)]


def pool(files: ModelFiles, length: str = "short", n: int = 256, seed: int = 7) -> Pool:
    """`n` base texts whose token counts fall in RANGES[length] once tagged: corpus sentences of the right length,
    else (long ones) randomly chosen sentences joined."""
    tokenizer = load_tokenizer(files)

    def count(text: str) -> int:
        return len(tokenizer.encode_batch([PREFIX + text])[0])

    rng = random.Random(seed)
    sentences = [r["text"] for r in load_corpus()]
    lo, hi = RANGES[length][0], RANGES[length][1] - TAG_TOKENS
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
    return Pool(out)
