"""azure_local_ai.* through the proxy over the extended query protocol, as drivers use it: prepared
statements executed many times, bind parameters typed and untyped, binary results, pipelines."""

from __future__ import annotations

import uuid

import asyncpg
import numpy as np
import psycopg
import pytest

from .helpers_embeddings import assert_same_embeddings
from .proxyproc import ProxyProcess
from .test_functions_simple import DIM, MODEL


@pytest.fixture()
async def apg(proxy: ProxyProcess):
    connection = await asyncpg.connect(proxy.dsn())
    yield connection
    await connection.close()


async def test_asyncpg_prepared_statement_evaluated_per_execution(apg, engine_vectors) -> None:
    statement = await apg.prepare("SELECT azure_local_ai.create_embeddings($1, $2)")
    assert [p.name for p in statement.get_parameters()] == ["text", "text"]
    assert [a.name for a in statement.get_attributes()] == ["create_embeddings"]
    assert statement.get_attributes()[0].type.oid == 1021  # real[]
    for text in ("query: one", "query: two", "query: three"):
        value = await statement.fetchval(MODEL, text)
        assert_same_embeddings(np.array(value, np.float32), engine_vectors(text)[0])


async def test_asyncpg_binary_array_parameter_and_ids(apg, engine_vectors) -> None:
    rows = await apg.fetch(
        "SELECT id, embedding FROM azure_local_ai.create_embeddings($1, $2::text[], $3::bigint[], batch_size => 7)",
        MODEL, ["red", "green", "blue"], [7, 8, 9],
    )
    assert [r["id"] for r in rows] == [7, 8, 9]
    assert_same_embeddings(np.array([r["embedding"] for r in rows], np.float32),
                                  engine_vectors("red", "green", "blue"))


async def test_asyncpg_thousand_inputs_batch_size_seven(apg) -> None:
    texts = [f"passage: document number {i}" for i in range(1000)]
    rows = await apg.fetch("SELECT embedding FROM azure_local_ai.create_embeddings($1, $2::text[], 7)", MODEL, texts)
    assert len(rows) == 1000
    norms = np.linalg.norm(np.array([r[0] for r in rows], np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


async def test_asyncpg_executemany_into_vector_column(apg) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    await apg.execute(f"CREATE TABLE {table} (body text, v vector({DIM}))")
    try:
        bodies = [(f"passage: item {i}",) for i in range(20)]
        await apg.executemany(
            f"INSERT INTO {table} VALUES ($1, azure_local_ai.create_embeddings('{MODEL}', $1)::vector)", bodies)
        assert await apg.fetchval(f"SELECT count(*) FROM {table} WHERE v IS NOT NULL") == 20
        best = await apg.fetchval(
            f"SELECT body FROM {table} ORDER BY v <=> azure_local_ai.create_embeddings($1, $2)::vector LIMIT 1",
            MODEL, "passage: item 13")
        assert best == "passage: item 13"
    finally:
        await apg.execute(f"DROP TABLE {table}")


async def test_asyncpg_errors_and_transactions(apg) -> None:
    with pytest.raises(asyncpg.UndefinedObjectError):
        await apg.fetchval("SELECT azure_local_ai.create_embeddings($1, $2)", "nope:v9", "x")
    tx = apg.transaction()
    await tx.start()
    with pytest.raises(asyncpg.UndefinedObjectError):
        await apg.fetchval("SELECT azure_local_ai.create_embeddings($1, $2)", "nope:v9", "x")
    with pytest.raises(asyncpg.InFailedSQLTransactionError):
        await apg.fetchval("SELECT azure_local_ai.create_embeddings($1, $2)", MODEL, "x")
    await tx.rollback()
    assert await apg.fetchval("SELECT azure_local_ai.get_setting($1)", "inter_op_parallelism") == "1"
    assert await apg.fetchval("SELECT azure_local_ai.create_embeddings($1, NULL::text)", MODEL) is None


async def test_asyncpg_types_of_every_result(apg) -> None:
    row = await apg.fetchrow(
        "SELECT azure_local_ai.get_setting(), azure_local_ai.get_setting('spin_control'), "
        "azure_local_ai.model_loaded($1), azure_local_ai.model_metadata($1)", MODEL)
    assert [type(v) for v in row.values()] == [str, str, bool, str]  # asyncpg decodes jsonb as text


def test_psycopg_server_side_binding_binary_and_pipeline(proxy: ProxyProcess, engine_vectors) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        (value,) = cur.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", [MODEL, "query: binary"]).fetchone()
        assert_same_embeddings(np.array(value, np.float32), engine_vectors("query: binary")[0])
        texts = [f"query: pipelined {i}" for i in range(5)]
        with conn.pipeline():
            cursors = [conn.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", [MODEL, t]) for t in texts]
            bad = conn.execute("SELECT 1")
        got = np.array([c.fetchone()[0] for c in cursors], np.float32)
        assert_same_embeddings(got, engine_vectors(*texts))
        assert bad.fetchone() == (1,)
        with pytest.raises(psycopg.errors.UndefinedObject), conn.pipeline():
            conn.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", ["nope:v9", "x"])
        assert conn.execute("SELECT azure_local_ai.get_setting(%s)", ["spin_control"]).fetchone()[0] in (
            "true", "false")


def test_psycopg_prepared_many_times(proxy: ProxyProcess, engine_vectors) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for text in ("a", "b", "c", "d"):
            (value,) = conn.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", [MODEL, text]).fetchone()
            assert_same_embeddings(np.array(value, np.float32), engine_vectors(text)[0])


def test_psycopg2_client_side_binding(proxy: ProxyProcess, engine_vectors) -> None:
    import psycopg2

    conn = psycopg2.connect(proxy.dsn())
    try:
        cur = conn.cursor()
        cur.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", (MODEL, "query: it's quoted"))
        assert_same_embeddings(np.array(cur.fetchone()[0], np.float32), engine_vectors("query: it's quoted")[0])
    finally:
        conn.close()


async def test_permissions_in_the_extended_protocol(proxy: ProxyProcess, pg) -> None:
    role = f"plain_{uuid.uuid4().hex[:6]}"
    pg.psql(f"CREATE ROLE {role} LOGIN")
    plain = await asyncpg.connect(proxy.dsn(role))
    try:
        assert await plain.fetchval("SELECT azure_local_ai.get_setting($1)", "spin_control") in ("true", "false")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await plain.execute("SELECT azure_local_ai.set_setting($1, $2)", "spin_control", "true")
    finally:
        await plain.close()
    superuser = await asyncpg.connect(proxy.dsn())
    try:
        await superuser.execute("SELECT azure_local_ai.set_setting($1, $2)", "spin_control", "true")
        assert await superuser.fetchval("SELECT azure_local_ai.get_setting('spin_control')") == "true"
    finally:
        await superuser.close()
