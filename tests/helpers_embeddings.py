"""Comparing embeddings that came through SQL with the engine's own."""

from __future__ import annotations

import numpy as np


def assert_same_embeddings(actual: object, expected: np.ndarray) -> None:
    """Equal up to float32 rounding: the engine batches concurrent requests together, and a text's
    vector may differ in the last bits with the company it was padded and run with."""
    got = np.asarray(actual, dtype=np.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
