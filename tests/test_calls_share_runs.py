"""The calls of one statement are embedded together: a multi-row INSERT (what pgJDBC's
reWriteBatchedInserts sends for a batch) or a SELECT with several create_embeddings calls should cost one
model run, not one per call.

Measured on a proxy whose batching window is long (400 ms: a run starts only once its first input has
waited that long for company), so the difference does not hide in the noise of a shared machine: calls
queued together cost one window, calls queued one after another cost a window each."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy
from .test_functions_simple import DIM, MODEL

WINDOW_MS = 400
CALLS = 8


@pytest.fixture(scope="module")
def slow_window_proxy(pg: PgCluster, model_data_dir: Path) -> Iterator[ProxyProcess]:
    running = start_proxy(model_data_dir, "--batch-wait-ms", str(WINDOW_MS), upstream=pg.url(), preload=True)
    yield running
    running.stop()


def seconds(conn: psycopg.Connection, sql: str, params: list) -> float:
    start = time.monotonic()
    conn.execute(sql, params)
    return time.monotonic() - start


def texts() -> list[str]:
    return [f"passage: row {i} of one statement" for i in range(CALLS)]


def test_a_lone_call_waits_one_window(slow_window_proxy: ProxyProcess) -> None:
    """The premise of the measurement: one call costs at least the window."""
    with psycopg.connect(slow_window_proxy.dsn(), autocommit=True) as conn:
        assert seconds(conn, "SELECT azure_local_ai.create_embeddings(%s, %s)", [MODEL, "query: alone"]) >= (
            WINDOW_MS / 1000 * 0.9)


@pytest.mark.parametrize("shape", ["insert-values", "select-list"])
def test_calls_of_one_statement_share_a_model_run(slow_window_proxy: ProxyProcess, shape: str) -> None:
    """8 calls in one statement: well under the 8 windows that embedding them one after another costs."""
    params = [x for text in texts() for x in (MODEL, text)]
    with psycopg.connect(slow_window_proxy.dsn(), autocommit=True) as conn:
        if shape == "insert-values":
            conn.execute(f"CREATE TEMP TABLE rows_in_one_statement (i int, v vector({DIM}))")
            values = ", ".join(f"({i}, azure_local_ai.create_embeddings(%s, %s)::vector)" for i in range(CALLS))
            sql = f"INSERT INTO rows_in_one_statement VALUES {values}"
        else:
            sql = "SELECT " + ", ".join("azure_local_ai.create_embeddings(%s, %s)" for _ in range(CALLS))
        elapsed = seconds(conn, sql, params)
    assert elapsed < CALLS * WINDOW_MS / 1000 / 2, (
        f"{CALLS} calls in one statement took {elapsed:.2f} s: one model run each ({WINDOW_MS} ms window)")
