"""The proxy chooses among the functions' overloads as PostgreSQL does: the same calls go to the
real server, against SQL functions of the very same signatures in a scratch schema (each says which
overload it is), and the server's choice, or its SQLSTATE, must be the proxy's."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from proxy.intercept.errors import CallError
from proxy.intercept.signatures import OVERLOADS
from proxy.intercept.sqlcalls import find_calls

from .helpers import direct, unique
from .pgcluster import PgCluster

CALLS = {
    "create_embeddings": [
        "'m', 'x'", "'m', 'x', 5", "'m', 'x', 5::bigint", "'m', 'x', 5000000000", "'m', '{a,b}'",
        "'m', ARRAY['a']", "'m', ARRAY['a'], 2", "'m', ARRAY['a'], ARRAY[1]", "'m', ARRAY['a'], '{1}'",
        "'m', '{a}', '{1}'", "'m', 2", "'m', true", "'m', ARRAY[1,2]", "1, 2", "'m', 'x'::varchar",
        "'m', ARRAY['a']::varchar[]", "'m'::text, 'x'::text", "model_uri => 'm', input => 'x'",
        "model_uri => 'm', inputs => ARRAY['a'], ids => ARRAY[1]", "'m', ARRAY['a'], ARRAY[1], 10",
        "'m', ARRAY['a'], batch_size => 5", "'m', NULL", "NULL, NULL", "'m', 'x', timeout_ms => 5",
        "'m', inputs => '{a}'", "'m', 'x', 2.5", "'m', ARRAY['a'], 5::smallint", "'m', 'x', 1, 2, 3, 4",
    ],
    "get_setting": ["", "'k'", "ARRAY['k']", "'{k}'", "'k', 5", "NULL", "keys => '{k}'", "key => 'k'", "1"],
    "set_setting": ["'k', 'v'", "ARRAY['k'], ARRAY['v']", "'{k}', '{v}'", "ARRAY['k'], 'v'", "'k', ARRAY['v']"],
    "model_register": ["'m', 'p'", "'m', 'p', 't'", "'m', 'p', NULL, 5", "'m'"],
    "model_metadata": ["'m'", "'m', 5"],
}


def _default(default: object) -> str:
    if default is None:
        return "NULL"
    if default == ():
        return "ARRAY[]::text[]"
    return str(default)


@pytest.fixture(scope="module")
def twin_schema(pg: PgCluster) -> Iterator[str]:
    """The overloads as SQL functions of the same names, argument names, types and defaults."""
    schema = unique("sig")
    with direct(pg) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        for function, overloads in OVERLOADS.items():
            for index, overload in enumerate(overloads):
                params = ", ".join(
                    f'"{p.name}" {p.type}' + ("" if p.required else f" DEFAULT {_default(p.default)}")
                    for p in overload.params)
                conn.execute(f"CREATE FUNCTION {schema}.{function}({params}) RETURNS int "
                             f"LANGUAGE sql AS 'SELECT {index}'")
    yield schema
    with direct(pg) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _server_choice(pg: PgCluster, schema: str, function: str, args: str) -> int | str:
    with direct(pg) as conn:
        try:
            # PREPARE resolves the call (and converts its constants); EXECUTE tells which overload it chose.
            conn.execute(f"PREPARE q AS SELECT {schema}.{function}({args})")
        except psycopg.Error as exc:
            return str(exc.sqlstate)
        return conn.execute("EXECUTE q").fetchone()[0]  # type: ignore[index]


def _proxy_choice(function: str, args: str) -> int | str:
    try:
        (statement,) = find_calls(f"SELECT azure_local_ai.{function}({args})")
    except CallError as exc:
        return exc.sqlstate
    (call,) = statement.calls
    return OVERLOADS[function].index(call.binding.overload)


@pytest.mark.parametrize("function, args", [(f, a) for f, calls in CALLS.items() for a in calls])
def test_overload_choice_matches_postgresql(pg: PgCluster, twin_schema: str, function: str, args: str) -> None:
    server = _server_choice(pg, twin_schema, function, args)
    proxy = _proxy_choice(function, args)
    if isinstance(server, str) and server.startswith("22"):
        # The server chose an overload and then could not convert a constant ('x' as text[], 2.5 as
        # an integer): the proxy must have chosen one too, and it fails the same way when it runs.
        assert isinstance(proxy, int) or proxy == server, (server, proxy)
    else:
        assert proxy == server
