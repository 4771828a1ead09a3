"""SQL text for computed values, shaped so that PostgreSQL gives the result the real extension would:
the same column names, types and row counts, wherever the call stood."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from .. import _floattext
from .arrays import format_text_array
from .sqlcalls import CallSite, Position

#: A value computed for a call: a scalar result, or the rows of a set-returning overload.
Rows = list[np.ndarray | None]


def string_literal(text: str) -> str:
    """A string constant that means `text` whatever standard_conforming_strings says."""
    quoted = text.replace("'", "''")
    if "\\" in text:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def real_array_text(vector: np.ndarray) -> str:
    """The real[] text of a float32 vector. Nine significant digits read back to the same float32 (as
    repr's seventeen would), in two thirds of the text, which the server parses in less time; written
    in C (_floattext.c), five times as fast as Python's formatting."""
    return _floattext.real_array_text(np.ascontiguousarray(vector, dtype=np.float32))


def real_array_literal(vector: np.ndarray | None) -> str:
    if vector is None:
        return "NULL::real[]"
    return "'" + real_array_text(vector) + "'::real[]"


def scalar_literal(sql_type: str, value: object) -> str:
    """A typed constant for a scalar result."""
    if value is None:
        return f"NULL::{sql_type}"
    if sql_type == "real[]":
        assert isinstance(value, np.ndarray)
        return real_array_literal(value)
    if sql_type == "jsonb":
        return string_literal(json.dumps(value, separators=(", ", ": "))) + "::jsonb"
    if sql_type == "boolean":
        return "true" if value else "false"
    if sql_type == "bigint":
        return f"{int(value)}::bigint"  # type: ignore[call-overload]
    if sql_type == "void":
        return "''::void"
    return string_literal(str(value)) + f"::{sql_type}"


def replace_scalar(call: CallSite, sql_type: str, value: object) -> str:
    """What stands in for a call of a scalar-returning overload, given its value."""
    return scalar_site(call, scalar_literal(sql_type, value))


def scalar_site(call: CallSite, literal: str) -> str:
    """What stands in for a call of a scalar-returning overload, given an expression of its value."""
    name = call.function  # the twelve names are plain lower-case identifiers
    if call.position is Position.TARGET:
        return literal if call.has_alias else f"{literal} AS {name}"
    if call.position is Position.FROM:
        # A scalar function in FROM names its one column after the alias, or after itself.
        column = _quote_ident(call.alias) if call.alias else name
        subquery = f"(SELECT {literal} AS {column})"
        return subquery if call.has_alias else f"{subquery} AS {name}"
    # Nested in an expression: a one-value subquery keeps the name PostgreSQL gives the column
    # (a function call names its column, and so does a subquery's single output) where it matters.
    return f"(SELECT {literal} AS {name})" if call.in_target else literal


def embeddings_text_array(vectors: Rows) -> str:
    """The rows of a set-returning call as one text[] value, an element per row."""
    return format_text_array([None if v is None else real_array_text(v) for v in vectors])


def replace_rows(call: CallSite, vectors: Rows | None, ids_sql: str | None) -> str:
    """What stands in for a call of a set-returning create_embeddings overload; None: no rows (NULL input)."""
    embeddings = "NULL::text[]" if vectors is None else string_literal(embeddings_text_array(vectors)) + "::text[]"
    return rows_site(call, embeddings, ids_sql)


def rows_site(call: CallSite, embeddings: str, ids_sql: str | None) -> str:
    """What stands in for a set-returning call, given a text[] expression holding its rows."""
    name = call.function  # the twelve names are plain lower-case identifiers
    if call.position is Position.FROM:
        if ids_sql is None:
            body = (f"(SELECT u.e::real[] AS embedding FROM unnest({embeddings}) WITH ORDINALITY AS u(e, n) "
                    "ORDER BY u.n)")
        else:
            body = (f"(SELECT u.id, u.e::real[] AS embedding FROM unnest({ids_sql}, {embeddings}) "
                    "WITH ORDINALITY AS u(id, e, n) ORDER BY u.n)")
        return body if call.has_alias else f"{body} AS {name}"
    if ids_sql is None:
        expression = f"unnest({embeddings})::real[]"
    else:
        expression = (f"unnest(ARRAY(SELECT ROW(u.id, u.e::real[]) FROM unnest({ids_sql}, {embeddings}) "
                      "WITH ORDINALITY AS u(id, e, n) ORDER BY u.n))")
    if call.position is Position.TARGET and not call.has_alias:
        return f"{expression} AS {name}"
    return expression


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def splice(sql: str, replacements: Sequence[tuple[int, int, str]]) -> str:
    """`sql` with each (start, end) span replaced by its text; spans must not overlap."""
    out = []
    cursor = 0
    for start, end, text in sorted(replacements):
        out.append(sql[cursor:start])
        out.append(text)
        cursor = end
    out.append(sql[cursor:])
    return "".join(out)


def splice_parts(data: memoryview, replacements: Sequence[tuple[int, int, str]]) -> list[bytes | memoryview]:
    """`splice` over bytes whose offsets are those of the text (ASCII), as parts to write one after
    another: a long statement is neither copied nor re-encoded, which would hold the GIL for long."""
    out: list[bytes | memoryview] = []
    cursor = 0
    for start, end, text in sorted(replacements):
        out.append(data[cursor:start])
        out.append(text.encode())
        cursor = end
    out.append(data[cursor:])
    return out
