"""Where the acquire benchmark and the database run: on CPUs of their own.

On a small machine the scheduler places each database connection's server process
(PostgreSQL) or thread (MariaDB) next to the client or on another CPU, connection by
connection, and a round trip differs by tens of microseconds between the two: more
than the library adds. So for the acquire benchmark the client runs on the first
CPU and a local server on the others, and every contender meets the same placement.
The servers' own CPU sets are restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

from ._backends import Backend

_LOCAL = ("127.0.0.1", "localhost", "::1", None, "")


def _tasks(pid: int) -> list[int]:
    """The threads of process ``pid``."""
    return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _named(command: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == command:
                    found.append(int(entry.name))
    return found


def server_tasks(backend: Backend) -> list[int]:
    """The threads and processes of ``backend``'s server, if it runs on this machine."""
    if backend.name == "sqlite" or make_url(backend.url).host not in _LOCAL:
        return []
    if backend.name == "postgresql":
        parents = [pid for pid in _named("postgres") if pid not in _all_children("postgres")]
        return [t for pid in parents for t in [pid, *_children(pid)]]
    return [t for pid in _named("mariadbd") + _named("mysqld") for t in _tasks(pid)]


def _all_children(command: str) -> set[int]:
    pids = _named(command)
    return {child for pid in pids for child in _children(pid) if child in pids}


@contextlib.contextmanager
def placed(backend: Backend) -> Iterator[str]:
    """Run this process on one CPU and ``backend``'s local server on the others; yields
    a line for the report saying what was done."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield "placement: one CPU only, left as it is"
        return
    client, server = {cpus[0]}, set(cpus[1:])
    moved: dict[int, set[int]] = {}
    ours = _tasks(os.getpid())  # the driver threads (aiosqlite) too
    try:
        for task, cpu_set in [(t, client) for t in ours] + [
            (t, server) for t in server_tasks(backend)
        ]:
            with contextlib.suppress(OSError):
                mask = os.sched_getaffinity(task)
                os.sched_setaffinity(task, cpu_set)
                moved[task] = mask
        servers = len(moved) - len(ours)
        where = f"server on CPU {sorted(server)}" if servers > 0 else "no server process moved"
        yield f"benchmark on CPU {cpus[0]}, {where}"
    finally:
        for task, mask in moved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(task, mask)
