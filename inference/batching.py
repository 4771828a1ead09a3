"""How queued inputs are cut into model runs (pure functions, no threads).

Inputs are sorted by length so that a run pads little, and a run is closed when it would
exceed ``max_batch_size`` rows, ``max_batch_tokens`` padded tokens, or the attention
budget: attention keeps batch x heads x seq x seq scores, so past ``ATTENTION_SPAN``
tokens a run also keeps rows x seq^2 <= max_batch_tokens x ATTENTION_SPAN.  That bounds the
memory of any run whatever the input (~130 MB of activations at most with the defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ATTENTION_SPAN = 64


@dataclass(frozen=True)
class BatchingConfig:
    """max_wait_ms: how long the first queued input waits for company before its run starts;
    max_batch_tokens: padded tokens per model run (bounds memory);
    max_batch_size: rows per model run."""

    max_wait_ms: float = 2.0
    max_batch_tokens: int = 4096
    max_batch_size: int = 128

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be positive")

    def rows_for(self, width: int) -> int:
        """Most rows a run of sequences ``width`` tokens long may hold (at least one)."""
        by_tokens = self.max_batch_tokens // width
        by_attention = self.max_batch_tokens * ATTENTION_SPAN // (width * width)
        return max(1, min(self.max_batch_size, by_tokens, by_attention))


def plan_runs(lengths: Sequence[int], caps: Sequence[int], config: BatchingConfig) -> list[list[int]]:
    """Group input indexes into runs; ``caps[i]`` is the most rows input i's caller allows per run."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    runs: list[list[int]] = []
    current: list[int] = []
    current_cap = config.max_batch_size
    for index in order:
        cap = min(current_cap, caps[index])
        if current and len(current) + 1 > min(cap, config.rows_for(lengths[index])):
            runs.append(current)
            current, cap = [], caps[index]
        current.append(index)
        current_cap = cap
    if current:
        runs.append(current)
    return runs
