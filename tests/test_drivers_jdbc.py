"""pgJDBC (Debian's libpostgresql-jdbc-java) through the proxy in the modes applications use:
tests/drivers/jdbc/DriverScenario.java, compiled here with javac, runs the shared scenario once per mode
(the connection properties in its URL) and these tests check what the driver got.

Without a JDK or the driver's jar these tests fail (`make system-deps` installs them), they do not skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .driver_scenario import (
    DRIVERS_DIR,
    ERROR_SQLSTATES,
    SCENARIO,
    STAND_IN_DATABASE,
    Reference,
    batch_behaviour,
    check_batch,
    check_error_batch,
    check_nearest,
    check_settings,
    check_single_calls,
    check_with_ids,
    run_program,
)
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess

JDBC_JAR = Path("/usr/share/java/postgresql.jar")
# The mode's connection properties; the default prepareThreshold is 5, which the scenario's prepared
# statement runs past.
MODES = {
    "default": "",
    "prepareThreshold=-1": "prepareThreshold=-1",
    "prepareThreshold=0": "prepareThreshold=0",
    "prepareThreshold=1": "prepareThreshold=1",
    "binaryTransfer=false": "binaryTransfer=false",
    "reWriteBatchedInserts": "reWriteBatchedInserts=true",
    "extendedCacheEverything": "preferQueryMode=extendedCacheEverything",
    "stringtype=unspecified": "stringtype=unspecified",
    "simple": "preferQueryMode=simple",  # every statement a simple Query, the parameters inlined by the driver
}


def require(path: str | None, what: str) -> str:
    if path is None or not Path(path).exists():
        pytest.fail(f"{what} is missing: run `make system-deps` as root (Debian's default-jdk-headless and "
                    "libpostgresql-jdbc-java)")
    return path


def scenario_lines() -> str:
    """The scenario as DriverScenario.java reads it: "key<TAB>field..." lines (no JSON parser needed)."""
    s = SCENARIO
    lines = [[key, s[key]] for key in ("model", "plain", "param", "query", "setting_key", "after_error")]
    lines += [["prepared", t] for t in s["prepared"]] + [["doc", t] for t in s["docs"]]
    lines += [["input", t] for t in s["with_ids"]["inputs"]] + [["id", str(i)] for i in s["with_ids"]["ids"]]
    lines += [["batch", t] for t in s["batch"]]
    lines += [["error_row", name, *map(str, row)] for name, rows in s["error_batches"].items() for row in rows]
    assert not any("\t" in f or "\n" in f for line in lines for f in line)
    return "".join("\t".join(line) + "\n" for line in lines)


@pytest.fixture(scope="session")
def scenario_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DriverScenario compiled against the driver's jar."""
    javac = require(shutil.which("javac"), "javac")
    require(str(JDBC_JAR), str(JDBC_JAR))
    out = tmp_path_factory.mktemp("jdbc-classes")
    source = DRIVERS_DIR / "jdbc" / "DriverScenario.java"
    done = subprocess.run([javac, "-d", str(out), "-cp", str(JDBC_JAR), str(source)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"javac failed:\n{done.stderr}"
    return out


@pytest.fixture(scope="module", params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def run_scenario(classes: Path, port: int, database: str, mode: str, *extra: str) -> dict:
    java = require(shutil.which("java"), "java")
    url = f"jdbc:postgresql://127.0.0.1:{port}/{database}?user=postgres&sslmode=disable&{MODES[mode]}"
    return run_program([java, "-cp", f"{JDBC_JAR}:{classes}", "DriverScenario", url, *extra], scenario_lines(),
                       classes)


@pytest.fixture(scope="module")
def run(mode: str, scenario_classes: Path, proxy: ProxyProcess) -> dict:
    return run_scenario(scenario_classes, proxy.port, "postgres", mode)


def test_driver_version() -> None:
    """The driver under test is a 42.x release (Debian bookworm ships 42.5)."""
    done = subprocess.run([require(shutil.which("java"), "java"), "-jar", str(JDBC_JAR)], capture_output=True,
                          text=True, timeout=60)
    assert "PostgreSQL JDBC Driver 42." in done.stdout + done.stderr


def test_plain_parameterised_and_prepared_calls(run: dict, mode: str, driver_reference: Reference) -> None:
    check_single_calls(run, driver_reference)


def test_prepared_statement_crosses_the_threshold(run: dict, mode: str) -> None:
    """The driver's own account of the statement (isUseServerPrepare): never server-prepared with
    prepareThreshold=0, from the start with -1 or 1, and switched to a named server statement along the
    way with the default threshold of 5 (the statement's text was already run once by the parameterised
    call). preferQueryMode=simple keeps the same account but sends each execution as a simple Query."""
    server_prepared = run["server_prepared"]
    assert len(server_prepared) == len(SCENARIO["prepared"])
    if mode == "prepareThreshold=0":
        assert not any(server_prepared)
    elif mode in ("prepareThreshold=-1", "prepareThreshold=1"):
        assert all(server_prepared)
    else:
        assert not server_prepared[0] and server_prepared[-1]
        assert server_prepared == sorted(server_prepared)


def test_array_overload_with_ids(run: dict, mode: str, driver_reference: Reference) -> None:
    check_with_ids(run, driver_reference)


def test_array_overload_fetched_two_rows_at_a_time(run: dict, mode: str, driver_reference: Reference) -> None:
    """setFetchSize(2) in a transaction: Execute with a row limit, the rows from a suspended portal
    (preferQueryMode=simple has no portals and reads them at once)."""
    check_with_ids({"with_ids": run["with_ids_fetched"]}, driver_reference)


def test_vector_insert_and_nearest_neighbours(run: dict, mode: str, driver_reference: Reference) -> None:
    check_nearest(run, driver_reference)


def test_jsonb_and_text_results(run: dict, mode: str, driver_reference: Reference) -> None:
    check_settings(run, driver_reference)


def test_batch_of_inserts(run: dict, mode: str, driver_reference: Reference) -> None:
    """addBatch/executeBatch of inserts whose vectors the proxy computes (one multi-row INSERT with
    reWriteBatchedInserts), read back as real[]."""
    check_batch(run, driver_reference)


@pytest.mark.parametrize("name", list(ERROR_SQLSTATES))
def test_error_in_the_middle_of_a_batch(run: dict, mode: str, driver_reference: Reference, name: str) -> None:
    """In autocommit mode pgJDBC sends a batch with one Sync at its end, so the server runs it as one
    implicit transaction: the error (its SQLSTATE in the BatchUpdateException's next exception) undoes
    the rows before it, and every update count is EXECUTE_FAILED (-3). With preferQueryMode=simple each
    row is its own Query, so only the failing one fails."""
    outcome = run["error_batches"][name]
    assert (outcome["ok"], outcome["sqlstate"]) == (False, ERROR_SQLSTATES[name])
    if mode == "simple":
        assert outcome["update_counts"] == [1, -3, 1]
        check_error_batch(outcome, driver_reference, kept=[1, 3])
    else:
        assert outcome["update_counts"] == [-3, -3, -3]
        check_error_batch(outcome, driver_reference, kept=[])


@pytest.mark.usefixtures("stand_in_dsn")
def test_error_batches_as_on_a_direct_server(run: dict, mode: str, scenario_classes: Path, pg: PgCluster) -> None:
    """The same batches against a server whose own function raises the 42704 (and whose key raises the
    23505): the SQLSTATEs, update counts and rows kept, as through the proxy."""
    direct = batch_behaviour(run_scenario(scenario_classes, pg.port, STAND_IN_DATABASE, mode, "batches-only"))
    assert direct["error_batches"]["intercepted"]["sqlstate"] == "42704"  # the stand-in did fail the middle row
    assert batch_behaviour(run) == direct
