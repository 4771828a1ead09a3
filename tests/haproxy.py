"""A real HAProxy (Debian's package, which `make system-deps` installs) in TCP mode in front of several
proxies, checking each with /healthz, as deploy/ sets it up."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .daemon import debian_binary, start_listening, stop
from .pgcluster import free_port, make_workdir


@dataclass
class HAProxy:
    proc: subprocess.Popen
    port: int
    workdir: Path

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def stop(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_haproxy(backends: list[tuple[int, int]]) -> HAProxy:
    """HAProxy on loopback balancing TCP over (proxy port, its HTTP port for /healthz) pairs; a proxy is
    taken out after two failed checks half a second apart, and back in after two good ones."""
    workdir = make_workdir("alp-haproxy-")
    port = free_port()
    servers = "\n".join(f"    server proxy{i} 127.0.0.1:{pg_port} check port {http_port} inter 500ms fall 2 rise 2"
                        for i, (pg_port, http_port) in enumerate(backends))
    config = workdir / "haproxy.cfg"
    config.write_text(f"""\
global
    maxconn 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s

frontend postgres
    bind 127.0.0.1:{port}
    default_backend proxies

backend proxies
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
{servers}
""")
    proc = start_listening([debian_binary("haproxy"), "-db", "-f", str(config)], port)
    return HAProxy(proc, port, workdir)
