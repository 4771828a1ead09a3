"""Helpers shared by the benchmarks: the corpus, cosine statistics, machine facts, plain tables."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.daemon import stop  # noqa: F401 - the benchmarks end their servers with it

CORPUS = Path(__file__).resolve().parent / "data" / "multilingual_sentences.jsonl"


def load_corpus() -> list[dict[str, str]]:
    """The multilingual corpus: rows with ``lang`` and ``text``."""
    with CORPUS.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def machine_header(title: str) -> str:
    """One line naming the benchmark, the date, the core count, the CPU and the current load."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"# {title} — {when}, nproc={os.cpu_count()}, {cpu}, {load_average()}"


def load_average() -> str:
    """The 1- and 5-minute load averages (other work on a shared machine shows here)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min)"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats are printed with 4 significant digits."""

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cos6(value: float) -> str:
    """A cosine similarity with six decimals (four significant digits hide the differences that matter)."""
    return f"{value:.6f}"


def publish(section: str, results: Path, title: str, record: bool) -> None:
    """Print a benchmark's section, and with `record` put it in place of its own in the results file."""
    print(section)
    if record:
        write_section(results, title, section)


def write_section(results: Path, title: str, section: str) -> None:
    """Replace the section headed ``title`` of a results file with ``section`` (appended when absent),
    re-reading the file right before writing so that other sections, edited meanwhile, are kept."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    body = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    results.write_text(text.rstrip("\n") + "\n")


def section_head(title: str, command_line: str, minutes: float, header: str, facts: list[str]) -> list[str]:
    """The first lines of a results section: title, the command, the machine, and the setup."""
    return [title, "", f"Command: `{command_line}` ({minutes:.1f} min).", "",
            header.lstrip("# ") + f"; at the end: {load_average()}.", "", *[f"- {fact}" for fact in facts], ""]
