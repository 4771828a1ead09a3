"""The third-party servers the topology tests run (PgBouncer, HAProxy): found where Debian's packages
put them (`make system-deps` installs them), started, waited for, stopped."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .proxyproc import wait_for_port


def debian_binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if found is None:
        raise RuntimeError(f"{name} is not installed: `make system-deps` installs Debian's package")
    return found


def start_listening(command: list[str], port: int, **popen: object) -> subprocess.Popen:
    """Start `command` and wait until it listens on `port`; what it printed, if it does not."""
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, **popen)  # type: ignore[call-overload]
        try:
            wait_for_port(port, 30, proc)
        except (TimeoutError, RuntimeError) as exc:
            stop(proc)
            output.seek(0)
            raise RuntimeError(f"{command[0]} did not start: {output.read().decode(errors='replace')}") from exc
    return proc


def stop(proc: subprocess.Popen) -> None:
    """End a server process: politely first, then for sure."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
