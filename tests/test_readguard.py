"""What a look-ahead query may contain and read (readguard.py), without a server: each refusal is a
way to run code of another role's on the proxy's service connection, or to read more than rows."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from proxy.intercept.readguard import ReadPlan, TableFacts, guard, qualified, verdict


def plan(sql: str) -> ReadPlan | None:
    (raw,) = parse_sql(sql)
    return guard(raw.stmt)


def test_a_plain_read_names_its_tables_and_columns() -> None:
    found = plan("WITH s AS (SELECT * FROM src) SELECT CAST(pg_catalog.lower(d.title || s.tag) AS pg_catalog.text) "
                 "FROM public.docs AS d JOIN s USING (id), (VALUES (1, 'a')) AS v(n, word) "
                 "WHERE d.id % 2 = 0 AND coalesce(v.word, '') LIKE 'a%' ORDER BY d.id LIMIT 5")
    assert found == ReadPlan(("src", "public.docs"), ("id", "tag", "title", "word"), ("n", "word"))


@pytest.mark.parametrize("sql", [
    "SELECT public.lower(body)::text FROM docs",  # a function of another schema
    "SELECT lower(body)::public.mytext FROM docs",  # a type of another schema
    "SELECT f(body)::text FROM docs",  # a function we know nothing of
    "SELECT count(body)::text FROM docs",  # an aggregate
    "SELECT (SELECT body FROM other LIMIT 1)::text FROM docs",  # a sub-query expression
    "SELECT body::text FROM docs, LATERAL (SELECT 1) AS l",
    "SELECT body::text FROM generate_series(1, 3) AS docs(body)",
    "SELECT body::text FROM docs WHERE body = $1",
    "SELECT concat(docs.*)::text FROM docs",  # a whole row
    "SELECT (docs.body).x::text FROM docs",  # a field selection
    "SELECT body::text FROM docs NATURAL JOIN other",
    "SELECT body::text FROM docs ORDER BY body USING <",
    "SELECT body::text FROM docs FOR UPDATE",
    "SELECT * FROM docs",
    "WITH RECURSIVE r AS (SELECT 1) SELECT body::text FROM docs",
    "SELECT body::text FROM (WITH w AS (SELECT 1) SELECT body FROM docs) AS s",  # WITH inside
    "WITH docs AS (SELECT body FROM docs) SELECT body::text FROM docs",  # a CTE naming a table of its name
    "SELECT body::text FROM otherdb.public.docs",
    "SELECT body OPERATOR(public.###) body FROM docs",
    "SELECT body::text FROM docs WHERE row(id) IS NOT NULL",
])
def test_what_could_run_code_or_read_more_is_refused(sql: str) -> None:
    assert plan(sql) is None


def test_function_names_are_written_as_pg_catalogs() -> None:
    (raw,) = parse_sql("SELECT lower(body)::text FROM docs")
    guard(raw.stmt)
    assert raw.stmt.targetList[0].val.arg.funcname[0].sval == "pg_catalog"


def facts(**columns: str) -> TableFacts:
    return TableFacts("public", "docs", True, True, frozenset(columns), frozenset())


def test_the_catalogs_facts_decide() -> None:
    read = ReadPlan(("docs",), ("body", "n"), ("n",))
    assert verdict(read, [facts(body="text")]) is None
    assert "not a table" in verdict(read, [None])
    assert "not a plain table" in verdict(read, [TableFacts("public", "docs", False, True, frozenset(), frozenset())])
    assert "may not read" in verdict(read, [TableFacts("public", "docs", True, False, frozenset({"body"}),
                                                       frozenset())])
    assert "type outside pg_catalog" in verdict(read, [TableFacts("public", "docs", True, True, frozenset({"body"}),
                                                                  frozenset({"body"}))])
    assert "sneaky is not a column" in verdict(ReadPlan(("docs",), ("sneaky",), ()), [facts(body="text")])


def test_tables_are_written_as_resolved_and_ctes_are_left() -> None:
    query = "WITH s AS (SELECT body FROM src) SELECT CAST(body AS pg_catalog.text) FROM s, docs AS d WHERE d.id = 1"
    assert qualified(query, {"src": ("app", "src"), "docs": ("Mixed Case", "docs")}) == (
        'WITH s AS (SELECT body FROM app.src) SELECT CAST(body AS pg_catalog.text) FROM s, "Mixed Case".docs AS d '
        "WHERE d.id = 1")
