"""With no upstream configured, `serve` starts an embedded PostgreSQL with pgvector and says how to connect."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from .proxyproc import PSQL, ProxyProcess, start_proxy


def _wait_for_connect_line(proxy: ProxyProcess, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"psql '(postgresql://[^']+)'", proxy.log)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(proxy.log)


def test_embedded_default(tmp_path: Path) -> None:
    """A first run: sessions are served at once; the built-in model is built before the connect line
    is printed, and a call that arrives during the build says why it waits."""
    data_dir = tmp_path / "data"
    proxy = start_proxy(data_dir, upstream=None, preload=True)
    try:
        early = proxy.psql("-At", "-c", "select array_length(azure_local_ai.create_embeddings("
                           "'multilingual-e5-small:v1', 'query: first call'), 1)")
        assert early.stdout.strip() == "384"
        assert "NOTICE:  azure-local-ai-proxy: the built-in model multilingual-e5-small:v1 is being built" \
            in early.stderr
        command = _wait_for_connect_line(proxy)
        log = proxy.log
        assert log.index("model ready") < log.index("psql 'postgresql://")
        later = proxy.psql("-At", "-c", "select array_length(azure_local_ai.create_embeddings("
                           "'multilingual-e5-small:v1', 'query: later call'), 1)")
        assert later.stdout.strip() == "384" and "NOTICE" not in later.stderr
        url = command.group(1)
        assert f":{proxy.port}/" in url
        out = subprocess.run(
            [PSQL, "-X", "-q", "-At", url, "-c", "create extension if not exists vector",
             "-c", "select '[1,2,3]'::vector <-> '[1,2,4]'::vector", "-c", "select current_user"],
            capture_output=True, text=True, check=True,
        )
        assert out.stdout.split() == ["1", "postgres"]
        assert (data_dir / "postgres" / "PG_VERSION").exists()
        # The embedded server listens on a Unix socket in the data directory only, not on TCP.
        opts = (data_dir / "postgres" / "postmaster.opts").read_text()
        assert '"-h" ""' in opts
    finally:
        assert proxy.stop() == 0
    # Stopping the proxy stops its embedded server.
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
