"""A real HAProxy (Debian's package, which `make system-deps` installs) in TCP mode in front of several
proxies, checking each with /healthz, as deploy/ sets it up."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .pgcluster import free_port, make_workdir
from .proxyproc import wait_for_port


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        raise RuntimeError("haproxy is not installed: `make system-deps` installs Debian's package")
    return found


@dataclass
class HAProxy:
    proc: subprocess.Popen
    port: int
    workdir: Path

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)], stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, 30, proc)
        except (TimeoutError, RuntimeError) as exc:
            output.seek(0)
            raise RuntimeError(f"haproxy did not start: {output.read().decode(errors='replace')}") from exc
    return HAProxy(proc, port, workdir)
