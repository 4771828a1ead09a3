"""With no upstream configured, `serve` starts an embedded PostgreSQL with pgvector and says how to connect."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .proxyproc import PSQL, start_proxy


def test_embedded_default(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proxy = start_proxy(data_dir, upstream=None)
    try:
        command = re.search(r"psql '(postgresql://[^']+)'", proxy.log)
        assert command, proxy.log
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
