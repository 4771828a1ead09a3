"""The catalog: settings, the model registry and the model-path check, on real SQLite files in tmp_path.

Crash safety is tested the hard way: a child process writes through the catalog and is killed with
SIGKILL in the middle of a transaction, then the store is reopened and checked.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from catalog import BUILTIN_MODEL_URI, Catalog, CatalogError, pairs_from_arrays, resolve_model_path, typed_settings
from catalog.settings import MAX_THREADS, available_cpus, parse_bool
from catalog.store import CATALOG_FILENAME, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
VALID_KEYS_TEXT = "valid keys: inter_op_parallelism, intra_op_parallelism, spin_control"


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog(tmp_path / "data") as catalog:
        yield catalog


@contextmanager
def raises(sqlstate: str) -> Iterator[pytest.ExceptionInfo[CatalogError]]:
    """Like pytest.raises(CatalogError), also checking the SQLSTATE."""
    with pytest.raises(CatalogError) as info:
        yield info
    assert info.value.sqlstate == sqlstate, repr(info.value)


# -- settings ---------------------------------------------------------------------------------------


def test_defaults(cat: Catalog) -> None:
    cpus = str(min(available_cpus(), MAX_THREADS))
    assert cat.get_settings() == {"intra_op_parallelism": cpus, "inter_op_parallelism": "1", "spin_control": "true"}
    assert list(cat.get_settings([])) == ["intra_op_parallelism", "inter_op_parallelism", "spin_control"]
    assert cat.get_setting("intra_op_parallelism") == cpus
    assert cat.get_setting("inter_op_parallelism") == "1"
    assert cat.get_setting("spin_control") == "true"


def test_set_get_round_trip_in_canonical_form(cat: Catalog) -> None:
    cat.set_setting("intra_op_parallelism", " +4 ")
    cat.set_setting("inter_op_parallelism", "256")
    cat.set_setting("spin_control", "OFF")
    assert cat.get_settings() == {"intra_op_parallelism": "4", "inter_op_parallelism": "256", "spin_control": "false"}
    assert cat.get_settings(["spin_control", "inter_op_parallelism"]) == {
        "spin_control": "false",
        "inter_op_parallelism": "256",
    }
    assert typed_settings(cat.get_settings()) == {
        "intra_op_parallelism": 4,
        "inter_op_parallelism": 256,
        "spin_control": False,
    }


def test_keys_are_case_insensitive_and_reported_in_lower_case(cat: Catalog) -> None:
    cat.set_settings({"Spin_Control": "yes"})
    assert cat.get_setting("SPIN_CONTROL") == "true"
    assert cat.get_settings(["INTRA_OP_PARALLELISM"]).keys() == {"intra_op_parallelism"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("t", True), ("TRU", True), ("yes", True), ("y", True), ("on", True), ("1", True),
     (" true ", True), ("false", False), ("f", False), ("No", False), ("n", False), ("off", False), ("of", False),
     ("0", False), ("o", None), ("onn", None), ("maybe", None), ("", None), ("2", None), ("tru e", None)],
)
def test_boolean_input_like_postgresql(text: str, expected: bool | None) -> None:
    assert parse_bool(text) is expected


def test_unknown_key_lists_the_valid_keys(cat: Catalog) -> None:
    for call in (
        lambda: cat.get_setting("intra_op_threads"),
        lambda: cat.get_settings(["spin_control", "nope"]),
        lambda: cat.set_setting("nope", "1"),
    ):
        with raises("22023") as info:
            call()
        assert VALID_KEYS_TEXT in info.value.message
        assert info.value.hint


@pytest.mark.parametrize("value", ["0", "-1", "257", "1.5", "4x", "", "  ", "0x10", "1_0", "\u0663", "four"])
@pytest.mark.parametrize("key", ["intra_op_parallelism", "inter_op_parallelism"])
def test_invalid_integer_states_the_range(cat: Catalog, key: str, value: str) -> None:
    with raises("22023") as info:
        cat.set_setting(key, value)
    assert f'"{key}"' in info.value.message
    assert "an integer from 1 to 256" in info.value.message


@pytest.mark.parametrize("value", ["maybe", "", "2", "o", "truee"])
def test_invalid_boolean_states_what_is_accepted(cat: Catalog, value: str) -> None:
    with raises("22023") as info:
        cat.set_setting("spin_control", value)
    assert "true/false, on/off, yes/no, 1/0" in info.value.message


def test_null_key_or_value(cat: Catalog) -> None:
    with raises("22004"):
        cat.set_settings({None: "1"})
    with raises("22004"):
        cat.set_settings({"spin_control": None})


def test_multi_set_is_all_or_nothing(cat: Catalog) -> None:
    cat.set_setting("inter_op_parallelism", "2")
    with raises("22023"):
        cat.set_settings({"inter_op_parallelism": "3", "intra_op_parallelism": "5", "spin_control": "maybe"})
    with raises("22023"):
        cat.set_settings({"inter_op_parallelism": "3", "bogus": "1"})
    assert cat.get_setting("inter_op_parallelism") == "2"
    assert cat.get_setting("spin_control") == "true"
    cat.set_settings({"inter_op_parallelism": "3", "intra_op_parallelism": "5", "spin_control": "off"})
    assert cat.get_settings() == {"intra_op_parallelism": "5", "inter_op_parallelism": "3", "spin_control": "false"}


def test_default_removes_the_stored_value(cat: Catalog) -> None:
    cat.set_settings({"inter_op_parallelism": "4", "spin_control": "false"})
    cat.set_settings({"inter_op_parallelism": "DEFAULT", "spin_control": "default"})
    assert cat.get_setting("inter_op_parallelism") == "1"
    assert cat.get_setting("spin_control") == "true"


def test_arrays_to_pairs() -> None:
    assert pairs_from_arrays(["spin_control", "spin_control"], ["on", "off"]) == {"spin_control": "off"}
    with raises("2202E") as info:
        pairs_from_arrays(["spin_control", "inter_op_parallelism"], ["on"])
    assert "same length" in info.value.message


def test_hand_edited_invalid_value_reads_as_the_default(cat: Catalog) -> None:
    with sqlite3.connect(cat.path) as raw:
        raw.execute("INSERT INTO settings (key, value) VALUES ('inter_op_parallelism', 'lots')")
    raw.close()
    assert cat.get_setting("inter_op_parallelism") == "1"


# -- models -----------------------------------------------------------------------------------------


def test_builtin_model_is_present(cat: Catalog) -> None:
    builtin = cat.get_model(BUILTIN_MODEL_URI)
    assert (builtin.id, builtin.builtin, builtin.dimensions, builtin.max_seq_length) == (1, True, 384, 512)
    assert cat.list_models() == [builtin]
    created = datetime.fromisoformat(builtin.created_at)
    assert created.utcoffset() == timedelta(0)


def test_register_get_list_unregister(cat: Catalog) -> None:
    record = cat.register_model("bge-small:v1", "/models/bge/model.onnx", "/models/bge/tokenizer.json", 384, 512)
    assert record.id == 2 and not record.builtin
    assert cat.get_model("bge-small:v1") == record
    other = cat.register_model("minilm", "/models/minilm/model.onnx")
    assert other.id == 3 and other.tokenizer_path is None and other.dimensions is None
    assert [m.uri for m in cat.list_models()] == [BUILTIN_MODEL_URI, "bge-small:v1", "minilm"]
    cat.unregister_model("bge-small:v1")
    with raises("42704") as info:
        cat.get_model("bge-small:v1")
    assert "not registered" in info.value.message
    assert info.value.hint is not None and BUILTIN_MODEL_URI in info.value.hint and "minilm" in info.value.hint
    # Ids are never reused, so an id handed out once always means the same registration.
    assert cat.register_model("bge-small:v1", "/models/bge/model.onnx").id == 4


def test_metadata_is_json(cat: Catalog) -> None:
    record = cat.register_model("m", "/models/m.onnx", None, 768, 256)
    metadata = json.loads(json.dumps(record.to_metadata()))
    assert metadata == {
        "id": record.id,
        "model_uri": "m",
        "model_path": "/models/m.onnx",
        "tokenizer_path": None,
        "dimensions": 768,
        "max_seq_length": 256,
        "builtin": False,
        "created_at": record.created_at,
    }


def test_duplicate_registration(cat: Catalog) -> None:
    cat.register_model("m", "/models/m.onnx")
    with raises("42710") as info:
        cat.register_model("m", "/models/other.onnx")
    assert "already registered" in info.value.message
    with raises("42710"):
        cat.register_model(BUILTIN_MODEL_URI, "/models/m.onnx")
    assert cat.get_model("m").model_path == "/models/m.onnx"


def test_builtin_cannot_be_unregistered(cat: Catalog) -> None:
    with raises("42501") as info:
        cat.unregister_model(BUILTIN_MODEL_URI)
    assert "built-in" in info.value.message
    assert cat.get_model(BUILTIN_MODEL_URI).builtin


def test_unknown_model(cat: Catalog) -> None:
    with raises("42704"):
        cat.unregister_model("nope")
    with raises("42704"):
        cat.update_model_files("nope", "/x", None, 1, 1)


@pytest.mark.parametrize(
    "kwargs",
    [{"uri": ""}, {"uri": "  "}, {"model_path": ""}, {"dimensions": 0}, {"max_seq_length": -1}, {"dimensions": True}],
)
def test_invalid_registration(cat: Catalog, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"uri": "m", "model_path": "/models/m.onnx", "dimensions": 8, "max_seq_length": 8}
    with raises("22023"):
        cat.register_model(**(args | kwargs))  # type: ignore[arg-type]
    assert [m.uri for m in cat.list_models()] == [BUILTIN_MODEL_URI]


def test_update_model_files_of_the_builtin(cat: Catalog) -> None:
    updated = cat.update_model_files(BUILTIN_MODEL_URI, "/data/e5/model.onnx", "/data/e5/tokenizer.json", 384, 512)
    assert (updated.id, updated.builtin, updated.model_path) == (1, True, "/data/e5/model.onnx")
    assert cat.get_model(BUILTIN_MODEL_URI) == updated


# -- durability -------------------------------------------------------------------------------------


def test_survives_reopen(tmp_path: Path) -> None:
    with Catalog(tmp_path) as first:
        first.set_settings({"inter_op_parallelism": "6", "spin_control": "off"})
        record = first.register_model("m", "/models/m.onnx", "/models/tok.json", 16, 32)
        first.update_model_files(BUILTIN_MODEL_URI, "/e5/model.onnx", "/e5/tok.json", 384, 512)
    with Catalog(tmp_path) as second:
        assert second.get_setting("inter_op_parallelism") == "6"
        assert second.get_setting("spin_control") == "false"
        assert second.get_model("m") == record
        assert second.get_model(BUILTIN_MODEL_URI).model_path == "/e5/model.onnx"
        assert len(second.list_models()) == 2


def test_file_is_wal_synchronous_and_versioned(cat: Catalog) -> None:
    assert cat.path.name == CATALOG_FILENAME
    raw = sqlite3.connect(cat.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()
    assert cat._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Catalog(tmp_path).close()
    raw = sqlite3.connect(tmp_path / CATALOG_FILENAME)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with raises("55000") as info:
        Catalog(tmp_path)
    assert "Upgrade" in (info.value.hint or "")


def test_garbage_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    (tmp_path / CATALOG_FILENAME).write_bytes(os.urandom(8192))
    with raises("XX001") as info:
        Catalog(tmp_path)
    assert "move it aside" in (info.value.hint or "")


def run_child(body: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run `body` in a fresh interpreter with `data` (the catalog directory) and `catalog` importable."""
    script = "import os, sys\nfrom pathlib import Path\nfrom catalog import Catalog\ndata = Path(sys.argv[1])\n"
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body), str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def assert_intact(data_dir: Path) -> None:
    raw = sqlite3.connect(data_dir / CATALOG_FILENAME)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        raw.close()


def test_kill_inside_set_settings_keeps_the_old_values(tmp_path: Path) -> None:
    child = run_child(
        """
        catalog = Catalog(data)
        catalog.set_settings({"inter_op_parallelism": "3"})
        inserts = 0
        def trace(sql):
            global inserts
            if sql.startswith("INSERT INTO settings"):
                inserts += 1
                if inserts == 2:  # the first row is written, the transaction still open
                    os.kill(os.getpid(), 9)
        catalog._conn.set_trace_callback(trace)
        catalog.set_settings({"inter_op_parallelism": "5", "spin_control": "false"})
        print("not killed")
        """,
        tmp_path,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr + child.stdout
    assert_intact(tmp_path)
    with Catalog(tmp_path) as catalog:
        assert catalog.get_setting("inter_op_parallelism") == "3"
        assert catalog.get_setting("spin_control") == "true"


def test_kill_with_uncommitted_pages_already_in_the_wal(tmp_path: Path) -> None:
    """A big transaction spills pages to the WAL before COMMIT; they must be ignored after the crash."""
    child = run_child(
        """
        catalog = Catalog(data)
        catalog.set_settings({"spin_control": "off"})
        catalog.register_model("kept", "/models/kept.onnx")
        catalog.close()
        import sqlite3
        raw = sqlite3.connect(data / "catalog.sqlite3", isolation_level=None)
        raw.execute("PRAGMA cache_size = 10")
        wal = data / "catalog.sqlite3-wal"
        before = wal.stat().st_size
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("UPDATE settings SET value = 'true' WHERE key = 'spin_control'")
        raw.execute("DELETE FROM models WHERE uri = 'kept'")
        for i in range(3000):
            raw.execute("INSERT INTO models (uri, model_path, builtin, created_at) VALUES (?, ?, 0, 'x')",
                        (f"junk-{i}", "p" * 1000))
        print(before, wal.stat().st_size, flush=True)
        os.kill(os.getpid(), 9)
        """,
        tmp_path,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr + child.stdout
    before, after = map(int, child.stdout.split())
    assert after > before + 1_000_000, "the uncommitted transaction should have reached the WAL file"
    assert_intact(tmp_path)
    with Catalog(tmp_path) as catalog:
        assert catalog.get_setting("spin_control") == "false"
        assert [m.uri for m in catalog.list_models()] == [BUILTIN_MODEL_URI, "kept"]


def test_kill_right_after_commit_keeps_the_new_values(tmp_path: Path) -> None:
    child = run_child(
        """
        catalog = Catalog(data)
        catalog.set_settings({"intra_op_parallelism": "7"})
        catalog.register_model("m", "/models/m.onnx")
        os.kill(os.getpid(), 9)
        """,
        tmp_path,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Catalog(tmp_path) as catalog:
        assert catalog.get_setting("intra_op_parallelism") == "7"
        assert catalog.get_model("m").model_path == "/models/m.onnx"


def test_kill_while_creating_the_schema(tmp_path: Path) -> None:
    child = run_child(
        """
        import sqlite3
        real_connect = sqlite3.connect
        def connect(*args, **kwargs):
            conn = real_connect(*args, **kwargs)
            conn.set_trace_callback(lambda sql: sql.startswith("CREATE TABLE settings") and os.kill(os.getpid(), 9))
            return conn
        sqlite3.connect = connect
        Catalog(data)
        """,
        tmp_path,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Catalog(tmp_path) as catalog:
        assert catalog.get_model(BUILTIN_MODEL_URI).id == 1
        assert catalog.get_setting("spin_control") == "true"
    assert_intact(tmp_path)


# -- concurrency ------------------------------------------------------------------------------------


def test_concurrent_threads_and_two_catalogs_on_one_directory(tmp_path: Path) -> None:
    catalogs = [Catalog(tmp_path), Catalog(tmp_path)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        catalog = catalogs[n % 2]
        try:
            start.wait()
            for i in range(25):
                record = catalog.register_model(f"t{n}-{i}", f"/models/{n}/{i}.onnx")
                assert catalog.get_model(record.uri).id == record.id
                catalog.set_settings({"inter_op_parallelism": str(n + 1), "spin_control": "on" if i % 2 else "off"})
                assert catalog.get_setting("inter_op_parallelism") in {str(k + 1) for k in range(8)}
                assert len(catalog.get_settings()) == 3
                if i % 5 == 0:
                    catalog.unregister_model(record.uri)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    models = catalogs[0].list_models()
    assert len(models) == 1 + 8 * 20
    assert len({m.id for m in models}) == len(models)
    for catalog in catalogs:
        catalog.close()
    assert_intact(tmp_path)


# -- model paths ------------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two model roots with files, and a secret file outside both."""
    models, more, outside = tmp_path / "models", tmp_path / "more", tmp_path / "outside"
    for directory in (models / "e5", more, outside):
        directory.mkdir(parents=True)
    (models / "e5" / "model.onnx").write_bytes(b"onnx")
    (more / "tok.json").write_text("{}")
    (outside / "secret.onnx").write_bytes(b"secret")
    return models, more, outside


def test_path_inside_a_root_is_accepted(roots: tuple[Path, Path, Path]) -> None:
    models, more, _ = roots
    assert resolve_model_path(str(models / "e5" / "model.onnx"), [models, more]) == models / "e5" / "model.onnx"
    assert resolve_model_path(str(more / "tok.json"), [models, more]) == more / "tok.json"
    assert resolve_model_path(str(models / "e5"), [models]) == models / "e5"  # a model directory
    assert resolve_model_path(str(models / "e5" / "." / "model.onnx"), [models]) == models / "e5" / "model.onnx"


def test_relative_path_is_looked_up_under_each_root(roots: tuple[Path, Path, Path]) -> None:
    models, more, _ = roots
    assert resolve_model_path("e5/model.onnx", [more, models]) == models / "e5" / "model.onnx"
    assert resolve_model_path("tok.json", [models, more]) == more / "tok.json"


def assert_refused(path: str, roots: list[Path]) -> CatalogError:
    with raises("42501") as info:
        resolve_model_path(path, roots)
    assert "permission denied" in info.value.message
    for root in roots:
        assert str(root.resolve()) in info.value.message
    return info.value


def test_traversal_out_of_the_roots_is_refused(roots: tuple[Path, Path, Path]) -> None:
    models, _, outside = roots
    assert_refused(str(models / ".." / "outside" / "secret.onnx"), [models])
    assert_refused("../outside/secret.onnx", [models])
    assert_refused("e5/../../outside/secret.onnx", [models])
    assert_refused(str(outside / "secret.onnx"), [models])
    assert_refused("/etc/passwd", [models])
    assert_refused(str(models.parent), [models])


def test_a_missing_file_outside_is_refused_without_saying_whether_it_exists(roots: tuple[Path, Path, Path]) -> None:
    models, _, outside = roots
    error = assert_refused(str(outside / "no-such.onnx"), [models])
    assert "does not exist" not in error.message


def test_symlink_out_of_a_root_is_refused(roots: tuple[Path, Path, Path]) -> None:
    models, _, outside = roots
    (models / "link.onnx").symlink_to(outside / "secret.onnx")
    (models / "linkdir").symlink_to(outside, target_is_directory=True)
    assert_refused(str(models / "link.onnx"), [models])
    assert_refused("link.onnx", [models])
    assert_refused(str(models / "linkdir" / "secret.onnx"), [models])


def test_symlink_within_the_roots_is_accepted(roots: tuple[Path, Path, Path]) -> None:
    models, more, _ = roots
    (models / "alias.json").symlink_to(more / "tok.json")
    assert resolve_model_path(str(models / "alias.json"), [models, more]) == more / "tok.json"
    assert_refused(str(models / "alias.json"), [models])  # leads into `more`, which is not a root here


def test_a_symlinked_root_is_compared_by_its_real_path(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    models, _, _ = roots
    (tmp_path / "models-link").symlink_to(models, target_is_directory=True)
    real = models / "e5" / "model.onnx"
    assert resolve_model_path(str(real), [tmp_path / "models-link"]) == real
    assert resolve_model_path(str(tmp_path / "models-link" / "e5" / "model.onnx"), [models]) == real


def test_missing_file_inside_a_root(roots: tuple[Path, Path, Path]) -> None:
    models, _, _ = roots
    with raises("58P01") as info:
        resolve_model_path(str(models / "nope.onnx"), [models])
    assert "does not exist" in info.value.message
    assert resolve_model_path(str(models / "nope.onnx"), [models], must_exist=False) == models / "nope.onnx"


def test_no_roots_or_no_path(roots: tuple[Path, Path, Path]) -> None:
    models, _, _ = roots
    with raises("42501") as info:
        resolve_model_path(str(models / "e5" / "model.onnx"), [])
    assert "no model roots" in info.value.message
    for bad in ("", "   ", "a\x00b"):
        with raises("22023"):
            resolve_model_path(bad, [models])
