"""Session-wide fixtures: a real PostgreSQL with pgvector and the proxy in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trustme

from .driver_scenario import STAND_IN_DATABASE, STAND_IN_SQL, Reference
from .pgcluster import PgCluster, make_workdir, start_cluster
from .proxyproc import ProxyProcess, start_proxy

SCRAM_PASSWORD = "scram-secret"
MD5_PASSWORD = "md5-secret"


@pytest.fixture(scope="session")
def tls_files() -> Iterator[dict[str, Path]]:
    """A test CA and a certificate for 127.0.0.1/localhost, used by the proxy and by PostgreSQL."""
    directory = make_workdir("alp-tls-")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    yield files


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = start_cluster()
    cluster.psql(
        f"CREATE EXTENSION vector;"
        f"CREATE ROLE scram_user LOGIN PASSWORD '{SCRAM_PASSWORD}';"
        f"SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD '{MD5_PASSWORD}';"
    )
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def model_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with the built-in model built (once per test session, shared by all tests)."""
    from inference import builtin_model

    directory = tmp_path_factory.getbasetemp() / "inference-data"
    builtin_model(directory)
    return directory


@pytest.fixture(scope="session")
def engine_vectors(model_data_dir: Path) -> Iterator:
    """The engine's own output for a text, computed in this process, to compare SQL results with."""
    from inference import builtin_model
    from inference.engine import EmbeddingEngine

    engine = EmbeddingEngine()
    files = builtin_model(model_data_dir)

    def embed(*texts: str) -> np.ndarray:
        return engine.embed_sync(files, list(texts))

    yield embed
    engine.close_sync()


@pytest.fixture(scope="session")
def proxy(pg: PgCluster, tls_files: dict[str, Path], model_data_dir: Path) -> Iterator[ProxyProcess]:
    """The proxy, as a user runs it, in front of `pg`, offering TLS to clients."""
    running = start_proxy(
        model_data_dir,
        "--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"]), "--service-user", "postgres",
        upstream=pg.url(), preload=True,
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def driver_reference(proxy: ProxyProcess) -> Reference:
    """What psycopg gets through the proxy for the driver scenario, to check the other drivers against."""
    return Reference(proxy.dsn())


@pytest.fixture(scope="session")
def stand_in_dsn(pg: PgCluster) -> Iterator[str]:
    """A database on `pg`, reached directly, with a stand-in create_embeddings (driver_scenario.py)."""
    import psycopg

    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {STAND_IN_DATABASE}")
    with psycopg.connect(pg.dsn(database=STAND_IN_DATABASE), autocommit=True) as conn:
        conn.execute(STAND_IN_SQL)
    yield pg.dsn(database=STAND_IN_DATABASE)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {STAND_IN_DATABASE} WITH (FORCE)")
