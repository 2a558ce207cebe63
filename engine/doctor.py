"""``memchat doctor``: check settings, database, isolation, jobs and model in one go.

Every check returns a :class:`CheckResult` instead of raising: the point of a
doctor is to keep going and report everything it can, so a broken settings
file or an unreachable database is a result here, not an exception. Nothing in
this module prints; the CLI (``engine/cli/doctor_commands.py``) does.

No result ever carries a secret: the API key and the database password are
never put into a detail, and as a second line of defence :func:`diagnose`
replaces any that slipped in through an exception's text.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from engine import doctor_db_security as db_security
from engine.admin import CHECK_FAILED_JOBS, CHECK_RLS, USER_OWNED_TABLES, AdminReader
from engine.config import ModelSettings, Settings, load_settings, memory_model_settings
from engine.db import Database
from engine.db.migrate import available_migrations
from engine.embeddings import embeddings_endpoint
from engine.errors import ConfigError, MemchatError
from engine.extraction import EndpointModes
from engine.memory import probe_extraction_mode
from engine.models import create_model
from engine.models.base import (
    ChatMessage,
    ModelConfigError,
    ModelError,
    StreamEnd,
    TextDelta,
)
from engine.queue import JobQueue
from engine.recall import describe_retrieval
from engine.redact import remember_secrets, scrub
from engine.text import one_line

MODEL_CHECK_TIMEOUT = 5.0
PROBE_TIMEOUT = 30.0
"""Seconds for each probe request: a local model on a busy CPU needs several
to write a few tokens (4.6 s for a forced call on SmolLM2 at load 8)."""
"""Seconds for the model probe: long enough for a slow local server, short enough to wait for."""

MAX_FAILED_USERS_SHOWN = 3

SETTINGS = "settings"
DATABASE = "database"
MIGRATIONS = "migrations"
ISOLATION = "isolation"
MEMORY_JOBS = "memory jobs"
MODEL = "model"
STREAM = "model stream"
EXTRACTION = "memory extraction"
RETRIEVAL = "memory retrieval"


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    """What to do about it; None when ok."""


def all_ok(results: Iterable[CheckResult]) -> bool:
    return all(result.ok for result in results)


async def diagnose(
    config: str | os.PathLike[str] | None = None,
    *,
    settings: Settings | None = None,
    model_timeout: float = MODEL_CHECK_TIMEOUT,
    probe: bool = True,
) -> list[CheckResult]:
    """Every check, in order. Loads the settings itself unless given them.

    ``probe`` sends a few tokens' worth of real requests (a short streamed
    reply, a forced tool call) to learn what the endpoint can do.
    """
    if settings is None:
        try:
            settings = load_settings(config)
        except ConfigError as exc:
            # Everything else needs settings; the broken file is the one finding.
            return [settings_problem(exc)]
    results = [settings_ok(settings)]
    results += await database_checks(settings)
    model = await model_check(settings, probe_seconds=model_timeout)
    results.append(model)
    if model.ok and probe:
        results += await probe_checks(settings, probe_seconds=max(model_timeout, PROBE_TIMEOUT))
    # The settings' secrets (keys, passwords, secret URL parameters): the same
    # list every log line and error message of this process is scrubbed of.
    remember_secrets(settings)
    return [_scrubbed(result) for result in results]


def settings_problem(error: ConfigError) -> CheckResult:
    # ConfigError messages already name the file or the variable at fault.
    if error.message.startswith("environment variable "):
        fix = "fix or unset the variable named above"
    else:
        fix = "fix the line named above or remove the file"
    return CheckResult(SETTINGS, False, error.message, fix)


def settings_ok(settings: Settings) -> CheckResult:
    if settings.config_file is None:
        return CheckResult(SETTINGS, True, "no settings file (defaults and environment only)")
    return CheckResult(SETTINGS, True, f"{settings.config_file} (valid)")


# -- database, migrations, isolation, jobs ------------------------------------


async def database_checks(settings: Settings) -> list[CheckResult]:
    """The database line, then (only if it could be opened) the checks that need it."""
    try:
        db = await Database.open(settings)
    except MemchatError as exc:
        return [CheckResult(DATABASE, False, exc.message, _database_fix(settings))]
    except Exception as exc:  # a doctor reports what it cannot handle instead of crashing
        detail = f"cannot open the database: {type(exc).__name__}: {one_line(str(exc))}"
        return [CheckResult(DATABASE, False, detail, _database_fix(settings))]
    try:
        results = [CheckResult(DATABASE, True, _database_detail(db))]
        for check in (migrations_check, isolation_check, jobs_check, *DB_SECURITY_CHECKS):
            try:
                results.append(await check(db))
            except (MemchatError, asyncpg.PostgresError, OSError) as exc:
                # One failing check (lost connection, missing grant) must not hide the others.
                name = _CHECK_NAMES[check.__name__]
                text = exc.message if isinstance(exc, MemchatError) else one_line(str(exc))
                results.append(CheckResult(name, False, f"check failed: {text}", _RETRY_FIX))
        # The database opened: say how prompt memories are chosen from it.
        try:
            results.append(await retrieval_check(db, settings))
        except (MemchatError, asyncpg.PostgresError, OSError) as exc:
            text = exc.message if isinstance(exc, MemchatError) else one_line(str(exc))
            results.append(CheckResult(RETRIEVAL, False, f"check failed: {text}", _RETRY_FIX))
        return results
    finally:
        await db.close()


async def retrieval_check(db: Database, settings: Settings) -> CheckResult:
    """Similarity (embeddings + pgvector) or full text, and why."""
    memory = settings.memory
    try:
        endpoint = embeddings_endpoint(settings)
    except ModelConfigError as exc:
        fix = "fix memory.embeddings_base_url / embeddings_api_key, or unset embeddings_model"
        return CheckResult(RETRIEVAL, False, describe_retrieval(memory, exc.message), fix)
    if isinstance(endpoint, str):
        return CheckResult(RETRIEVAL, True, describe_retrieval(memory, endpoint))
    why = await AdminReader(db).vector_status()
    if why is not None:
        why = f"memory.embeddings_model is set, but {why}"
        return CheckResult(RETRIEVAL, True, describe_retrieval(memory, why))
    return CheckResult(RETRIEVAL, True, f"{describe_retrieval(memory, None)}; {endpoint.label}")


_RETRY_FIX = "run `memchat -v doctor` again; if it persists, check the database server's log"


def _database_fix(settings: Settings) -> str:
    if settings.database.url is not None:
        return "is PostgreSQL running? check database.url (MEMCHAT_DATABASE__URL)"
    return f"see the log in {settings.data_dir() / 'log'}"


def _database_detail(db: Database) -> str:
    # location: the embedded server's data dir, or the DSN with its password redacted.
    return f"{db.info.label} ({db.info.location})"


async def migrations_check(db: Database) -> CheckResult:
    latest = max(m.version for m in available_migrations())
    version = await AdminReader(db).schema_version()
    if version == latest:
        return CheckResult(MIGRATIONS, True, f"schema version {version} (current)")
    if version is None:
        detail = "no schema yet"
    elif version > latest:
        detail = f"schema version {version} is newer than this memchat knows ({latest})"
        return CheckResult(MIGRATIONS, False, detail, "upgrade memchat")
    else:
        detail = f"schema version {version}, this memchat has {latest}"
    fix = "run any memchat command once as the database owner; migrations run at start"
    return CheckResult(MIGRATIONS, False, detail, fix)


async def isolation_check(db: Database) -> CheckResult:
    (rls,) = (await AdminReader(db).run_checks(CHECK_RLS)).checks
    if rls.ok:
        detail = (
            f"row-level security enabled and forced on {len(USER_OWNED_TABLES)} tables; "
            f"{db.roles.app} cannot bypass it"
        )
        return CheckResult(ISOLATION, True, detail)
    shown = "; ".join(str(finding) for finding in rls.findings[:5])
    more = len(rls.findings) - 5
    if more > 0:
        shown += f"; and {more} more"
    fix = (
        "the schema or roles were changed by hand: restore them from "
        "engine/db/migrations/0001_initial.sql (ENABLE/FORCE ROW LEVEL SECURITY, the "
        f"<table>_user_scope policies) and ALTER ROLE {db.roles.app} NOSUPERUSER NOBYPASSRLS"
    )
    return CheckResult(ISOLATION, False, f"{rls.detail}: {shown}", fix)


async def jobs_check(db: Database) -> CheckResult:
    counts = await JobQueue(db).counts()
    detail = f"{counts.pending} pending, {counts.running} running, {counts.failed} failed"
    if counts.failed == 0:
        return CheckResult(MEMORY_JOBS, True, detail)
    (failed,) = (await AdminReader(db).run_checks(CHECK_FAILED_JOBS)).checks
    if failed.findings:
        newest = failed.findings[0]
        detail += f" (newest: {newest.subject}: {one_line(newest.message)})"
        users = [finding.subject for finding in failed.findings[:MAX_FAILED_USERS_SHOWN]]
        who = ", ".join(users) + (", ..." if len(failed.findings) > len(users) else "")
        fix = (
            f"failed jobs keep their error: see `memchat jobs --failed --user {users[0]}` "
            f"(users with failed jobs: {who}) or the inspector (F3)"
        )
    else:  # they were retried or deleted between the two reads
        fix = "see `memchat jobs --failed` / the inspector (F3)"
    return CheckResult(MEMORY_JOBS, False, detail, fix)


# -- login roles, socket, stuck jobs (engine/doctor_db_security.py) ------------


async def login_roles_check(db: Database) -> CheckResult:
    ok, detail, fix = db_security.login_roles_summary(await db_security.login_roles_check(db))
    return CheckResult(db_security.LOGIN_ROLES, ok, detail, fix)


async def socket_check(db: Database) -> CheckResult:
    ok, detail, fix = db_security.socket_check(db)
    return CheckResult(db_security.SOCKET, ok, detail, fix)


async def stuck_jobs_check(db: Database) -> CheckResult:
    ok, detail, fix = await db_security.stuck_jobs_check(db)
    return CheckResult(db_security.STUCK_JOBS, ok, detail, fix)


DB_SECURITY_CHECKS = (login_roles_check, socket_check, stuck_jobs_check)

_CHECK_NAMES = {
    migrations_check.__name__: MIGRATIONS,
    isolation_check.__name__: ISOLATION,
    jobs_check.__name__: MEMORY_JOBS,
    login_roles_check.__name__: db_security.LOGIN_ROLES,
    socket_check.__name__: db_security.SOCKET,
    stuck_jobs_check.__name__: db_security.STUCK_JOBS,
}


# -- model ----------------------------------------------------------------------

_MODEL_FIX = "check OPENAI_BASE_URL / model.base_url, or unset it to use the offline model"


async def model_check(
    settings: Settings, *, probe_seconds: float = MODEL_CHECK_TIMEOUT
) -> CheckResult:
    if settings.model.resolved_provider == "offline":
        return CheckResult(MODEL, True, "offline model (no network needed)")
    try:
        # Validates the settings exactly as a chat would (URL shape, missing key).
        model = create_model(settings.model)
    except ModelError as exc:
        fix = 'set OPENAI_API_KEY / model.base_url, or model.provider = "offline"'
        return CheckResult(MODEL, False, exc.message, fix)
    await model.aclose()
    # Imported here for the same reason as in engine.models: openai is heavy.
    import openai

    from engine.models.endpoint import OPENAI_BASE_URL, PLACEHOLDER_API_KEY, _display_url

    base_url = (settings.model.base_url or "").strip() or OPENAI_BASE_URL
    shown = _display_url(base_url)
    api_key = settings.model.api_key.get_secret_value() if settings.model.api_key else ""
    probe = min(probe_seconds, settings.model.timeout)
    # The ChatModel protocol has no cheap request; GET /models is the cheapest
    # an OpenAI-compatible server has, and needs no tokens. No retries: the
    # question is whether it answers now.
    client = openai.AsyncOpenAI(
        api_key=api_key or PLACEHOLDER_API_KEY,
        base_url=base_url,
        timeout=probe,
        max_retries=0,
    )
    try:
        page = await client.models.list()
        names = [m.id for m in page.data]
    except openai.APITimeoutError:
        detail = f"{shown} did not answer within {probe:g}s"
        return CheckResult(MODEL, False, detail, _MODEL_FIX)
    except openai.APIConnectionError as exc:
        detail = f"cannot reach {shown} ({_connection_reason(exc)})"
        return CheckResult(MODEL, False, detail, _MODEL_FIX)
    except openai.APIStatusError as exc:
        status = exc.status_code
        if status in (401, 403):
            # The server's text may echo part of the key: leave it out.
            detail = f"{shown} rejected the API key (HTTP {status})"
            return CheckResult(MODEL, False, detail, "check OPENAI_API_KEY / model.api_key")
        if status in (404, 405):
            # Some compatible servers have chat but no model list: it answered.
            detail = f"{settings.model.name} @ {shown} (reachable; it has no model list)"
            return CheckResult(MODEL, True, detail)
        detail = f"{shown} answered HTTP {status} to GET /models"
        return CheckResult(MODEL, False, detail, _MODEL_FIX)
    except (openai.OpenAIError, ValueError, TypeError, AttributeError) as exc:
        # TypeError/AttributeError: a 200 whose body has no model list at all.
        detail = f"{shown} gave an unusable answer to GET /models ({type(exc).__name__})"
        return CheckResult(MODEL, False, detail, _MODEL_FIX)
    finally:
        await client.close()
    listed = "listed" if settings.model.name in names else "not in its model list"
    return CheckResult(
        MODEL, True, f"{settings.model.name} @ {shown} (reachable; {settings.model.name} {listed})"
    )


_PROBE_PROMPT = (ChatMessage("user", "Say OK."),)


async def probe_checks(
    settings: Settings, *, probe_seconds: float = PROBE_TIMEOUT
) -> list[CheckResult]:
    """A few tokens of real requests: does a reply stream, and which extraction form works."""
    memory = memory_model_settings(settings.model, settings.memory)
    if settings.model.resolved_provider == "offline" and memory.resolved_provider == "offline":
        return [CheckResult(EXTRACTION, True, "tools (the offline model calls tools)")]
    results = []
    if settings.model.resolved_provider != "offline":
        results.append(await _stream_check(_probe_settings(settings.model, probe_seconds)))
    results.append(await _extraction_check(settings, _probe_settings(memory, probe_seconds)))
    return results


def _probe_settings(model: ModelSettings, seconds: float) -> ModelSettings:
    # Enough tokens for a short reply or one tool call; no retries: the
    # question is whether it works now.
    return model.model_copy(
        update={"max_tokens": 64, "timeout": min(seconds, model.timeout), "max_retries": 0}
    )


async def _stream_check(settings: ModelSettings) -> CheckResult:
    try:
        model = create_model(settings)
    except ModelError as exc:
        return CheckResult(STREAM, False, exc.message, _MODEL_FIX)
    started = time.monotonic()
    first: float | None = None
    text = ""
    try:
        async for event in model.stream(_PROBE_PROMPT):
            if isinstance(event, TextDelta) and event.text and first is None:
                first = time.monotonic() - started
            if isinstance(event, StreamEnd):
                text = event.text
    except ModelError as exc:
        return CheckResult(STREAM, False, exc.message, _stream_fix(exc))
    finally:
        await model.aclose()
    if not text.strip():
        detail = "the endpoint streamed an empty reply"
        return CheckResult(STREAM, False, detail, "check model.name: is it a chat model?")
    took = f"first text after {first:.2f}s" if first is not None else "no text deltas"
    return CheckResult(STREAM, True, f"a reply streamed ({took})")


def _stream_fix(exc: ModelError) -> str:
    if isinstance(exc, ModelConfigError):
        return "check model.name and the API key"
    return _MODEL_FIX


async def _extraction_check(settings: Settings, probe_model: ModelSettings) -> CheckResult:
    wanted = settings.memory.extraction
    try:
        model = create_model(probe_model)
    except ModelError as exc:
        return CheckResult(EXTRACTION, False, exc.message, "check the [memory] model settings")
    try:
        mode, reason = await probe_extraction_mode(model)
    except ModelError as exc:
        fix = "check memory.model / memory.base_url (or model.*), then run doctor again"
        return CheckResult(EXTRACTION, False, f"tool-call probe failed: {exc.message}", fix)
    finally:
        await model.aclose()
    where = model.endpoint
    if wanted == "auto":
        # What the jobs would learn on their first run: learn it now.
        EndpointModes().remember(where, mode, scrub(reason))
        return CheckResult(EXTRACTION, True, f"{mode} for {where} (auto: {reason})")
    if wanted == "tools" and mode == "json":
        fix = 'set memory.extraction = "auto" or "json"'
        return CheckResult(EXTRACTION, False, f"tools is set, but {reason}", fix)
    return CheckResult(EXTRACTION, True, f"{wanted} for {where} (memory.extraction; {reason})")


def _connection_reason(exc: BaseException) -> str:
    # httpx wraps the socket error a few levels down ("All connection attempts
    # failed"); the useful words are at the bottom of the chain.
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, ConnectionRefusedError) or "refused" in str(error).lower():
            return "connection refused"
    for error in chain:
        if isinstance(error, socket.gaierror):
            return "host not found"
        if isinstance(error, ssl.SSLError):
            return "TLS handshake failed"
    return one_line(str(chain[-1])) or type(chain[-1]).__name__


# -- secrets --------------------------------------------------------------------


def _scrubbed(result: CheckResult) -> CheckResult:
    """The result with every secret engine/redact.py knows of hidden."""
    detail, fix = scrub(result.detail), scrub(result.fix) if result.fix else result.fix
    if (detail, fix) == (result.detail, result.fix):
        return result
    return CheckResult(result.name, result.ok, detail, fix)
