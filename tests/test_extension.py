"""CREATE EXTENSION azure_local_ai through the proxy, and the calls the server evaluates: generated
columns, back-fills, copies, triggers, views, in every isolation level, answered by the proxy.
Each test works in a database of its own, where the extension is installed or not."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import numpy as np
import psycopg
import pytest

from proxy import protocol as pg
from proxy.intercept.extension import VERSION
from proxy.intercept.serverrequests import encode_answer, kept_key, kept_place
from proxy.mailbox import Mailbox
from proxy.messages import Bind, Parse

from .helpers import new_database, unique
from .helpers_embeddings import assert_same_embeddings
from .pgcluster import PgCluster, debian_postgres_bin, start_cluster
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient

MODEL = "multilingual-e5-small:v1"
CALL = f"azure_local_ai.create_embeddings('{MODEL}', {{}})"
TWELVE = {
    ("create_embeddings", "model_uri text, input text, timeout_ms integer DEFAULT 3600000"),
    ("create_embeddings", "model_uri text, inputs text[], batch_size bigint DEFAULT 128, "
                          "timeout_ms integer DEFAULT 3600000"),
    ("create_embeddings", "model_uri text, inputs text[], ids anyarray, batch_size bigint DEFAULT 128, "
                          "timeout_ms integer DEFAULT 3600000"),
    ("get_setting", "keys text[] DEFAULT ARRAY[]::text[], timeout_ms integer DEFAULT 3600000"),
    ("get_setting", "key text, timeout_ms integer DEFAULT 3600000"),
    ("model_loaded", "model_uri text, timeout_ms integer DEFAULT 3600000"),
    ("model_metadata", "model_uri text"),
    ("model_register", "model_uri text, model_path text, tokenizer_path text DEFAULT NULL::text, "
                       "timeout_ms integer DEFAULT 3600000"),
    ("model_unload", "model_uri text, timeout_ms integer DEFAULT 3600000"),
    ("model_unregister", "model_uri text, timeout_ms integer DEFAULT 3600000"),
    ("set_setting", "keys text[], \"values\" text[], timeout_ms integer DEFAULT 3600000"),
    ("set_setting", "key text, value text, timeout_ms integer DEFAULT 3600000"),
}
TEXTS = ["hello world", "bonjour le monde", "hola mundo", "こんにちは世界", "Hallo Welt"]


@pytest.fixture()
def database(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "ext", "vector") as name:
        yield name


@pytest.fixture()
def conn(proxy: ProxyProcess, database: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as connection:
        connection.execute("CREATE EXTENSION IF NOT EXISTS azure_local_ai")
        yield connection


def floats(text: str) -> np.ndarray:
    return np.array([float(x) for x in text.strip("{}[]").split(",")], dtype=np.float32)


def constant_path(conn: psycopg.Connection, text: str) -> str:
    """The same text through the proxy's fast path (a constant argument), as text."""
    return conn.execute(f"SELECT {CALL.format('%s')}::text", (text,)).fetchone()[0]


def test_the_documented_generated_column_over_existing_rows_then_an_insert(
    conn: psycopg.Connection, engine_vectors
) -> None:
    conn.execute("CREATE TABLE documents (doc_id serial PRIMARY KEY, doc_contents text)")
    conn.execute("INSERT INTO documents (doc_contents) SELECT unnest(%s::text[])", (TEXTS,))
    conn.execute(
        "ALTER TABLE documents ADD COLUMN doc_vector vector(384) GENERATED ALWAYS AS "
        f"({CALL.format('doc_contents')}::vector) STORED"
    )
    conn.execute("INSERT INTO documents (doc_contents) VALUES ('a sixth document')")
    rows = conn.execute("SELECT doc_contents, doc_vector::text FROM documents ORDER BY doc_id").fetchall()
    assert [r[0] for r in rows] == [*TEXTS, "a sixth document"]
    for text, stored in rows:
        assert stored == conn.execute("SELECT %s::real[]::vector::text", (constant_path(conn, text),)).fetchone()[0]
        assert_same_embeddings(floats(stored), engine_vectors(text)[0])


def test_create_table_with_the_column_inserts_and_the_similarity_query(conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, v vector(384) GENERATED ALWAYS AS "
        f"({CALL.format('body')}::vector) STORED)"
    )
    for i, text in enumerate(TEXTS):
        conn.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (i, text))
    found = conn.execute(
        f"SELECT body FROM docs ORDER BY v <=> {CALL.format(repr('hello world'))}::vector LIMIT 1"
    ).fetchone()
    assert found == ("hello world",)


def test_back_fill_copy_cte_join_lateral_and_a_view(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE src (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO src SELECT i, (%s::text[])[i] FROM generate_series(1, 5) i", (TEXTS,))
    conn.execute("ALTER TABLE src ADD COLUMN v real[]")
    assert conn.execute(f"UPDATE src SET v = {CALL.format('body')}").rowcount == 5
    conn.execute("CREATE TABLE dst (id int, v real[])")
    conn.execute(f"INSERT INTO dst SELECT id, {CALL.format('body')} FROM src")
    expected = {text: constant_path(conn, text) for text in TEXTS}
    for table in ("src", "dst"):
        got = conn.execute(f"SELECT s.body, t.v::text FROM {table} t JOIN src s USING (id)").fetchall()
        assert dict(got) == expected
    cte = conn.execute(
        f"WITH q AS (SELECT 'hola mundo' AS s) SELECT body FROM src, q "
        f"ORDER BY v::vector <=> {CALL.format('q.s')}::vector LIMIT 1"
    ).fetchone()
    assert cte == ("hola mundo",)
    lateral = conn.execute(
        f"SELECT s.body, e.x::text FROM src s, LATERAL (SELECT {CALL.format('s.body')} AS x) e ORDER BY s.id"
    ).fetchall()
    assert dict(lateral) == expected
    conn.execute(f"CREATE VIEW embedded AS SELECT body, {CALL.format('body')} AS v FROM src")
    assert dict(conn.execute("SELECT body, v::text FROM embedded").fetchall()) == expected


def test_trigger_copy_on_conflict_and_update_of_the_source_recompute(conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, v real[] GENERATED ALWAYS AS "
        f"({CALL.format('body')}) STORED, t real[])"
    )
    conn.execute(
        "CREATE FUNCTION embed_t() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"NEW.t := {CALL.format(chr(39) + 'passage: ' + chr(39) + ' || NEW.body')}; RETURN NEW; END $$"
    )
    conn.execute("CREATE TRIGGER docs_t BEFORE INSERT OR UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION embed_t()")
    with conn.cursor().copy("COPY docs (id, body) FROM STDIN") as copy:
        for i in range(1000):
            copy.write_row((i, f"row {i % 10}"))
    assert conn.execute("SELECT count(*), count(DISTINCT v::text), count(t) FROM docs").fetchone() == (1000, 10, 1000)
    conn.execute("INSERT INTO docs (id, body) VALUES (1, 'hola mundo') ON CONFLICT (id) DO UPDATE SET body = "
                 "excluded.body")
    conn.execute("UPDATE docs SET body = 'Hallo Welt' WHERE id = 2")
    got = dict(conn.execute("SELECT body, v::text FROM docs WHERE id IN (1, 2)").fetchall())
    assert got == {text: constant_path(conn, text) for text in ("hola mundo", "Hallo Welt")}
    trig = conn.execute("SELECT t::text FROM docs WHERE id = 1").fetchone()[0]
    assert trig == constant_path(conn, "passage: hola mundo")


@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_every_isolation_level(conn: psycopg.Connection, level: str) -> None:
    conn.execute(f"CREATE TABLE docs (body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    conn.autocommit = False
    conn.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
    conn.execute("SELECT 1")  # the snapshot is taken: the proxy's answers come after it
    conn.execute("INSERT INTO docs (body) VALUES ('hello world'), ('hola mundo')")
    conn.execute("UPDATE docs SET body = body || '!'")
    got = dict(conn.execute(f"SELECT body, {CALL.format('body')}::text FROM docs").fetchall())
    conn.commit()
    conn.autocommit = True
    stored = dict(conn.execute("SELECT body, v::text FROM docs").fetchall())
    expected = {text: constant_path(conn, text) for text in ("hello world!", "hola mundo!")}
    assert got == expected and stored == expected


def test_every_function_answers_when_the_server_calls_it(conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE FUNCTION settings_now() RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
        "RETURN azure_local_ai.get_setting('spin_control') || ' ' "
        "|| azure_local_ai.get_setting(ARRAY['inter_op_parallelism'])::text "
        f"|| ' ' || azure_local_ai.model_loaded('{MODEL}') || ' ' "
        f"|| (azure_local_ai.model_metadata('{MODEL}')->>'dimensions'); END $$"
    )
    assert conn.execute("SELECT settings_now()").fetchone() == ('true {"inter_op_parallelism": "1"} true 384',)
    rows = conn.execute(
        "SELECT e.embedding::text FROM (SELECT ARRAY['a', 'b'] AS x) s, "
        f"azure_local_ai.create_embeddings('{MODEL}', s.x) e"
    ).fetchall()
    assert [r[0] for r in rows] == [constant_path(conn, "a"), constant_path(conn, "b")]
    with_ids = conn.execute(
        "SELECT e.id, e.embedding::text FROM (SELECT ARRAY['a', 'b'] AS x, ARRAY[7, 9] AS i) s, "
        f"azure_local_ai.create_embeddings('{MODEL}', s.x, s.i) e"
    ).fetchall()
    assert with_ids == [(7, constant_path(conn, "a")), (9, constant_path(conn, "b"))]
    # What changes settings and models is never evaluated by the server (its request could be forged
    # by any code in the session): it says how to call it instead, and nothing changes.
    for statement in ("SELECT azure_local_ai.set_setting(k, 'false') FROM (VALUES ('spin_control')) s(k)",
                      "DO $$ BEGIN PERFORM azure_local_ai.set_setting('spin_control', 'false'); END $$",
                      "SELECT azure_local_ai.model_unload(m) FROM (VALUES ('multilingual-e5-small:v1')) s(m)"):
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            conn.execute(statement)
        assert "with constant arguments" in (refused.value.diag.message_hint or "")
    assert conn.execute("SELECT azure_local_ai.get_setting('spin_control')").fetchone() == ("true",)
    assert conn.execute(f"SELECT azure_local_ai.model_loaded('{MODEL}')").fetchone() == (True,)


def test_the_client_sees_none_of_the_proxys_messages(conn: psycopg.Connection) -> None:
    notices: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda diag: notices.append((diag.sqlstate, diag.message_primary)))
    conn.execute("SET client_min_messages = debug5")  # the server's own debug messages still come
    conn.execute(f"SELECT {CALL.format('relname')} FROM pg_class LIMIT 3").fetchall()
    assert notices and not [n for n in notices if n[0] in ("AL001", "AL002") or "proxy" in (n[1] or "")]


def test_psql_lists_the_twelve_and_the_extension_statements(proxy: ProxyProcess, database: str) -> None:
    dsn = proxy.dsn(database=database)
    out = proxy.psql("-c", "CREATE EXTENSION azure_local_ai", dsn=dsn)
    assert out.stdout.strip() == "CREATE EXTENSION"
    listed = proxy.psql("-At", "-F", "|", "-c", r"\df azure_local_ai.*", dsn=dsn).stdout.strip().split("\n")
    assert {(line.split("|")[1], line.split("|")[3]) for line in listed} == TWELVE and len(listed) == 12
    again = proxy.psql("-c", "CREATE EXTENSION azure_local_ai", dsn=dsn, check=False)
    assert 'ERROR:  extension "azure_local_ai" already exists' in again.stderr and "CONTEXT" not in again.stderr
    skip = proxy.psql("-c", "CREATE EXTENSION IF NOT EXISTS azure_local_ai", dsn=dsn)
    assert 'extension "azure_local_ai" already exists, skipping' in skip.stderr
    update = proxy.psql("-c", "ALTER EXTENSION azure_local_ai UPDATE", dsn=dsn)
    assert update.stdout.strip() == "ALTER EXTENSION" and f'"{VERSION}" of extension' in update.stderr
    proxy.psql("-c", f"CREATE TABLE d (b text, v real[] GENERATED ALWAYS AS ({CALL.format('b')}) STORED)", dsn=dsn)
    refused = proxy.psql("-c", "DROP EXTENSION azure_local_ai", dsn=dsn, check=False)
    assert "cannot drop extension azure_local_ai because other objects depend on it" in refused.stderr
    assert "column v of table d depends on function azure_local_ai.create_embeddings" in refused.stderr
    dropped = proxy.psql("-c", "DROP EXTENSION azure_local_ai CASCADE", dsn=dsn)
    assert dropped.stdout.strip() == "DROP EXTENSION" and "drop cascades to column v of table d" in dropped.stderr
    gone = proxy.psql("-c", "DROP EXTENSION IF EXISTS azure_local_ai", dsn=dsn)
    assert 'extension "azure_local_ai" does not exist, skipping' in gone.stderr


def test_without_the_extension_a_column_argument_says_what_to_do(proxy: ProxyProcess, database: str) -> None:
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidSchemaName) as caught:
            conn.execute(f"SELECT {CALL.format('relname')} FROM pg_class LIMIT 1")
        assert "CREATE EXTENSION azure_local_ai" in (caught.value.diag.message_hint or "")
        assert conn.execute(f"SELECT array_length({CALL.format(repr('x'))}, 1)").fetchone() == (384,)


def test_a_session_straight_to_the_server_gets_a_clear_error(conn: psycopg.Connection, pg: PgCluster,
                                                             database: str) -> None:
    with (psycopg.connect(pg.dsn(database=database), autocommit=True) as direct,
          pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not connected through it")):
        direct.execute(f"SELECT {CALL.format(repr('x'))}")


def test_privileges(conn: psycopg.Connection, proxy: ProxyProcess, pg: PgCluster, database: str) -> None:
    role = unique("plain")
    pg.psql(f"CREATE ROLE {role} LOGIN; REVOKE CREATE ON DATABASE {database} FROM PUBLIC")
    conn.execute("CREATE TABLE docs (body text)")
    conn.execute(f"INSERT INTO docs VALUES ('x'); GRANT SELECT ON docs TO {role}")
    with psycopg.connect(proxy.dsn(user=role, database=database), autocommit=True) as plain:
        assert len(plain.execute(f"SELECT {CALL.format('body')} FROM docs").fetchone()[0]) == 384
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            plain.execute("SELECT azure_local_ai.set_setting('spin_control', 'false')")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            plain.execute("SELECT azure_local_ai.set_setting(k, 'false') FROM (VALUES ('spin_control')) s(k)")
    other = unique("ext")
    pg.psql(f"CREATE DATABASE {other}")
    pg.psql(f"REVOKE CREATE ON DATABASE {other} FROM PUBLIC")
    try:
        with (psycopg.connect(proxy.dsn(user=role, database=other), autocommit=True) as plain,
              pytest.raises(psycopg.errors.InsufficientPrivilege)):
            plain.execute("CREATE EXTENSION azure_local_ai")
    finally:
        pg.psql(f"DROP DATABASE {other}")


def test_timeout_and_cancel_stop_a_back_fill(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE big (body text)")
    conn.execute("INSERT INTO big SELECT 'text number ' || i FROM generate_series(1, 5000) i")
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute(f"SELECT count(azure_local_ai.create_embeddings('{MODEL}', body, 1)) FROM big")
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute(f"SELECT count({CALL.format('body')}) FROM big")
    assert time.monotonic() - started < 10
    conn.execute("SET statement_timeout = 500")
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute(f"SELECT count({CALL.format('body')}) FROM big")
    conn.execute("RESET statement_timeout")
    assert conn.execute("SELECT 1").fetchone() == (1,)


def create_deaf_function(conn: psycopg.Connection, body: str) -> None:
    """deaf(body text) runs `body` and swallows the server's own cancel or statement timeout (a 57014
    raised anywhere but at a RAISE of the extension's, which the proxy's answers and 1.5's timeout
    are), as PostgreSQL does where one lands as the extension's wait for its answer times out."""
    conn.execute(f"""CREATE FUNCTION deaf(body text) RETURNS real[] LANGUAGE plpgsql AS $$
        DECLARE context text;
        BEGIN
            {body}
        EXCEPTION WHEN query_canceled THEN
            GET STACKED DIAGNOSTICS context = PG_EXCEPTION_CONTEXT;
            IF context LIKE '%at RAISE%' THEN
                RAISE;
            END IF;
            RETURN NULL;
        END $$""")


def test_a_cancel_the_server_loses_still_ends_the_statement(conn: psycopg.Connection) -> None:
    """PostgreSQL loses a cancel that lands as the function's wait for its answer times out (lock_timeout
    then wins, and the wait goes on): the proxy, which relayed the cancel, answers the statement's calls
    with the cancel's error itself. Here a function swallows the server's own cancel, every time."""
    conn.execute("CREATE TABLE big (body text)")
    conn.execute("INSERT INTO big SELECT 'lost cancel ' || i FROM generate_series(1, 3000) i")
    create_deaf_function(conn, f"RETURN {CALL.format('body')};")
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request") as raised:
        conn.execute("SELECT count(deaf(body)) FROM big")
    assert time.monotonic() - started < 10
    assert (raised.value.diag.message_detail, raised.value.diag.message_hint) == (None, None)  # as PostgreSQL's
    conn.cancel()  # between statements there is nothing to cancel: the next one runs
    time.sleep(0.3)
    assert conn.execute("SELECT count(deaf(body)) FROM big WHERE body LIKE '%cancel 7'").fetchone() == (1,)


def test_a_statement_timeout_the_server_loses_still_ends_the_statement(conn: psycopg.Connection) -> None:
    """PostgreSQL loses a statement_timeout that falls due as the function's wait for its answer times
    out (it reports the wait's timeout, which the wait takes as a turn of its loop): from 1.5 the wait
    raises the statement's timeout itself once it has passed. Here a function swallows the server's
    own timeout, every time, and each call waits longer than a turn (8 long texts)."""
    conn.execute("CREATE TABLE long_texts (body text)")
    conn.execute("INSERT INTO long_texts SELECT 'lost timeout ' || i || repeat(' word', 500) "
                 "FROM generate_series(1, 40) i")
    create_deaf_function(conn, f"PERFORM azure_local_ai.create_embeddings('{MODEL}', "
                               "ARRAY(SELECT g || body FROM generate_series(1, 8) g)); RETURN NULL;")
    conn.execute("SET statement_timeout = 500")
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to statement timeout"):
        conn.execute("SELECT count(deaf(body)) FROM long_texts")
    assert time.monotonic() - started < 30  # lost, it runs to its end: ~90 s here


def test_prepared_statements_of_asyncpg_and_psycopg(conn: psycopg.Connection, proxy: ProxyProcess,
                                                    database: str) -> None:
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")

    async def with_asyncpg() -> list[str]:
        session = await asyncpg.connect(proxy.dsn(database=database))
        try:
            insert = await session.prepare("INSERT INTO docs (id, body) VALUES ($1, $2)")
            for i, text in enumerate(TEXTS[:3]):
                await insert.fetch(i, text)
            return [r[0] for r in await session.fetch("SELECT v::text FROM docs ORDER BY id")]
        finally:
            await session.close()

    assert asyncio.run(with_asyncpg()) == [constant_path(conn, t) for t in TEXTS[:3]]
    with psycopg.connect(proxy.dsn(database=database), autocommit=True, prepare_threshold=0) as prepared:
        for i, text in enumerate(TEXTS[3:], 3):
            prepared.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (i, text))
        got = prepared.execute(f"SELECT {CALL.format('body')}::text FROM docs WHERE id >= %s ORDER BY id", (3,))
        assert [r[0] for r in got] == [constant_path(conn, t) for t in TEXTS[3:]]


def test_read_only_transactions(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE docs (body text)")
    conn.execute("INSERT INTO docs VALUES ('hello world')")
    expected = constant_path(conn, "hello world")
    conn.autocommit = False
    conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED READ ONLY")
    got = conn.execute(f"SELECT {CALL.format('body')}::text FROM docs").fetchone()[0]
    conn.rollback()
    assert got == expected
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only REPEATABLE READ"):
        conn.execute(f"SELECT {CALL.format('body')} FROM docs")
    conn.rollback()


def test_a_dump_restored_through_the_proxy_recomputes_the_column(
    conn: psycopg.Connection, proxy: ProxyProcess, pg: PgCluster, database: str
) -> None:
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    conn.execute("INSERT INTO docs (id, body) SELECT i, 'dumped ' || i FROM generate_series(1, 20) i")
    dump = subprocess.run([str(pg.bin_dir / "pg_dump"), "--no-owner", pg.dsn(database=database)],
                          capture_output=True, text=True, check=True).stdout
    assert "GENERATED ALWAYS AS" in dump and "azure_local_ai_proxy.ask" in dump
    assert "lo_create" not in dump  # no mailbox outlives the statement that needed it
    restored = unique("ext")
    pg.psql(f"CREATE DATABASE {restored}")
    try:
        proxy.psql("-q", "-f", "-", dsn=proxy.dsn(database=restored), input=dump)
        with psycopg.connect(proxy.dsn(database=restored), autocommit=True) as again:
            rows = again.execute("SELECT body, v::text FROM docs ORDER BY id").fetchall()
        assert rows == [(f"dumped {i}", constant_path(conn, f"dumped {i}")) for i in range(1, 21)]
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {restored} WITH (FORCE)")


def test_on_debians_postgresql_too(model_data_dir: Path, tmp_path: Path) -> None:
    """The same objects and channel on another major version: Debian's server package (15 on bookworm)."""
    bin_dir = debian_postgres_bin()
    if bin_dir is None:
        pytest.fail("Debian's postgresql server package is needed: apt-get install postgresql (make test does this)")
    cluster = start_cluster(bin_dir=bin_dir)
    data_dir = tmp_path / "proxy"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
    proxy = start_proxy(data_dir, "--service-user", "postgres", upstream=cluster.url())
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            version = conn.execute("SHOW server_version_num").fetchone()[0]
            conn.execute("CREATE EXTENSION azure_local_ai")
            conn.execute("CREATE TABLE docs (id int, body text)")
            conn.execute("INSERT INTO docs VALUES (1, 'hello world'), (2, 'hola mundo')")
            conn.execute(f"ALTER TABLE docs ADD COLUMN v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED")
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute("INSERT INTO docs (id, body) VALUES (3, 'Hallo Welt')")
            conn.execute("COMMIT")
            got = dict(conn.execute("SELECT body, v::text FROM docs").fetchall())
            assert got == {t: constant_path(conn, t) for t in ("hello world", "hola mundo", "Hallo Welt")}
            assert int(version) // 10000 != 18, "not another major version"
    finally:
        proxy.stop()
        cluster.destroy()


def in_mailbox(conn: psycopg.Connection, mailbox: Mailbox) -> None:
    """Begin a transaction whose mailbox is `mailbox`, as the proxy sets it with a statement it has an
    answer for (extension 1.4): a test knows its OID and secret so."""
    conn.execute("BEGIN")
    conn.execute("SELECT set_config('azure_local_ai.proxy_session', %s, true)", (mailbox.setting,))


def test_another_role_cannot_open_a_sessions_mailbox(conn: psycopg.Connection, pg: PgCluster,
                                                    database: str) -> None:
    role = unique("other")
    pg.psql(f"CREATE ROLE {role} LOGIN")
    mailbox = Mailbox.new()
    conn.execute("CREATE TABLE big (body text)")
    conn.execute("INSERT INTO big SELECT 'mailbox text ' || i FROM generate_series(1, 3000) i")
    outcome: list[BaseException] = []

    def long_statement() -> None:
        try:
            in_mailbox(conn, mailbox)
            conn.execute(f"SELECT count({CALL.format('body')}) FROM big")
        except psycopg.Error as exc:
            outcome.append(exc)
        finally:
            conn.execute("ROLLBACK")

    running = threading.Thread(target=long_statement)
    running.start()
    try:
        with psycopg.connect(pg.dsn(database=database), autocommit=True) as admin:
            deadline = time.monotonic() + 10
            while not admin.execute("SELECT 1 FROM pg_largeobject_metadata WHERE oid = %s", (mailbox.oid,)).fetchone():
                assert time.monotonic() < deadline, "the mailbox never appeared"
                time.sleep(0.01)
        with (psycopg.connect(pg.dsn(user=role, database=database), autocommit=True) as other,
              pytest.raises(psycopg.errors.InsufficientPrivilege)):
            other.execute("SELECT lo_get(%s)", (mailbox.oid,))
    finally:
        conn.cancel()
        running.join(30)
    assert not running.is_alive() and isinstance(outcome[0], psycopg.errors.QueryCanceled)


def test_merge_and_an_index_expression(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, v real[] GENERATED ALWAYS AS "
                 f"({CALL.format('body')}) STORED)")
    conn.execute("CREATE TABLE incoming (id int, body text)")
    conn.execute("INSERT INTO docs (id, body) VALUES (1, 'old text')")
    conn.execute("INSERT INTO incoming VALUES (1, 'hello world'), (2, 'hola mundo')")
    conn.execute("MERGE INTO docs d USING incoming i ON d.id = i.id WHEN MATCHED THEN UPDATE SET body = i.body "
                 "WHEN NOT MATCHED THEN INSERT (id, body) VALUES (i.id, i.body)")
    got = dict(conn.execute("SELECT body, v::text FROM docs").fetchall())
    assert got == {t: constant_path(conn, t) for t in ("hello world", "hola mundo")}
    conn.execute(f"CREATE INDEX docs_first ON docs ((({CALL.format('body')})[1]))")
    conn.execute("SET enable_seqscan = off")
    first = float(conn.execute("SELECT (v)[1] FROM docs WHERE body = 'hola mundo'").fetchone()[0])
    search = f"SELECT id FROM docs WHERE ({CALL.format('body')})[1] = %s::real"
    assert any("docs_first" in row[0] for row in conn.execute("EXPLAIN " + search, (first,)).fetchall())
    assert conn.execute(search, (first,)).fetchall() == [(2,)]


def test_a_table_with_row_security_is_not_read_ahead(conn: psycopg.Connection, proxy: ProxyProcess,
                                                     pg: PgCluster, database: str) -> None:
    """Reading a table with row-level security ahead would run its policies on the proxy's service
    connection: its rows ask one by one instead, under the policies as the session's statement is."""
    role = unique("owner")
    table = f"notes_{role}"
    pg.psql(f"CREATE ROLE {role} LOGIN")
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, owner text, body text, v real[])")
    conn.execute(f"INSERT INTO {table} SELECT i, CASE WHEN i <= 37 THEN %s ELSE 'someone' END, 'note ' || i "
                 "FROM generate_series(1, 60) i", (role,))
    conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; GRANT SELECT, UPDATE ON {table} TO {role}; "
                 f"CREATE POLICY mine ON {table} USING (owner = current_user)")
    with psycopg.connect(proxy.dsn(user=role, database=database), autocommit=True) as own:
        assert own.execute(f"UPDATE {table} SET v = {CALL.format('body')}").rowcount == 37
    assert f'event=lookahead_refused reason="{table} is not a plain table' in proxy.log
    rows = conn.execute(f"SELECT body, v::text FROM {table} WHERE v IS NOT NULL ORDER BY id").fetchall()
    assert [body for body, _ in rows] == [f"note {i}" for i in range(1, 38)]
    for body, stored in rows:
        assert stored == constant_path(conn, body)


def test_rows_written_into_a_generated_column_are_read_ahead(conn: psycopg.Connection, proxy: ProxyProcess) -> None:
    """INSERT ... SELECT, a many-row INSERT ... VALUES and an UPDATE of the source column name no
    azure_local_ai function, but the table's generated column embeds: the proxy reads its expression
    from the catalog when the server first asks, and the rows' texts ahead."""
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    conn.execute("CREATE TABLE src (n int, title text)")
    conn.execute("INSERT INTO src SELECT i, 'title ' || i FROM generate_series(1, 41) i")
    conn.execute("INSERT INTO docs (id, body) SELECT n, title FROM src")
    assert "event=lookahead texts=41 " in proxy.log
    values = ", ".join(f"({i}, 'value {i}')" for i in range(100, 143))
    conn.execute(f"INSERT INTO docs (id, body) VALUES {values}")
    assert "event=lookahead texts=43 " in proxy.log
    assert conn.execute("UPDATE docs SET body = body || ' again' WHERE id <= 39").rowcount == 39
    assert "event=lookahead texts=39 " in proxy.log
    rows = conn.execute("SELECT body, v::text FROM docs ORDER BY id").fetchall()
    assert len(rows) == 41 + 43
    for body, stored in rows:
        assert stored == constant_path(conn, body)


def test_look_aheads_go_a_page_at_a_time_and_alter_table_reads_first(pg: PgCluster, database: str,
                                                                        model_data_dir: Path, tmp_path: Path) -> None:
    """With a cache of 1 MB a look-ahead reads 256 texts at a time, a page ahead of the server at most;
    ALTER TABLE, which locks its table against reading, has its texts read before it runs (as many as
    the cache keeps ahead), and with the cache off nothing is read ahead."""
    data_dir = tmp_path / "proxy"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
    small = start_proxy(data_dir, "--service-user", "postgres", "--cache-mb", "1", upstream=pg.url())
    try:
        with psycopg.connect(small.dsn(database=database), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION azure_local_ai")
            conn.execute("CREATE TABLE docs (id int, body text, v real[])")
            conn.execute("INSERT INTO docs SELECT i, 'paged text ' || i FROM generate_series(1, 601) i")
            assert conn.execute(f"UPDATE docs SET v = {CALL.format('body')}").rowcount == 601
            assert "event=lookahead texts=601 " in small.log
            conn.execute("CREATE TABLE more (id int, body text)")
            conn.execute("INSERT INTO more SELECT i, 'altered text ' || i FROM generate_series(1, 300) i")
            conn.execute(f"ALTER TABLE more ADD COLUMN v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED")
            assert "event=lookahead texts=256 " in small.log  # all the cache keeps ahead; the rest one by one
            for table in ("docs", "more"):
                rows = conn.execute(f"SELECT body, v::text FROM {table} WHERE id % 50 = 1").fetchall()
                assert len(rows) == (13 if table == "docs" else 6)
                for body, stored in rows:  # evicted since (the cache is small): computed anew, alone
                    assert_same_embeddings(floats(stored), floats(constant_path(conn, body)))
    finally:
        small.stop()
    off = start_proxy(data_dir, "--service-user", "postgres", "--cache-mb", "0", upstream=pg.url())
    try:
        with psycopg.connect(off.dsn(database=database), autocommit=True) as conn:
            conn.execute("UPDATE docs SET v = NULL WHERE id <= 5")
            conn.execute(f"UPDATE docs SET v = {CALL.format('body')} WHERE id <= 5")
            assert "event=lookahead" not in off.log
            assert conn.execute("SELECT count(*) FROM docs WHERE v IS NULL").fetchone() == (0,)
    finally:
        off.stop()


def test_a_lost_service_connection_ends_the_statement_and_the_next_one_works(
    conn: psycopg.Connection, pg: PgCluster, database: str
) -> None:
    """The service connection is terminated mid-back-fill: the statement gets an error (or, if no answer
    was in flight, finishes), never hangs; the proxy connects again for the next statement."""
    conn.execute("CREATE TABLE docs (id int, body text, v real[])")
    conn.execute("INSERT INTO docs SELECT i, 'dropped service text ' || i FROM generate_series(1, 400) i")
    admin = psycopg.connect(pg.dsn(database=database), autocommit=True)
    terminate = threading.Timer(1.0, lambda: admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
        "'azure-local-ai-proxy service' AND datname = current_database()"))
    terminate.start()
    started = time.monotonic()
    try:
        conn.execute(f"UPDATE docs SET v = azure_local_ai.create_embeddings('{MODEL}', body || ' ' || id, 30000)")
        failed = None
    except psycopg.errors.QueryCanceled as exc:
        failed = exc
    finally:
        terminate.join()
        admin.close()
    assert time.monotonic() - started < 60
    done = conn.execute("SELECT count(v) FROM docs").fetchone()[0]
    assert done == (0 if failed is not None else 400)  # all or nothing: one statement
    assert conn.execute(f"UPDATE docs SET v = {CALL.format('body')} WHERE id <= 3").rowcount == 3


def test_a_proxy_stopped_mid_statement_loses_no_committed_data(pg: PgCluster, database: str, model_data_dir: Path,
                                                                tmp_path: Path) -> None:
    """The proxy is killed during a back-fill: the client's connection ends; the server backend,
    whose client is gone, ends within about a second (the function's keep-alive) and its
    transaction rolls back; committed rows are as they were; the next proxy removes the mailbox left."""
    data_dir = tmp_path / "proxy"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
    first = start_proxy(data_dir, "--service-user", "postgres", upstream=pg.url())
    conn = psycopg.connect(first.dsn(database=database), autocommit=True)
    conn.execute("CREATE EXTENSION azure_local_ai")
    conn.execute("CREATE TABLE docs (id int, body text, v real[])")
    # Rows enough that the back-fill is still running when the proxy is killed, a second in (400 short
    # texts took less than that on an idle machine).
    conn.execute("INSERT INTO docs SELECT i, 'killed proxy text ' || i FROM generate_series(1, 4000) i")
    conn.execute(f"UPDATE docs SET v = {CALL.format('body')} WHERE id = 1")
    committed = conn.execute("SELECT v::text FROM docs WHERE id = 1").fetchone()[0]
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    threading.Timer(1.0, first.stop, kwargs={"sig": signal.SIGKILL}).start()
    with pytest.raises(psycopg.OperationalError):
        conn.execute(f"UPDATE docs SET v = {CALL.format('body')} WHERE id > 1")
    conn.close()
    with psycopg.connect(pg.dsn(database=database), autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the backend of a session whose client is gone still runs"
            time.sleep(0.2)
        assert admin.execute("SELECT count(v) FROM docs").fetchone() == (1,)
        assert admin.execute("SELECT v::text FROM docs WHERE id = 1").fetchone() == (committed,)
        left = "SELECT count(*) FROM pg_description WHERE description LIKE 'azure-local-ai-proxy mailbox%%'"
        assert admin.execute(left).fetchone() == (1,)  # the one of the statement cut short
        second = start_proxy(data_dir, "--service-user", "postgres", upstream=pg.url())
        try:
            with psycopg.connect(second.dsn(database=database), autocommit=True) as again:
                again.execute(f"UPDATE docs SET v = {CALL.format('body')} WHERE id = 2")
            assert "event=mailbox_cleanup database=" + database + " removed=1" in second.log
            deadline = time.monotonic() + 5  # the statement's own goes just after its end
            while admin.execute(left).fetchone() != (0,):
                assert time.monotonic() < deadline, "a mailbox is left"
                time.sleep(0.1)
        finally:
            second.stop()


def answered(proxy: ProxyProcess) -> tuple[int, int]:
    """create_embeddings calls the server evaluated so far: (requests answered, answers kept ahead)."""
    with psycopg.connect(proxy.dsn(database="azure_local_ai_proxy"), autocommit=True) as admin:
        stats = dict(admin.execute("SHOW STATS").fetchall())
    return (int(stats.get("calls create_embeddings server", 0)), int(stats.get("calls create_embeddings ahead", 0)))


@pytest.mark.parametrize("csv", [False, True], ids=["text", "csv"])
def test_a_copys_rows_are_computed_ahead_on_their_way_to_the_server(conn: psycopg.Connection, proxy: ProxyProcess,
                                                                   csv: bool) -> None:
    """COPY FROM STDIN into a table whose generated column embeds, the table's first COPY: the proxy
    looks the table up at the COPY, reads the rows from the client's data as it goes upstream,
    computes their texts in batches and keeps the answers ahead. Most rows ask nothing; the vectors
    are the constant path's."""
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    texts = [f"copied row {i}: tab\there, a backslash \\, \"quotes\", été" for i in range(400)]
    if csv:
        data = "".join(f'{i},"{t.replace(chr(34), chr(34) * 2)}"\n' for i, t in enumerate(texts)).encode()
    else:
        data = "".join(f"{i}\t{t.replace(chr(92), chr(92) * 2).replace(chr(9), chr(92) + 't')}\n"
                       for i, t in enumerate(texts)).encode()
    before = answered(proxy)
    with conn.cursor().copy(f"COPY docs (id, body) FROM STDIN{' (FORMAT csv)' if csv else ''}") as copy:
        for start in range(0, len(data), 4096):
            copy.write(data[start : start + 4096])
    after = answered(proxy)
    asked, ahead = after[0] - before[0], after[1] - before[1]
    assert ahead >= 300 and asked <= 100, (asked, ahead)
    stored = dict(conn.execute("SELECT body, v::text FROM docs WHERE id IN (0, 199, 399)").fetchall())
    assert stored == {t: constant_path(conn, t) for t in (texts[0], texts[199], texts[399])}


def test_copy_data_in_a_message_too_long_to_read_on_the_way_is_embedded_row_by_row(
        conn: psycopg.Connection, proxy: ProxyProcess, database: str) -> None:
    """One CopyData message of 300 kB (over relay.OBSERVE_MAX) is not read on the event loop: the COPY
    reads no further, its rows ask as they run, and every row is stored right."""
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    texts = [f"row {i} " + "a long text " * 850 for i in range(30)]
    data = "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)).encode()
    assert len(data) > 300_000
    client = RawClient(proxy.port, timeout=120)
    client.login(database=database)
    before = answered(proxy)
    client.send(pg.message(pg.QUERY, b"COPY docs (id, body) FROM STDIN\0"))
    assert client.read_message()[0] == b"G"  # CopyInResponse
    client.send(pg.message(pg.COPY_DATA, data) + pg.message(pg.COPY_DONE))
    replies = client.read_until(b"Z")
    client.close()
    assert [t for t, _ in replies] == [b"C", b"Z"]
    asked, ahead = (a - b for a, b in zip(answered(proxy), before, strict=True))
    assert (asked, ahead) == (30, 0)
    stored = dict(conn.execute("SELECT body, v::text FROM docs WHERE id IN (0, 29)").fetchall())
    assert stored == {t: constant_path(conn, t) for t in (texts[0], texts[29])}


def test_a_back_fills_answers_are_kept_ahead_of_its_requests(conn: psycopg.Connection, proxy: ProxyProcess) -> None:
    """The proxy computes a back-fill's texts in batches and writes each answer into the mailbox
    before the server asks for it, where the function finds it: most rows send no request at all."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, v real[])")
    conn.execute("INSERT INTO docs SELECT i, 'kept ahead ' || i FROM generate_series(1, 600) i")
    before = answered(proxy)
    assert conn.execute(f"UPDATE docs SET v = {CALL.format('body')}").rowcount == 600
    after = answered(proxy)
    asked, ahead = after[0] - before[0], after[1] - before[1]
    assert ahead >= 400 and asked <= 200, (asked, ahead)
    for body, stored in conn.execute("SELECT body, v::text FROM docs WHERE id % 60 = 1").fetchall():
        assert stored == constant_path(conn, body)


def test_an_answer_kept_ahead_without_the_sessions_secret_is_not_used(conn: psycopg.Connection, pg: PgCluster,
                                                                      database: str) -> None:
    """A role that may write the mailbox (the session's own, in another session), but does not know the
    transaction's secret, cannot put an answer where the function looks for one kept ahead: the
    function does not use it, and asks the proxy."""
    mailbox = Mailbox.new()
    key = kept_key(MODEL, "a forged text")
    assert key is not None
    forged = encode_answer(Mailbox(mailbox.oid, "0" * 32), key, "V", "{1,2,3}")
    conn.execute("CREATE TABLE docs (body text)")
    conn.execute("INSERT INTO docs VALUES ('a forged text'), ('a first text')")
    in_mailbox(conn, mailbox)
    try:
        # Asks: the mailbox is made, and lasts as long as the transaction.
        conn.execute(f"SELECT {CALL.format('body')} FROM docs WHERE body = 'a first text' AND random() >= 0")
        with psycopg.connect(pg.dsn(database=database), autocommit=True) as other:
            other.execute("SELECT lo_put(%s, %s, %s)", (mailbox.oid, kept_place(key), forged))
        # Not read ahead (random() is not among the functions a look-ahead may call): the proxy's own
        # answer kept ahead would take the forged one's place, and race with the request's.
        got = conn.execute(f"SELECT {CALL.format('body')}::text FROM docs WHERE body = 'a forged text' "
                           "AND random() >= 0").fetchone()[0]
    finally:
        conn.execute("ROLLBACK")
    assert got == constant_path(conn, "a forged text") != "{1,2,3}"


def test_a_request_naming_a_large_object_not_its_own_is_never_written_into(conn: psycopg.Connection, pg: PgCluster,
                                                                          database: str) -> None:
    """Any code in a session can set the transaction's mailbox, or raise a request naming one: where
    that OID is another's large object (here, one a superuser made: the service login in these tests
    may write it), the proxy cannot make it, writes nothing into it, and the statement fails."""
    mailbox = Mailbox.new()
    conn.execute("CREATE TABLE docs (body text)")
    conn.execute("INSERT INTO docs VALUES ('a text for someone else''s object')")
    with psycopg.connect(pg.dsn(database=database), autocommit=True) as admin:
        admin.execute("SELECT lo_from_bytea(%s, 'not a mailbox')", (mailbox.oid,))
        try:
            in_mailbox(conn, mailbox)
            try:
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute(f"SELECT {CALL.format('body')} FROM docs WHERE random() >= 0")
            finally:
                conn.execute("ROLLBACK")
            assert admin.execute("SELECT lo_get(%s)", (mailbox.oid,)).fetchone() == (b"not a mailbox",)
        finally:
            admin.execute("SELECT lo_unlink(%s)", (mailbox.oid,))
    assert conn.execute(f"SELECT {CALL.format('body')} IS NOT NULL FROM docs WHERE random() >= 0").fetchone() == (True,)


def learnt(conn: psycopg.Connection, proxy: ProxyProcess) -> None:
    """Insert rows into docs until the proxy answers one before it runs (it has looked the table up)."""
    for attempt in range(50):
        before = answered(proxy)
        conn.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (-1 - attempt, f"learning {attempt}"))
        if answered(proxy)[1] > before[1]:
            return
        time.sleep(0.05)
    raise AssertionError("the proxy never learnt that docs embeds")


@pytest.mark.parametrize("prepare", [False, True], ids=["unnamed statements", "prepared statements"])
def test_one_row_inserts_are_answered_before_they_run(conn: psycopg.Connection, proxy: ProxyProcess,
                                                      database: str, prepare: bool) -> None:
    """Once the server has asked during a one-row INSERT into a table whose generated column embeds,
    the proxy reads the next ones' texts from the statement (constants, bound parameters) and has the
    answer there before it runs: handed over with a prepared statement's Bind or a Query, kept in the
    mailbox where the INSERT's Parse is in the same batch. None asks; the rows are the same."""
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    learnt(conn, proxy)
    texts = [f"answered before it runs {i}" for i in range(8)]
    before = answered(proxy)
    with psycopg.connect(proxy.dsn(database=database), autocommit=True,
                         prepare_threshold=0 if prepare else None) as session:
        for i, text in enumerate(texts[:4]):
            session.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (i, text))
        for i, text in enumerate(texts[4:], 4):  # constants, in unnamed statements
            session.execute(f"INSERT INTO docs VALUES ({i}, '{text}')".encode(), prepare=False)
    with session_of(proxy, database) as simple:
        simple.execute("INSERT INTO docs (body, id) VALUES ('sent as a query', 100)")
    after = answered(proxy)
    assert (after[0] - before[0], after[1] - before[1]) == (0, 9)
    stored = dict(conn.execute("SELECT body, v::text FROM docs WHERE id >= 0").fetchall())
    assert stored == {t: constant_path(conn, t) for t in [*texts, "sent as a query"]}


def test_a_one_row_insert_the_server_refuses_while_its_answer_is_computed(
        conn: psycopg.Connection, proxy: ProxyProcess, database: str) -> None:
    """The server refuses the INSERT's Parse (a column that is not there) while the proxy computes its
    answer, having prepared its own statement behind it: the client gets the error and its
    ReadyForQuery, and the replies to its later messages are all its own (none is taken for the proxy's)."""
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    learnt(conn, proxy)
    client = RawClient(proxy.port, timeout=60)
    client.login(database=database)
    values = (b"1", b"refused while computed", b"x")
    client.send(b"".join([
        pg.message(pg.PARSE, Parse("", "INSERT INTO docs (id, body, nosuch) VALUES ($1, $2, $3)", ()).encode()),
        pg.message(pg.BIND, Bind("", "", (), values, ()).encode()),
        pg.message(pg.EXECUTE, b"\0\0\0\0\0"), pg.message(pg.SYNC)]))
    replies = client.read_until(b"Z")
    assert [t for t, _ in replies] == [b"E", b"Z"]
    assert pg.parse_fields(replies[0][1])["C"] == "42703"
    client.send(pg.message(pg.PARSE, Parse("s1", "SELECT 1", ()).encode()) + pg.message(pg.SYNC))
    assert [t for t, _ in client.read_until(b"Z")] == [b"1", b"Z"]
    client.send(pg.message(pg.CLOSE, b"Ss1\0") + pg.message(pg.SYNC))
    assert [t for t, _ in client.read_until(b"Z")] == [b"3", b"Z"]
    client.close()


def session_of(proxy: ProxyProcess, database: str) -> psycopg.Connection:
    """A session whose statements go as simple-protocol Queries (psycopg's client-side binding)."""
    return psycopg.connect(proxy.dsn(database=database), autocommit=True, cursor_factory=psycopg.ClientCursor)


def test_an_answer_handed_over_without_the_sessions_secret_is_not_used(conn: psycopg.Connection) -> None:
    """A value set in the session where the proxy hands answers over, with the right key but not
    signed with the session's secret, is not used: the function asks, and gets the real answer."""
    text = "a forged hand-over"
    key = kept_key(MODEL, text)
    forged = encode_answer(Mailbox(1, "not the secret"), key, "V", "{1,2,3}").decode()
    conn.execute("CREATE TABLE docs (id int, body text)")
    conn.execute("INSERT INTO docs VALUES (1, %s)", (text,))
    conn.execute("SELECT set_config('azure_local_ai.proxy_kept', %s, false)", (forged,))
    assert conn.execute(f"SELECT {CALL.format('body')}::text FROM docs").fetchone()[0] == constant_path(conn, text)


def test_objects_before_1_4_are_updated_and_have_no_way_back(proxy: ProxyProcess, database: str) -> None:
    """Objects of a version before 1.4 read their mailbox from a start-up parameter, which the proxy no
    longer adds (poolers refuse it): calls they leave to the server fail with 55000, constant calls
    still work; ALTER EXTENSION ... UPDATE brings them to the latest, as PostgreSQL runs an extension's
    update scripts, and the calls work again."""
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION azure_local_ai VERSION '1.0'")
        assert conn.execute("SELECT azure_local_ai_proxy.version()").fetchone() == ("1.0",)
        conn.execute("CREATE TABLE docs (id int, body text, v real[])")
        conn.execute("INSERT INTO docs SELECT i, 'version one ' || i FROM generate_series(1, 40) i")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not connected through it"):
            conn.execute(f"UPDATE docs SET v = {CALL.format('body')}")
        assert len(floats(constant_path(conn, "version one 1"))) == 384
        conn.execute("ALTER EXTENSION azure_local_ai UPDATE TO '1.1'")
        assert conn.execute("SELECT azure_local_ai_proxy.version()").fetchone() == ("1.1",)
        conn.execute("ALTER EXTENSION azure_local_ai UPDATE")
        assert conn.execute("SELECT azure_local_ai_proxy.version()").fetchone() == (VERSION,)
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=rf'no update path from version "{VERSION}" to version "1\.0"'):
            conn.execute("ALTER EXTENSION azure_local_ai UPDATE TO '1.0'")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r'for version "2\.0"'):
            conn.execute("ALTER EXTENSION azure_local_ai UPDATE TO '2.0'")
        assert conn.execute(f"UPDATE docs SET v = {CALL.format('body')}").rowcount == 40
        for body, stored in conn.execute("SELECT body, v::text FROM docs WHERE id % 10 = 1").fetchall():
            assert stored == constant_path(conn, body)


def test_sql_prepare_and_execute(proxy: ProxyProcess, database: str, conn: psycopg.Connection) -> None:
    """SQL's PREPARE with a parameter, then EXECUTE, as a psql script: $1 is the prepared statement's,
    and the server evaluates the call with EXECUTE's value."""
    script = (f"PREPARE p(text) AS SELECT {CALL.format('$1')}::text;\n"
              "EXECUTE p('hello');\nEXECUTE p('hola');\nDEALLOCATE p;\n")
    out = proxy.psql("-qAt", "-f", "-", dsn=proxy.dsn(database=database), input=script)
    assert out.stdout.split() == [constant_path(conn, "hello"), constant_path(conn, "hola")]


#: What pg_dump writes for a database of a server where azure_local_ai is a native extension.
NATIVE_DUMP = """SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
CREATE EXTENSION IF NOT EXISTS azure_local_ai WITH SCHEMA azure_local_ai;
COMMENT ON EXTENSION azure_local_ai IS 'Azure Local AI: embeddings in the database';
CREATE TABLE public.docs (
    id integer,
    body text,
    v real[] GENERATED ALWAYS AS (azure_local_ai.create_embeddings('multilingual-e5-small:v1'::text, body)) STORED
);
COPY public.docs (id, body) FROM stdin;
{rows}
\\.
"""


@pytest.fixture()
def restored(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "restored") as name:
        yield name


def test_a_dump_of_a_server_with_the_native_extension_restores_through_the_proxy(
    conn: psycopg.Connection, proxy: ProxyProcess, restored: str
) -> None:
    """CREATE EXTENSION ... WITH SCHEMA and COMMENT ON EXTENSION, as pg_dump writes them, restore with
    ON_ERROR_STOP; the generated column is recomputed, its COPY's rows in batches."""
    rows = "\n".join(f"{i}\tnative text {i}" for i in range(1, 41))
    before = answered(proxy)
    proxy.psql("-q", "-f", "-", dsn=proxy.dsn(database=restored), input=NATIVE_DUMP.format(rows=rows))
    after = answered(proxy)
    assert after[1] - before[1] >= 30, f"{after[1] - before[1]} of 40 rows computed ahead"
    with psycopg.connect(proxy.dsn(database=restored), autocommit=True) as again:
        got = again.execute("SELECT body, v::text FROM docs ORDER BY id").fetchall()
        assert again.execute("SELECT obj_description('azure_local_ai'::regnamespace)").fetchone() == (
            "Azure Local AI: embeddings in the database",)
    assert got == [(f"native text {i}", constant_path(conn, f"native text {i}")) for i in range(1, 41)]


def test_dumps_made_through_the_proxy_restore_with_exit_on_error(
    conn: psycopg.Connection, proxy: ProxyProcess, pg: PgCluster, database: str, tmp_path: Path
) -> None:
    conn.execute(f"CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    conn.execute("INSERT INTO docs (id, body) SELECT i, 'dumped text ' || i FROM generate_series(1, 30) i")
    conn.execute("COMMENT ON EXTENSION azure_local_ai IS 'embeddings'")
    expected = conn.execute("SELECT body, v::text FROM docs ORDER BY id").fetchall()
    custom = tmp_path / "dump.custom"
    subprocess.run([str(pg.bin_dir / "pg_dump"), "--no-owner", "-Fc", "-f", str(custom),
                    proxy.dsn(database=database)], check=True, capture_output=True, timeout=120)
    plain = subprocess.run([str(pg.bin_dir / "pg_dump"), "--no-owner", proxy.dsn(database=database)],
                           check=True, capture_output=True, text=True, timeout=120).stdout
    for restore in ("plain", "custom"):
        with new_database(pg, "restored") as name:
            if restore == "plain":
                proxy.psql("-q", "-f", "-", dsn=proxy.dsn(database=name), input=plain)
            else:
                subprocess.run([str(pg.bin_dir / "pg_restore"), "--no-owner", "--exit-on-error",
                                "--single-transaction", "-d", proxy.dsn(database=name), str(custom)],
                               check=True, capture_output=True, timeout=120)
            with psycopg.connect(proxy.dsn(database=name), autocommit=True) as again:
                assert again.execute("SELECT body, v::text FROM docs ORDER BY id").fetchall() == expected, restore


def test_concurrent_create_extension_if_not_exists(proxy: ProxyProcess, restored: str) -> None:
    """Two sessions' CREATE EXTENSION IF NOT EXISTS at once: they take turns, and both succeed."""
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with psycopg.connect(proxy.dsn(database=restored), autocommit=True) as session:
                session.execute("CREATE EXTENSION IF NOT EXISTS azure_local_ai")
        except BaseException as exc:
            errors.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=create) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        with psycopg.connect(proxy.dsn(database=restored), autocommit=True) as session:
            session.execute("DROP EXTENSION azure_local_ai")


BACKSLASHED = r"'a \ b'"  # a constant whose value depends on standard_conforming_strings


@pytest.mark.parametrize("relay_thread", [True, False], ids=["relay thread", "python"])
def test_after_copy_from_stdin_the_session_still_answers(pg: PgCluster, model_data_dir: Path, tmp_path: Path,
                                                        database: str, relay_thread: bool) -> None:
    """psql's \\copy (COPY FROM STDIN by a simple Query): the COPY's data opens no extended-protocol
    batch, so the calls after it that the proxy answers with the session's server are answered."""
    data_dir = tmp_path / "proxy"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
    proxy = start_proxy(data_dir, "--service-user", "postgres", "--relay-thread", str(relay_thread).lower(),
                        upstream=pg.url())
    try:
        (tmp_path / "one.txt").write_text("first line\nsecond line\n")
        script = "\n".join([
            "CREATE TEMP TABLE tt (a text);",
            f"\\copy tt from '{tmp_path / 'one.txt'}'",
            "SELECT count(*) FROM tt;",
            f"SELECT array_length({CALL.format(BACKSLASHED)}, 1);",
            "SELECT azure_local_ai.set_setting('spin_control', 'true');",
            "SELECT azure_local_ai.get_setting('spin_control');", ""])
        out = proxy.psql("-qAt", "-f", "-", dsn=proxy.dsn(database=database), input=script)
        assert out.stdout.split("\n")[:4] == ["2", "384", "", "true"], out.stdout + out.stderr
    finally:
        proxy.stop()


def test_a_look_ahead_read_that_fails_after_its_statement_ended_is_seen(conn: psycopg.Connection,
                                                                         proxy: ProxyProcess) -> None:
    """The statement ends (its statement_timeout, 30 ms) while its look-ahead waits for its table, which
    the session's own transaction locked; the read then gives up (its lock_timeout, 100 ms), unseen by
    anyone: the session goes on, with the right answers. (That such a failure is marked as seen, which
    asyncio would otherwise log with a traceback at some later garbage collection, is tested without
    the collector's timing in test_tasks.py.)"""
    conn.execute("CREATE TABLE src (id int, body text)")
    conn.execute("CREATE TABLE dst (id int, v real[])")
    conn.execute("INSERT INTO src SELECT i, 'a text read ahead in vain ' || i FROM generate_series(1, 2000) i")
    seen = len(proxy.log)
    for _ in range(3):
        with pytest.raises(psycopg.errors.QueryCanceled), conn.transaction():
            conn.execute("LOCK TABLE src IN ACCESS EXCLUSIVE MODE")
            conn.execute("SET LOCAL statement_timeout = 30")
            try:
                conn.execute(f"INSERT INTO dst SELECT id, {CALL.format('body')} FROM src")
            finally:
                time.sleep(0.3)  # the transaction keeps the lock: the read fails, after its statement ended
    conn.execute(f"INSERT INTO dst SELECT id, {CALL.format('body')} FROM src WHERE id = 1")
    (stored,) = conn.execute("SELECT v::text FROM dst").fetchone()
    assert_same_embeddings(floats(stored), floats(constant_path(conn, "a text read ahead in vain 1")))
    log = proxy.log[seen:]
    assert "never retrieved" not in log and "Traceback" not in log, log
