"""The catalog kept in the server (catalog/server.py), against a real PostgreSQL of its own: read from
a snapshot, kept when the server is out of reach, a data directory's catalog imported once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
