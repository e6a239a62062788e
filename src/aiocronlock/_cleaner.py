"""The background cleaner: prunes old rows every ``clean_interval``, on one instance.

Each interval is itself a tick of the reserved job ``aiocronlock.cleaner``, decided
through the same table, so with N instances one of them prunes per interval.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._identifiers import Precision

if TYPE_CHECKING:
    from ._locker import AsyncDBLocker

logger = logging.getLogger("aiocronlock.cleaner")

#: The job name under which cleaner ticks are recorded.
CLEAN_JOB_NAME = "aiocronlock.cleaner"


async def run_cleaner(locker: AsyncDBLocker, steps: Precision) -> None:
    """Prune at every multiple of ``steps.step`` since the epoch until cancelled.

    ``steps`` is also what names the cleaner's ticks (see ``_clean_tick``). A failed
    interval is logged and the loop waits for the next one: an outage never stops
    the cleaner, and never reaches the application.
    """
    interval = steps.step
    while True:
        tick = steps.truncate(locker.clock.now()) + interval
        await locker.clock.sleep_until(tick)
        locker._cleaner_idle.clear()  # aclose() lets this interval finish before cancelling
        try:
            deleted = await locker._clean_tick(tick)
        except Exception as error:
            logger.warning(
                "pruning for the tick at %s failed, next try in %s: %s",
                tick.isoformat(),
                interval,
                error,
            )
            continue
        finally:
            locker._cleaner_idle.set()
        if deleted is None:
            logger.debug("another worker prunes the tick at %s", tick.isoformat())
        else:
            logger.debug("pruned %d rows for the tick at %s", deleted, tick.isoformat())
