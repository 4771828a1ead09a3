"""The proxy's /v1/embeddings against the same embeddings through SQL (create_embeddings from asyncpg) and against
a standalone service a user might run instead (bench/st_server.py, in bench/.venv), side by side in one run.

The proxy: `serve --http-listen`, default settings. The standalone: sentence-transformers on torch CPU (threads =
nproc), the same e5 weights dequantised to float32, behind ThreadingHTTPServer, one model call per request, calls
taking turns. Unique short texts (14-28 tokens): one per request from one client (single) and from --clients at
once (concurrent), and --batch-size per request (batch); latency per request as the client sees it (vectors
decoded); texts/s over each workload's wall time; --rounds blocks in a rotating order. The proxy's engine runs
under SCHED_IDLE, torch at normal priority: on a loaded machine that favours the standalone server. Checked once:
whether /v1/embeddings gives SQL's vectors bit for bit; the lowest cosine of the standalone's vectors with ours."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import numpy as np

from bench import workloads
from bench.common import BENCH, Cli, clients, pct, rotated, row_cosines, table
from bench.harness import MODEL, Rig
from tests.pgcluster import free_port
from tests.proxyproc import wait_for_port

SECTION = "## Embeddings over HTTP (bench.http_embeddings)"
HTTP, SQL, STANDALONE = "proxy /v1/embeddings", "proxy SQL (asyncpg)", "standalone st-torch"

#: One request: the texts in, the vectors out.
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


@dataclass
class Measured:
    latencies: list[float] = field(default_factory=list)  # seconds
    texts: int = 0
    seconds: float = 0.0


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
                  pool: workloads.Pool) -> dict[tuple[str, str], Measured]:
    """Every workload (name, requests, texts per request, clients) on every path, in rotating rounds."""
    results = {(workload[0], p): Measured() for workload in plan for p in paths}
    for embed in paths.values():  # warm-up: connections, the first model runs
        for _ in range(3):
            await embed(pool.take(1))
        await embed(pool.take(8))
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


async def agreement(paths: dict[str, Embed], texts: list[str]) -> tuple[bool, float]:
    """Whether /v1/embeddings gives SQL's bits for each text (one request each, as the SQL calls), and the lowest
    cosine between the standalone's vectors and ours."""
    got = {path: np.array([(await paths[path]([t]))[0] for t in texts], np.float32) for path in (HTTP, SQL, STANDALONE)}
    same = all(a.tobytes() == b.tobytes() for a, b in zip(got[HTTP], got[SQL], strict=True))
    return same, float(row_cosines(got[STANDALONE], got[SQL]).min())


def main(argv: list[str] | None = None) -> int:
    cli = Cli("http_embeddings", __doc__)
    cli.add_argument("--single", type=int, default=150, help="requests of the single workload")
    cli.add_argument("--concurrent", type=int, default=300, help="requests of the concurrent workload")
    cli.add_argument("--clients", type=int, default=8, help="clients of the concurrent workload")
    cli.add_argument("--batches", type=int, default=15, help="requests of the batch workload")
    cli.add_argument("--batch-size", type=int, default=32, help="texts per request of the batch workload")
    cli.add_argument("--rounds", type=int, default=3, help="blocks each workload is cut into")
    cli.wait_load()
    cli.data_dir()
    cli.record(SECTION)
    args = cli.parse(argv)
    with Rig(args, SECTION, "alp-http-bench-") as rig:
        pool = workloads.pool(rig.model(args.data_dir))
        plan = [("single", args.single, 1, 1),
                (f"concurrent ({args.clients} clients)", args.concurrent, 1, args.clients),
                (f"batch ({args.batch_size} texts)", args.batches, args.batch_size, 1)]
        cluster = rig.cluster()
        http_port, st_port = free_port(), free_port()
        proxy = rig.proxy(cluster.port, "proxy", "--http-listen", f"127.0.0.1:{http_port}")
        wait_for_port(http_port, 30, proxy.proc)
        subprocess.run([str(BENCH / "setup_venv.sh")], check=True)
        st_command = [str(BENCH / ".venv" / "bin" / "python"), "-m", "bench.st_server", "--port", str(st_port)]
        st = rig.started_server(subprocess.Popen(st_command, stdout=subprocess.PIPE, text=True, cwd=BENCH.parent))
        assert st.stdout is not None and st.stdout.readline().strip() == "ready", "the standalone server failed"
        wait_for_port(st_port, 30, st)

        async def run() -> tuple[dict[tuple[str, str], Measured], bool, float]:
            connector = aiohttp.TCPConnector(limit=args.clients)
            async with aiohttp.ClientSession(connector=connector) as session, asyncpg.create_pool(
                proxy.dsn(), min_size=args.clients, max_size=args.clients
            ) as sql_pool:
                paths = {HTTP: http_client(session, f"http://127.0.0.1:{http_port}/v1/embeddings"),
                         SQL: sql_client(sql_pool),
                         STANDALONE: http_client(session, f"http://127.0.0.1:{st_port}/v1/embeddings")}
                same, cosine = await agreement(paths, pool.take(20))
                return await measure(paths, plan, args.rounds, pool), same, cosine

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
