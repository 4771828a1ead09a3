"""With no upstream configured, `serve` starts an embedded PostgreSQL with pgvector and says how to connect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from proxy.pgserver import SERVER_OS_USER, EmbeddedError, package_install, running_as_root, socket_directory

from .pgcluster import free_port, proxy_data_dir
from .proxyproc import PSQL, ProxyProcess, start_proxy
from .transcripts import transcript


def _wait_for_connect_line(proxy: ProxyProcess, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"psql '(postgresql://[^']+)'", proxy.log)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(proxy.log)


def test_embedded_default() -> None:
    """A first run: sessions are served at once; the built-in model is built before the connect line
    is printed, and a call that arrives during the build says why it waits."""
    with proxy_data_dir() as data_dir:
        _first_run(data_dir)


def _first_run(data_dir: Path) -> None:
    proxy = start_proxy(data_dir, upstream=None, preload=True)
    try:
        early = proxy.psql("-At", "-c", "select array_length(azure_local_ai.create_embeddings("
                           "'multilingual-e5-small:v1', 'query: first call'), 1)")
        assert early.stdout.strip() == "384"
        # The NOTICE docs/getting-started.md shows, word for word.
        assert transcript("warming-notice").strip() in early.stderr, early.stderr
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


def _modes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_mode & 0o7777 for path in paths}


def _ancestors(path: Path) -> list[Path]:
    return [path, *path.parents]


def test_the_embedded_server_changes_no_directory_it_did_not_make(model_data_dir: Path) -> None:
    """Under a private (0700) directory, as from mktemp -d: a proxy run as root says that the server's OS
    user cannot enter it and what to do; any other user's proxy starts its server there. Either way no
    directory above the data directory, nor of the installed package, changes mode."""
    private = Path(tempfile.mkdtemp(prefix="alp-private-"))
    try:
        data_dir = private / "data"
        data_dir.mkdir()
        (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
        watched = _ancestors(private) + _ancestors(package_install() / "bin")
        before = _modes(watched)
        port = free_port()
        command = [sys.executable, "-m", "proxy.cli", "serve", "--listen", f"127.0.0.1:{port}",
                   "--data-dir", str(data_dir), "--preload-model", "false"]
        if running_as_root():
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 1
            assert f"cannot enter {data_dir} ({private} is mode 700)" in done.stderr
            assert "data_dir" in done.stderr and "/var/lib/azure-local-ai-proxy" in done.stderr
            assert not (data_dir / "postgres").exists()
        else:
            proxy = start_proxy(data_dir, upstream=None)
            try:
                assert proxy.psql("-At", "-c", "select 1").stdout.strip() == "1"
            finally:
                assert proxy.stop() == 0
        assert _modes(watched) == before
    finally:
        shutil.rmtree(private)


def test_as_root_the_server_runs_as_its_own_os_user_from_its_own_copy(model_data_dir: Path) -> None:
    """A proxy run as root runs PostgreSQL as SERVER_OS_USER from DATA_DIR/pginstall (readable by that
    user, written only by root), the cluster owned by that user; as any other user, as that user from the
    package's own build."""
    with proxy_data_dir(model_data_dir) as data_dir:
        proxy = start_proxy(data_dir, upstream=None)
        try:
            pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
            postmaster = psutil.Process(pid)
            copy = data_dir / "pginstall"
            copied_install = copy / package_install().parent.name / "pginstall"
            if running_as_root():
                assert postmaster.username() == SERVER_OS_USER
                assert postmaster.exe() == str(copied_install / "bin" / "postgres")
                assert (data_dir / "postgres").owner() == SERVER_OS_USER
                assert copy.owner() == "root" and copy.stat().st_mode & 0o022 == 0
            else:
                assert postmaster.uids().real == os.geteuid()
                assert postmaster.exe() == str(package_install() / "bin" / "postgres")
                assert not copy.exists()
        finally:
            assert proxy.stop() == 0


def test_a_data_directory_too_deep_for_a_socket_gets_a_private_socket_directory(tmp_path: Path) -> None:
    """A Unix socket path is limited to 107 bytes: under a deeper PGDATA the socket goes to a directory of
    the system's temporary directory named after PGDATA, private to the server's user, and one that
    someone else made (or opened to others) there is refused, not used."""
    pgdata = tmp_path / ("d" * 120) / "postgres"
    chosen = socket_directory(pgdata, None)
    try:
        assert chosen.parent == Path(tempfile.gettempdir())
        assert chosen.stat().st_mode & 0o777 == 0o700 and chosen.owner() == psutil.Process().username()
        assert socket_directory(pgdata, None) == chosen
        chosen.chmod(0o777)
        with pytest.raises(EmbeddedError, match="not a private directory"):
            socket_directory(pgdata, None)
    finally:
        chosen.rmdir()
    assert socket_directory(tmp_path / "postgres", None) == tmp_path / "postgres"
