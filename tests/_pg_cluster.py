"""A throwaway PostgreSQL primary and streaming standby, from the installed binaries.

Both listen on free ports of 127.0.0.1 with trust authentication; their data lives in
a temporary folder removed by :meth:`Cluster.remove`. The server programs refuse to
run as root, so as root every command runs as the ``postgres`` OS user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Where the binaries are looked for: ``AIOCRONLOCK_PG_BINDIR``, else the newest
#: Debian/Ubuntu install.
ENV_BINDIR = "AIOCRONLOCK_PG_BINDIR"
_PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "psql")
#: Every command here is bounded by this (starting a server, a base backup...).
COMMAND_TIMEOUT_S = 60.0


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl, pg_basebackup and psql, if there is one."""
    candidates = [Path(os.environ[ENV_BINDIR])] if os.environ.get(ENV_BINDIR) else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = [p for p in root.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _PROGRAMS):
            return bindir
    return None


def why_unusable() -> str | None:
    """Why a cluster cannot be made here (binaries absent, no ``postgres`` user as
    root), or None."""
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup, psql) not found "
            f"under /usr/lib/postgresql/*/bin or ${ENV_BINDIR}"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root, and runuser (to run the server as 'postgres') is missing"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    port: int
    data: Path

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"


class Cluster:
    """A primary and a standby streaming from it, built by :meth:`create`."""

    def __init__(self, root: Path, bindir: Path, *, synchronous: bool) -> None:
        self.root = root
        self.bindir = bindir
        self.synchronous = synchronous
        self.primary = Server("primary", free_port(), root / "primary")
        self.standby = Server("standby", free_port(), root / "standby")
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @classmethod
    def create(cls, *, synchronous: bool, password: str) -> Cluster:
        """Start a primary with database ``test`` and role ``postgres`` (whose
        password becomes ``password``), and a standby streaming from it."""
        bindir = find_bindir()
        assert bindir is not None, why_unusable()
        root = Path(tempfile.mkdtemp(prefix="aiocronlock-failover-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        cluster = cls(root, bindir, synchronous=synchronous)
        try:
            cluster._start(password)
        except BaseException:
            cluster.remove()
            raise
        return cluster

    def _start(self, password: str) -> None:
        primary, standby = self.primary, self.standby
        self.run("initdb", "-D", str(primary.data), "-U", "postgres", "--auth=trust", "-N")
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {primary.port}",
            f"unix_socket_directories = '{self.root}'",
            "fsync = off",  # nothing here outlives the test
            "shared_buffers = 16MB",
            "max_connections = 50",
            "wal_level = replica",
        ]
        with (primary.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")
        self.run("pg_ctl", "-D", str(primary.data), "-l", str(primary.log), "-w", "start")
        # Through stdin, so that the password is on no command line.
        sql = f"CREATE DATABASE test;\nALTER ROLE postgres PASSWORD '{password}';\n"
        self.run(*self._psql(primary), "-v", "ON_ERROR_STOP=1", "-f", "-", stdin=sql)
        self.run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(standby.data), "-R", "-X", "stream", "-c", "fast"),
        )
        with (standby.data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {standby.port}\n")
        self.run("pg_ctl", "-D", str(standby.data), "-l", str(standby.log), "-w", "start")
        if self.synchronous:
            # Only now: until a standby streams, every commit would wait for one.
            # '*': any standby (its application_name is "walreceiver").
            sync = "ALTER SYSTEM SET synchronous_standby_names = '*'"
            self.run(*self._psql(primary), "-c", sync)
            self.run("pg_ctl", "-D", str(primary.data), "reload")
        self._wait_streaming()

    def _wait_streaming(self) -> None:
        """Until the primary sees its standby streaming (and as synchronous, if so)."""
        wanted = "sync" if self.synchronous else "async"
        query = "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while time.monotonic() < deadline:
            states = self.run(*self._psql(self.primary), "-tA", "-c", query).split()
            if wanted in states:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the standby was not streaming ({wanted}) after {COMMAND_TIMEOUT_S} s")

    def _psql(self, server: Server) -> list[str]:
        """psql on ``server``'s database ``postgres``."""
        return [
            *("psql", "-X", "-h", "127.0.0.1", "-p", str(server.port)),
            *("-U", "postgres", "-d", "postgres"),
        ]

    def run(self, program: str, *args: str, stdin: str | None = None) -> str:
        """Run one of the binaries as the server's user; its stdout. Fails with its
        stderr (which never holds the password: it is only ever sent on stdin)."""
        command = [*self._as_postgres, str(self.bindir / program), *args]
        done = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            cwd=self.root,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    async def arun(self, program: str, *args: str) -> None:
        """:meth:`run` without blocking the event loop."""
        await asyncio.to_thread(self.run, program, *args)

    async def kill_primary(self) -> None:
        """Stop the primary as a crash would: no checkpoint, connections cut."""
        await self.arun("pg_ctl", "-D", str(self.primary.data), "-m", "immediate", "stop")

    async def promote_standby(self) -> None:
        """Make the standby a primary; returns once it accepts writes."""
        await self.arun("pg_ctl", "-D", str(self.standby.data), "-w", "promote")

    def logs(self) -> str:
        return "".join(
            server.log.read_text(errors="replace")
            for server in (self.primary, self.standby)
            if server.log.exists()
        )

    def remove(self) -> None:
        """Stop whatever still runs and delete the data."""
        for server in (self.standby, self.primary):
            if (server.data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.run("pg_ctl", "-D", str(server.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
