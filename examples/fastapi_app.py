"""A FastAPI app whose replicas share a job: each tick runs on one replica only.

Prerequisites: ``pip install 'aiocronlock[sqlite]' fastapi uvicorn`` (``[postgres]`` or
``[mysql]`` for a server). From the repository's root, run one or more replicas::

    uvicorn examples.fastapi_app:app --port 8000
    uvicorn examples.fastapi_app:app --port 8001

or ``python examples/fastapi_app.py``, which starts uvicorn itself on
``AIOCRONLOCK_EXAMPLE_PORT`` (default 8000). Each second one replica prints
``ran fastapi-report tick=<ISO UTC> worker=<name>``; ``GET /runs`` on any of them returns
the latest runs as JSON (``?job=`` and ``?limit=`` narrow it). Stop with Ctrl-C or
SIGTERM: uvicorn runs the lifespan's exit, which lets a run in progress finish.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_WORKER`` (default ``<hostname>:<pid>``), ``AIOCRONLOCK_EXAMPLE_SECONDS``
(send ourselves SIGTERM after that many seconds).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, TypedDict

from fastapi import FastAPI, Query, Request

from aiocronlock import AsyncDBLocker, JobRun, Scheduler, current_lock

JOB_NAME = "fastapi-report"


async def report() -> None:
    lock = current_lock()
    # flush: after its graceful shutdown, uvicorn re-raises SIGTERM, which ends the
    # process without flushing stdout.
    print(f"ran {JOB_NAME} tick={lock.run_time.isoformat()} worker={lock.worker}", flush=True)


class State(TypedDict):
    locker: AsyncDBLocker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[State]:
    locker = AsyncDBLocker(
        os.environ.get("AIOCRONLOCK_URL", "sqlite:///aiocronlock-example.db"),
        worker=os.environ.get("AIOCRONLOCK_WORKER"),
    )
    await locker.create_table()
    scheduler = Scheduler(locker)
    scheduler.add_job(report, timedelta(seconds=1), name=JOB_NAME)
    if seconds := os.environ.get("AIOCRONLOCK_EXAMPLE_SECONDS"):
        asyncio.get_running_loop().call_later(float(seconds), signal.raise_signal, signal.SIGTERM)
    async with locker, scheduler:
        yield {"locker": locker}
    # Here the scheduler has stopped (runs in progress finished) and the locker is closed.


app = FastAPI(title="aiocronlock example", lifespan=lifespan)


@app.get("/runs")
async def runs(
    request: Request,
    job: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> list[JobRun]:
    """The latest runs, on every replica, of one job or of all jobs; newest first."""
    locker: AsyncDBLocker = request.state.locker
    return await locker.history(job, limit=limit)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, port=int(os.environ.get("AIOCRONLOCK_EXAMPLE_PORT", "8000")))
