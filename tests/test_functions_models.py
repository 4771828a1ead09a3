"""Model lifecycle, timeouts, cancel and durable settings through the proxy."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from inference import EmbeddingEngine, build_hf_dir, load_model_dir
from proxy import protocol as pg_protocol
from proxy.intercept.arrays import format_text_array

from . import test_inference_fixtures as shared
from .helpers_embeddings import assert_same_embeddings
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient
from .test_functions_simple import MODEL
from .test_inference_quantize import with_outlier_weights

minilm_dir = shared.minilm_dir  # session fixture: all-MiniLM-L6-v2 as safetensors


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture()
def conn(proxy: ProxyProcess):
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


def test_register_use_and_unregister_a_second_model(conn, model_data_dir: Path, minilm_dir: Path) -> None:
    target = model_data_dir / "models" / f"minilm-{uuid.uuid4().hex[:6]}"
    build_hf_dir(minilm_dir, target)
    uri = f"minilm-test:{target.name}"
    (model_id,) = conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [uri, str(target)]).fetchone()
    assert model_id > 1
    (metadata,) = conn.execute("SELECT azure_local_ai.model_metadata(%s)", [uri]).fetchone()
    assert (metadata["model_uri"], metadata["dimensions"], metadata["builtin"], metadata["id"]) == (
        uri, 384, False, model_id)
    (vector,) = conn.execute("SELECT azure_local_ai.create_embeddings(%s, 'a sentence to embed')", [uri]).fetchone()
    engine = EmbeddingEngine()
    try:
        expected = engine.embed_sync(load_model_dir(target, uri=uri), ["a sentence to embed"])[0]
    finally:
        engine.close_sync()
    assert_same_embeddings(vector, expected)
    assert conn.execute("SELECT azure_local_ai.model_loaded(%s)", [uri]).fetchone() == (True,)
    conn.execute("SELECT azure_local_ai.model_unload(%s)", [uri])
    assert conn.execute("SELECT azure_local_ai.model_loaded(%s)", [uri]).fetchone() == (False,)
    with pytest.raises(psycopg.errors.DuplicateObject):
        conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [uri, str(target)])
    conn.execute("SELECT azure_local_ai.model_unregister(%s)", [uri])
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute("SELECT azure_local_ai.create_embeddings(%s, 'x')", [uri])


def test_a_float_model_registered_with_integer_weights(conn, model_data_dir: Path, minilm_dir: Path) -> None:
    """'q8:' asks for 8-bit weights: the model's vectors change a little, the choice shows in its
    metadata and holds when the model loads again; without the prefix nothing is quantised."""
    target = model_data_dir / "models" / f"minilm-{uuid.uuid4().hex[:6]}"
    build_hf_dir(minilm_dir, target)
    as_is, built = f"minilm-float:{target.name}", f"minilm-q8:{target.name}"
    conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [as_is, str(target)])
    conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [built, f"q8:{target}"])
    # 4 bits cost this model more than the check accepts, on its long texts (tests/test_inference_quantize.py)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"loses too much as q4: .* lowest 0\.8"):
        conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [f"minilm-q4:{target.name}", f"q4:{target}"])
    metadata = {uri: conn.execute("SELECT azure_local_ai.model_metadata(%s)", [uri]).fetchone()[0]
                for uri in (as_is, built)}
    assert "weights" not in metadata[as_is] and metadata[built]["weights"] == "q8"
    assert list((model_data_dir / "builds").glob("*-q8-*.onnx"))  # kept for the next load (buildcache.py)
    assert metadata[built]["model_path"] == f"q8:{metadata[as_is]['model_path']}"

    def vectors(uri: str, texts: list[str]) -> np.ndarray:
        return np.array([conn.execute("SELECT azure_local_ai.create_embeddings(%s, %s)", [uri, text]).fetchone()[0]
                         for text in texts])

    def assert_built(texts: list[str]) -> None:
        floats, integers = vectors(as_is, texts), vectors(built, texts)
        similarity = (floats * integers).sum(axis=1) / np.linalg.norm(floats, axis=1) / np.linalg.norm(integers, axis=1)
        assert similarity.min() > 0.999 and not np.array_equal(floats, integers)

    assert_built(["a sentence to embed", "Die Zugspitze ist der höchste Berg Deutschlands.", "东京是日本的首都"])
    conn.execute("SELECT azure_local_ai.model_unload(%s)", [built])
    assert_built(["texts new to the cache", "loaded again from the catalog: as q8 again"])
    for uri in (as_is, built):
        conn.execute("SELECT azure_local_ai.model_unregister(%s)", [uri])


def test_an_integer_build_that_breaks_the_model_is_refused(conn, model_data_dir: Path, minilm_dir: Path,
                                                           tmp_path: Path) -> None:
    built = load_model_dir(build_hf_dir(minilm_dir, tmp_path / "minilm"))
    target = with_outlier_weights(built, model_data_dir / "models" / f"outliers-{uuid.uuid4().hex[:6]}")
    uri = f"outliers:{target.name}"
    refused = r"loses too much as q4: .* lowest 0\.[0-8]"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=refused) as caught:
        conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [uri, f"q4:{target}"])
    assert "q8:" in caught.value.diag.message_hint
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute("SELECT azure_local_ai.model_metadata(%s)", [uri])
    conn.execute("SELECT azure_local_ai.model_register(%s, %s)", [uri, f"q8:{target}"])
    conn.execute("SELECT azure_local_ai.model_unregister(%s)", [uri])


def test_model_paths_must_stay_under_the_roots(conn, model_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="models"):
        conn.execute("SELECT azure_local_ai.model_register('x:1', %s)", [str(tmp_path)])
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="models"):
        conn.execute("SELECT azure_local_ai.model_register('x:1', %s)", [f"q4:{tmp_path}"])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not one a remote pool does"):
        conn.execute("SELECT azure_local_ai.model_register('x:1', 'q4:remote:pool')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT azure_local_ai.model_register('x:1', %s)",
                     [str(model_data_dir / "models" / ".." / "..")])
    escape = model_data_dir / "models" / f"link-{uuid.uuid4().hex[:6]}"
    escape.symlink_to(tmp_path)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT azure_local_ai.model_register('x:1', %s)", [str(escape)])
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"SELECT azure_local_ai.model_unregister('{MODEL}')")


def test_unload_frees_memory(pg: PgCluster, model_data_dir: Path) -> None:
    own = start_proxy(model_data_dir, upstream=pg.url())
    try:
        with psycopg.connect(own.dsn(), autocommit=True) as c:
            before = rss_kib(own.proc.pid)
            c.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'load me')")
            loaded = rss_kib(own.proc.pid)
            c.execute(f"SELECT azure_local_ai.model_unload('{MODEL}')")
            unloaded = rss_kib(own.proc.pid)
            assert c.execute(f"SELECT azure_local_ai.model_loaded('{MODEL}')").fetchone() == (False,)
        print(f"proxy RSS: {before} KiB idle, {loaded} KiB with the model, {unloaded} KiB after model_unload")
        assert loaded - before > 40_000
        assert loaded - unloaded > (loaded - before) * 0.6
    finally:
        own.stop()


def test_timeout_ms(conn) -> None:
    texts = [f"passage: a long enough text number {i} " * 20 for i in range(400)]
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled, match="100 ms"):
        conn.execute("SELECT count(*) FROM azure_local_ai.create_embeddings(%s, %s::text[], timeout_ms => 100)",
                     [MODEL, texts])
    assert time.monotonic() - started < 10
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_request_stops_local_work(conn) -> None:
    texts = [f"passage: another long text number {i} " * 20 for i in range(2000)]
    timer = threading.Timer(0.5, conn.cancel)
    started = time.monotonic()
    timer.start()
    with pytest.raises(psycopg.errors.QueryCanceled):
        # text[]: psycopg sends a list of str untyped, which the server reads as one text (the array's)
        conn.execute("SELECT count(*) FROM azure_local_ai.create_embeddings(%s, %s::text[])", [MODEL, texts])
    assert time.monotonic() - started < 10
    assert conn.execute("SELECT 2").fetchone() == (2,)


def test_settings_survive_a_restart(pg: PgCluster, model_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(model_data_dir / "models")
    first = start_proxy(data, upstream=pg.url())
    try:
        with psycopg.connect(first.dsn(), autocommit=True) as c:
            c.execute("SELECT azure_local_ai.set_setting('intra_op_parallelism', '1')")
    finally:
        first.stop()
    second = start_proxy(data, upstream=pg.url())
    try:
        with psycopg.connect(second.dsn(), autocommit=True) as c:
            assert c.execute("SELECT azure_local_ai.get_setting('intra_op_parallelism')").fetchone() == ("1",)
            (vector,) = c.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'x')").fetchone()
            assert len(vector) == 384
    finally:
        second.stop()


def proxy_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_client_leaving_mid_call_costs_nothing_further(proxy: ProxyProcess) -> None:
    texts = [f"passage: a text nobody will wait for, number {i} " * 15 for i in range(3000)]
    client = RawClient(proxy.port)
    client.login()
    sql = f"SELECT count(*) FROM azure_local_ai.create_embeddings('{MODEL}', '{format_text_array(texts)}'::text[])"
    client.send(pg_protocol.message(pg_protocol.QUERY, sql.encode() + b"\0"))
    time.sleep(1.5)  # the engine is busy with it now
    busy_from = proxy_cpu_seconds(proxy.proc.pid)
    time.sleep(1.0)
    busy = proxy_cpu_seconds(proxy.proc.pid) - busy_from
    client.close()
    # The model run in progress finishes (one run is at most max_batch_tokens: about a second, a few on
    # a loaded machine, where the engine's threads yield to others); the queued rest of the 3000 texts,
    # some 40 s of work, must be dropped: the CPU goes quiet long before that.
    assert busy > 0.5, f"the call did not keep the engine busy ({busy:.2f} s of CPU in 1 s)"
    windows = []
    for _ in range(20):
        idle_from = proxy_cpu_seconds(proxy.proc.pid)
        time.sleep(0.5)
        windows.append(proxy_cpu_seconds(proxy.proc.pid) - idle_from)
        if windows[-1] < busy / 8:
            break
    assert windows[-1] < busy / 8, f"work went on after the client left: CPU s per 0.5 s {windows} (busy: {busy:.2f}/s)"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_official_variant_is_the_fetched_export(pg: PgCluster, model_data_dir: Path, tmp_path: Path) -> None:
    """`model_variant = official` serves the export `models fetch` downloads (a model directory under
    the data directory; here a copy of our own build stands in for it, as no model hub is reachable),
    and says how to get it when it is not there, without stopping the proxy."""
    import shutil

    from inference.build import builtin_dir
    from inference.fetch import fetched_dir

    data_dir = tmp_path / "official"
    proxy = start_proxy(data_dir, "--model-variant", "official", upstream=pg.url(), preload=True)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="models fetch"):
                conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'x')")
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        proxy.stop()
    shutil.copytree(builtin_dir(model_data_dir), fetched_dir(data_dir))
    proxy = start_proxy(data_dir, "--model-variant", "official", upstream=pg.url(), preload=True)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            (vector,) = conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'x')").fetchone()
            metadata = conn.execute(f"SELECT azure_local_ai.model_metadata('{MODEL}')").fetchone()[0]
        assert len(vector) == 384 and str(fetched_dir(data_dir)) in str(metadata)
    finally:
        proxy.stop()
