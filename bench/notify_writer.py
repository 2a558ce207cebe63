"""The other process of the NOTIFY-hop benchmark: add memories one at a time.

``python -m bench.notify_writer DSN USER COUNT`` prints one JSON line per
memory: its id and CLOCK_MONOTONIC just before its transaction commits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.harness import bench_settings
from engine import event_loop
from engine.db import Database
from engine.store import Store

SPACING_S = 0.005  # one change at a time: the hop, not a burst's queueing


async def main(dsn: str, user_id: str, count: int) -> None:
    settings = bench_settings(dsn, model={"provider": "offline"})
    db = await Database.open(settings)
    store = Store(db, settings.limits)
    try:
        for n in range(count):
            async with store.scope(user_id) as s:
                memory = await s.add_memory(f"Hop fact number {n}", actor="user")
                before_commit = time.monotonic()
            assert memory is not None
            print(json.dumps({"memory_id": str(memory.memory_id), "before_commit": before_commit}))
            await asyncio.sleep(SPACING_S)
    finally:
        await db.close()


if __name__ == "__main__":
    event_loop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
