"""Background consolidation: a user past ``memory.optimize_threshold`` memories
gets ``memchat memory optimize`` run for them by the memory workers.

Bounded on purpose: one consolidation at a time per process, at most
:data:`MAX_WAITING` users waiting (more are skipped until their next job), and
a user is not considered again until they have a tenth of the threshold more
memories than the last run left (a model that merges nothing is not asked
again after every turn). Two processes may pick the same user; the second
finds its changes refused (the memories changed since it read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.consolidate import Consolidator
from engine.errors import MemchatError

log = logging.getLogger(__name__)

MAX_WAITING = 100


class OptimizePolicy:
    def __init__(self, consolidator: Consolidator, threshold: int) -> None:
        self.consolidator = consolidator
        self.threshold = threshold
        self._step = max(threshold // 10, 1)
        self._waiting: dict[str, int] = {}  # user -> memories counted, in arrival order
        self._floor: dict[str, int] = {}  # user -> count below which no new run
        self._task: asyncio.Task[None] | None = None

    def consider(self, user_id: str, memory_count: int) -> bool:
        """After a job of ``user_id`` left ``memory_count`` memories; True if a run is queued."""
        if not self.threshold or memory_count <= self.threshold:
            return False
        if memory_count < self._floor.get(user_id, 0) or user_id in self._waiting:
            return False
        if len(self._waiting) >= MAX_WAITING:
            return False
        self._waiting[user_id] = memory_count
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="memory-optimize")
        return True

    async def wait_idle(self) -> None:
        """Until every queued consolidation has run (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Cancel a running consolidation: its transaction rolls back, nothing half-applied."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._waiting.clear()

    async def _drain(self) -> None:
        while self._waiting:
            user_id, counted = next(iter(self._waiting.items()))
            left = counted
            try:
                result = await self.consolidator.run(user_id)
                left = result.after
                log.info("background optimize: %s", result.summary())
                if result.rejected:
                    log.info("background optimize of %s refused: %s", user_id, result.rejected)
            except MemchatError as exc:
                log.warning("background optimize of %s failed: %s", user_id, exc.message)
            except Exception:
                log.exception("background optimize of %s failed unexpectedly", user_id)
            finally:
                self._waiting.pop(user_id, None)
            self._floor[user_id] = max(left, self.threshold) + self._step
