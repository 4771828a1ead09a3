"""The proxy reads string constants as the session's server does, whatever standard_conforming_strings
says: random statements of string constants, comments and quotes go to the real server under both
settings, and what the server reads must be what pglast reads (of the text as the proxy rewrites it)."""

from __future__ import annotations

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from proxy.intercept.strings import plain_literals_as_escape_strings

from .helpers import direct
from .pgcluster import PgCluster

PIECES = ["a", "\\", "'", "''", "\\'", '"', "$", "$$", "$t$", "\n", " ", "--", "/*", "*/", "E", "N", "b", "é"]
PREFIXES = ["", "E", "e", "N", "b", "x", "U&"]


class _Strings(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[str] = []

    def visit_A_Const(self, _ancestors: object, node: ast.A_Const) -> None:
        if isinstance(node.val, ast.String):
            self.values.append(node.val.sval)
        elif isinstance(node.val, ast.BitString):  # b'01' or x'ff', as the server prints the bits
            kind, digits = node.val.bsval[0], node.val.bsval[1:]
            bits = digits if kind == "b" else "".join(f"{int(d, 16):04b}" for d in digits)
            self.values.append(bits)


def pglast_reading(sql: str) -> list[str] | str:
    try:
        tree = parse_sql(sql)
    except ParseError:
        return "error"
    values = []
    for target in tree[0].stmt.targetList:  # one constant each, in the text's order
        finder = _Strings()
        finder(target)
        values += finder.values
    return values


def server_reading(conn: psycopg.Connection, sql: str) -> list[str] | str:
    try:
        row = conn.execute(sql).fetchone()
    except psycopg.errors.SyntaxError:
        return "error"
    except psycopg.Error:
        return "refused"  # read, but refused for another reason (a bit string, a Unicode escape)
    return [str(v) for v in row] if row else []


constants = st.tuples(st.sampled_from(PREFIXES), st.lists(st.sampled_from(PIECES), max_size=8)).map(
    lambda t: t[0] + "'" + "".join(t[1]) + "'")
statements = st.lists(constants, min_size=1, max_size=3).map(lambda cs: "SELECT " + ", ".join(cs))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=statements)
def test_constants_read_as_the_server_reads_them(pg: PgCluster, sql: str) -> None:
    with direct(pg) as conn:
        for standard in ("on", "off"):
            conn.execute(f"SET standard_conforming_strings = {standard}")
            server = server_reading(conn, sql)
            if server == "refused":
                continue
            escaped = plain_literals_as_escape_strings(sql) if standard == "off" else None
            ours = pglast_reading(escaped if escaped is not None else sql)
            if server == "error":
                assert ours == "error" or standard == "off", (standard, sql, ours)
            else:
                assert ours == server, (standard, sql, escaped)
