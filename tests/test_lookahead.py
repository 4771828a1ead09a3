"""Which statements the proxy reads ahead for, and what it reads (lookahead.py), without a server: the
queries are checked as text, and each refusal is a statement whose reading ahead could do or read
more than the statement itself."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from proxy.intercept.lookahead import (
    Lookahead,
    RowInput,
    embedded_columns,
    generated_lookaheads,
    lookaheads,
    one_row_insert,
    row_inputs,
    written_tables,
)
from proxy.intercept.shorttext import LONG_CONSTANT
from proxy.intercept.sqlcalls import find_calls

M = "multilingual-e5-small:v1"
CALL = f"azure_local_ai.create_embeddings('{M}', {{}})"


def one(sql: str) -> list[Lookahead]:
    (raw,) = parse_sql(sql)
    return lookaheads(raw.stmt)


@pytest.mark.parametrize(("sql", "query"), [
    (f"UPDATE docs SET v = {CALL.format('body')}::vector WHERE id % 2 = 0",
     "SELECT CAST(body AS pg_catalog.text) FROM docs WHERE id % 2 = 0"),
    (f"UPDATE docs d SET v = {CALL.format('d.title || s.tag')} FROM sources s WHERE s.id = d.source",
     "SELECT CAST(d.title || s.tag AS pg_catalog.text) FROM docs AS d, sources AS s WHERE s.id = d.source"),
    (f"ALTER TABLE public.docs ADD COLUMN g vector(384) GENERATED ALWAYS AS ({CALL.format('body')}::vector) STORED",
     "SELECT CAST(body AS pg_catalog.text) FROM public.docs"),
    (f"INSERT INTO dst SELECT id, {CALL.format('lower(body)')} FROM src WHERE body <> ''",
     "SELECT CAST(pg_catalog.lower(body) AS pg_catalog.text) FROM src WHERE body <> ''"),
    (f"WITH s AS (SELECT * FROM src) INSERT INTO dst SELECT id, {CALL.format('body')} FROM s",
     "WITH s AS (SELECT * FROM src) SELECT CAST(body AS pg_catalog.text) FROM s"),
    (f"SELECT id, azure_local_ai.create_embeddings(model_uri => '{M}', input => body) FROM src ORDER BY id LIMIT 10",
     "SELECT CAST(body AS pg_catalog.text) FROM src ORDER BY id LIMIT 10"),
])
def test_the_rows_a_statement_embeds_are_read_by_a_query(sql: str, query: str) -> None:
    # ALTER TABLE locks its table against reading: its texts are read before it runs.
    assert one(sql) == [Lookahead(M, query, before=sql.startswith("ALTER"))]


@pytest.mark.parametrize("sql", [
    f"SELECT {CALL.format(repr('a constant'))}",  # the proxy answers it before the server runs
    f"SELECT {CALL.format('$1')} FROM src",  # the value comes with the Bind
    f"SELECT azure_local_ai.create_embeddings('{M}', array_agg(body)) FROM src",  # one call over an array
    f"SELECT {CALL.format('body')} FROM src WHERE nextval('s') > 0",  # a function that writes
    f"SELECT {CALL.format('f(body)')} FROM src",  # a function we know nothing of
    f"SELECT {CALL.format('body')} FROM src FOR UPDATE",  # locks rows
    f"WITH d AS (DELETE FROM src RETURNING body) SELECT {CALL.format('body')} FROM d",  # writes
    f"SELECT {CALL.format('body')} FROM src GROUP BY body",  # other rows than the table's
    f"SELECT {CALL.format('body')} FROM src UNION SELECT {CALL.format('body')} FROM src",
    f"SELECT {CALL.format('x')} FROM generate_series(1, 10) x",  # a function in FROM
    "SELECT azure_local_ai.create_embeddings(body, 'text') FROM src",  # the model from a column
    f"INSERT INTO dst VALUES (1, {CALL.format('(SELECT body FROM src LIMIT 1)')})",
    f"DELETE FROM src WHERE {CALL.format('body')} IS NULL",
])
def test_nothing_is_read_ahead_where_the_query_could_do_more(sql: str) -> None:
    assert one(sql) == []


def test_a_long_constant_is_restored_in_the_query() -> None:
    long_text = "x" * (LONG_CONSTANT + 10)
    sql = f"UPDATE docs SET v = {CALL.format('body')} WHERE body <> '{long_text}'"
    (statement,) = find_calls(sql)
    (lookahead,) = statement.lookaheads
    assert lookahead.query == f"SELECT CAST(body AS pg_catalog.text) FROM docs WHERE body <> '{long_text}'"


def test_a_constant_with_quotes_and_backslashes_is_written_for_standard_strings() -> None:
    (lookahead,) = one(f"UPDATE docs SET v = {CALL.format('body')} WHERE tag = E'it''s a \\\\ back'")
    assert lookahead.query.endswith("WHERE tag = 'it''s a \\ back'")


GENERATED = [f"(azure_local_ai.create_embeddings('{M}'::text, body))::vector"]


def written(sql: str) -> list[Lookahead]:
    (stmt, table), = written_tables(sql)
    assert table == ("public.docs" if "public." in sql else "docs")
    return generated_lookaheads(stmt, ["id", "body"], GENERATED)


@pytest.mark.parametrize(("sql", "query"), [
    ("INSERT INTO docs (body) SELECT title FROM src WHERE title <> ''",
     "SELECT CAST(body AS pg_catalog.text) FROM (SELECT title FROM src WHERE title <> '') AS lookahead_rows (body)"),
    ("INSERT INTO public.docs SELECT n, title FROM src",
     "SELECT CAST(body AS pg_catalog.text) FROM (SELECT n, title FROM src) AS lookahead_rows (id, body)"),
    ("INSERT INTO docs (id, body) VALUES (1, 'a'), (2, 'b')",
     "SELECT CAST(body AS pg_catalog.text) FROM ((VALUES (1, 'a'), (2, 'b'))) AS lookahead_rows (id, body)"),
    ("UPDATE docs SET body = upper(body) WHERE id < 10",
     "SELECT CAST(pg_catalog.upper(body) AS pg_catalog.text) FROM docs WHERE id < 10"),
])
def test_the_rows_a_generated_column_embeds_are_read_by_a_query(sql: str, query: str) -> None:
    assert written(sql) == [Lookahead(M, query)]


@pytest.mark.parametrize("sql", [
    "INSERT INTO docs (id) SELECT n FROM src",  # body takes its default
    "INSERT INTO docs SELECT * FROM src",  # how many columns * is, only the server knows
    "INSERT INTO docs (body) SELECT f(title) FROM src",  # a function we know nothing of
    "INSERT INTO docs (body) SELECT title FROM src ON CONFLICT DO NOTHING",
    "UPDATE docs SET id = id + 1",  # body keeps its value
])
def test_no_generated_look_ahead_where_the_rows_are_not_plain(sql: str) -> None:
    assert written(sql) == []


def test_only_inserts_and_updates_write_generated_columns() -> None:
    assert written_tables("SELECT 1; DELETE FROM docs; COPY docs FROM STDIN") == []
    assert written_tables("INSERT INTO docs (body) VALUES ('one row')") == []  # its one request is on its way
    assert written_tables("INSERT INTO") == []  # the server says what is wrong with it


GENERATED = (f"(azure_local_ai.create_embeddings('{M}'::text, body))::vector(384)",)


@pytest.mark.parametrize(("sql", "table", "inputs"), [
    ("INSERT INTO docs (body) VALUES ($1)", "docs", [RowInput(M, param=1)]),
    ("insert into public.docs values (7, 'it''s a text'::text)", "public.docs", [RowInput(M, text="it's a text")]),
    ('INSERT INTO "Docs" (id, body) VALUES ($2, $1) RETURNING id', '"Docs"', [RowInput(M, param=1)]),
    ("INSERT INTO docs (id, body) VALUES (1, lower($1))", "docs", []),  # an expression: it asks
    ("INSERT INTO docs (id) VALUES (1)", "docs", []),  # no text: the column's default
    ("INSERT INTO docs (id, body) VALUES (1, DEFAULT)", "docs", []),
])
def test_a_one_row_inserts_text_is_read_from_the_statement(sql: str, table: str, inputs: list[RowInput]) -> None:
    found = one_row_insert(sql)
    assert found is not None and found[1] == table
    assert row_inputs(found[0], ["id", "body"], embedded_columns(GENERATED)) == inputs


@pytest.mark.parametrize("sql", [
    "INSERT INTO docs (body) VALUES ('a'), ('b')",  # many rows: read ahead as they are asked for
    "INSERT INTO docs (body) SELECT body FROM src",
    "INSERT INTO docs (body) VALUES ('a'); INSERT INTO docs (body) VALUES ('b')",
    "WITH t AS (SELECT 1) INSERT INTO docs (body) VALUES ('a')",
    "UPDATE docs SET body = 'a'",
    "INSERT INTO docs (body VALUES",
])
def test_other_statements_are_not_one_row_inserts(sql: str) -> None:
    assert one_row_insert(sql) is None
