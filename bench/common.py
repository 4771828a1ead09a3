"""What every benchmark shares: the corpus, statistics, machine facts, tables, the command line, processes of
their own and RESULTS sections. Light on purpose (numpy alone): engine_speed's runner processes import it, and
its memory figures count a runner's imports on top of it. The servers' harness is bench.harness."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import multiprocessing.pool
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
CORPUS = BENCH / "data" / "multilingual_sentences.jsonl"
DEFAULT_DATA_DIR = Path(tempfile.gettempdir()) / "alp-bench-data"  # the built model, kept between runs
T = TypeVar("T")


def load_corpus() -> list[dict[str, str]]:
    """The multilingual corpus: rows with ``lang`` and ``text``."""
    with CORPUS.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def cos6(value: float) -> str:
    """Six decimals: four significant digits would hide the differences that matter."""
    return f"{value:.6f}"


def verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def pct(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def rotated(items: Sequence[T], k: int) -> list[T]:
    """The order of round ``k`` of an interleaved measurement: the noise of a shared machine falls on every item
    alike, and none always runs first."""
    k %= len(items)
    return [*items[k:], *items[:k]]


async def clients(call: Callable[[T], Awaitable[object]], items: Iterable[T], count: int) -> tuple[float, list[float]]:
    """`items` sent by `count` concurrent clients, each call timed: the wall seconds, and every call's."""
    pending = iter(items)
    latencies: list[float] = []

    async def client() -> None:
        for item in pending:
            started = time.perf_counter()
            await call(item)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(count)))
    return time.perf_counter() - started, latencies


def timed_ms(call: Callable[[T], object], items: Iterable[T]) -> list[float]:
    """Each call of `call` on an item, timed, in ms."""
    out = []
    for item in items:
        started = time.perf_counter()
        call(item)
        out.append((time.perf_counter() - started) * 1000)
    return out


def throughput(embed: Callable[[list[str]], object], texts: list[str], batch: int) -> float:
    """Texts per second of `embed` over `texts` in calls of `batch`, after one call to warm it."""
    embed(texts[:batch])
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        embed(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - started)


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory figure of /proc/PID/status (VmRSS; VmHWM: the peak resident size), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def machine_header() -> str:
    """The date, the core count, the CPU and the current load."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, nproc={os.cpu_count()}, {cpu}, {load_average()}"


def load_average() -> str:
    """Other work on a shared machine shows here."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min)"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with 4 significant digits."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Cli(argparse.ArgumentParser):
    """``python -m bench.NAME`` (or `prog`), described by its docstring's first paragraph; ``parse`` adds
    ``command_line``, the command as its RESULTS section records it, and ``method``, the docstring's second
    paragraph (how it measures), which the section states."""

    def __init__(self, name: str, doc: str | None, section: str, prog: str = "") -> None:
        self.paragraphs = [" ".join(p.split()) for p in (doc or "").split("\n\n")]
        super().__init__(prog=prog or f"python -m bench.{name}", description=self.paragraphs[0],
                         epilog=" ".join(self.paragraphs[1:2]))
        self.name, self.section = name, section
        self.add_argument("--record", action="store_true", help=f"replace '{section}' in bench/RESULTS.md")
        self.add_argument("--wait-load", type=float, default=0.0,
                          help="first wait (up to 10 min) for the 1-minute load average to fall below this; 0: no wait")

    def data_dir(self, default: Path | None = DEFAULT_DATA_DIR) -> None:
        self.add_argument("--data-dir", type=Path, default=default, help="where the built model is kept (reused by "
                          f"later runs; default: {default or 'a new one for this run'})")

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        args = self.parse_args(argv)
        args.command_line = " ".join([self.prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
        args.method, args.name, args.section = " ".join(self.paragraphs[1:2]), self.name, self.section
        deadline = time.monotonic() + 600
        while os.getloadavg()[0] >= args.wait_load > 0 and time.monotonic() < deadline:
            print(f"waiting for the load to drop below {args.wait_load} ({load_average()})", file=sys.stderr)
            time.sleep(15)
        return args


def spawned(initializer: Callable[..., None] | None = None, *args: object) -> multiprocessing.pool.Pool:
    """A process of its own (spawned: no thread pool or event loop shared with this one), set up by
    `initializer(*args)`; functions run in it by `apply`."""
    return multiprocessing.get_context("spawn").Pool(1, initializer, args)


class Section:
    """A benchmark's RESULTS section: its title (Cli's `section`, "## ..."), the command and its minutes, the machine
    at the start and at the end, the method (Cli's) and facts as a list, then the figures. Printed; with --record,
    written into RESULTS.md in place of the section of that title (appended if absent), the file re-read right
    before writing so that sections edited meanwhile are kept."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.title, self.started = args, args.section, time.monotonic()
        self.header = machine_header()
        print(f"{self.title}: {self.header}", file=sys.stderr, flush=True)

    def publish(self, facts: list[str], *lines: str) -> None:
        minutes = (time.monotonic() - self.started) / 60
        section = "\n".join([self.title, "", f"Command: `{self.args.command_line}` ({minutes:.1f} min).", "",
                             f"{self.header}; at the end: {load_average()}.", "",
                             *[f"- {fact}" for fact in [self.args.method, *facts] if fact], "", *lines])
        print(section)
        if not self.args.record:
            return
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        pattern = re.compile(rf"^{re.escape(self.title)}\n.*?(?=^## |\Z)", re.M | re.S)
        body = section.rstrip("\n") + "\n"
        if pattern.search(text):
            text = pattern.sub(lambda _: body + "\n", text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + body
        RESULTS.write_text(text.rstrip("\n") + "\n")
