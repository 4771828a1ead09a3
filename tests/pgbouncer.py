"""A real PgBouncer (Debian's package, which `make system-deps` installs) in front of a test server, for
the topology tests and the benchmarks: every database of the server, trusting its users, with
PgBouncer's defaults otherwise (pool mode and pool size aside)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from proxy.pgserver import as_user

from .daemon import debian_binary, start_listening, stop
from .pgcluster import RUN_AS, free_port, make_workdir


@dataclass
class PgBouncer:
    proc: subprocess.Popen
    port: int
    workdir: Path

    def url(self) -> str:
        """The pooler as a proxy's upstream."""
        return f"postgresql://127.0.0.1:{self.port}/postgres?sslmode=disable"

    def dsn(self, user: str = "postgres", database: str = "postgres") -> str:
        """A client's connection to the pooler."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def stop(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_pgbouncer(server_port: int, pool_mode: str = "session", pool_size: int = 20,
                    max_clients: int = 200, users: tuple[str, ...] = ("postgres",),
                    settings: dict[str, str] | None = None) -> PgBouncer:
    """PgBouncer on loopback in front of the server on `server_port`: any database; `users` (trusted:
    PgBouncer still wants each in its auth_file); `settings`, more of PgBouncer's."""
    workdir = make_workdir("alp-pgbouncer-")
    port = free_port()
    (workdir / "userlist.txt").write_text("".join(f'"{user}" ""\n' for user in users))
    ini = workdir / "pgbouncer.ini"
    ini.write_text(f"""\
[databases]
* = host=127.0.0.1 port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = {max_clients}
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
""" + "".join(f"{name} = {value}\n" for name, value in (settings or {}).items()))
    if RUN_AS is not None:  # PgBouncer refuses to run as root
        for path in (workdir, *workdir.iterdir()):
            shutil.chown(path, RUN_AS, RUN_AS)
    proc = start_listening([debian_binary("pgbouncer"), str(ini)], port, cwd=workdir, **as_user(RUN_AS))
    return PgBouncer(proc, port, workdir)
