"""How queued inputs are cut into model runs (inference/batching.py): pure code, no model."""

from __future__ import annotations

import random

from inference.batching import RUN_COST_TOKENS, BatchingConfig, plan_runs

CONFIG = BatchingConfig()


def _padded(lengths: list[int], runs: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in run) * len(run) for run in runs)


def _check_bounds(lengths: list[int], caps: list[int], runs: list[list[int]]) -> None:
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))  # each input once
    for run in runs:
        width = max(lengths[i] for i in run)
        assert len(run) <= min(CONFIG.rows_for(width), *(caps[i] for i in run))


def _mixed_lengths(count: int, seed: int) -> list[int]:
    """Mostly short texts with a long tail, as a back-fill of a text column has them."""
    rng = random.Random(seed)
    return [min(512, int(rng.lognormvariate(3.0, 0.8)) + 4) for _ in range(count)]


def test_mixed_lengths_are_cut_with_little_padding_within_the_bounds() -> None:
    """256 queued texts of mixed lengths (one dispatch's worth): runs filled greedily in length order
    padded ~20% of what they computed; the cheapest cut pads a few percent and still shares runs."""
    for seed in range(5):
        lengths = _mixed_lengths(256, seed)
        caps = [128] * len(lengths)
        runs = plan_runs(lengths, caps, CONFIG)
        _check_bounds(lengths, caps, runs)
        padded = _padded(lengths, runs)
        assert (padded - sum(lengths)) / padded < 0.05
        assert len(runs) < len(lengths) / 4
        # cheaper than the runs filled greedily in the same order, by the same measure
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        greedy: list[list[int]] = [[]]
        for i in order:
            if len(greedy[-1]) >= CONFIG.rows_for(lengths[i]):
                greedy.append([])
            greedy[-1].append(i)
        cost = padded + RUN_COST_TOKENS * len(runs)
        assert cost <= _padded(lengths, greedy) + RUN_COST_TOKENS * len(greedy)


def test_callers_caps_and_the_memory_bounds_hold() -> None:
    rng = random.Random(7)
    lengths = _mixed_lengths(300, 11) + [512] * 5
    caps = [rng.choice([1, 3, 32, 128]) for _ in lengths]
    runs = plan_runs(lengths, caps, CONFIG)
    _check_bounds(lengths, caps, runs)
    assert all(len(run) == 1 for run in runs if any(lengths[i] == 512 for i in run))  # attention budget


def test_equal_lengths_share_one_run_and_nothing_queued_gives_none() -> None:
    assert plan_runs([9] * 40, [128] * 40, CONFIG) == [list(range(40))]
    assert sorted(len(run) for run in plan_runs([9] * 10, [3] * 10, CONFIG)) == [1, 3, 3, 3]
    assert plan_runs([], [], CONFIG) == []
