"""The proxy's /v1/embeddings against the same embeddings through SQL (create_embeddings from asyncpg) and against
a standalone service a user might run instead, side by side in one run.

The proxy: `serve --http-listen`, default settings. The standalone: sentence-transformers on torch CPU (threads =
nproc), the same e5 weights dequantised to float32, behind ThreadingHTTPServer, one model call per request, calls
taking turns. Unique short texts (14-28 tokens): one per request from one client (single) and from --clients at
once (concurrent), and --batch-size per request (batch); latency per request as the client sees it (vectors
decoded); texts/s over each workload's wall time; --rounds blocks in a rotating order. The proxy's engine runs
under SCHED_IDLE, torch at normal priority: on a loaded machine that favours the standalone server. Checked once:
whether /v1/embeddings gives SQL's vectors bit for bit; the lowest cosine of the standalone's vectors with ours."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import asyncpg
import numpy as np

from bench import runners
from bench.common import Cli, clients, pct, rotated, row_cosines, spawned, table
from bench.harness import MODEL, Rig
from tests.pgcluster import free_port
from tests.proxyproc import wait_for_port

SECTION = "## Embeddings over HTTP (bench.http_embeddings)"
HTTP, SQL, STANDALONE = "proxy /v1/embeddings", "proxy SQL (asyncpg)", "standalone st-torch"

#: One request: the texts in, the vectors out.
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


@dataclass
class Measured:
    seconds: float = 0.0
    texts: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds


def standalone(port: int) -> None:
    """What a user might run instead of /v1/embeddings, set up in a process of its own: sentence-transformers behind the
    standard library's HTTP server, one model call per request, calls taking turns (torch already spreads one call
    over every core)."""
    encode, turn = runners.st_embedder(), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the proxy's listener

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with turn:
                vectors = encode([body["input"]] if isinstance(body["input"], str) else body["input"])
            answer = json.dumps({"object": "list", "model": body["model"], "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    threading.Thread(target=ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever, daemon=True).start()


def http_client(session: aiohttp.ClientSession, url: str) -> Embed:
    async def embed(texts: list[str]) -> list[list[float]]:
        body = {"model": MODEL, "input": texts[0] if len(texts) == 1 else texts}
        async with session.post(url, json=body) as response:
            response.raise_for_status()
            return [item["embedding"] for item in (await response.json())["data"]]

    return embed


def sql_client(pool: asyncpg.Pool) -> Embed:
    async def embed(texts: list[str]) -> list[list[float]]:
        async with pool.acquire() as conn:
            if len(texts) == 1:
                return [await conn.fetchval("SELECT azure_local_ai.create_embeddings($1, $2)", MODEL, texts[0])]
            sql = "SELECT embedding FROM azure_local_ai.create_embeddings($1, $2::text[])"
            return [row[0] for row in await conn.fetch(sql, MODEL, texts)]

    return embed


async def measure(paths: dict[str, Embed], plan: list[tuple[str, int, int, int]], rounds: int,
                  pool: runners.Pool) -> dict[tuple[str, str], Measured]:
    """Every workload (name, requests, texts per request, clients) on every path, in rotating rounds."""
    results = {(workload[0], p): Measured() for workload in plan for p in paths}
    for embed in paths.values():  # warm-up: connections, the first model runs
        for n in (1, 1, 1, 8):
            await embed(pool.take(n))
    for round_ in range(rounds):
        for name, requests, per_request, count in plan:
            for path in rotated(list(paths), round_):
                block = [pool.take(per_request) for _ in range(requests // rounds)]
                seconds, latencies = await clients(paths[path], block, count)
                into = results[name, path]
                into.seconds, into.texts = into.seconds + seconds, into.texts + per_request * len(block)
                into.latencies += latencies
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    cli = Cli("http_embeddings", __doc__, SECTION, prog="bench/run.sh http_embeddings")
    cli.add_argument("--single", type=int, default=150, help="requests of the single workload")
    cli.add_argument("--concurrent", type=int, default=300, help="requests of the concurrent workload")
    cli.add_argument("--clients", type=int, default=8, help="clients of the concurrent workload")
    cli.add_argument("--batches", type=int, default=15, help="requests of the batch workload")
    cli.add_argument("--batch-size", type=int, default=32, help="texts per request of the batch workload")
    cli.add_argument("--rounds", type=int, default=3, help="blocks each workload is cut into")
    cli.data_dir()
    args = cli.parse(argv)
    with Rig(args) as rig:
        pool = runners.pool(rig.model())
        plan = [("single", args.single, 1, 1),
                (f"concurrent ({args.clients} clients)", args.concurrent, 1, args.clients),
                (f"batch ({args.batch_size} texts)", args.batches, args.batch_size, 1)]
        cluster = rig.cluster()
        http_port, st_port = free_port(), free_port()
        proxy = rig.proxy(cluster.url(), "proxy", "--http-listen", f"127.0.0.1:{http_port}")
        wait_for_port(http_port, 30, proxy.proc)
        rig.callback(spawned(standalone, st_port).terminate)
        wait_for_port(st_port, 300)

        async def run() -> tuple[dict[tuple[str, str], Measured], bool, float]:
            connector = aiohttp.TCPConnector(limit=args.clients)
            async with aiohttp.ClientSession(connector=connector) as session, asyncpg.create_pool(
                proxy.dsn(), min_size=args.clients, max_size=args.clients
            ) as sql_pool:
                paths = {HTTP: http_client(session, f"http://127.0.0.1:{http_port}/v1/embeddings"),
                         SQL: sql_client(sql_pool),
                         STANDALONE: http_client(session, f"http://127.0.0.1:{st_port}/v1/embeddings")}
                got = {path: np.array([(await paths[path]([t]))[0] for t in texts], np.float32)
                       for texts in [pool.take(20)] for path in paths}  # one request a text, as the SQL calls
                same = got[HTTP].tobytes() == got[SQL].tobytes()
                return await measure(paths, plan, args.rounds, pool), same, row_cosines(got[STANDALONE], got[SQL]).min()

        results, same, cosine = asyncio.run(run())
    rows = [[workload, path, m.texts, f"{m.texts / m.seconds:.0f}", f"{pct(m.latencies, 50) * 1000:.1f}",
             f"{pct(m.latencies, 99) * 1000:.1f}"] for (workload, path), m in results.items()]
    rig.publish(
        [f"/v1/embeddings gives the SQL function's vectors bit for bit: **{'yes' if same else 'NO'}**; lowest cosine "
         f"standalone vs ours over 20 texts: {cosine:.6f}."],
        table(["workload", "path", "texts", "texts/s", "p50 ms", "p99 ms"], rows),
        "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
