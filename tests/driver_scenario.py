"""One scenario for every driver program under tests/drivers/, and the checks of its results.

Each program (node-postgres, postgres.js, pgJDBC) runs the same steps through the proxy and prints what
the driver returned as JSON; the expected values come from psycopg through the same proxy (`Reference`),
never from the program under test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import psycopg

from .helpers_embeddings import assert_same_embeddings
from .test_functions_simple import DIM, MODEL

DRIVERS_DIR = Path(__file__).resolve().parent / "drivers"
BAD_MODEL = "nope:v9"

SCENARIO: dict = {
    "model": MODEL,
    "plain": "query: a plain call, it's quoted",
    "param": "query: a parameterised call ✓",
    # More executions of one statement than any driver's server-prepare threshold (pgJDBC's and
    # psycopg's are 5; node-postgres and postgres.js prepare a named statement at its first use).
    "prepared": [f"query: prepared statement run {i}" for i in range(8)],
    "with_ids": {"inputs": ["passage: red", "passage: green", "passage: blue"], "ids": [7, 8, 9]},
    "docs": ["passage: the cat sat on the mat", "passage: stock markets fell sharply today",
             "passage: a kitten sleeps on a rug", "passage: Die Katze schläft auf dem Sofa"],
    "query": "query: where is the cat sleeping?",
    "setting_key": "intra_op_parallelism",
    "batch": [f"query: sent in one batch, number {i}" for i in range(12)],
    # Rows (id, model, text) inserted in one batch, the middle one failing: in the proxy (a model that
    # is not registered, 42704) or in the server after the proxy computed its value (a duplicate key, 23505).
    "error_batches": {
        "intercepted": [[1, MODEL, "passage: one"], [2, BAD_MODEL, "passage: two"], [3, MODEL, "passage: three"]],
        "server": [[1, MODEL, "passage: one"], [1, MODEL, "passage: two"], [3, MODEL, "passage: three"]],
    },
    "after_error": "query: the session goes on after the error",
}
ERROR_SQLSTATES = {"intercepted": "42704", "server": "23505"}


# A server with no proxy in front whose stand-in create_embeddings fails as the proxy does for a model
# that is not registered: the drivers' error batches run against it give what each driver does with a
# server's error, which the same batches through the proxy must match.
STAND_IN_DATABASE = "driver_stand_in"
STAND_IN_SQL = f"""
CREATE EXTENSION vector;
CREATE SCHEMA azure_local_ai;
CREATE FUNCTION azure_local_ai.create_embeddings(model_uri text, input text) RETURNS real[]
LANGUAGE plpgsql AS $$
BEGIN
    IF model_uri IS DISTINCT FROM '{MODEL}' THEN
        RAISE EXCEPTION 'model "%" is not registered', model_uri USING ERRCODE = '42704';
    END IF;
    RETURN array_fill(0.5::real, ARRAY[{DIM}]);
END $$;
"""


def batch_behaviour(result: dict) -> dict:
    """What a driver did with the error batches, without the parts only the proxy gives (the vectors
    and the error messages' wording)."""
    return {key: {name: _without_wording(outcome) for name, outcome in result[key].items()}
            for key in ("error_batches", "transaction_batches") if key in result}


def _without_wording(outcome: dict) -> dict:
    kept = {k: v for k, v in outcome.items() if k not in ("message", "after")}
    if "outcomes" in kept:
        kept["outcomes"] = [_without_wording(o) for o in kept["outcomes"]]
    return kept


def run_program(command: list[str], stdin: str, cwd: Path, timeout: float = 180) -> dict:
    """Run a driver program; its stdout is one JSON object. A failure shows the program's stderr."""
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def vectors(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


class Reference:
    """What psycopg 3 gets through the proxy for the scenario's calls, one call at a time."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._embeddings: dict[str, np.ndarray] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            # The array overload with ids, called as the programs call it (one call, the same texts).
            rows = conn.execute("SELECT id, embedding FROM azure_local_ai.create_embeddings(%s, %s, %s::bigint[])",
                                [MODEL, SCENARIO["with_ids"]["inputs"], SCENARIO["with_ids"]["ids"]]).fetchall()
            self.with_ids = ([r[0] for r in rows], vectors([r[1] for r in rows]))
            # get_setting() (jsonb), get_setting(key) (text) and model_metadata (jsonb).
            self.settings, self.setting, self.metadata = conn.execute(
                "SELECT azure_local_ai.get_setting(), azure_local_ai.get_setting(%s), "
                "azure_local_ai.model_metadata(%s)", [SCENARIO["setting_key"], MODEL]).fetchone()

    def embedding(self, text: str) -> np.ndarray:
        if text not in self._embeddings:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                (value,) = conn.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", [MODEL, text]).fetchone()
            self._embeddings[text] = vectors(value)
        return self._embeddings[text]


def assert_equal_vector(got: object, expected: np.ndarray) -> None:
    """Bit for bit: a text embedded alone gives the same float32 values whichever driver asked."""
    array = vectors(got)
    assert array.shape == expected.shape == (DIM,)
    np.testing.assert_array_equal(array, expected)


def check_single_calls(result: dict, ref: Reference) -> None:
    """The plain (literal) and parameterised calls and every execution of the prepared statement."""
    assert_equal_vector(result["plain"], ref.embedding(SCENARIO["plain"]))
    assert_equal_vector(result["param"], ref.embedding(SCENARIO["param"]))
    assert len(result["prepared"]) == len(SCENARIO["prepared"])
    for got, text in zip(result["prepared"], SCENARIO["prepared"], strict=True):
        assert_equal_vector(got, ref.embedding(text))


def check_with_ids(result: dict, ref: Reference) -> None:
    ids, expected = ref.with_ids
    assert [row[0] for row in result["with_ids"]] == ids == SCENARIO["with_ids"]["ids"]
    np.testing.assert_array_equal(vectors([row[1] for row in result["with_ids"]]), expected)


def check_nearest(result: dict, ref: Reference) -> None:
    """`<=>` over the inserted `::vector` column: the order and distances computed here from the
    reference vectors."""
    query = ref.embedding(SCENARIO["query"]).astype(np.float64)
    expected = []
    for doc in SCENARIO["docs"]:
        v = ref.embedding(doc).astype(np.float64)
        expected.append((doc, 1 - float(v @ query / (np.linalg.norm(v) * np.linalg.norm(query)))))
    expected.sort(key=lambda pair: pair[1])
    assert [body for body, _ in result["nearest"]] == [body for body, _ in expected]
    np.testing.assert_allclose([d for _, d in result["nearest"]], [d for _, d in expected], rtol=0, atol=1e-6)
    assert expected[0][0] in ("passage: the cat sat on the mat", "passage: a kitten sleeps on a rug")


def check_settings(result: dict, ref: Reference) -> None:
    assert result["settings"] == ref.settings
    assert set(ref.settings) >= {"intra_op_parallelism", "inter_op_parallelism"}
    assert result["setting"] == ref.setting == ref.settings["intra_op_parallelism"]
    assert result["metadata"] == ref.metadata and ref.metadata["model_uri"] == MODEL


def check_batch(result: dict, ref: Reference) -> None:
    """The driver's batch or pipeline: texts in flight together may share one model run, where padding
    can change the last bits, so these equal the reference up to float32 rounding."""
    assert len(result["batch"]) == len(SCENARIO["batch"])
    assert_same_embeddings(vectors(result["batch"]), np.stack([ref.embedding(t) for t in SCENARIO["batch"]]))


def check_error_batch(outcome: dict, ref: Reference, kept: list[int]) -> None:
    """A batch whose middle row failed: the rows `kept` (as the driver documents), and the session usable
    (a call right after it, on the same connection, answers)."""
    assert outcome["kept"] == kept
    assert_equal_vector(outcome["after"], ref.embedding(SCENARIO["after_error"]))
