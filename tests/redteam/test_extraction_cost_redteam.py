"""Red-team finding (MEDIUM): a hostile endpoint stalls the event loop with topics."""

from __future__ import annotations

import time

from engine.store import _clean_topics


def test_many_distinct_topics_are_cleaned_in_linear_time() -> None:
    """engine.store._clean_topics keeps every distinct topic in a list and tests
    `text not in cleaned` before cutting to MAX_TOPICS (10): quadratic. One add_memory
    call with 60,000 topics (600 kB) blocked `memchat chat` for 17 s of CPU; 20 calls
    per job (memory.max_calls_per_job) make minutes with the event loop blocked (every
    pane of the TUI, every job's lease heartbeat)."""
    topics = [f"t{i}" for i in range(30_000)]
    started = time.process_time()
    cleaned = _clean_topics(topics)
    took = time.process_time() - started
    assert len(cleaned) == 10
    assert took < 0.5, f"30,000 topics took {took:.1f}s of CPU"
