"""The proxy as users run it: the real command in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .pgcluster import free_port, tool

PSQL = shutil.which("psql") or tool("psql")


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@dataclass
class ProxyProcess:
    """A running `azure-local-ai-proxy serve`, its port and its log file."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def dsn(self, user: str = "postgres", password: str | None = None, database: str = "postgres",
            **params: str) -> str:
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}?{query}"

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def psql(self, *args: str, dsn: str | None = None, input: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PSQL, "-X", "-v", "ON_ERROR_STOP=1", dsn or self.dsn(), *args],
                              input=input, capture_output=True, text=True, check=check, timeout=120)

    def wait_for_model(self, timeout: float = 120) -> None:
        """Until the built-in model is loaded (a preloading proxy serves sessions before that)."""
        deadline = time.monotonic() + timeout
        while "event=model_ready" not in self.log:
            if time.monotonic() > deadline or not self.alive():
                raise TimeoutError(f"the model was not loaded:\n{self.log}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_proxy(data_dir: Path, *args: str, upstream: str | None, port: int | None = None,
                env: dict[str, str] | None = None, preload: bool = False) -> ProxyProcess:
    """Start the proxy's CLI on a free loopback port; `upstream` None means the embedded server.
    Unless `preload`, the built-in model is left for its first use (most tests of the relay never
    embed, and a fresh data directory would build the model in the background)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"proxy-{port}.log"
    command = [sys.executable, "-m", "proxy.cli", "serve", "--listen", f"127.0.0.1:{port}",
               "--data-dir", str(data_dir), "--preload-model", "true" if preload else "false", *args]
    if upstream is not None:
        command += ["--upstream", upstream]
        if "--catalog" not in args:  # each test's proxy its own catalog, unless it tests a shared one
            command += ["--catalog", "local"]
    full_env = {**os.environ, **(env or {})}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                cwd=Path(__file__).resolve().parent.parent)
    wait_for_port(port, 120, proc)
    return ProxyProcess(proc, port, log_path, env or {})
