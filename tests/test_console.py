"""The admin console and configuration reload, on the proxy as users run it (its CLI in a process of
its own) in front of a real PostgreSQL, read with psql and asyncpg."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import asyncpg
import pytest
import trustme

from proxy import messages
from proxy import protocol as pg

from .conftest import SCRAM_PASSWORD
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient

CONSOLE = "azure_local_ai_proxy"
OPS, APP = "console_ops", "console_app"  # an admin_users login, and a login that is not one (neither superuser)


@pytest.fixture(scope="module")
def roles(pg: PgCluster) -> None:
    for role in (OPS, APP):
        pg.psql(f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")


def start(pg: PgCluster, directory: Path, config: str = "", *args: str) -> ProxyProcess:
    """A proxy in front of `pg` reading `config` (TOML) from a file it can be told to read again."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "proxy.toml"
    path.write_text(config)
    return start_proxy(directory, "--config", str(path), *args, upstream=pg.url())


@pytest.fixture(scope="module")
def listed(pg: PgCluster, roles: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose admin_users lists OPS and scram_user."""
    running = start(pg, tmp_path_factory.mktemp("console"), f'[admin]\nadmin_users = "{OPS}, scram_user"\n')
    yield running
    running.stop()


@pytest.fixture
def fresh(pg: PgCluster, roles: None, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy of this test's own (its configuration gets changed), with the default admin access."""
    running = start(pg, tmp_path)
    yield running
    running.stop()


def console(proxy: ProxyProcess, user: str = OPS, password: str | None = None) -> str:
    return proxy.dsn(user=user, password=password, database=CONSOLE)


def table(proxy: ProxyProcess, command: str, user: str = OPS) -> list[list[str]]:
    """psql's unaligned, tuples-only output of one console command, split into rows and columns."""
    out = proxy.psql("-A", "-t", "-F", "\t", "-c", command, dsn=console(proxy, user))
    return [line.split("\t") for line in out.stdout.splitlines()]


def frame(msg_type: int, body: bytes = b"") -> bytes:
    return pg.message(msg_type, body)


def write_config(proxy: ProxyProcess, text: str) -> None:
    (proxy.log_path.parent / "proxy.toml").write_text(text)


def wait_for_log(proxy: ProxyProcess, pattern: str, count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, proxy.log)) < count:
        assert time.monotonic() < deadline, f"{pattern!r} not logged {count} times:\n{proxy.log}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- SHOW


async def test_show_sessions_lists_a_live_session_as_the_server_sees_it(listed: ProxyProcess) -> None:
    app = await asyncpg.connect(listed.dsn(), server_settings={"application_name": "console-watched"})
    try:
        pid = await app.fetchval("SELECT pg_backend_pid()")
        rows = await asyncio.to_thread(table, listed, "SHOW SESSIONS")
        mine = [row for row in rows if row[3] == "console-watched"]
        assert len(mine) == 1
        session, user, database, _, address, connected_at, state, backend_pid = mine[0]
        assert (user, database, state, backend_pid) == ("postgres", "postgres", "idle", str(pid))
        assert re.fullmatch(r"[0-9a-f]{8}", session) and address.startswith("127.0.0.1:")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", connected_at)
        async with app.transaction():
            await app.execute("SELECT 1")
            rows = await asyncio.to_thread(table, listed, "SHOW CLIENTS")
            assert [r[6] for r in rows if r[3] == "console-watched"] == ["idle in transaction"]
    finally:
        await app.close()
    rows = await asyncio.to_thread(table, listed, "SHOW SESSIONS")
    assert not [row for row in rows if row[3] == "console-watched"]


def test_show_stats_counts_sessions_and_bytes(listed: ProxyProcess) -> None:
    before = dict(table(listed, "SHOW STATS"))
    listed.psql("-c", "SELECT 1")
    after = dict(table(listed, "SHOW STATS"))
    assert int(after["sessions_total"]) == int(before["sessions_total"]) + 1
    assert int(after["bytes_from_server"]) > int(before["bytes_from_server"])
    assert after["paused"] == "no" and int(after["uptime_seconds"]) >= 0
    assert {"embedded_texts", "engine_queue_depth", "upstream_connect_failures", "cache_hits"} <= set(after)


def test_show_version_models_config_and_help(listed: ProxyProcess) -> None:
    assert table(listed, "SHOW VERSION") == [[f"azure-local-ai-proxy {version('azure-local-ai-proxy')}"]]
    models = table(listed, "show models")
    assert models[0][:6] == ["multilingual-e5-small:v1", "yes", "no", "local", "384", "512"]
    config = {row[0]: row[1:] for row in table(listed, "SHOW CONFIG;")}
    assert config["admin_users"] == [f"{OPS}, scram_user", "", "yes"]
    assert config["listen"] == [f"127.0.0.1:{listed.port}", "127.0.0.1:6432", "no"]
    assert config["admin_database"] == [CONSOLE, CONSOLE, "yes"]
    commands = [row[0] for row in table(listed, "SHOW HELP")]
    assert {"SHOW STATS", "SHOW SESSIONS", "RELOAD", "PAUSE", "RESUME"} <= set(commands)


def test_psql_shows_errors_and_the_session_goes_on(listed: ProxyProcess) -> None:
    out = listed.psql("-v", "ON_ERROR_STOP=0", "-c", "SELECT 1", "-c", "SHOW nonsense", "-c", "SHOW VERSION",
                      dsn=console(listed))
    assert "ERROR:  the admin console does not run SELECT statements" in out.stderr
    assert 'ERROR:  unrecognized SHOW item "nonsense"' in out.stderr
    assert "azure-local-ai-proxy " in out.stdout


async def test_asyncpg_reads_the_console_over_the_extended_protocol(listed: ProxyProcess) -> None:
    conn = await asyncpg.connect(console(listed))
    try:
        stats = {r["stat"]: r["value"] for r in await conn.fetch("SHOW STATS")}
        assert int(stats["sessions_now"]) >= 0
        statement = await conn.prepare("SHOW SESSIONS")
        assert [a.name for a in statement.get_attributes()] == [
            "session", "user", "database", "application_name", "client_addr", "connected_at", "state", "backend_pid"]
        assert {a.type.name for a in statement.get_attributes()} == {"text"}
        await statement.fetch()
        assert await conn.fetchval("SHOW VERSION") == f"azure-local-ai-proxy {version('azure-local-ai-proxy')}"
        for command, error in [("SELECT 1", asyncpg.FeatureNotSupportedError),
                               ("SHOW", asyncpg.PostgresSyntaxError),
                               ("SHOW STATS extra", asyncpg.PostgresSyntaxError),
                               ("SHOW nonsense", asyncpg.UndefinedObjectError)]:
            with pytest.raises(error):
                await conn.fetch(command)  # extended protocol
            with pytest.raises(error):
                await conn.execute(command)  # simple protocol
        with pytest.raises(asyncpg.PostgresSyntaxError, match="multiple commands"):
            await conn.fetch("SHOW STATS; SHOW VERSION")
        assert await conn.execute("SHOW STATS; SHOW VERSION") == "SHOW"  # the simple protocol runs both
        assert await conn.fetchval("SHOW VERSION")  # and the session is still fine
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------- who may log in


async def test_a_login_not_in_admin_users_is_refused(listed: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f'"{APP}" is not in admin_users'):
        await asyncpg.connect(console(listed, APP))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(console(listed, "postgres"))  # a superuser too, once admin_users is set
    out = await asyncio.to_thread(listed.psql, "-c", "SHOW STATS", dsn=console(listed, APP), check=False)
    assert out.returncode != 0 and "FATAL:  permission denied for the admin console" in out.stderr
    assert "sqlstate=42501" in listed.log


async def test_the_server_checks_an_admins_password(listed: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(console(listed, "scram_user", "wrong"))
    conn = await asyncpg.connect(console(listed, "scram_user", SCRAM_PASSWORD))
    try:
        assert await conn.fetchval("SHOW VERSION")
    finally:
        await conn.close()


async def test_by_default_superusers_may_on_a_loopback_listener(fresh: ProxyProcess) -> None:
    conn = await asyncpg.connect(console(fresh, "postgres"))
    try:
        assert await conn.fetchval("SHOW VERSION")
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is not a superuser"):
        await asyncpg.connect(console(fresh, APP))


# ---------------------------------------------------------------------------------------------- reload


def _startup_timed_out_after(port: int) -> tuple[float, bytes]:
    """Connect and send nothing: how long until the proxy gives up on the start-up, and what it says."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return time.monotonic() - started, data


async def test_sighup_changes_log_level_and_a_timeout_and_sessions_stay(fresh: ProxyProcess) -> None:
    kept = await asyncpg.connect(fresh.dsn())
    try:
        pid = await kept.fetchval("SELECT pg_backend_pid()")
        write_config(fresh, '[proxy]\nlog_level = "warning"\nstartup_timeout = 1.0\n[engine]\ncache_mb = 16\n')
        fresh.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_for_log, fresh, "event=reload ")
        log = fresh.log
        assert "changed=startup_timeout,log_level" in log
        assert re.search(r"level=warning .*event=reload_needs_restart option=cache_mb", log)
        assert await kept.fetchval("SELECT pg_backend_pid()") == pid  # the same session, still served
        elapsed, said = await asyncio.to_thread(_startup_timed_out_after, fresh.port)
        assert elapsed < 5 and b"start-up did not complete within 1 seconds" in said
        connects = fresh.log.count("event=connect ")
        await (await asyncpg.connect(fresh.dsn())).close()
        assert fresh.log.count("event=connect ") == connects  # info lines are no longer written
        config = {row[0]: row[1] for row in await asyncio.to_thread(table, fresh, "SHOW CONFIG", "postgres")}
        assert (config["log_level"], config["startup_timeout"], config["cache_mb"]) == ("warning", "1.0", "64")
        assert await kept.fetchval("SELECT 1") == 1
    finally:
        await kept.close()


async def test_reload_from_the_console_applies_idle_timeout_to_live_sessions(fresh: ProxyProcess) -> None:
    idle = await asyncpg.connect(fresh.dsn())
    try:
        write_config(fresh, "[proxy]\nidle_timeout = 1.0\n")
        out = await asyncio.to_thread(fresh.psql, "-c", "RELOAD", dsn=console(fresh, "postgres"))
        assert out.stdout.strip() == "RELOAD" and "NOTICE:  changed: idle_timeout" in out.stderr
        await asyncio.sleep(2.5)
        assert idle.is_closed()  # the proxy ended it (57P05), and asyncpg read that at once
        assert "event=idle_timeout" in fresh.log
    finally:
        await idle.close()


async def test_a_wrong_configuration_is_not_reloaded(fresh: ProxyProcess) -> None:
    write_config(fresh, '[proxy]\nidle_timeout = "soon"\n')
    conn = await asyncpg.connect(console(fresh, "postgres"))
    try:
        with pytest.raises(asyncpg.ConfigFileError, match=r"the configuration was not reloaded: .*expected float"):
            await conn.execute("RELOAD")
        write_config(fresh, '[proxy]\nlisten = "127.0.0.1:1"\nshutdown_grace = 5\n[engine]\nmodel_variant = "fp32"\n')
        notices: list[str] = []
        conn.add_log_listener(lambda _, message: notices.append(message.message))
        assert await conn.execute("RELOAD") == "RELOAD"
        await asyncio.sleep(0.2)  # notices arrive with the answer; the listener is called soon after
        assert notices == ["changed: shutdown_grace",
                           "model_variant changed, but takes effect only at a restart: the running value is kept"]
        config = {r["option"]: r["value"] for r in await conn.fetch("SHOW CONFIG")}
        assert (config["model_variant"], config["shutdown_grace"]) == ("q4", "5.0")
        assert config["listen"] == f"127.0.0.1:{fresh.port}"  # the --listen flag beats the file, as at start-up
    finally:
        await conn.close()
    assert "event=reload_failed" in fresh.log


# ---------------------------------------------------------------------------------------------- PAUSE / RESUME


async def test_pause_waits_for_running_queries_then_new_ones_wait_until_resume(fresh: ProxyProcess) -> None:
    busy = await asyncpg.connect(fresh.dsn())
    waiting = await asyncpg.connect(fresh.dsn())
    admin = await asyncpg.connect(console(fresh, "postgres"))
    try:
        running = asyncio.ensure_future(busy.fetchval("SELECT pg_sleep(1.5)"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        assert await admin.execute("PAUSE") == "PAUSE"
        assert time.monotonic() - started > 0.8 and running.done()  # PAUSE returned once that query ended
        later = asyncio.ensure_future(waiting.fetchval("SELECT 42"))
        await asyncio.sleep(1.0)
        assert not later.done()
        stats = {r["stat"]: r["value"] for r in await admin.fetch("SHOW STATS")}
        assert stats["paused"] == "yes"
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="paused already"):
            await admin.execute("PAUSE")
        assert await admin.execute("RESUME") == "RESUME"
        assert await asyncio.wait_for(later, 5) == 42
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="not paused"):
            await admin.execute("RESUME")
    finally:
        for conn in (busy, waiting, admin):
            await conn.close()


async def test_a_cancelled_pause_resumes(fresh: ProxyProcess) -> None:
    busy = await asyncpg.connect(fresh.dsn())
    admin = await asyncpg.connect(console(fresh, "postgres"))
    try:
        running = asyncio.ensure_future(busy.fetchval("SELECT pg_sleep(2)"))
        await asyncio.sleep(0.3)
        with pytest.raises(TimeoutError):
            await admin.execute("PAUSE", timeout=0.5)  # asyncpg sends a cancel request, then gives up
        stats = {r["stat"]: r["value"] for r in await admin.fetch("SHOW STATS")}
        assert stats["paused"] == "no"
        await running
        assert await busy.fetchval("SELECT 7") == 7
    finally:
        await busy.close()
        await admin.close()


async def test_sighup_reads_a_rotated_certificate_for_new_sessions(pg: PgCluster, tmp_path: Path) -> None:
    authorities = [trustme.CA(), trustme.CA()]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue(ca: trustme.CA) -> None:
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    def trusting(ca: trustme.CA) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    issue(authorities[0])
    proxy = start(pg, tmp_path, "", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        old = await asyncpg.connect(proxy.dsn(sslmode="verify-full"), ssl=trusting(authorities[0]))
        issue(authorities[1])
        proxy.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_for_log, proxy, "event=reload .*tls=re-read")
        new = await asyncpg.connect(proxy.dsn(sslmode="verify-full"), ssl=trusting(authorities[1]))
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncpg.connect(proxy.dsn(sslmode="verify-full"), ssl=trusting(authorities[0]))
        assert await old.fetchval("SELECT 1") == await new.fetchval("SELECT 1") == 1  # the old session stays
        await old.close()
        await new.close()
    finally:
        proxy.stop()


async def test_reload_changes_the_model_roots(pg: PgCluster, tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    root.mkdir()
    proxy = start(pg, tmp_path / "data", "", "--service-user", "postgres")
    try:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            register = "SELECT azure_local_ai.model_register('rooted:1', $1)"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(register, str(root))
            write_config(proxy, f'[proxy]\nmodel_roots = "{root}"\n')
            proxy.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_log, proxy, "event=reload .*changed=model_roots")
            with pytest.raises(asyncpg.InvalidParameterValueError):  # allowed now; but the directory holds no model
                await conn.fetchval(register, str(root))
        finally:
            await conn.close()
    finally:
        proxy.stop()


async def test_pause_lets_a_batch_in_progress_reach_its_sync(fresh: ProxyProcess) -> None:
    """A session cut off before its Sync would keep its batch in progress, and PAUSE waiting, for ever."""
    client = RawClient(fresh.port)
    admin = await asyncpg.connect(console(fresh, "postgres"))
    try:
        client.login()
        client.send(frame(pg.PARSE, messages.Parse("", "SELECT 1", ()).encode())
                    + frame(pg.BIND, messages.Bind("", "", (), (), ()).encode())
                    + frame(pg.EXECUTE, b"\0\0\0\0\0"))
        pause = asyncio.ensure_future(admin.execute("PAUSE"))
        await asyncio.sleep(0.5)
        assert not pause.done()  # the batch is in progress
        client.send(frame(pg.SYNC))
        answer = await asyncio.to_thread(client.read_until, b"Z")
        assert [kind for kind, _ in answer] == [b"1", b"2", b"D", b"C", b"Z"]
        assert await asyncio.wait_for(pause, 5) == "PAUSE"
        client.send(frame(pg.QUERY, b"SELECT 2\0"))
        client.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            client.read_message()  # paused: the query waits
        client.sock.settimeout(10)
        assert await admin.execute("RESUME") == "RESUME"
        rows = [body for kind, body in await asyncio.to_thread(client.read_until, b"Z") if kind == b"D"]
        assert [messages.parse_data_row(body) for body in rows] == [("2",)]
    finally:
        client.close()
        await admin.close()


def test_execute_with_max_rows_suspends_the_portal(listed: ProxyProcess) -> None:
    client = RawClient(listed.port)
    try:
        client.login(user=OPS, database=CONSOLE)
        client.send(frame(pg.PARSE, messages.Parse("help", "SHOW HELP", ()).encode())
                    + frame(pg.BIND, messages.Bind("", "help", (), (), (1,)).encode())
                    + frame(pg.DESCRIBE, b"P\0")
                    + frame(pg.EXECUTE, b"\0\0\0\0\x03") + frame(pg.EXECUTE, b"\0\0\0\0\0") + frame(pg.SYNC))
        kinds = [kind for kind, _ in client.read_until(b"Z")]
        assert kinds == [b"1", b"2", b"T", b"D", b"D", b"D", b"s", *[b"D"] * 8, b"C", b"Z"]  # SHOW HELP: 11 rows
        client.send(frame(pg.BIND, messages.Bind("", "nope", (), (), ()).encode()) + frame(pg.EXECUTE, b"\0\0\0\0\0")
                    + frame(pg.SYNC))
        answer = client.read_until(b"Z")
        assert [kind for kind, _ in answer] == [b"E", b"Z"]  # the Execute after the error is skipped
        assert pg.parse_fields(answer[0][1])["C"] == "26000"
    finally:
        client.close()
