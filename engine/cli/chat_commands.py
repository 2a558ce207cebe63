"""``memchat chat``, ``sessions`` and ``history``: the headless chat."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from engine.agent import (
    TurnCancelled,
    TurnCompleted,
    TurnDelta,
    TurnFailed,
    TurnRetrying,
    TurnStarted,
)
from engine.cli.output import print_json, say, table, tokens_cell, warn, when
from engine.cli.resources import open_chat_runtime, open_store_only
from engine.config import Settings
from engine.conversation import Conversations
from engine.errors import InvalidInput
from engine.queue import JobQueue
from engine.records import Message, Session
from engine.runtime import Runtime


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    chat = commands.add_parser(
        "chat",
        help="send one message as a user and stream the reply",
        description=(
            "Send one message and stream the reply to stdout. The user is created on "
            "first use. Without --session or --new-session the user's most recent "
            "session is continued (or a first one started)."
        ),
        epilog='example:\n  memchat chat --user alice@example.com "My name is Alice."\n\n'
        + exit_codes,
        formatter_class=fmt,
    )
    chat.add_argument("--user", required=True, help="user id, e.g. alice@example.com")
    where = chat.add_mutually_exclusive_group()
    where.add_argument("--session", help="session id (see `memchat sessions`)")
    where.add_argument("--new-session", action="store_true", help="start a new session")
    chat.add_argument("text", help='the message; "-" reads it from stdin')
    chat.add_argument("--json", action="store_true", help="print one JSON object at the end")
    chat.set_defaults(handler=chat_command)

    sessions = commands.add_parser(
        "sessions",
        help="list a user's sessions, newest first",
        epilog="example:\n  memchat sessions --user alice@example.com\n\n" + exit_codes,
        formatter_class=fmt,
    )
    sessions.add_argument("--user", required=True)
    sessions.add_argument("--json", action="store_true", help="print JSON")
    sessions.set_defaults(handler=sessions_command)

    history = commands.add_parser(
        "history",
        help="show the messages of one session",
        epilog="example:\n  memchat history --user alice@example.com --session 3f2b...\n\n"
        + exit_codes,
        formatter_class=fmt,
    )
    history.add_argument("--user", required=True)
    history.add_argument("--session", required=True)
    history.add_argument("--limit", type=int, default=50, help="last N messages (default 50)")
    history.add_argument("--json", action="store_true", help="print JSON")
    history.set_defaults(handler=history_command)


def _read_text(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read()
    # `echo hi | memchat chat -` stores "hi", not "hi\n": the line end is the shell's.
    return data.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")


async def chat_command(args: argparse.Namespace, settings: Settings) -> int:
    text = _read_text(args.text)
    if not args.verbose:
        # This command reports its job's outcome in one line of its own.
        logging.getLogger("engine.jobs").setLevel(logging.ERROR)
    # No dispatcher: this process learns from its own turn only.
    async with open_chat_runtime(settings) as rt:
        text = rt.agent.check_text(text)
        chats = Conversations.of(rt)
        session = await chats.pick_session(args.user, args.session, new=args.new_session)
        result: dict[str, Any] = {"user_id": session.user_id, "session_id": session.session_id}
        try:
            await _stream_turn(chats, args, session, text, result)
        except asyncio.CancelledError:
            # Ctrl-C (SIGINT cancels this task): the agent stored the partial
            # reply as cancelled; report it like any other outcome, exit 130.
            if "user_message_id" not in result:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await _interrupted(rt, args, result)
            return 130
        reply_id = result.get("reply_message_id")
        if result["status"] == "complete" and reply_id is not None:
            result["memory_job"] = await _learn_from_turn(rt, session.user_id, reply_id)
        if args.json:
            print_json(result)
        return 1 if result["status"] == "failed" else 0


async def _learn_from_turn(rt: Runtime, user_id: str, reply_id: int) -> dict[str, Any] | None:
    """Run this turn's memory job (and any older ones of this user) within the drain timeout."""
    async with rt.store.scope(user_id) as s:
        job = await JobQueue.job_for_reply(s, reply_id)
    if job is None:
        return None
    within = rt.settings.memory.drain_timeout
    job = await rt.dispatcher.run_own_jobs(user_id, job.job_id, within) or job
    if job.status in ("pending", "running"):
        warn(
            f"memory: job {job.job_id} for this turn is still {job.status} after {within:g}s "
            "(memory.drain_timeout); `memchat worker` or the next memchat run will finish it"
        )
    elif job.status == "failed":
        warn(f"memory: job {job.job_id} failed: {job.last_error} (see `memchat jobs --failed`)")
    elif job.note:
        warn(f"memory: job {job.job_id}: {job.note}")
    return {
        "job_id": job.job_id,
        "status": job.status,
        "last_error": job.last_error,
        "note": job.note,
        "extraction": job.extraction,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
    }


async def _interrupted(rt: Runtime, args: argparse.Namespace, result: dict[str, Any]) -> None:
    await rt.agent.wait_stored()
    async with rt.store.scope(result["user_id"]) as s:
        after = await s.messages_after(result["session_id"], result["user_message_id"], 1)
    result["status"] = "cancelled"
    if after and after[0].role == "assistant":
        reply = after[0]
        result.update(status=reply.status, reply=reply.content)
        result["reply_message_id"] = reply.message_id
        result["usage"] = _usage(reply)
    if args.json:
        print_json(result)
    else:
        say()
    warn("interrupted")


async def _stream_turn(
    chats: Conversations,
    args: argparse.Namespace,
    session: Session,
    text: str,
    result: dict[str, Any],
) -> dict[str, Any]:
    streamed = False
    async for event in chats.send(session.user_id, session.session_id, text):
        match event:
            case TurnStarted(user_message=message):
                result["user_message_id"] = message.message_id
            case TurnRetrying(attempt=attempt, of=of):
                if not args.json:
                    warn(f"the model request failed; retrying {attempt}/{of}…")
            case TurnDelta(text=delta):
                if not args.json:
                    say(delta, end="")
                    streamed = True
            case TurnCompleted(reply=reply) | TurnCancelled(reply=reply):
                result.update(status=reply.status, reply=reply.content)
                result["reply_message_id"] = reply.message_id
                result["usage"] = _usage(reply)
            case TurnFailed(reply=reply, error=error):
                result.update(status="failed", reply=reply.content, error=error)
                result["reply_message_id"] = reply.message_id
    if not args.json:
        if streamed:
            say()
        if result["status"] == "failed":
            warn(f"error: the reply failed: {result['error']} (your message is saved)")
    return result


def _usage(message: Message) -> dict[str, int] | None:
    if message.prompt_tokens is None and message.completion_tokens is None:
        return None
    return {
        "prompt_tokens": message.prompt_tokens or 0,
        "completion_tokens": message.completion_tokens or 0,
    }


async def sessions_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store_only(settings) as res, res.store.scope(args.user) as s:
        sessions = await s.list_sessions()
        per_session = await s.message_counts()
        counts = {x.session_id: per_session.get(x.session_id, 0) for x in sessions}
    if args.json:
        print_json(
            [
                {
                    "session_id": x.session_id,
                    "title": x.title,
                    "messages": counts[x.session_id],
                    "created_at": x.created_at,
                    "updated_at": x.updated_at,
                }
                for x in sessions
            ]
        )
        return 0
    if not sessions:
        say(f"{args.user} has no sessions yet")
        return 0
    table(
        [
            [str(x.session_id), when(x.updated_at), str(counts[x.session_id]), x.title or ""]
            for x in sessions
        ],
        ["SESSION", "UPDATED", "MESSAGES", "TITLE"],
    )
    return 0


async def history_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise InvalidInput("--limit must be at least 1")
    async with open_store_only(settings) as res, res.store.scope(args.user) as s:
        session = await s.get_session(args.session)
        messages = await s.last_messages(session.session_id, args.limit)
    if args.json:
        print_json({"session": session, "messages": messages})
        return 0
    say(f"# {session.title or 'untitled'} ({session.session_id})")
    for m in messages:
        mark = "" if m.status == "complete" else f" [{m.status}]"
        tokens = tokens_cell(m.prompt_tokens, m.completion_tokens)
        spent = f" · {tokens} tokens" if tokens else ""
        say(f"\n{m.role}{mark} · {when(m.created_at)}{spent}")
        say(m.content)
        if m.error:
            say(f"(error: {m.error})")
    return 0
