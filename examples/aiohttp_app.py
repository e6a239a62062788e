"""An aiohttp app whose replicas share a job: each tick runs on one replica only.

Prerequisites: ``pip install 'aiocronlock[sqlite]' aiohttp`` (``[postgres]`` or
``[mysql]`` for a server). Run one or more replicas, each on its own port::

    AIOCRONLOCK_EXAMPLE_PORT=8080 python examples/aiohttp_app.py
    AIOCRONLOCK_EXAMPLE_PORT=8081 python examples/aiohttp_app.py

Each second one replica prints ``ran aiohttp-report tick=<ISO UTC> worker=<name>``;
``GET /runs`` on any of them returns the latest runs as JSON (``?job=`` and ``?limit=``
narrow it). Stop with Ctrl-C or SIGTERM: aiohttp runs the cleanup context's exit, which
lets a run in progress finish.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_WORKER`` (default ``<hostname>:<pid>``), ``AIOCRONLOCK_EXAMPLE_PORT``
(default 8080), ``AIOCRONLOCK_EXAMPLE_SECONDS`` (send ourselves SIGTERM after that many
seconds).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from aiohttp import web

from aiocronlock import AsyncDBLocker, JobRun, Scheduler, current_lock

JOB_NAME = "aiohttp-report"
LOCKER = web.AppKey("locker", AsyncDBLocker)


async def report() -> None:
    lock = current_lock()
    print(f"ran {JOB_NAME} tick={lock.run_time.isoformat()} worker={lock.worker}", flush=True)


async def scheduled_jobs(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the locker and the scheduler live as long as the app."""
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
        app[LOCKER] = locker
        yield
    # Here the scheduler has stopped (runs in progress finished) and the locker is closed.


async def runs(request: web.Request) -> web.Response:
    """``GET /runs?job=...&limit=...``: the latest runs on every replica, newest first."""
    job = request.query.get("job") or None
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise web.HTTPBadRequest(text="limit must be an integer") from None
    if not 1 <= limit <= 500:
        raise web.HTTPBadRequest(text="limit must be between 1 and 500")
    try:
        history = await request.app[LOCKER].history(job, limit=limit)
    except ValueError as error:  # a job name the table cannot hold
        raise web.HTTPBadRequest(text=str(error)) from None
    return web.json_response([as_json(run) for run in history])


def as_json(run: JobRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "job_name": run.job_name,
        "identifier": run.identifier,
        "worker": run.worker,
        "status": run.status,
        "started_at": run.started_at.isoformat(),
        "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
    }


def create_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(scheduled_jobs)
    app.router.add_get("/runs", runs)
    return app


if __name__ == "__main__":
    web.run_app(create_app(), port=int(os.environ.get("AIOCRONLOCK_EXAMPLE_PORT", "8080")))
