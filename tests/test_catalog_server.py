"""The catalog kept in the server (catalog/server.py), against a real PostgreSQL of its own: read from
a snapshot, kept when the server is out of reach, a data directory's catalog imported once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from catalog import Catalog, CatalogError
from catalog.server import ServerCatalog

from .pgcluster import PgCluster, start_cluster


@pytest.fixture
def server() -> Iterator[PgCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


def conninfo(cluster: PgCluster) -> str:
    return cluster.dsn()


def test_a_data_directorys_catalog_is_imported_once_into_an_empty_one(server: PgCluster, tmp_path: Path) -> None:
    with Catalog(tmp_path / "a") as local:
        local.set_setting("intra_op_parallelism", "1")
        local.register_model("old:v1", "/models/old", "/models/old/tokenizer.json", 384, 256)
        shared = ServerCatalog(conninfo(server), local)
    assert shared.get_setting("intra_op_parallelism") == "1"
    assert [m.uri for m in shared.list_models()] == ["multilingual-e5-small:v1", "old:v1"]
    shared.close()
    with Catalog(tmp_path / "b") as other:  # a second proxy's, with a catalog of its own: not imported
        other.set_setting("intra_op_parallelism", "2")
        again = ServerCatalog(conninfo(server), other)
    assert again.get_setting("intra_op_parallelism") == "1"
    again.close()


def test_out_of_reach_the_last_snapshot_serves_and_changes_are_refused(server: PgCluster) -> None:
    shared = ServerCatalog(conninfo(server))
    shared.set_setting("spin_control", "false")
    server.stop()
    try:
        shared.refresh()
        assert shared.problem is not None and "cannot be read" in shared.problem
        assert shared.get_setting("spin_control") == "false"
        with pytest.raises(CatalogError) as refused:
            shared.set_setting("spin_control", "true")
        assert refused.value.sqlstate == "58030"
    finally:
        server.start()
    shared.refresh()
    assert shared.problem is None
    shared.set_setting("spin_control", "true")
    assert shared.get_setting("spin_control") == "true"
    shared.close()


def test_the_built_in_models_files_are_each_proxys_own(server: PgCluster) -> None:
    first, second = ServerCatalog(conninfo(server)), ServerCatalog(conninfo(server))
    first.update_model_files("multilingual-e5-small:v1", "/first/model.onnx", "/first/tokenizer.json", 384, 512)
    second.refresh()
    assert second.get_model("multilingual-e5-small:v1").model_path is None
    assert first.get_model("multilingual-e5-small:v1").model_path == "/first/model.onnx"
    with pytest.raises(CatalogError) as builtin:
        second.unregister_model("multilingual-e5-small:v1")
    assert builtin.value.sqlstate == "42501"
    first.close()
    second.close()


def test_a_schema_another_role_made_is_not_used(server: PgCluster) -> None:
    """A role that may create in the database makes the schema first (to put a trigger on its tables,
    which the proxy's writes would run as the service login): the proxy refuses it (42501)."""
    server.psql("CREATE ROLE intruder LOGIN; GRANT CREATE ON DATABASE postgres TO intruder; "
                "CREATE ROLE svc LOGIN; GRANT CREATE ON DATABASE postgres TO svc")
    server.psql("CREATE SCHEMA azure_local_ai_catalog; GRANT ALL ON SCHEMA azure_local_ai_catalog TO svc",
                user="intruder")
    with pytest.raises(CatalogError) as refused:
        ServerCatalog(server.dsn(user="svc"))
    assert refused.value.sqlstate == "42501" and "not the service login's own" in refused.value.message


class CountingCatalog(ServerCatalog):
    """The catalog, counting how often it is read."""

    reads = 0

    def refresh(self) -> None:
        self.reads += 1
        super().refresh()


def test_a_flood_of_notifications_makes_few_readings(server: PgCluster) -> None:
    """Any role may NOTIFY the catalog's channel: 500 notifications make a few readings, not 500; and a
    real change is still read."""
    shared = CountingCatalog(server.dsn())

    async def flood() -> int:
        listening = asyncio.ensure_future(shared.listen())
        try:
            await asyncio.sleep(1)
            before = shared.reads
            with psycopg.connect(server.dsn(), autocommit=True) as other:
                for _ in range(500):
                    other.execute("SELECT pg_notify('azure_local_ai_catalog', '')")
                other.execute("INSERT INTO azure_local_ai_catalog.settings VALUES ('spin_control', 'false')")
                other.execute("SELECT pg_notify('azure_local_ai_catalog', '')")
            await asyncio.sleep(1)
            return shared.reads - before
        finally:
            listening.cancel()

    reads = asyncio.run(flood())
    assert 1 <= reads < 100, reads
    assert shared.get_setting("spin_control") == "false"
    shared.close()
