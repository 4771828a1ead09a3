"""azure_local_ai.* through the proxy over the simple query protocol (psql, psycopg's client-side
binding): values, column names and types, NULLs, errors and transactions, as the extension gives them."""

from __future__ import annotations

import uuid

import numpy as np
import psycopg
import pytest

from .helpers_embeddings import assert_same_embeddings
from .proxyproc import ProxyProcess

MODEL = "multilingual-e5-small:v1"
DIM = 384


@pytest.fixture()
def conn(proxy: ProxyProcess):
    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=psycopg.ClientCursor) as connection:
        yield connection


def vector(text: str) -> np.ndarray:
    return np.array([float(x) for x in text.strip("{}").split(",")], dtype=np.float32)


def test_scalar_call_in_psql(proxy: ProxyProcess, engine_vectors) -> None:
    out = proxy.psql("-A", "-c", f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'query: hello world')")
    header, value, footer = out.stdout.strip().split("\n")
    assert header == "create_embeddings"
    assert footer == "(1 row)"
    got = vector(value)
    assert got.shape == (DIM,)
    assert_same_embeddings(got, engine_vectors("query: hello world")[0])


def test_types_and_names(conn) -> None:
    cur = conn.execute(
        f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'a') AS v, "
        f"pg_typeof(azure_local_ai.create_embeddings('{MODEL}', 'a'))::text, "
        f"azure_local_ai.get_setting('inter_op_parallelism'), azure_local_ai.get_setting(), "
        f"azure_local_ai.model_loaded('{MODEL}'), azure_local_ai.model_metadata('{MODEL}')"
    )
    row = cur.fetchone()
    assert [d.name for d in cur.description] == [
        "v", "pg_typeof", "get_setting", "get_setting", "model_loaded", "model_metadata"]
    assert len(row[0]) == DIM and row[1] == "real[]"
    assert row[2] == "1"
    assert set(row[3]) == {"intra_op_parallelism", "inter_op_parallelism", "spin_control"}
    assert row[4] is True
    assert row[5]["model_uri"] == MODEL and row[5]["loaded"] is True and row[5]["dimensions"] == DIM


def test_named_arguments_and_concatenation(conn, engine_vectors) -> None:
    (got,) = conn.execute(
        f"SELECT azure_local_ai.create_embeddings(input => 'query: ' || 'naïve café', model_uri => '{MODEL}')"
    ).fetchone()
    assert_same_embeddings(np.array(got, np.float32), engine_vectors("query: naïve café")[0])


def test_array_overload_in_select_list_and_from(conn, engine_vectors) -> None:
    expected = engine_vectors("alpha", "beta", "gamma")
    rows = conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', ARRAY['alpha','beta','gamma'])")
    assert [d.name for d in rows.description] == ["create_embeddings"]
    assert_same_embeddings(np.array([r[0] for r in rows.fetchall()], np.float32), expected)
    cur = conn.execute(f"SELECT * FROM azure_local_ai.create_embeddings('{MODEL}', '{{alpha,beta,gamma}}'::text[], 2)")
    assert [d.name for d in cur.description] == ["embedding"]
    assert_same_embeddings(np.array([r[0] for r in cur.fetchall()], np.float32), expected)


@pytest.mark.parametrize(
    ("ids", "sql_type"),
    [("ARRAY[10, 20]", "integer"), ("ARRAY[10, 20]::bigint[]", "bigint"), ("ARRAY['x', 'y']", "text"),
     (f"ARRAY['{uuid.UUID(int=1)}', '{uuid.UUID(int=2)}']::uuid[]", "uuid")],
)
def test_ids_overload_keeps_id_type_and_order(conn, engine_vectors, ids: str, sql_type: str) -> None:
    cur = conn.execute(
        f"SELECT id, pg_typeof(id)::text, embedding FROM azure_local_ai.create_embeddings('{MODEL}', "
        f"ARRAY['first', 'second'], {ids}) e"
    )
    assert [d.name for d in cur.description] == ["id", "pg_typeof", "embedding"]
    rows = cur.fetchall()
    assert [r[1] for r in rows] == [sql_type, sql_type]
    assert_same_embeddings(np.array([r[2] for r in rows], np.float32), engine_vectors("first", "second"))


def test_strict_nulls(conn) -> None:
    assert conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', NULL)").fetchone() == (None,)
    assert conn.execute("SELECT azure_local_ai.create_embeddings(NULL, 'x')").fetchone() == (None,)
    assert conn.execute(
        f"SELECT count(*) FROM azure_local_ai.create_embeddings('{MODEL}', NULL::text[])").fetchone() == (0,)
    rows = conn.execute(f"SELECT embedding IS NULL FROM azure_local_ai.create_embeddings('{MODEL}', ARRAY['a', NULL])")
    assert [r[0] for r in rows] == [False, True]


def test_pgvector_search(conn) -> None:
    table = f"docs_{uuid.uuid4().hex[:8]}"
    texts = ["passage: The cat sits on the mat.", "passage: Stock markets fell sharply today.",
             "passage: Der Hund spielt im Garten."]
    conn.execute(f"CREATE TABLE {table} (id int, body text, v vector({DIM}))")
    try:
        for i, text in enumerate(texts):
            conn.execute(f"INSERT INTO {table} VALUES ({i}, %s, "
                         f"azure_local_ai.create_embeddings('{MODEL}', %s)::vector)", [text, text])
        for op in ("<=>", "<#>", "<->"):
            (best,) = conn.execute(
                f"SELECT id FROM {table} ORDER BY v {op} "
                f"azure_local_ai.create_embeddings('{MODEL}', 'query: where is the kitten?')::vector LIMIT 1"
            ).fetchone()
            assert best == 0, op
    finally:
        conn.execute(f"DROP TABLE {table}")


def test_multi_statement_and_error_rolls_back_implicit_transaction(proxy: ProxyProcess) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    ok = proxy.psql("-qAt", "-c", f"CREATE TABLE {table} (v real[]); INSERT INTO {table} SELECT "
                    f"azure_local_ai.create_embeddings('{MODEL}', 'x'); SELECT count(*) FROM {table}")
    assert ok.stdout.strip() == "1"
    bad = proxy.psql("-v", "VERBOSITY=verbose", "-c",
                     f"INSERT INTO {table} VALUES (NULL); SELECT azure_local_ai.create_embeddings('nope:v9', 'x')",
                     check=False)
    assert bad.returncode != 0
    assert "ERROR:  42704" in bad.stderr and "nope:v9" in bad.stderr
    assert proxy.psql("-At", "-c", f"SELECT count(*) FROM {table}").stdout.strip() == "1"
    proxy.psql("-c", f"DROP TABLE {table}")


def test_error_in_transaction_block_aborts_it_on_both_sides(conn) -> None:
    conn.autocommit = False
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT azure_local_ai.create_embeddings('nope:v9', 'x')")
    assert info.value.sqlstate == "42704"
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'x')")
    conn.rollback()
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_column_dependent_arguments_without_the_extension_say_what_to_do(conn) -> None:
    with pytest.raises(psycopg.errors.InvalidSchemaName) as caught:
        conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', relname) FROM pg_class LIMIT 1")
    assert "run CREATE EXTENSION azure_local_ai through azure-local-ai-proxy" in caught.value.diag.message_hint


def test_unknown_function_and_bad_overload(conn) -> None:
    with pytest.raises(psycopg.errors.UndefinedFunction):
        conn.execute("SELECT azure_local_ai.nothing_here()")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        conn.execute("SELECT azure_local_ai.create_embeddings('m')")


def test_settings_and_permissions(proxy: ProxyProcess, pg, conn) -> None:
    role = f"plain_{uuid.uuid4().hex[:6]}"
    admin = f"admin_{uuid.uuid4().hex[:6]}"
    pg.psql(f"CREATE ROLE {role} LOGIN; CREATE ROLE {admin} LOGIN;"
            "DO $$BEGIN CREATE ROLE azure_local_ai_setting_manager; EXCEPTION WHEN duplicate_object THEN END$$;"
            f"GRANT azure_local_ai_setting_manager TO {admin}")
    with psycopg.connect(proxy.dsn(role), autocommit=True, cursor_factory=psycopg.ClientCursor) as plain:
        assert plain.execute("SELECT azure_local_ai.get_setting('spin_control')").fetchone() == ("true",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            plain.execute("SELECT azure_local_ai.set_setting('spin_control', 'false')")
    with psycopg.connect(proxy.dsn(admin), autocommit=True, cursor_factory=psycopg.ClientCursor) as privileged:
        privileged.execute("SELECT azure_local_ai.set_setting('spin_control', 'false')")
        assert privileged.execute("SELECT azure_local_ai.get_setting('spin_control')").fetchone() == ("false",)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="valid keys"):
            privileged.execute("SELECT azure_local_ai.set_setting('no_such_key', '1')")
        privileged.execute("SELECT azure_local_ai.set_setting(ARRAY['spin_control'], ARRAY['true'])")
    (settings,) = conn.execute("SELECT azure_local_ai.get_setting(ARRAY['spin_control'])").fetchone()
    assert settings == {"spin_control": "true"}


def test_scalar_functions_in_from_name_their_column_like_postgres(conn) -> None:
    cur = conn.execute(f"SELECT m->>'model_uri', m->'dimensions' FROM azure_local_ai.model_metadata('{MODEL}') AS m")
    assert cur.fetchone() == (MODEL, 384)
    cur = conn.execute("SELECT * FROM azure_local_ai.get_setting('inter_op_parallelism')")
    assert [d.name for d in cur.description] == ["get_setting"]
    assert cur.fetchone() == ("1",)


def test_savepoints_and_rollback_around_calls(conn) -> None:
    table = f"sp_{uuid.uuid4().hex[:8]}"
    conn.autocommit = False
    conn.execute(f"CREATE TABLE {table} (label text, v real[])")
    conn.execute(f"INSERT INTO {table} VALUES ('kept', azure_local_ai.create_embeddings('{MODEL}', 'kept'))")
    conn.execute("SAVEPOINT before_error")
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute(f"INSERT INTO {table} VALUES ('lost', azure_local_ai.create_embeddings('nope:v9', 'x'))")
    conn.execute("ROLLBACK TO SAVEPOINT before_error")
    conn.execute(f"INSERT INTO {table} VALUES ('after', azure_local_ai.create_embeddings('{MODEL}', 'after'))")
    conn.commit()
    labels = [r[0] for r in conn.execute(f"SELECT label FROM {table} ORDER BY label")]
    assert labels == ["after", "kept"]
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
