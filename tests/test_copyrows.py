"""COPY FROM STDIN read as the server reads it (proxy/intercept/copyrows.py): the same data is copied
into a real table, and the parser's fields must be the server's, however the data is cut."""

from __future__ import annotations

import random
from collections.abc import Iterator

import psycopg
import pytest

from proxy.intercept.copyrows import CopyFormat, CopyFrom, CopyRows, copy_from_stdin

from .pgcluster import PgCluster

TEXT_DATA = (
    b"1\tplain text\t\\N\n"
    b"2\ttab\\there, newline\\nthere, backslash \\\\ and \\x41\\102\\7\tx\n"
    b"3\tescaped\\\tdelimiter\t\n"
    b"4\t\\N\tnull first\n"
    b"5\t\xc3\xa9t\xc3\xa9 \xe3\x81\x93\xe3\x82\x93\tend\\\\\n"
    b"6\t\\b\\f\\r\\v and \\q unknown\t\n"
    b"7\tlast line, no line end\tz"
)
CSV_DATA = (
    b"id,body,more\n"
    b'1,"quoted, with comma",x\n'
    b'2,"two\nlines and ""quotes""",\n'
    b"3,unquoted,\n"
    b'4,,"not null"\n'
    b'5,"\xc3\xa9t\xc3\xa9",""\n'
    b'6,"a ""b"" c",last\n'
)


@pytest.fixture
def direct(pg: PgCluster) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE copied (id int, body text, more text)")
        yield conn


def server_reads(conn: psycopg.Connection, sql: str, data: bytes) -> list[list[str | None]]:
    conn.execute("TRUNCATE copied")
    with conn.cursor().copy(sql) as copy:
        copy.write(data)
    return [list(row) for row in conn.execute("SELECT body, more FROM copied ORDER BY id").fetchall()]


def parser_reads(copy: CopyFrom, data: bytes, cuts: list[int]) -> list[list[str | None]]:
    rows = CopyRows(copy.format, [1, 2])
    out: list[list[str | None]] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        out += rows.feed(data[start:end])
    return out + rows.finish()


@pytest.mark.parametrize(("sql", "data"), [
    ("COPY copied FROM STDIN", TEXT_DATA),
    ("COPY copied (id, body, more) FROM stdin WITH (FORMAT text)", TEXT_DATA + b"\n\\.\n"),
    ("COPY copied FROM STDIN", TEXT_DATA.replace(b"\n", b"\r\n")),
    ("copy copied from stdin with delimiter '|' null 'NIL'",
     TEXT_DATA.replace(b"\\N", b"NIL").replace(b"\\\t", b"\\|").replace(b"\t", b"|")),
    ("COPY copied FROM STDIN (FORMAT csv, HEADER true)", CSV_DATA),
    ("COPY copied FROM STDIN WITH CSV HEADER DELIMITER ';'", CSV_DATA.replace(b",", b";")),
], ids=["text", "text with its end marker", "text, CRLF", "text, delimiter and null", "csv", "csv, delimiter"])
def test_the_parser_reads_the_fields_the_server_stores(direct: psycopg.Connection, sql: str, data: bytes) -> None:
    copy = copy_from_stdin(sql)
    assert copy is not None
    expected = server_reads(direct, sql, data)
    assert len(expected) >= 6
    csv_empty_is_null = copy.format.csv and copy.format.null == b""
    if csv_empty_is_null:  # a quoted empty text reads as NULL here (the row then asks): documented
        expected = [[None if v == "" else v for v in row] for row in expected]
    assert parser_reads(copy, data, []) == expected
    assert parser_reads(copy, data, list(range(1, len(data)))) == expected  # a byte at a time
    generator = random.Random(7)
    for _ in range(20):
        cuts = sorted(generator.sample(range(1, len(data)), 5))
        assert parser_reads(copy, data, cuts) == expected


def test_joined_midway_it_reads_from_the_next_line_on() -> None:
    copy = copy_from_stdin("COPY copied FROM STDIN")
    assert copy is not None
    rows = CopyRows(copy.format, [1], resync=True)
    assert rows.feed(b"ne of a row\t1\n8\tnext\n9\tand") + rows.finish() == [["next"], ["and"]]


@pytest.mark.parametrize(("sql", "expected"), [
    ("COPY public.docs (id, body) FROM stdin;", CopyFrom("public.docs", ("id", "body"), CopyFormat())),
    ('COPY "Docs" FROM STDIN (FORMAT csv)', CopyFrom('"Docs"', None, CopyFormat(True, b",", b"", False, b'"'))),
    ("COPY t FROM STDIN (FORMAT csv, QUOTE '''')", CopyFrom("t", None, CopyFormat(True, b",", b"", False, b"'"))),
    ("COPY t FROM STDIN (FREEZE)", CopyFrom("t", None, CopyFormat())),
    ("COPY t FROM STDIN (FORMAT binary)", None),
    ("COPY t FROM STDIN (FORMAT csv, FORCE_NULL (body))", None),
    ("COPY t FROM STDIN (FORMAT csv, ESCAPE '\\')", None),
    ("COPY t FROM STDIN (ENCODING 'LATIN1')", None),
    ("COPY t FROM STDIN (DEFAULT 'x')", None),
    ("COPY t TO STDOUT", None),
    ("COPY t FROM '/tmp/rows'", None),
    ("COPY t FROM STDIN; SELECT 1", None),
    ("SELECT 'stdin'", None),
])
def test_which_copies_are_read(sql: str, expected: CopyFrom | None) -> None:
    assert copy_from_stdin(sql) == expected
