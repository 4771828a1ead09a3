"""psql (libpq, simple query protocol, COPY via \\copy) through the proxy, checked against the server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import SCRAM_PASSWORD
from .helpers import direct, scratch_table
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess


def both(proxy: ProxyProcess, pg: PgCluster, *args: str, input: str | None = None,
         check: bool = True) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Run the same psql invocation through the proxy and directly against the server."""
    through = proxy.psql(*args, input=input, check=check)
    straight = proxy.psql(*args, dsn=pg.dsn(), input=input, check=check)
    return through, straight


QUERIES = [
    "SELECT 1 + 1",
    "SELECT current_user, current_database(), version()",
    "SELECT string_agg(x::text, ',' ORDER BY x) FROM generate_series(1, 2000) x",
    "SELECT repeat('é✓', 5000)",
    "SELECT NULL::int IS NULL, ''::text = '', E'tab\\there'",
    "SELECT n, n * n, md5(n::text) FROM generate_series(1, 300) n",
    "SELECT '[1.5,2,3]'::vector <-> '[1,2,3.5]'::vector",
    "SELECT typname FROM pg_type WHERE oid < 100 ORDER BY oid",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_simple_query_matches_direct(proxy: ProxyProcess, pg: PgCluster, sql: str) -> None:
    """Each query prints exactly what it prints on a direct connection."""
    through, straight = both(proxy, pg, "-A", "-F", "|", "-c", sql)
    assert through.stdout == straight.stdout
    assert through.stderr == straight.stderr == ""


def test_simple_values(proxy: ProxyProcess) -> None:
    """Values computed here, not taken from any output."""
    out = proxy.psql("-At", "-c", "SELECT sum(x) FROM generate_series(1, 10000) x", "-c", "SELECT 'a' || 'b'")
    assert out.stdout.split() == [str(sum(range(1, 10001))), "ab"]


@pytest.mark.parametrize("sslmode", ["disable", "require", "verify-full"])
def test_tls_and_password(proxy: ProxyProcess, tls_files: dict[str, Path], sslmode: str) -> None:
    """psql over TLS to the proxy (verified against the test CA), with a SCRAM password relayed upstream."""
    dsn = proxy.dsn("scram_user", SCRAM_PASSWORD, sslmode=sslmode, sslrootcert=str(tls_files["ca"]))
    out = proxy.psql("-At", "-c", "SELECT current_user, 6 * 7", "-c", "\\conninfo", dsn=dsn)
    lines = out.stdout.splitlines()
    assert lines[0] == "scram_user|42"
    assert ("SSL connection" in out.stdout) == (sslmode != "disable")


def test_multi_statement_string(proxy: ProxyProcess, pg: PgCluster) -> None:
    """One -c string with several statements is one Query message; psql prints the last result."""
    with scratch_table(pg, "i int") as name:
        sql = (f"INSERT INTO {name} SELECT generate_series(1, 10); UPDATE {name} SET i = i * 2 WHERE i > 5; "
               f"SELECT count(*), sum(i) FROM {name}")
        out = proxy.psql("-At", "-c", sql)
        expected_sum = sum(range(1, 6)) + 2 * sum(range(6, 11))
        # psql >= 15 shows every statement's result, command tags included.
        assert out.stdout.splitlines() == ["INSERT 0 10", "UPDATE 5", f"10|{expected_sum}"]
        with direct(pg) as conn:
            assert conn.execute(f"SELECT count(*), sum(i) FROM {name}").fetchone() == (10, expected_sum)


def test_multi_statement_error_rolls_back_whole_string(proxy: ProxyProcess, pg: PgCluster) -> None:
    """A failing statement inside a multi-statement string aborts the implicit transaction: nothing stays."""
    with scratch_table(pg, "i int") as name:
        sql = f"INSERT INTO {name} VALUES (1); SELECT 1/0; INSERT INTO {name} VALUES (2)"
        out = proxy.psql("-c", sql, check=False)
        assert out.returncode != 0
        assert "division by zero" in out.stderr
        with direct(pg) as conn:
            assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)
        # The session is fine afterwards: the next -c of the same psql run works.
        out = proxy.psql("-At", "-v", "ON_ERROR_STOP=0", "-c", "SELECT 1/0", "-c", f"SELECT count(*) FROM {name}",
                         check=False)
        assert out.stdout.strip() == "0"


ERROR_SCRIPT = """\
\\set VERBOSITY verbose
SELECT 'before';
{bad}
SELECT 'not reached';
"""


@pytest.mark.parametrize(("bad", "sqlstate"), [
    ("SELECT 1/0;", "22012"),
    ("SELECT * FROM no_such_table_anywhere;", "42P01"),
    ("SELEKT 1;", "42601"),
    ("SELECT 'abc'::int;", "22P02"),
    ("SELECT repeat('x', 10)::varchar(3)::char(2)::int;", "22P02"),
])
def test_error_stops_with_sqlstate(proxy: ProxyProcess, pg: PgCluster, bad: str, sqlstate: str) -> None:
    """ON_ERROR_STOP ends psql with status 3; VERBOSITY verbose shows the SQLSTATE; output as direct."""
    through, straight = both(proxy, pg, "-At", input=ERROR_SCRIPT.format(bad=bad), check=False)
    assert through.returncode == 3
    assert f"ERROR:  {sqlstate}:" in through.stderr
    assert through.stdout == "before\n"
    assert (through.returncode, through.stdout, through.stderr) == (
        straight.returncode, straight.stdout, straight.stderr)


def test_error_then_continue(proxy: ProxyProcess) -> None:
    """Without ON_ERROR_STOP the session goes on; LAST_ERROR_SQLSTATE is the server's code."""
    script = "\\set ON_ERROR_STOP 0\nSELECT 1/0;\n\\echo state=:LAST_ERROR_SQLSTATE\nSELECT 'alive';\n"
    out = proxy.psql("-At", input=script)
    assert out.stdout.split() == ["state=22012", "alive"]


# --------------------------------------------------------------------------- \copy

def copy_escape(value: str | None) -> str:
    """COPY text format, written here from the documented rules (not from PostgreSQL's output)."""
    if value is None:
        return "\\N"
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def tricky_rows(count: int) -> list[tuple[int, str | None, bytes, str]]:
    texts = ["plain", "", "tab\there", "new\nline", "cr\rlf\r\n", "back\\slash", "ünïcødé ✓ 漢字", "\\N", "a,b;\"q\""]
    rows = []
    for i in range(count):
        text = None if i % 17 == 0 else f"{texts[i % len(texts)]}-{i}" * (1 + i % 5)
        blob = bytes((i * 7 + k) % 256 for k in range(i % 40))
        rows.append((i, text, blob, f"{i / 8:.3f}"))
    return rows


def copy_text(rows: list[tuple[int, str | None, bytes, str]]) -> bytes:
    lines = [f"{i}\t{copy_escape(text)}\t\\\\x{blob.hex()}\t{num}\n" for i, text, blob, num in rows]
    return "".join(lines).encode()


def test_copy_from_and_to_file(proxy: ProxyProcess, pg: PgCluster, tmp_path: Path) -> None:
    """\\copy FROM a file written here, rows checked on the server; \\copy TO gives the same bytes back."""
    rows = tricky_rows(5000)
    source = tmp_path / "in.tsv"
    source.write_bytes(copy_text(rows))
    with scratch_table(pg, "id int PRIMARY KEY, t text, b bytea, n numeric") as name:
        out = proxy.psql("-c", f"\\copy {name} FROM '{source}'")
        assert out.stdout.strip() == f"COPY {len(rows)}"
        with direct(pg) as conn:
            got = conn.execute(f"SELECT id, t, b, n::text FROM {name} ORDER BY id").fetchall()
        assert got == rows
        target = tmp_path / "out.tsv"
        proxy.psql("-c", f"\\copy (SELECT * FROM {name} ORDER BY id) TO '{target}'")
        assert target.read_bytes() == source.read_bytes()
        reference = tmp_path / "direct.tsv"
        proxy.psql("-c", f"\\copy (SELECT * FROM {name} ORDER BY id) TO '{reference}'", dsn=pg.dsn())
        assert target.read_bytes() == reference.read_bytes()


def test_copy_csv_with_header(proxy: ProxyProcess, pg: PgCluster, tmp_path: Path) -> None:
    """CSV with a header line round-trips byte for byte."""
    lines = ["id,label"] + [f'{i},"quote "" and , comma {i}"' if i % 3 else f"{i},plain{i}" for i in range(1, 3001)]
    source = tmp_path / "in.csv"
    source.write_bytes(("\n".join(lines) + "\n").encode())
    with scratch_table(pg, "id int, label text") as name:
        proxy.psql("-c", f"\\copy {name} FROM '{source}' WITH (FORMAT csv, HEADER)")
        target = tmp_path / "out.csv"
        proxy.psql("-c", f"\\copy (SELECT * FROM {name} ORDER BY id) TO '{target}' WITH (FORMAT csv, HEADER)")
        assert target.read_bytes() == source.read_bytes()


def test_copy_from_bad_data_fails_cleanly(proxy: ProxyProcess, pg: PgCluster, tmp_path: Path) -> None:
    """A bad line makes the server end the COPY with 22P02; no row is kept and the session goes on."""
    source = tmp_path / "bad.tsv"
    source.write_bytes(b"".join(f"{i}\n".encode() for i in range(1000)) + b"oops\n" + b"5\n" * 1000)
    with scratch_table(pg, "i int") as name:
        script = (f"\\set ON_ERROR_STOP 0\n\\set VERBOSITY verbose\n\\copy {name} FROM '{source}'\n"
                  f"SELECT count(*) FROM {name};\n")
        out = proxy.psql("-At", input=script)
        assert "ERROR:  22P02: invalid input syntax for type integer" in out.stderr
        assert out.stdout.split() == ["0"]


# --------------------------------------------------------------------------- transactions

def test_transaction_savepoint_rollback(proxy: ProxyProcess, pg: PgCluster) -> None:
    """Savepoints, ROLLBACK TO after an error, COMMIT, and a whole ROLLBACK, as one psql session."""
    with scratch_table(pg, "i int") as name:
        script = f"""\
\\set ON_ERROR_STOP 0
BEGIN;
INSERT INTO {name} VALUES (1);
SAVEPOINT a;
INSERT INTO {name} VALUES (2);
ROLLBACK TO SAVEPOINT a;
INSERT INTO {name} VALUES (3);
SAVEPOINT b;
INSERT INTO {name} VALUES (30);
SELECT 1/0;
SELECT 'in failed transaction';
ROLLBACK TO b;
INSERT INTO {name} VALUES (4);
COMMIT;
BEGIN;
INSERT INTO {name} VALUES (5);
ROLLBACK;
SELECT string_agg(i::text, ',' ORDER BY i) FROM {name};
"""
        out = proxy.psql("-At", input=script)
        assert out.stdout.strip().splitlines()[-1] == "1,3,4"
        assert "current transaction is aborted" in out.stderr
        assert out.stderr.count("ERROR:") == 2  # the division, then the statement in the aborted transaction
        with direct(pg) as conn:
            assert [r[0] for r in conn.execute(f"SELECT i FROM {name} ORDER BY i")] == [1, 3, 4]


def test_single_transaction_flag(proxy: ProxyProcess, pg: PgCluster) -> None:
    """psql -1 wraps the script in one transaction: an error undoes the inserts before it."""
    with scratch_table(pg, "i int") as name:
        script = f"INSERT INTO {name} VALUES (1);\nINSERT INTO {name} VALUES (2);\nSELECT 1/0;\n"
        out = proxy.psql("-1", input=script, check=False)
        assert out.returncode == 3
        with direct(pg) as conn:
            assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)
