"""What a hostile or unlucky client can send to a session that calls azure_local_ai: each case gets
PostgreSQL's answer (an ERROR with its SQLSTATE, the session going on), never a dead engine, a
FATAL internal error, a dropped message, or SQL the server reads differently from the proxy."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from proxy import protocol as pg

from .helpers import scratch_table
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess
from .rawclient import RawClient

MODEL = "multilingual-e5-small:v1"


def query(sql: bytes) -> bytes:
    return pg.message(pg.QUERY, sql + b"\0")


def parse(sql: bytes, types: list[int] | None = None, name: bytes = b"", count: int | None = None) -> bytes:
    types = types or []
    declared = len(types) if count is None else count
    return pg.message(pg.PARSE, name + b"\0" + sql + b"\0" + struct.pack("!H", declared)
                      + b"".join(struct.pack("!I", t) for t in types))


def bind(values: list[bytes | None], statement: bytes = b"") -> bytes:
    body = b"\0" + statement + b"\0" + struct.pack("!H", 0) + struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return pg.message(pg.BIND, body + struct.pack("!H", 0))


def execute() -> bytes:
    return pg.message(pg.EXECUTE, b"\0" + struct.pack("!i", 0))


SYNC = pg.message(pg.SYNC)


def outcome(client: RawClient) -> list[tuple[str, str]]:
    """Messages up to the next ReadyForQuery, as (type, SQLSTATE or first data bytes)."""
    seen = []
    for msg_type, body in client.read_until(b"Z"):
        if msg_type in (b"E", b"N"):
            fields = pg.parse_fields(body)
            seen.append((msg_type.decode() + fields["S"], fields["C"]))
        elif msg_type == b"D":
            seen.append(("D", body[6:40].decode(errors="replace")))
        else:
            seen.append((msg_type.decode(), ""))
    return seen


def errors(seen: list[tuple[str, str]]) -> list[str]:
    return [code for kind, code in seen if kind.startswith("E")]


def session_goes_on(client: RawClient) -> None:
    client.send(query(b"select 40+2"))
    assert ("D", "42") in outcome(client)


def embeds(proxy: ProxyProcess) -> None:
    """Another session's embedding works: the engine is alive."""
    out = proxy.psql("-Atc", f"select array_length(azure_local_ai.create_embeddings('{MODEL}', 'check', 5000), 1)")
    assert out.stdout.strip() == "384"


@pytest.fixture
def client(proxy: ProxyProcess) -> RawClient:
    raw = RawClient(proxy.port)
    raw.login()
    yield raw
    raw.close()


# ---------------------------------------------------------------- 1. the engine survives


def test_a_tiny_timeout_leaves_the_engine_serving(proxy: ProxyProcess) -> None:
    for _ in range(5):
        out = proxy.psql("-Atc", f"select azure_local_ai.create_embeddings('{MODEL}', 'x', 1)", check=False)
        assert "did not finish within 1 ms" in out.stderr or out.returncode == 0
        embeds(proxy)
    assert "Traceback" not in proxy.log


def test_a_client_that_leaves_mid_call_leaves_the_engine_serving(proxy: ProxyProcess) -> None:
    words = "word " * 50
    texts = ",".join(f"'passage: text number {i} {words}'" for i in range(64))
    for _ in range(3):
        raw = RawClient(proxy.port)
        raw.login()
        raw.send(query(f"select count(*) from azure_local_ai.create_embeddings('{MODEL}', ARRAY[{texts}])".encode()))
        time.sleep(0.05)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, at once
        raw.close()
        embeds(proxy)


# ---------------------------------------------------------------- 2. string syntax of the session


INJECTION = "select azure_local_ai.create_embeddings('multilingual-e5-small:v1', 'a\\'); drop table {t}; --')"


@pytest.mark.parametrize("extra", ["", "SET escape_string_warning = off;", "SET backslash_quote = on;"])
def test_no_injection_with_standard_conforming_strings_off(proxy: ProxyProcess, pg: PgCluster, engine_vectors,
                                                           extra: str) -> None:
    """With the setting off the server reads 'a\\'); drop ...' as one constant; so must the proxy."""
    with scratch_table(pg, "id int") as table, psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SET standard_conforming_strings = off; {extra}")
        (vector,) = conn.execute(INJECTION.format(t=table)).fetchone()  # type: ignore[misc]
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)  # the table is still there
        expected = engine_vectors(f"a'); drop table {table}; --")[0]
        assert np.array_equal(np.array(vector, np.float32), expected)
        assert conn.execute("select azure_local_ai.get_setting('spin\\_control')").fetchone()[0] in ("true", "false")


def test_no_injection_when_the_setting_changes_in_the_same_write(proxy: ProxyProcess, pg: PgCluster,
                                                                 client: RawClient) -> None:
    """SET and the statement arrive together: the proxy reads the statement under the setting the
    server will read it with, not the one it last heard of."""
    with scratch_table(pg, "id int") as table:
        client.send(query(b"SET standard_conforming_strings = off") + query(INJECTION.format(t=table).encode()))
        outcome(client)
        seen = outcome(client)
        assert errors(seen) == [] and seen[-2][0] == "C"
        client.send(query(f"select count(*) from {table}".encode()))
        assert ("D", "0") in outcome(client)


def test_standard_conforming_strings_on_reads_backslashes_as_themselves(proxy: ProxyProcess) -> None:
    out = proxy.psql("-Atc", "select azure_local_ai.get_setting('spin\\_control')", check=False)
    assert "ERROR" in out.stderr and "spin\\_control" in out.stderr  # no such key: the backslash is part of it


def test_extended_protocol_with_standard_conforming_strings_off(proxy: ProxyProcess, pg: PgCluster,
                                                                engine_vectors) -> None:
    with scratch_table(pg, "id int") as table, psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET standard_conforming_strings = off")
        (vector,) = conn.execute(INJECTION.format(t=table), prepare=True).fetchone()  # type: ignore[misc]
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)
        assert np.array_equal(np.array(vector, np.float32), engine_vectors(f"a'); drop table {table}; --")[0])


# ---------------------------------------------------------------- 4. parenthesised calls


@pytest.mark.parametrize("call, column", [
    ("(azure_local_ai.get_setting('spin_control'))", "get_setting"),
    (f"(azure_local_ai.model_loaded('{MODEL}'))", "model_loaded"),
    (f"((azure_local_ai.create_embeddings('{MODEL}', 'x')))", "create_embeddings"),
    (f"(azure_local_ai.create_embeddings('{MODEL}', 'x'))[1:2]", "create_embeddings"),
])
def test_a_parenthesised_call(proxy: ProxyProcess, call: str, column: str) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.execute(f"select {call}")
        assert cur.fetchone()[0] is not None  # type: ignore[index]
        assert cur.description[0].name == column  # type: ignore[index]


# ---------------------------------------------------------------- 5, 6, 7. malformed messages


def test_invalid_utf8_in_a_query(client: RawClient) -> None:
    client.send(query(b"select azure_local_ai.get_setting('spin_control\xff')"))
    assert errors(outcome(client)) == ["22021"]
    session_goes_on(client)


def test_invalid_utf8_in_a_bind_value(client: RawClient) -> None:
    client.send(parse(b"select azure_local_ai.create_embeddings($1, $2)") + bind([MODEL.encode(), b"x\xffy"])
                + execute() + SYNC)
    assert errors(outcome(client)) == ["22021"]
    session_goes_on(client)


@pytest.mark.parametrize("cut", ["parse", "bind", "describe"])
def test_a_truncated_message(client: RawClient, cut: str) -> None:
    good_parse = parse(b"select azure_local_ai.create_embeddings($1, $2)", name=b"s1")
    if cut == "parse":
        body = good_parse[5:-2]
        broken = pg.message(pg.PARSE, body)
        client.send(broken + SYNC)
    else:
        client.send(good_parse + SYNC)
        assert errors(outcome(client)) == []
        body = bind([MODEL.encode(), b"x"], b"s1")[5:-3] if cut == "bind" else b"S"
        client.send(pg.message(pg.BIND if cut == "bind" else pg.DESCRIBE, body) + SYNC)
    assert errors(outcome(client)) == ["08P01"]
    session_goes_on(client)


def test_many_declared_parameter_types(client: RawClient) -> None:
    """PostgreSQL takes up to 65,535 parameter types (an unsigned count)."""
    client.send(parse(b"select azure_local_ai.get_setting($1)", [25] * 40_000) + SYNC)
    assert errors(outcome(client)) == []


def test_a_count_that_disagrees_with_the_types_sent(client: RawClient) -> None:
    client.send(parse(b"select azure_local_ai.get_setting($1)", [25] * 70_000, count=70_000 % 65_536) + SYNC)
    assert errors(outcome(client)) == ["08P01"]
    session_goes_on(client)


def test_deeply_nested_arrays(client: RawClient) -> None:
    nested = b"ARRAY[" * 1000 + b"'x'" + b"]" * 1000
    client.send(query(b"select azure_local_ai.create_embeddings('m', " + nested + b")"))
    assert len(errors(outcome(client))) == 1
    session_goes_on(client)


def test_a_parse_without_terminator_among_pending_messages(client: RawClient) -> None:
    good = parse(b"select azure_local_ai.get_setting($1)", name=b"s2")
    broken = pg.message(pg.PARSE, b"s3\0select azure_local_ai.get_setting($1)")  # no NUL, no count
    client.send(good + broken + SYNC)
    assert errors(outcome(client)) == ["08P01"]
    session_goes_on(client)


def test_a_query_without_terminator(client: RawClient) -> None:
    client.send(pg.message(pg.QUERY, b"select azure_local_ai.get_setting('spin_control')"))
    assert errors(outcome(client)) == ["08P01"]
    session_goes_on(client)


@pytest.mark.parametrize("args, sqlstate", [
    (f"'{MODEL}', 2", "42883"),
    (f"'{MODEL}', true", "42883"),
    (f"'{MODEL}', ARRAY[1,2]", "42883"),
    ("1, 2", "42883"),
    (f"'{MODEL}', '{{a,b}}', '{{1,2}}'", "42725"),
])
def test_arguments_of_the_wrong_type(proxy: ProxyProcess, args: str, sqlstate: str) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(f"select azure_local_ai.create_embeddings({args})")
    assert caught.value.sqlstate == sqlstate


def test_a_huge_batch_size_expression(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(f"select * from azure_local_ai.create_embeddings('{MODEL}', ARRAY['a'], 10^12)")
    assert caught.value.sqlstate != "XX000" and "column, subquery or function result" not in str(caught.value)


def test_duplicate_keys_in_one_set_setting(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute("select azure_local_ai.set_setting(ARRAY['spin_control', 'spin_control'], ARRAY['true', 'false'])")
    assert caught.value.sqlstate == "22023"


def test_a_tokenizer_symlink_out_of_the_model_root(proxy: ProxyProcess, model_data_dir: Path, tmp_path: Path) -> None:
    from inference import builtin_model

    files = builtin_model(model_data_dir)
    root = model_data_dir / "models" / "symlinked"
    root.mkdir(exist_ok=True)
    outside = tmp_path / "tokenizer.json"
    outside.write_bytes(files.tokenizer_path.read_bytes())
    for name in ("model.onnx", "config.json"):
        target = root / name
        if not target.exists():
            target.symlink_to(files.onnx_path.parent / name)
    link = root / "tokenizer.json"
    if not link.exists():
        link.symlink_to(outside)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute("select azure_local_ai.model_register('symlinked:v1', %s)", [str(root)])
    assert caught.value.sqlstate in ("22023", "42501")
    assert "outside" in str(caught.value) or "model root" in str(caught.value)


@pytest.mark.parametrize("prepare", [False, True])
def test_a_result_too_large_for_one_statement_is_refused_before_any_work(proxy: ProxyProcess, prepare: bool) -> None:
    """100,000 inputs would make some 600 MB of values: more than the server reads in one constant.
    54000 at once, not an error from the server minutes later."""
    inputs = "{" + ",".join(["x"] * 100_000) + "}"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        if prepare:
            conn.execute(f"select count(*) from azure_local_ai.create_embeddings('{MODEL}', %s::text[])",
                         [inputs], prepare=True)
        else:
            conn.execute(f"select count(*) from azure_local_ai.create_embeddings('{MODEL}', '{inputs}'::text[])")
    assert caught.value.sqlstate == "54000"
    assert "at most" in str(caught.value.diag.message_hint)
    embeds(proxy)


def test_many_rows_rendered_in_a_worker_thread(proxy: ProxyProcess) -> None:
    """3,000 rows of vectors go through the rendering done off the event loop, all of them distinct."""
    inputs = "{" + ",".join(f"t{i}" for i in range(3_000)) + "}"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        rows = conn.execute(f"select count(*), count(DISTINCT embedding) from azure_local_ai.create_embeddings("
                            f"'{MODEL}', '{inputs}'::text[])").fetchone()
    assert rows == (3_000, 3_000)


# ---------------------------------------------------------------- found by tests/test_fuzz.py


def test_a_privileged_call_after_a_failure_in_an_open_batch(client: RawClient) -> None:
    """The server skips to the Sync after the failed Execute, the Query included: the proxy must not
    wait for an answer to a privilege check of its own that the server would skip too."""
    client.send(pg.message(pg.EXECUTE, b"no_such_portal\0" + struct.pack("!i", 0))
                + query(b"SELECT azure_local_ai.set_setting(ARRAY['spin_control'], ARRAY['true'])") + SYNC)
    assert errors(outcome(client)) == ["34000"]
    session_goes_on(client)
    client.send(pg.message(pg.BIND, b"\0no_such_statement\0" + b"\0" * 6) + query(b"SELECT 1")
                + parse(b"SELECT azure_local_ai.set_setting($1, $2)") + SYNC)
    assert errors(outcome(client)) == ["26000"]
    session_goes_on(client)


def test_a_function_call_is_answered_like_a_query(client: RawClient) -> None:
    """FunctionCall gets a ReadyForQuery; the proxy counts it, so its own privilege check and the
    statement after it keep their places."""
    function_call = struct.pack("!IHH", 2026, 0, 0) + struct.pack("!H", 0)  # pg_backend_pid(), no arguments
    client.send(pg.message(pg.FUNCTION_CALL, function_call)
                + query(b"SELECT azure_local_ai.set_setting('spin_control', 'true')"))
    assert [kind for kind, _ in outcome(client)] == ["V", "Z"]
    seen = outcome(client)
    assert errors(seen) == [] and seen[-2][0] == "C"


def test_parameter_zero(client: RawClient) -> None:
    client.send(parse(b"SELECT azure_local_ai.get_setting($0::text[])") + SYNC)
    assert errors(outcome(client)) == ["42P02"]
    session_goes_on(client)


def rows(client: RawClient) -> list[list[str | None]]:
    """The DataRows up to the next ReadyForQuery, decoded (text format); errors fail the test."""
    out = []
    for msg_type, body in client.read_until(b"Z"):
        assert msg_type != b"E", pg.parse_fields(body)
        if msg_type == b"D":
            count, pos, row = struct.unpack_from("!H", body)[0], 2, []
            for _ in range(count):
                (length,) = struct.unpack_from("!i", body, pos)
                pos += 4
                row.append(None if length < 0 else body[pos : pos + length].decode())
                pos += max(length, 0)
            out.append(row)
    return out


LONG = "x" * (2 << 20)  # a long statement (over 1 MB) is read as bytes in a worker thread


def test_a_long_statement_with_other_characters_around_its_long_constant(client: RawClient) -> None:
    short = "SELECT 'é' || 'ünïcode', azure_local_ai.get_setting('spin_control'), '日本語'"
    client.send(query(short.encode()))
    expected = rows(client)
    client.send(query(f"SELECT 'é' || 'ünïcode', azure_local_ai.get_setting('spin_control'), '日本語', "
                      f"length('{LONG}')".encode()))
    assert rows(client) == [[*expected[0], str(len(LONG))]]


def test_a_long_constant_as_an_argument_is_read_from_the_bytes(client: RawClient, proxy: ProxyProcess) -> None:
    text = ("Ein längerer Text über Einbettungen. " * 60_000)[: 2 << 20]
    client.send(query(f"SELECT azure_local_ai.create_embeddings('{MODEL}', '{text}')::text".encode()))
    ((constant,),) = rows(client)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        bound = conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', %s)::text", (text,)).fetchone()[0]
    assert constant == bound


def test_a_long_statement_under_standard_conforming_strings_off(client: RawClient) -> None:
    client.send(query(b"SET standard_conforming_strings = off"))
    rows(client)
    client.send(query(f"SELECT 'it\\'s', azure_local_ai.get_setting('spin\\_control'), length('{LONG}')".encode()))
    ((quoted, setting, length),) = rows(client)
    client.send(query(b"SELECT azure_local_ai.get_setting('spin_control')"))
    assert (quoted, length) == ("it's", str(len(LONG))) and [[setting]] == rows(client)
