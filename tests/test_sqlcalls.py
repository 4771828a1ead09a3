"""Finding azure_local_ai calls, reading their arguments and choosing overloads: pure code over SQL text."""

from __future__ import annotations

import pytest

from proxy.intercept.arrays import ArrayLiteralError, format_text_array, parse_text_array
from proxy.intercept.errors import CallError
from proxy.intercept.extension import VERSION
from proxy.intercept.sqlcalls import BindRef, Const, Position, find_calls, mentions_schema

M = "'multilingual-e5-small:v1'"


def only_call(sql: str, **kw):
    statements = find_calls(sql, **kw)
    calls = [c for s in statements for c in s.calls]
    assert len(calls) == 1, calls
    return calls[0]


def test_prefilter_is_case_insensitive() -> None:
    assert mentions_schema(b"select AZURE_LOCAL_AI.get_setting('x')")
    assert not mentions_schema(b"select 1")


def test_scalar_overload_with_literal() -> None:
    call = only_call(f"SELECT azure_local_ai.create_embeddings({M}, 'query: hello')")
    assert call.binding.overload.returns == "real[]" and not call.binding.overload.set_returning
    assert call.argument("input").value == Const("query: hello")
    assert call.argument("timeout_ms") is None
    assert call.position is Position.TARGET and not call.has_alias


@pytest.mark.parametrize(
    "arg", ["ARRAY['a','b']", "'{a,b}'::text[]", "ARRAY['a','b']::varchar[]", "'{a,b}'::text []"]
)
def test_array_overload(arg: str) -> None:
    call = only_call(f"select azure_local_ai.create_embeddings({M}, {arg})")
    assert call.binding.overload.columns == (("embedding", "real[]"),)
    assert call.argument("inputs").value == Const(["a", "b"])


def test_ids_overload_and_batch_size() -> None:
    call = only_call(f"select * from azure_local_ai.create_embeddings({M}, ARRAY['a','b'], ARRAY[7,8], 7) e")
    assert [c for c, _ in call.binding.overload.columns] == ["id", "embedding"]
    assert call.argument("ids").text == "ARRAY[7,8]"
    assert call.argument("batch_size").value == Const(7)
    assert call.position is Position.FROM and call.has_alias


def test_named_arguments_in_any_order() -> None:
    call = only_call(f"select azure_local_ai.create_embeddings(input => 'x' || 'y', model_uri => {M})")
    assert call.argument("input").value == Const("xy")
    assert call.argument("model_uri").value == Const("multilingual-e5-small:v1")


def test_unknown_literal_prefers_text_and_cast_decides() -> None:
    assert only_call("select azure_local_ai.get_setting('intra_op_parallelism')").binding.overload.returns == "text"
    assert only_call("select azure_local_ai.get_setting('{a}'::text[])").binding.overload.returns == "jsonb"
    assert only_call("select azure_local_ai.get_setting()").binding.overload.returns == "jsonb"


def test_bind_parameters_typed_and_untyped() -> None:
    untyped = only_call("select azure_local_ai.create_embeddings($1, $2)")
    assert untyped.argument("input").value == BindRef(2)
    typed = only_call("select azure_local_ai.create_embeddings($1, $2)", param_types={2: 1009})
    assert typed.binding.overload.set_returning
    cast = only_call("select azure_local_ai.create_embeddings($1, $2::text[])")
    assert cast.argument("inputs").value == BindRef(2)


def test_nulls_are_constants() -> None:
    call = only_call("select azure_local_ai.create_embeddings(NULL, NULL::text)")
    assert call.argument("model_uri").value == Const(None)
    assert call.argument("input").value == Const(None)


def test_column_arguments_and_stored_expressions_are_left_to_the_server() -> None:
    (backfill,) = find_calls(f"update docs set v = azure_local_ai.create_embeddings({M}, body)::vector")
    assert (backfill.calls, backfill.server_calls) == ([], 1)
    generated = find_calls(
        f"alter table docs add column v real[] generated always as (azure_local_ai.create_embeddings({M}, 'x')) "
        f"stored; create view w as select azure_local_ai.create_embeddings({M}, 'y'); "
        f"select azure_local_ai.create_embeddings({M}, ARRAY['a'], ids::int[]) from t"
    )
    assert [(len(s.calls), s.server_calls) for s in generated] == [(0, 1), (0, 1), (1, 0)]  # ids pass through
    (unresolved,) = find_calls(f"select azure_local_ai.create_embeddings({M}, s.x, s.i) from s")
    assert (unresolved.calls, unresolved.server_calls) == ([], 1)  # only the server knows the types


def test_extension_statements_are_recognised() -> None:
    statements = find_calls("create extension if not exists azure_local_ai; drop extension azure_local_ai cascade; "
                            "alter extension azure_local_ai update; create extension vector")
    assert [s.extension.tag if s.extension else None for s in statements] == [
        "CREATE EXTENSION", "DROP EXTENSION", "ALTER EXTENSION", None]
    with pytest.raises(CallError) as refused:
        find_calls("drop extension azure_local_ai, vector")
    assert refused.value.sqlstate == "0A000"
    with pytest.raises(CallError) as version:
        find_calls("alter extension azure_local_ai update to '2.0'")
    assert version.value.sqlstate == "22023"
    # A version of another numbering (a dump of Azure's native extension) installs the latest, saying so.
    (foreign,) = find_calls("create extension azure_local_ai with schema azure_local_ai version '0.9.1'")
    assert f"is not one of azure-local-ai-proxy''s: installing {VERSION}" in foreign.extension.sql
    (comment,) = find_calls("comment on extension azure_local_ai is 'from a dump'")
    assert comment.extension.tag == "COMMENT"


def test_calls_everywhere_in_every_statement() -> None:
    sql = (
        f"select 1; with q as (select azure_local_ai.create_embeddings({M}, 'a') e) select * from q;"
        f"select id from docs order by v <=> azure_local_ai.create_embeddings({M}, 'b')::vector limit 3;"
        f"insert into t values (azure_local_ai.create_embeddings({M}, 'c')) returning "
        f"azure_local_ai.get_setting('spin_control')"
    )
    statements = find_calls(sql)
    assert [len(s.calls) for s in statements] == [0, 1, 1, 2]
    for statement in statements:
        for call in statement.calls:
            assert sql[call.start : call.end].startswith("azure_local_ai.")
            assert sql[call.end - 1] == ")"
    assert statements[3].calls[1].position is Position.TARGET


def test_spans_with_multibyte_text() -> None:
    sql = f"select 'é', azure_local_ai.create_embeddings({M}, 'naïve (café)') as x"
    call = only_call(sql)
    assert sql[call.start : call.end] == f"azure_local_ai.create_embeddings({M}, 'naïve (café)')"
    assert call.has_alias


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("select azure_local_ai.no_such_function()", "42883"),
        ("select azure_local_ai.create_embeddings('m')", "42883"),
        ("select azure_local_ai.create_embeddings('m', 'x', bogus => 1)", "42883"),
        ("select azure_local_ai.create_embeddings('m', '{a,{b}}'::text[])", "22P02"),
        ("select azure_local_ai.create_embeddings('m', ARRAY['a'], batch_size => 'x'::int)", "22P02"),
    ],
)
def test_errors(sql: str, sqlstate: str) -> None:
    with pytest.raises(CallError) as info:
        find_calls(sql)
    assert info.value.sqlstate == sqlstate


def test_syntax_errors_are_left_to_the_server() -> None:
    assert find_calls("selec azure_local_ai.get_setting('x')") == []


def test_other_schemas_and_quoted_names_are_ignored() -> None:
    assert find_calls("select other.create_embeddings('m', 'x'), \"AZURE_LOCAL_AI\".x()")[0].calls == []


@pytest.mark.parametrize(
    ("literal", "values"),
    [
        ("{}", []),
        ("{a,b}", ["a", "b"]),
        ('{"a b","c,d",NULL,"NULL", e }', ["a b", "c,d", None, "NULL", "e"]),
        ('{"quote \\" and \\\\ backslash"}', ['quote " and \\ backslash']),
        ("[1:2]={x,y}", ["x", "y"]),
    ],
)
def test_array_literals(literal: str, values: list) -> None:
    assert parse_text_array(literal) == values
    assert parse_text_array(format_text_array(values)) == values


@pytest.mark.parametrize("bad", ["a,b", "{a", "{a,,b}", '{"a}', "{{a}}"])
def test_bad_array_literals(bad: str) -> None:
    with pytest.raises(ArrayLiteralError):
        parse_text_array(bad)


def test_real_array_binary_format() -> None:
    import struct

    import numpy as np

    from proxy.intercept.evaluate import real_array_binary

    vector = np.array([0.5, -1.25, 3.0e-8], dtype=np.float32)
    expected = struct.pack("!iiiii", 1, 0, 700, 3, 1) + b"".join(struct.pack("!if", 4, float(v)) for v in vector)
    assert real_array_binary(vector) == expected


def test_with_ordinality_is_refused_clearly() -> None:
    with pytest.raises(CallError) as info:
        find_calls("select * from azure_local_ai.create_embeddings('m', ARRAY['a']) WITH ORDINALITY")
    assert info.value.sqlstate == "0A000"


@pytest.mark.parametrize("quote", ["'{}'", "E'{}'", "$${}$$", "$tag${}$tag$"])
def test_long_constants_keep_their_values_and_positions(quote: str) -> None:
    """Constants over LONG_CONSTANT are not handed to the parser; the calls' spans, argument texts and
    values must still be those of the statement itself, before and after such constants."""
    from proxy.intercept.shorttext import LONG_CONSTANT

    long_text = "é'x" * (LONG_CONSTANT // 2)
    written = quote.format(long_text.replace("'", "''") if "'" in quote else long_text)
    sql = (f"SELECT length({written}), azure_local_ai.create_embeddings('m', {written});\n"
           f"SELECT id FROM azure_local_ai.create_embeddings('m', ARRAY[{written}], ARRAY[{written}]) AS e")
    first, second = find_calls(sql)
    (call,) = first.calls
    assert sql[call.start : call.end] == f"azure_local_ai.create_embeddings('m', {written})"
    assert call.args[1].value == Const(long_text) and call.args[1].text == written
    (rows,) = second.calls
    assert sql[rows.start : rows.end].startswith("azure_local_ai.create_embeddings('m', ARRAY[")
    assert rows.argument("ids").text == f"ARRAY[{written}]"  # type: ignore[union-attr]
    assert rows.args[1].value == Const([long_text])
    assert sql[second.start : second.end].startswith("SELECT id FROM")


def test_real_array_text_reads_back_as_the_same_floats_on_the_server(pg) -> None:
    """Nine significant digits: PostgreSQL's float4 input gives back every bit of each float32,
    subnormals, extremes and negative zero among them."""
    import numpy as np
    import psycopg

    from proxy.intercept.render import real_array_text

    rng = np.random.default_rng(7)
    vectors = [(rng.standard_normal(384) * 10.0 ** rng.integers(-40, 38)).astype(np.float32) for _ in range(20)]
    vectors.append(np.array([0.0, -0.0, 1e-45, -1.4e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1.0,
                             0.1, 1 / 3], dtype=np.float32))
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for vector in vectors:
            text = real_array_text(vector)
            assert len(text) < 16 * len(vector)
            got = conn.execute("SELECT string_agg(encode(float4send(u), 'hex'), '' ORDER BY n) "
                               "FROM unnest(%s::real[]) WITH ORDINALITY AS x(u, n)", (text,)).fetchone()[0]
            assert got == vector.astype(">f4").tobytes().hex()
        text = real_array_text(np.array([np.nan, np.inf, -np.inf], dtype=np.float32))
        assert conn.execute("SELECT %s::real[]::text", (text,)).fetchone()[0] == "{NaN,Infinity,-Infinity}"


def test_real_array_text_reads_back_every_float32() -> None:
    """Two million random bit patterns: each element's text reads back as the same float32 (through a
    double, which cannot round it otherwise: a nine-digit decimal is nowhere near a float32 midpoint),
    and is what %.9g writes but in the last digit, rarely."""
    import numpy as np

    from proxy.intercept.render import real_array_text

    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    values = bits[(bits & 0x7F800000) != 0x7F800000].view(np.float32)  # NaN and infinities: above
    text = real_array_text(values)
    elements = text[1:-1].split(",")
    assert text[0] + text[-1] == "{}" and len(elements) == len(values)
    back = np.array([float(element) for element in elements]).astype(np.float32)
    assert np.array_equal(back.view(np.uint32), values.view(np.uint32))
    printf = ("%.9g," * 100_000)[:-1] % tuple(values[:100_000].tolist())
    assert sum(a != b for a, b in zip(elements[:100_000], printf.split(","), strict=True)) < 1_000
    assert real_array_text(np.zeros(0, dtype=np.float32)) == "{}"


def test_a_parameter_of_sql_prepare_is_the_servers() -> None:
    """In PREPARE, $1 is the prepared statement's, given by EXECUTE: the server evaluates the call
    (a constant in it is still the proxy's)."""
    (prepared,) = find_calls(f"PREPARE p(text) AS SELECT azure_local_ai.create_embeddings({M}, $1)")
    assert (prepared.calls, prepared.server_calls) == ([], 1)
    (constant,) = find_calls(f"PREPARE q AS SELECT azure_local_ai.create_embeddings({M}, 'hello')")
    assert len(constant.calls) == 1 and constant.server_calls == 0
    assert only_call(f"SELECT azure_local_ai.create_embeddings({M}, $1)").argument("input").value == BindRef(1)
