-- memchat schema, version 1.
--
-- Isolation is the database's job, not the application's:
-- * every user-owned table carries user_id and has row-level security enabled
--   and FORCED, with one policy on the transaction-local setting
--   memchat.user_id (USING and WITH CHECK), so a query that forgets its
--   WHERE still sees one user's rows only and cannot write another's;
-- * child rows reference their parents by (user_id, id), so a message cannot
--   point at another user's session and a memory cannot cite another user's
--   message, whatever the application does;
-- * runtime connections run as memchat_app (no BYPASSRLS); cross-user reads
--   run as memchat_admin, which may only SELECT.

GRANT USAGE ON SCHEMA public TO memchat_app, memchat_admin;

CREATE TABLE users (
    user_id      text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 128),
    display_name text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE sessions (
    session_id uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    user_id    text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    title      text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (user_id, session_id)
);
-- The session picker: a user's sessions, most recently active first.
CREATE INDEX sessions_by_user_recent ON sessions (user_id, updated_at DESC);

-- Append-only: one row per message, never rewritten (memchat_app has no UPDATE).
-- message_id orders a session's messages; created_at is for display.
CREATE TABLE messages (
    message_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id uuid NOT NULL,
    user_id    text NOT NULL,
    role       text NOT NULL CHECK (role IN ('user', 'assistant')),
    content    text NOT NULL,
    status     text NOT NULL DEFAULT 'complete'
               CHECK (status IN ('complete', 'failed', 'cancelled')),
    error      text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (user_id, message_id),
    FOREIGN KEY (user_id, session_id)
        REFERENCES sessions (user_id, session_id) ON DELETE CASCADE
);
-- "Last N messages of a session", in order.
CREATE INDEX messages_by_session ON messages (session_id, message_id);

CREATE TABLE memories (
    memory_id         uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    user_id           text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    content           text NOT NULL CHECK (btrim(content) <> ''),
    -- The duplicate key: case, surrounding punctuation and runs of spaces
    -- do not make a memory new.
    content_key       text GENERATED ALWAYS AS (
                          lower(regexp_replace(
                              btrim(content, E' \t\r\n.!?,;:'), '\s+', ' ', 'g'))
                      ) STORED,
    topics            text[] NOT NULL DEFAULT '{}',
    source_session_id uuid,
    source_message_id bigint,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    FOREIGN KEY (user_id, source_session_id)
        REFERENCES sessions (user_id, session_id) ON DELETE SET NULL (source_session_id),
    FOREIGN KEY (user_id, source_message_id)
        REFERENCES messages (user_id, message_id) ON DELETE SET NULL (source_message_id)
);
CREATE UNIQUE INDEX memories_unique_per_user ON memories (user_id, content_key);
CREATE INDEX memories_by_user_recent ON memories (user_id, updated_at DESC);
CREATE INDEX memories_by_source_message ON memories (source_message_id);
CREATE INDEX memories_by_source_session ON memories (source_session_id);

-- The audit trail of every memory change; append-only.
CREATE TABLE memory_events (
    event_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    memory_id         uuid NOT NULL,
    user_id           text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    op                text NOT NULL CHECK (op IN ('add', 'update', 'delete')),
    before            text,
    after             text,
    job_id            bigint,
    source_message_id bigint,
    actor             text NOT NULL DEFAULT 'user',
    at                timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX memory_events_by_user ON memory_events (user_id, event_id);
CREATE INDEX memory_events_by_memory ON memory_events (memory_id, event_id);

CREATE TABLE memory_jobs (
    job_id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id              text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    session_id           uuid,
    user_message_id      bigint,
    assistant_message_id bigint,
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts             integer NOT NULL DEFAULT 0,
    run_after            timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until          timestamptz,
    worker               text,
    last_error           text,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at           timestamptz,
    finished_at          timestamptz
);
-- Workers look for ready work; finished jobs drop out of this index.
CREATE INDEX memory_jobs_open ON memory_jobs (run_after, job_id)
    WHERE status IN ('pending', 'running');
CREATE INDEX memory_jobs_by_user ON memory_jobs (user_id, job_id);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'sessions', 'messages', 'memories',
                             'memory_events', 'memory_jobs']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY %I ON %I USING (user_id = current_setting(''memchat.user_id'', true)) '
            'WITH CHECK (user_id = current_setting(''memchat.user_id'', true))',
            t || '_user_scope', t);
        EXECUTE format(
            'CREATE POLICY %I ON %I FOR SELECT TO memchat_admin USING (true)',
            t || '_admin_read', t);
        EXECUTE format('GRANT SELECT ON %I TO memchat_admin', t);
    END LOOP;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON users, sessions, memories, memory_jobs TO memchat_app;
GRANT SELECT, INSERT ON messages TO memchat_app;
GRANT SELECT, INSERT ON memory_events TO memchat_app;
