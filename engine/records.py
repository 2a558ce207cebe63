"""Plain, immutable rows handed out by the store. No behaviour, no database handles."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

MessageRole = Literal["user", "assistant"]
MessageStatus = Literal["complete", "failed", "cancelled"]
MemoryOp = Literal["add", "update", "delete"]
JobStatus = Literal["pending", "running", "done", "failed"]

MEMORY_OPS: tuple[MemoryOp, ...] = get_args(MemoryOp)
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    display_name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Session:
    session_id: uuid.UUID
    user_id: str
    title: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    message_id: int
    session_id: uuid.UUID
    user_id: str
    role: MessageRole
    content: str
    status: MessageStatus
    error: str | None
    created_at: datetime
    prompt_tokens: int | None = None
    """Tokens the model counted for the prompt of this reply, when the endpoint said."""
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Memory:
    memory_id: uuid.UUID
    user_id: str
    content: str
    topics: tuple[str, ...]
    source_session_id: uuid.UUID | None
    source_message_id: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class MemoryEvent:
    event_id: int
    memory_id: uuid.UUID
    user_id: str
    op: MemoryOp
    before: str | None
    after: str | None
    job_id: int | None
    source_message_id: int | None
    actor: str
    at: datetime


@dataclass(frozen=True, slots=True)
class MemoryJob:
    job_id: int
    user_id: str
    session_id: uuid.UUID | None
    user_message_id: int | None
    assistant_message_id: int | None
    status: JobStatus
    attempts: int
    run_after: datetime
    lease_until: datetime | None
    worker: str | None
    last_error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    note: str | None = None
    """What a job that ran has to say besides failing: refused changes, an unusable answer."""
    extraction: str | None = None
    """How its answer was asked for: "tools" or "json"."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class JobProblem:
    """A failed job (with its error) or a job that left a note."""

    status: str
    attempts: int
    error: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class JobCounts:
    """Jobs by status: across all users (the queue's counts) or of one user (the inspector)."""

    pending: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    last_error: str | None = None
    """The error of the user's newest failed job."""
    noted: int = 0
    """Jobs that left a note (refused changes, an unusable answer)."""
    problems: tuple[JobProblem, ...] = ()
    """Newest first, at most engine.admin.JOB_PROBLEMS_SHOWN: failed jobs and jobs with a note."""
    problem_total: int = 0
    """All of this user's failed jobs and jobs with a note (``problems`` shows the newest)."""

    @property
    def open(self) -> int:
        """Jobs still to run or running."""
        return self.pending + self.running

    @property
    def total(self) -> int:
        return self.pending + self.running + self.done + self.failed
