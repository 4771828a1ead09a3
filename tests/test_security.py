"""Attacks on the proxy's service login, as an unprivileged role would make them, on the embedded
server (whose service login the proxy makes itself) and on an external server with a non-superuser
service login. Each escalation plants code that, run anywhere but in the attacker's own session,
marks where it ran (a session-level advisory lock), writes a file with COPY TO PROGRAM and makes
the attacker a superuser: none of the three may happen, and the statement's vectors must be right."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from .helpers import unique
from .pgcluster import PgCluster, proxy_data_dir
from .proxyproc import ProxyProcess, start_proxy

MODEL = "multilingual-e5-small:v1"
CALL = f"azure_local_ai.create_embeddings('{MODEL}', {{}})"
EMBEDDED_SERVICE_LOGIN = "azure_local_ai_service"
#: The advisory lock the planted code takes where it runs, if anywhere but the attacker's session.
MARK = (4242, 4242)


@dataclass
class Target:
    """A proxy, and how to reach its server as a superuser (through the proxy)."""

    name: str
    proxy: ProxyProcess
    service_login: str

    def admin(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.proxy.dsn(database=database), autocommit=True)


@pytest.fixture(scope="module", params=["external", "embedded"])
def target(request: pytest.FixtureRequest, pg: PgCluster, model_data_dir: Path) -> Iterator[Target]:
    with proxy_data_dir(model_data_dir) as data_dir:
        if request.param == "external":
            login = unique("svc")
            pg.psql(f"CREATE ROLE {login} LOGIN NOSUPERUSER; GRANT pg_read_all_data TO {login}")
            running = start_proxy(data_dir, "--service-user", login, upstream=pg.url(), preload=True)
        else:
            login = EMBEDDED_SERVICE_LOGIN
            running = start_proxy(data_dir, upstream=None, preload=True)
        yield Target(request.param, running, login)
        running.stop()


@dataclass
class Attacker:
    """An unprivileged role, with CREATE on the public schema of a database of its own."""

    role: str
    database: str
    evidence: Path

    def dsn(self, target: Target) -> str:
        return target.proxy.dsn(user=self.role, database=self.database)


@pytest.fixture()
def attacker(target: Target) -> Iterator[Attacker]:
    role, database = unique("mallory"), unique("sec")
    evidence = Path(f"/tmp/alp-pwned-{uuid.uuid4().hex}.log")
    with target.admin() as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE DATABASE {database}")
    with target.admin(database) as admin:
        admin.execute("CREATE EXTENSION azure_local_ai")
        admin.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    with psycopg.connect(target.proxy.dsn(user=role, database=database), autocommit=True) as own:
        own.execute(_PAYLOAD.format(role=role, evidence=evidence))
    yield Attacker(role, database, evidence)
    with target.admin() as admin:
        admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
        admin.execute(f"DROP ROLE {role}")
    evidence.unlink(missing_ok=True)


#: What runs wherever the attacker's objects are evaluated: harmless in the attacker's own session.
_PAYLOAD = """
CREATE FUNCTION public.payload() RETURNS boolean LANGUAGE plpgsql AS $body$
BEGIN
    IF session_user <> '{role}' THEN
        PERFORM pg_catalog.pg_advisory_lock(4242, 4242);
        BEGIN
            SET LOCAL transaction_read_only = off;
        EXCEPTION WHEN others THEN NULL;
        END;
        BEGIN
            SET LOCAL ROLE postgres;
            EXECUTE 'COPY (SELECT current_user, session_user) TO PROGRAM ''cat >> {evidence}''';
        EXCEPTION WHEN others THEN NULL;
        END;
        BEGIN
            SET LOCAL ROLE postgres;
            EXECUTE 'ALTER ROLE {role} SUPERUSER';
        EXCEPTION WHEN others THEN NULL;
        END;
    END IF;
    RETURN true;
END $body$
"""


def assert_no_trace(target: Target, attacker: Attacker) -> None:
    with target.admin(attacker.database) as admin:
        marks = admin.execute(
            "SELECT a.usename, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s", MARK).fetchall()
        superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (attacker.role,)).fetchone()
    assert marks == [], f"the attacker's code ran in {marks}"
    assert superuser == (False,)
    assert not attacker.evidence.exists(), attacker.evidence.read_text()
    assert target.proxy.alive()


def stats(target: Target) -> dict[str, int]:
    with psycopg.connect(target.proxy.dsn(database="azure_local_ai_proxy"), autocommit=True) as admin:
        return {name: int(value) for name, value in admin.execute("SHOW STATS").fetchall()
                if name.startswith("calls create_embeddings")}


def ahead(target: Target) -> int:
    return stats(target).get("calls create_embeddings ahead", 0)


def assert_embedded_right(conn: psycopg.Connection, table: str, text_sql: str = "body") -> None:
    rows = conn.execute(f"SELECT {text_sql}, v::text FROM {table}").fetchall()
    assert rows and all(v is not None for _, v in rows)
    for text, stored in rows:
        assert stored == conn.execute(f"SELECT {CALL.format('%s')}::text", (text,)).fetchone()[0]


ROWS = 20

#: Each: the objects the attacker makes (after payload()), and its statement, over table t(id, body, v).
ESCALATIONS = {
    "operator": (
        "CREATE FUNCTION public.cat(a text, b text) RETURNS text LANGUAGE sql AS "
        "$$ SELECT CASE WHEN public.payload() THEN a || b END $$;"
        "CREATE OPERATOR public.### (LEFTARG = text, RIGHTARG = text, FUNCTION = public.cat)",
        "UPDATE t SET v = " + CALL.format("body ### ' '")),
    "schema-qualified operator": (
        "CREATE FUNCTION public.cat(a text, b text) RETURNS text LANGUAGE sql AS "
        "$$ SELECT CASE WHEN public.payload() THEN a || b END $$;"
        "CREATE OPERATOR public.### (LEFTARG = text, RIGHTARG = text, FUNCTION = public.cat)",
        "UPDATE t SET v = " + CALL.format("body OPERATOR(public.###) ' '")),
    "operator on the search_path": (
        "CREATE FUNCTION public.cat(a text, b text) RETURNS text LANGUAGE sql AS "
        "$$ SELECT CASE WHEN public.payload() THEN pg_catalog.textcat(a, b) END $$;"
        "CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.cat);"
        "SET search_path = public, pg_catalog",
        "UPDATE t SET v = " + CALL.format("body || ' '")),
    "shadowed function": (
        "CREATE FUNCTION public.lower(x varchar) RETURNS text LANGUAGE sql AS "
        "$$ SELECT CASE WHEN public.payload() THEN pg_catalog.lower(x::text) END $$;"
        "ALTER TABLE t ALTER COLUMN body TYPE varchar",
        f"UPDATE t SET v = {CALL.format('lower(body)')}"),
    "view": (
        "CREATE TABLE dst (id int, v real[]);"
        "CREATE VIEW w AS SELECT id, body FROM t WHERE public.payload()",
        f"INSERT INTO dst SELECT id, {CALL.format('body')} FROM w"),
    "row-level security policy": (
        "ALTER TABLE t ENABLE ROW LEVEL SECURITY; ALTER TABLE t FORCE ROW LEVEL SECURITY;"
        "CREATE POLICY everything ON t USING (public.payload()) WITH CHECK (true)",
        f"UPDATE t SET v = {CALL.format('body')}"),
    "user-defined cast": (
        "CREATE TYPE wrapped AS (x text);"
        "CREATE FUNCTION public.unwrap(w wrapped) RETURNS text LANGUAGE sql AS "
        "$$ SELECT CASE WHEN public.payload() THEN (w).x END $$;"
        "CREATE CAST (wrapped AS text) WITH FUNCTION public.unwrap(wrapped) AS IMPLICIT;"
        "ALTER TABLE t ADD COLUMN packed wrapped; UPDATE t SET packed = ROW(body)",
        f"UPDATE t SET v = {CALL.format('packed::text')}"),
    "function in column notation": (
        "CREATE FUNCTION public.sneaky(r t) RETURNS text LANGUAGE sql AS "
        "$$ SELECT CASE WHEN public.payload() THEN r.body END $$",
        f"UPDATE t SET v = {CALL.format('t.sneaky')}"),
    "security definer function": (
        "CREATE FUNCTION public.definer(x text) RETURNS text LANGUAGE sql SECURITY DEFINER AS "
        "$$ SELECT CASE WHEN public.payload() THEN x END $$",
        f"UPDATE t SET v = {CALL.format('public.definer(body)')}"),
}


@pytest.mark.parametrize("attack", list(ESCALATIONS))
def test_an_escalation_through_the_look_ahead_leaves_no_trace(target: Target, attacker: Attacker,
                                                               attack: str) -> None:
    objects, statement = ESCALATIONS[attack]
    with psycopg.connect(attacker.dsn(target), autocommit=True) as own:
        own.execute("CREATE TABLE t (id int, body text, v real[])")
        own.execute(f"INSERT INTO t SELECT i, 'passage: attack ' || i FROM generate_series(1, {ROWS}) i")
        own.execute(objects)
        own.execute(statement)
        own.execute("RESET search_path")
        if attack == "view":
            stored = own.execute("SELECT t.body, dst.v::text FROM dst JOIN t USING (id)").fetchall()
            assert len(stored) == ROWS
            for text, vector in stored:
                assert vector == own.execute(f"SELECT {CALL.format('%s')}::text", (text,)).fetchone()[0]
        else:
            own.execute("ALTER TABLE t DISABLE ROW LEVEL SECURITY")
            text_sql = {"operator": "body || ' '", "schema-qualified operator": "body || ' '",
                        "operator on the search_path": "body || ' '"}.get(
                attack, "body")
            assert_embedded_right(own, "t", text_sql)
    assert_no_trace(target, attacker)


def test_a_back_fill_over_plain_columns_is_still_computed_ahead(target: Target, attacker: Attacker) -> None:
    """The checks leave plain tables to the look-ahead: most rows are answered ahead, by the service
    login, which is no superuser."""
    with target.admin() as admin:
        assert admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s",
                             (target.service_login,)).fetchone() == (False,)
    with psycopg.connect(attacker.dsn(target), autocommit=True) as own:
        own.execute("CREATE TABLE plain (id int, title text, body varchar, v real[])")
        own.execute("INSERT INTO plain SELECT i, 'title ' || i, 'passage: plain ' || i FROM generate_series(1, 200) i")
        before = ahead(target)
        own.execute(f"UPDATE plain SET v = {CALL.format('lower(title) || chr(10) || body')} WHERE id % 2 = 0 "
                    "OR coalesce(title, '') LIKE 'title 1%'")
        computed = ahead(target) - before
        assert_embedded_right(own, "plain WHERE v IS NOT NULL", "lower(title) || chr(10) || body")
        assert computed >= 100, f"only {computed} of the rows were computed ahead"
    assert_no_trace(target, attacker)


def test_a_forged_request_changes_no_setting(target: Target, attacker: Attacker) -> None:
    """A SECURITY DEFINER function of the attacker's, called by a superuser, raises a notice shaped
    like the extension's request to change a setting, in the superuser's name: nothing changes."""
    with psycopg.connect(attacker.dsn(target), autocommit=True) as own:
        own.execute("""
            CREATE FUNCTION public.innocent() RETURNS integer LANGUAGE plpgsql SECURITY DEFINER AS $$
            BEGIN
                RAISE NOTICE USING ERRCODE = 'AL001', MESSAGE = 'azure-local-ai-proxy request',
                    DETAIL = jsonb_build_object('id', md5(random()::text), 'at', 0, 'fn', 'set_setting',
                        'args', jsonb_build_object('key', 'intra_op_parallelism', 'value', '1'),
                        'role', session_user, 'kept', true, 'keyed', true)::text;
                PERFORM pg_sleep(0.5);
                RETURN 1;
            END $$""")
    with target.admin(attacker.database) as admin:
        admin.execute("SELECT azure_local_ai.set_setting('intra_op_parallelism', '2')")
        assert admin.execute("SELECT public.innocent()").fetchone() == (1,)
        time.sleep(0.5)
        assert admin.execute("SELECT azure_local_ai.get_setting('intra_op_parallelism')").fetchone() == ("2",)
    assert target.proxy.alive()


def _watch_advisory_locks(dsn: str, stop: threading.Event, grabbed: list[int], take: bool) -> None:
    """Another role: reads pg_locks every few milliseconds and, with `take`, takes every advisory lock
    it has ever seen there as soon as it is free, and keeps it (a session's fixed key, seen once,
    would be held against all its later requests). Without `take` it only watches: the same load on
    the machine, to measure against."""
    seen: set[int] = set()
    held: set[int] = set()
    with psycopg.connect(dsn, autocommit=True) as eve:
        while not stop.is_set():
            seen.update(key for (key,) in eve.execute(
                "SELECT (l.classid::bigint << 32) | l.objid::bigint FROM pg_locks l "
                "WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.pid <> pg_backend_pid()").fetchall())
            wanted = sorted(seen - held) if take else []
            taken = [key for (key,) in eve.execute(
                "SELECT k FROM unnest(%s::bigint[]) AS k WHERE pg_try_advisory_lock(k)", (wanted,))]
            held.update(taken)
            grabbed.extend(taken)
            time.sleep(0.005)


def test_a_role_holding_the_locks_it_sees_stalls_no_one(target: Target, attacker: Attacker) -> None:
    """The lock a waiting function sleeps on is new for each request: another role that takes every
    advisory lock it sees in pg_locks slows a 10-row back-fill whose rows each ask by under 250 ms,
    against the same role only watching (the same load on the machine): a lock it could hold would
    stall each row by its lock_timeout (50 ms) at the least, 500 ms in all, and a loaded machine moves
    the paired difference by tens of milliseconds."""
    eve = unique("eve")
    with target.admin() as admin:
        admin.execute(f"CREATE ROLE {eve} LOGIN")
    with psycopg.connect(attacker.dsn(target), autocommit=True) as own:
        # Through a function of its own, the statement names no azure_local_ai function: no look-ahead,
        # every row asks and waits.
        own.execute(f"CREATE FUNCTION emb(x text) RETURNS real[] LANGUAGE sql AS $$ SELECT {CALL.format('x')} $$")
        own.execute("CREATE TABLE ten (id int, body text, v real[])")

        def back_fill(run: str, take: bool, grabbed: list[int]) -> float:
            own.execute("TRUNCATE ten")
            own.execute("INSERT INTO ten SELECT i, %s || ' sentence number ' || i FROM generate_series(1, 10) i",
                        (run,))
            stop = threading.Event()
            eve_dsn = target.proxy.dsn(user=eve, database=attacker.database)
            watcher = threading.Thread(target=_watch_advisory_locks, args=(eve_dsn, stop, grabbed, take), daemon=True)
            watcher.start()
            time.sleep(0.05)
            try:
                started = time.monotonic()
                own.execute("UPDATE ten SET v = emb(body)")
                return time.monotonic() - started
            finally:
                stop.set()
                watcher.join(10)

        back_fill("warm-up", False, [])
        watched, attacked, grabbed = [], [], []
        for run in range(7):
            watched.append(back_fill(f"watched {run}", False, []))
            attacked.append(back_fill(f"attacked {run}", True, grabbed))
        assert_embedded_right(own, "ten")
    with target.admin() as admin:
        admin.execute(f"DROP OWNED BY {eve}; DROP ROLE {eve}")
    slowed = statistics.median(a - w for a, w in zip(attacked, watched, strict=True))  # pairs: drift cancels
    assert slowed < 0.25, f"slowed by {slowed * 1000:.0f} ms (watched {watched}, attacked {attacked})"
    assert grabbed, "the other role took no lock: the attack was not made"


def test_an_operator_of_the_sessions_schemas_cannot_answer_the_privilege_check(target: Target,
                                                                               attacker: Attacker) -> None:
    """The proxy checks a constant set_setting's caller in the caller's own session: an `=` of the
    attacker's, first on its search_path, that says every name is a superuser's, changes nothing."""
    with psycopg.connect(attacker.dsn(target), autocommit=True) as own:
        own.execute("CREATE FUNCTION public.yes(a name, b name) RETURNS boolean LANGUAGE sql AS 'SELECT true';"
                    "CREATE OPERATOR public.= (LEFTARG = name, RIGHTARG = name, FUNCTION = public.yes)")
        own.execute("SET search_path = public, pg_catalog")
        before = own.execute("SELECT azure_local_ai.get_setting('intra_op_parallelism')").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            own.execute("SELECT azure_local_ai.set_setting('intra_op_parallelism', '1')")
        assert own.execute("SELECT azure_local_ai.get_setting('intra_op_parallelism')").fetchone() == before
