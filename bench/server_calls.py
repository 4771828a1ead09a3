"""Calls the server evaluates (after CREATE EXTENSION azure_local_ai): statements over many rows against the
engine's own offline batch throughput, and a one-row INSERT into a table with a generated column.

A PostgreSQL and two proxies (`--service-user bench_service`: no superuser, pg_read_all_data), one in front of it,
one in front of PgBouncer in transaction mode (its service connections straight to the server). Unique short texts
(14-28 tokens), new to the proxy in every statement. In order: the engine offline (batches of 128); one-row INSERTs
through each proxy against the engine's single-text latency, in alternating rounds (target: p50 <= the engine's
p50 + 2 ms); the back-fill direct, pooled, pooled, direct (target: pooled >= 0.9 of direct); the other statements
through the direct proxy (target: every statement >= 0.8 of the engine offline, the higher of before and after);
a back-fill of texts of mixed lengths (the corpus, 5-481 tokens) and its padding (the proxy's /metrics)."""

from __future__ import annotations

import operator
import re
import statistics
import sys
import time
import urllib.request

import psycopg

from bench import runners
from bench.common import Cli, load_corpus, pct, table, throughput, timed_ms, verdict
from bench.harness import BACK_FILL, MODEL, SERVICE_LOGIN, Rig, copy_in
from inference.engine import EmbeddingEngine
from inference.model_dir import ModelFiles
from tests.pgcluster import free_port

SECTION = "## Calls the server evaluates (bench.server_calls)"
CALL = f"azure_local_ai.create_embeddings('{MODEL}', body)"
#: Each over a table of its own texts (src_0, src_1, ...), so that none finds another's in the cache.
STATEMENTS = {
    "ALTER TABLE ADD COLUMN GENERATED": f"ALTER TABLE {{src}} ADD COLUMN g real[] GENERATED ALWAYS AS ({CALL}) STORED",
    "INSERT ... SELECT": f"INSERT INTO dst SELECT id, {CALL} FROM {{src}}",
    "INSERT ... SELECT into a generated column": "INSERT INTO gen (id, body) SELECT id, body FROM {src}",
    "COPY FROM STDIN into a generated column": "COPY copied (id, body) FROM STDIN",
}
ROUNDS = 5
DIRECT, POOLED = "proxy -> server", "proxy -> PgBouncer (transaction) -> server"
#: The back-fill through each, in the order A B B A: the machine's drift falls on both alike.
ORDER = (DIRECT, POOLED, POOLED, DIRECT)
OFFLINE_TEXTS = 2000
INSERT = "INSERT INTO docs (body) VALUES (%s)"


def timed_inserts(conns: dict[str, psycopg.Connection], engine: EmbeddingEngine, files: ModelFiles,
                  singles: dict[str, list[str]]) -> dict[str, tuple[list[float], list[float]]]:
    """One-row INSERTs of `singles[name]` into docs through `conns[name]`, each timed (ms), with the engine's
    own single-text times of the same texts: in rounds that alternate the engine and each connection, so
    that all see the machine alike. Per name: (insert latencies, engine latencies)."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in conns}
    count = min(map(len, singles.values()))
    step = max(1, count // ROUNDS)
    for start in range(0, count, step):
        for name, conn in conns.items():
            chunk = singles[name][start : start + step]
            times[name][1].extend(timed_ms(lambda text: engine.embed_sync(files, [text]), chunk))
            times[name][0].extend(timed_ms(lambda text, c=conn: c.execute(INSERT, (text,)), chunk))
    return times


def timed_statement(conn: psycopg.Connection, table_name: str, sql: str, texts: list[str]) -> float:
    """Seconds `sql` takes over a new table `table_name` of `texts`."""
    conn.execute(f"CREATE TABLE {table_name} (id int PRIMARY KEY, body text, v real[])")
    copy_in(conn, f"COPY {table_name} (id, body) FROM STDIN", texts)
    t0 = time.perf_counter()
    if sql.startswith("COPY"):
        copy_in(conn, sql, texts)
    else:
        conn.execute(sql.format(src=table_name))
    return time.perf_counter() - t0


def engine_tokens(metrics_url: str) -> tuple[float, float]:
    """Tokens the proxy's engine embedded, and computed with their padding, so far (its /metrics)."""
    text = urllib.request.urlopen(metrics_url).read().decode()
    found = [re.search(rf"^azure_local_ai_proxy_{name}_total (\S+)$", text, re.M)
             for name in ("embedded_tokens", "embedded_padded_tokens")]
    return float(found[0][1]), float(found[1][1])  # type: ignore[index]


def insert_row(label: str, latencies: list[float], engine_single: list[float]) -> list[object]:
    target = pct(engine_single, 50) + 2
    paired = statistics.median(map(operator.sub, latencies, engine_single))
    return [label, len(latencies), f"{pct(latencies, 50):.2f}", f"{pct(latencies, 99):.2f}",
            f"{pct(engine_single, 50):.2f}", f"{paired:+.2f}", verdict(pct(latencies, 50) <= target)]


def main(argv: list[str] | None = None) -> int:
    cli = Cli("server_calls", __doc__, SECTION)
    cli.add_argument("--rows", type=int, default=10_000, help="rows of each many-row statement")
    cli.add_argument("--inserts", type=int, default=300, help="single-row INSERTs timed, per topology")
    cli.add_argument("--mixed-rows", type=int, default=3000, help="rows of the back-fill of mixed lengths")
    cli.data_dir()
    args = cli.parse(argv)
    with Rig(args) as rig:
        files = rig.model()
        pool = runners.pool(files)
        engine = EmbeddingEngine()
        rig.callback(engine.close_sync)
        def offline() -> float:
            return throughput(lambda texts: engine.embed_sync(files, texts), pool.take(OFFLINE_TEXTS), 128)

        rates = [offline()]
        print(f"engine offline: {rates[0]:.0f} texts/s", file=sys.stderr)
        cluster = rig.cluster()
        rig.service_login(cluster)
        metrics_port = free_port()
        direct = rig.proxy(cluster.url(), "proxy", "--service-user", SERVICE_LOGIN,
                           "--http-listen", f"127.0.0.1:{metrics_port}")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        # The same proxy in front of PgBouncer in transaction mode; its service login straight to the server.
        bouncer = rig.pgbouncer(cluster.port, "transaction", users=("postgres", SERVICE_LOGIN))
        pooled = rig.proxy(bouncer.url(), "proxy-pooled", "--service-user",
                           SERVICE_LOGIN, "--service-upstream", cluster.url())
        with (psycopg.connect(direct.dsn(), autocommit=True) as conn,
              psycopg.connect(pooled.dsn(), autocommit=True, prepare_threshold=None) as pooled_conn):
            conns = {DIRECT: conn, POOLED: pooled_conn}
            conn.execute("CREATE EXTENSION azure_local_ai")
            # First, on a server with nothing else to do (after the statements, it vacuums them).
            conn.execute(f"CREATE TABLE docs (body text, v real[] GENERATED ALWAYS AS ({CALL}) STORED)")
            inserts = timed_inserts(conns, engine, files, {name: pool.take(args.inserts) for name in conns})
            fills = []  # rows/s of each back-fill, in ORDER
            for number, name in enumerate(ORDER):
                fills.append(args.rows / timed_statement(conns[name], f"fill_{number}", BACK_FILL,
                                                         pool.take(args.rows)))
                print(f"back-fill, {name}: {fills[-1]:.0f} rows/s", file=sys.stderr, flush=True)
            back_fill = {name: statistics.mean(rate for run, rate in zip(ORDER, fills, strict=True) if run == name)
                         for name in conns}
            conn.execute("CREATE TABLE dst (id int, v real[])")
            for generated in ("gen", "copied"):
                conn.execute(f"CREATE TABLE {generated} (id int, body text, "
                             f"v real[] GENERATED ALWAYS AS ({CALL}) STORED)")
            seconds_taken = {"UPDATE back-fill": args.rows / back_fill[DIRECT]}
            for number, (name, sql) in enumerate(STATEMENTS.items()):
                seconds_taken[name] = timed_statement(conn, f"src_{number}", sql, pool.take(args.rows))
                print(f"{name}: {args.rows / seconds_taken[name]:.0f} rows/s", file=sys.stderr, flush=True)
            corpus = [row["text"] for row in load_corpus()]
            mixed = [f"{corpus[i % len(corpus)]} ({i})" for i in range(args.mixed_rows)]
            tokens_before = engine_tokens(metrics_url)
            mixed_seconds = timed_statement(conn, "mixed", BACK_FILL, mixed)
            tokens, computed = map(operator.sub, engine_tokens(metrics_url), tokens_before)
        rates.append(offline())
        print(f"engine offline: {rates[1]:.0f} texts/s", file=sys.stderr)
    rate = max(rates)
    rows: list[list[object]] = []
    for name, seconds in seconds_taken.items():
        ratio = args.rows / seconds / rate
        rows.append([name, args.rows, f"{seconds:.1f}", f"{args.rows / seconds:.0f}", f"{ratio:.2f}",
                     verdict(ratio >= 0.8)])
    pooled_ratio = back_fill[POOLED] / back_fill[DIRECT]
    rig.publish(
        [],
        f"Engine offline batch throughput: **{rate:.0f} texts/s** (the higher of {rates[0]:.0f} before the "
        f"statements and {rates[1]:.0f} after them).",
        "",
        table(["statement (through the proxy)", "rows", "seconds", "rows/s", "of engine offline",
               "target >= 0.8"], rows),
        "",
        "The UPDATE back-fill's row: the mean of the two direct back-fills below.",
        "",
        table(["single-row INSERT, generated column", "inserts", "p50 ms", "p99 ms", "engine single text p50 ms",
               "median of the per-text differences ms", "target: <= engine p50 + 2 ms"],
              [insert_row(name, *inserts[name]) for name in (DIRECT, POOLED)]),
        "",
        table(["UPDATE back-fill, rows/s", *(f"run {n}: {name}" for n, name in enumerate(ORDER, 1)),
               "pooled of direct (means)", "target >= 0.9"],
              [[f"{args.rows} rows", *(f"{rate:.0f}" for rate in fills), f"{pooled_ratio:.2f}",
                verdict(pooled_ratio >= 0.9)]]),
        "",
        table(["UPDATE back-fill, texts of mixed lengths (the corpus, 5-481 tokens)", "rows", "seconds", "rows/s",
               "tokens", "tokens computed", "padding, of computed"],
              [["proxy -> server", args.mixed_rows, f"{mixed_seconds:.1f}", f"{args.mixed_rows / mixed_seconds:.0f}",
                f"{tokens:.0f}", f"{computed:.0f}", f"{(computed - tokens) / computed:.1%}"]]),
        "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
