"""Flush 4 KiB to disk every ``interval`` seconds until stdin closes; print the spans.

Run as a script of its own (``python _disk_probe.py DIR INTERVAL``) by ``prune.DiskProbe``,
in a process of its own, so that nothing the benchmark's process does can hold it up.
It rewrites one 4 KiB block of a new file in ``DIR`` and ``fsync``s it, then waits
``INTERVAL`` or until stdin reaches its end, whichever comes first. At the end it
prints every flush as ``[start, end]`` in ``time.perf_counter_ns()`` (the system's
monotonic clock, which the benchmark's process reads too), as one JSON list. The
file is removed from its folder as soon as it is open, so that nothing is left
behind even when the process is killed. It imports nothing from the project.
"""

from __future__ import annotations

import json
import os
import select
import sys
import tempfile
import time

BLOCK = 4096


def main(directory: str, interval: float) -> None:
    fd, path = tempfile.mkstemp(prefix="aiocronlock-disk-probe-", dir=directory)
    os.unlink(path)  # written and flushed all the same, through fd
    spans: list[tuple[int, int]] = []
    try:
        block = os.urandom(BLOCK)
        while True:
            started = time.perf_counter_ns()
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            spans.append((started, time.perf_counter_ns()))
            readable, _, _ = select.select([sys.stdin], [], [], interval)
            if readable and not os.read(sys.stdin.fileno(), 1):
                break
    finally:
        os.close(fd)
    json.dump(spans, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
