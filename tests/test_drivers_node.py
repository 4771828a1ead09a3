"""node-postgres (plain and pipeline mode) and postgres.js (prepared by default, and unnamed) through the
proxy: tests/drivers/node/*.mjs run the shared scenario, these tests check what each driver got.

The npm packages are pinned in tests/drivers/node/package-lock.json and installed there with `npm ci`;
without Node.js and npm these tests fail (`make system-deps` installs them), they do not skip."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .driver_scenario import (
    DRIVERS_DIR,
    ERROR_SQLSTATES,
    SCENARIO,
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
from .proxyproc import ProxyProcess

NODE_DIR = DRIVERS_DIR / "node"
POSTGRES_JS_RUNS = [("postgres.mjs", "prepare"), ("postgres.mjs", "unnamed")]
RUNS = [("pg.mjs", "plain"), ("pg.mjs", "pipeline"), *POSTGRES_JS_RUNS]


def require(command: str) -> str:
    found = shutil.which(command)
    if found is None:
        pytest.fail(f"{command} is not installed: run `make system-deps` as root (Debian's nodejs and npm)")
    return found


@pytest.fixture(scope="session")
def node_packages() -> Path:
    """tests/drivers/node/node_modules as the lock file pins it (`npm ci` when it is missing or stale)."""
    npm = require("npm")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR / "node_modules"


def run_ids(runs: list[tuple[str, str]]) -> list[str]:
    return [f"{program.removesuffix('.mjs')}-{mode}" for program, mode in runs]


@pytest.fixture(scope="module")
def results(node_packages: Path, proxy: ProxyProcess) -> dict[tuple[str, str], dict]:
    """Each program's output through the proxy, run once per (program, mode) on first use."""
    return ProgramResults(proxy.dsn())


@pytest.fixture(scope="module")
def direct_results(node_packages: Path, stand_in_dsn: str) -> dict[tuple[str, str], dict]:
    """The programs' error batches alone, run directly against the stand-in server."""
    return ProgramResults(stand_in_dsn, "batches-only")


class ProgramResults(dict):
    """Runs a (program, mode) against `dsn` when its output is first asked for."""

    def __init__(self, dsn: str, *extra: str) -> None:
        super().__init__()
        self.command = [dsn, *extra]

    def __missing__(self, key: tuple[str, str]) -> dict:
        program, mode = key
        dsn, *extra = self.command
        result = run_program([require("node"), program, dsn, mode, *extra], json.dumps(SCENARIO), NODE_DIR)
        assert result["mode"] == mode
        self[key] = result
        return result


@pytest.fixture(params=RUNS, ids=run_ids(RUNS))
def run_key(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture
def run(run_key: tuple[str, str], results: dict) -> dict:
    return results[run_key]


@pytest.fixture(params=POSTGRES_JS_RUNS, ids=run_ids(POSTGRES_JS_RUNS))
def postgres_js_run(request: pytest.FixtureRequest, results: dict) -> dict:
    return results[request.param]


def test_installed_versions(node_packages: Path) -> None:
    """The drivers under test are the versions package.json pins."""
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        assert json.loads((node_packages / name / "package.json").read_text())["version"] == version


def test_plain_parameterised_and_prepared_calls(run: dict, driver_reference: Reference) -> None:
    check_single_calls(run, driver_reference)


def test_array_overload_with_ids(run: dict, driver_reference: Reference) -> None:
    check_with_ids(run, driver_reference)


def test_array_overload_read_through_a_cursor(postgres_js_run: dict, driver_reference: Reference) -> None:
    """postgres.js's cursor(2): the proxy's rows come two at a time from a suspended portal."""
    chunks = postgres_js_run["with_ids_chunks"]
    assert [len(chunk) for chunk in chunks] == [2, 1]
    check_with_ids({"with_ids": [row for chunk in chunks for row in chunk]}, driver_reference)


def test_vector_insert_and_nearest_neighbours(run: dict, driver_reference: Reference) -> None:
    check_nearest(run, driver_reference)


def test_jsonb_and_text_results(run: dict, driver_reference: Reference) -> None:
    check_settings(run, driver_reference)


def test_batch_of_queries(run: dict, driver_reference: Reference) -> None:
    """node-postgres's pipeline mode and postgres.js send the queries all at once on the one connection;
    node-postgres's plain mode, the baseline, one after another."""
    check_batch(run, driver_reference)


@pytest.mark.parametrize("name", list(ERROR_SQLSTATES))
def test_error_in_the_middle_of_a_batch(run: dict, driver_reference: Reference, name: str) -> None:
    """Each query of these drivers ends with its own Sync, so outside a transaction only the failing
    insert fails, with its SQLSTATE, and the others are kept."""
    outcome = run["error_batches"][name]
    assert [o["ok"] for o in outcome["outcomes"]] == [True, False, True]
    assert outcome["outcomes"][1]["sqlstate"] == ERROR_SQLSTATES[name]
    check_error_batch(outcome, driver_reference, kept=[1, 3])


@pytest.mark.parametrize("name", list(ERROR_SQLSTATES))
def test_error_in_a_pipelined_transaction(postgres_js_run: dict, driver_reference: Reference, name: str) -> None:
    """postgres.js's sql.begin with the inserts pipelined: the error rejects the transaction, which is
    rolled back whole."""
    outcome = postgres_js_run["transaction_batches"][name]
    assert (outcome["ok"], outcome["sqlstate"]) == (False, ERROR_SQLSTATES[name])
    check_error_batch(outcome, driver_reference, kept=[])


def test_error_batches_as_on_a_direct_server(run: dict, run_key: tuple[str, str], direct_results: dict) -> None:
    """The same batches against a server whose own function raises the 42704 (and whose key raises the
    23505): which queries fail, with which SQLSTATE, and which rows are kept, as through the proxy."""
    direct = batch_behaviour(direct_results[run_key])
    assert direct["error_batches"]["intercepted"]["kept"] == [1, 3]  # the stand-in did fail the middle row
    assert batch_behaviour(run) == direct
