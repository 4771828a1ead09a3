"""Many proxies in front of one server share one catalog of models and settings, kept in the server
(catalog/server.py): a change through one is seen through the others within a second, survives their
restarts, and changes racing each other end as some serial order of them would have left it."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from inference import build_hf_dir

from . import test_inference_fixtures as shared
from .helpers import new_database, unique
from .pgcluster import PgCluster, proxy_data_dir
from .proxyproc import ProxyProcess, start_proxy

minilm_dir = shared.minilm_dir  # session fixture: all-MiniLM-L6-v2 as safetensors


@pytest.fixture(scope="module")
def catalog_database(pg: PgCluster) -> Iterator[str]:
    """Where the catalog is kept (admin_auth_database): a database of this module's own."""
    with new_database(pg, "catalog") as name:
        yield name


@pytest.fixture(scope="module")
def catalog_login(pg: PgCluster, catalog_database: str) -> str:
    """A service login that may make the catalog's schema (CREATE on the database), and no superuser."""
    login = unique("svc")
    pg.psql(f"CREATE ROLE {login} LOGIN; GRANT pg_read_all_data TO {login}; "
            f"GRANT CREATE ON DATABASE {catalog_database} TO {login}")
    return login


def catalog_proxy(directory: Path, pg: PgCluster, login: str, database: str) -> ProxyProcess:
    return start_proxy(directory, "--service-user", login, "--catalog", "server", "--admin-auth-database", database,
                       upstream=pg.url(), preload=True)


@pytest.fixture(scope="module")
def proxies(pg: PgCluster, model_data_dir: Path, catalog_login: str,
            catalog_database: str) -> Iterator[list[ProxyProcess]]:
    with proxy_data_dir(model_data_dir) as first_dir, proxy_data_dir(model_data_dir) as second_dir:
        running = [catalog_proxy(directory, pg, catalog_login, catalog_database)
                   for directory in (first_dir, second_dir)]
        try:
            yield running
        finally:
            for proxy in running:
                proxy.stop()


def value(proxy: ProxyProcess, sql: str) -> object:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def within(seconds: float, check: Callable[[], bool]) -> float:
    """How long `check` took to hold (fails after `seconds`)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "not seen in time"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_setting_changed_through_one_is_seen_through_the_other(proxies: list[ProxyProcess]) -> None:
    first, second = proxies
    for wanted in ("1", "2"):
        value(first, f"SELECT azure_local_ai.set_setting('intra_op_parallelism', '{wanted}')")
        took = within(1.0, lambda wanted=wanted: value(
            second, "SELECT azure_local_ai.get_setting('intra_op_parallelism')") == wanted)
        assert took < 1.0


def test_racing_changes_end_in_one_state_that_every_proxy_reports(proxies: list[ProxyProcess]) -> None:
    """50 conflicting set_setting calls through both proxies at once: afterwards both report the same
    value, the one of the last call the server ran (some serial order of them)."""
    calls = [(proxies[i % 2], str(1 + i % 2), "true" if i % 3 else "false") for i in range(50)]
    errors: list[BaseException] = []

    def call(proxy: ProxyProcess, threads: str, spin: str) -> None:
        try:
            value(proxy, f"SELECT azure_local_ai.set_setting(ARRAY['intra_op_parallelism', 'spin_control'], "
                         f"ARRAY['{threads}', '{spin}'])")
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=call, args=c) for c in calls]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    query = "SELECT azure_local_ai.get_setting(ARRAY['intra_op_parallelism', 'spin_control'])::text"
    within(1.0, lambda: value(proxies[0], query) == value(proxies[1], query))
    final = value(proxies[0], query)
    assert final in {value_of(threads, spin) for _, threads, spin in calls}


def value_of(threads: str, spin: str) -> str:
    return f'{{"spin_control": "{spin}", "intra_op_parallelism": "{threads}"}}'


def test_the_catalog_outlives_a_proxys_restart(pg: PgCluster, proxies: list[ProxyProcess], model_data_dir: Path,
                                                catalog_login: str, catalog_database: str) -> None:
    value(proxies[0], "SELECT azure_local_ai.set_setting('inter_op_parallelism', '2')")
    with proxy_data_dir(model_data_dir) as directory:
        third = catalog_proxy(directory, pg, catalog_login, catalog_database)
        try:
            assert value(third, "SELECT azure_local_ai.get_setting('inter_op_parallelism')") == "2"
        finally:
            third.stop()
    value(proxies[1], "SELECT azure_local_ai.set_setting('inter_op_parallelism', '1')")


def test_a_model_registered_through_one_is_used_through_the_other_and_checked(
        proxies: list[ProxyProcess], model_data_dir: Path, minilm_dir: Path) -> None:
    """Registered through one proxy, a model is there for the other within a second; its files' SHA-256,
    taken at registration, is checked by each proxy that loads them: a copy that differs is refused
    (XX001, naming the file and both hashes), never used. Unregistered through the other, it is gone
    for the first."""
    first, second = proxies
    target = (model_data_dir / "models" / f"shared-{unique('m')}").resolve()
    build_hf_dir(minilm_dir, target)
    uri = f"shared-minilm:{target.name}"
    try:
        value(first, f"SELECT azure_local_ai.model_register('{uri}', '{target}')")
        embed = f"SELECT array_length(azure_local_ai.create_embeddings('{uri}', 'shared text'), 1)"
        within(1.0, lambda: _error(second, f"SELECT azure_local_ai.model_metadata('{uri}')") == "")
        assert value(second, embed) == 384
        value(second, f"SELECT azure_local_ai.model_unload('{uri}')")
        tokenizer = target / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text() + "\n")  # still a tokenizer, but not the one registered
        with psycopg.connect(first.dsn(), autocommit=True) as conn, pytest.raises(psycopg.errors.DataCorrupted) as bad:
            conn.execute(embed)
        assert str(target) in str(bad.value) and "not those registered" in str(bad.value)
        value(second, f"SELECT azure_local_ai.model_unregister('{uri}')")
        within(1.0, lambda: "not registered" in _error(first, embed))
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _error(proxy: ProxyProcess, sql: str) -> str:
    try:
        value(proxy, sql)
    except psycopg.Error as exc:
        return str(exc)
    return ""


def test_show_stats_says_where_the_catalog_is(proxies: list[ProxyProcess]) -> None:
    with psycopg.connect(proxies[0].dsn(database="azure_local_ai_proxy"), autocommit=True) as admin:
        stats = dict(admin.execute("SHOW STATS").fetchall())
    assert stats["catalog"] == "server"


def test_racing_registrations_of_one_model_leave_one(proxies: list[ProxyProcess], model_data_dir: Path,
                                                     minilm_dir: Path) -> None:
    """10 registrations of the same model at once, through both proxies: one succeeds, the others are
    told it is registered (42710), and both proxies then list it once."""
    target = (model_data_dir / "models" / f"race-{unique('m')}").resolve()
    build_hf_dir(minilm_dir, target)
    uri = f"race-minilm:{target.name}"
    outcomes: list[str] = []

    def register(proxy: ProxyProcess) -> None:
        try:
            value(proxy, f"SELECT azure_local_ai.model_register('{uri}', '{target}')")
            outcomes.append("registered")
        except psycopg.errors.DuplicateObject:
            outcomes.append("42710")

    workers = [threading.Thread(target=register, args=(proxies[i % 2],)) for i in range(10)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert sorted(outcomes) == ["42710"] * 9 + ["registered"]
        for proxy in proxies:
            within(1.0, lambda proxy=proxy: _error(proxy, f"SELECT azure_local_ai.model_metadata('{uri}')") == "")
        value(proxies[0], f"SELECT azure_local_ai.model_unregister('{uri}')")
    finally:
        shutil.rmtree(target, ignore_errors=True)
