-- memchat schema, version 5: case-insensitive user ids; references that
-- cannot name another user's rows (issue 12, findings 11 and 12).
--
-- 1. User ids are stored lower-cased (ASCII only, so lower() means the same
--    as Python's str.lower()): "ALICE@EXAMPLE.COM" and "alice@example.com"
--    are one user. Existing ids are lower-cased in every table. Ids that
--    differ only by case are two people's data under what is now one id:
--    merging them silently could show one person's chats to another, so the
--    migration refuses, naming them, and changes nothing.
-- 2. memory_jobs references its session and messages by (user_id, id),
--    SET NULL on delete (what the workers already expect when a session is
--    deleted: the job has nothing left to learn from).
-- 3. memory_events keeps history after its memory is deleted, so it cannot
--    reference memories. Every memory id ever created is registered, with
--    its user, in memory_ids (filled by a trigger on memories; rows go only
--    with their user); events reference memory_ids by (user_id, memory_id).
--    An event naming another user's memory can no longer be written.
-- Rows written before this version that already point at another user's
-- rows are refused, naming them; references to rows that no longer exist
-- become NULL, as the new keys would have made them.

DO $$
DECLARE
    clash text;
    forged text;
BEGIN
    SELECT string_agg(ids, '; ') INTO clash FROM (
        SELECT string_agg(user_id, ', ' ORDER BY user_id) AS ids
          FROM users GROUP BY lower(user_id) HAVING count(*) > 1 LIMIT 5
    ) c;
    IF clash IS NOT NULL THEN
        RAISE EXCEPTION 'user ids that differ only by case belong to one user from this version on: %; '
            'rename one of each (UPDATE users SET user_id = ... as the database owner) or delete it, '
            'then start memchat again (docs/security.md, "Users and references")', clash;
    END IF;

    SELECT string_agg(format('job %s', j.job_id), ', ') INTO forged FROM (
        SELECT j.job_id FROM memory_jobs j
         WHERE EXISTS (SELECT 1 FROM sessions s
                        WHERE s.session_id = j.session_id AND s.user_id <> j.user_id)
            OR EXISTS (SELECT 1 FROM messages m
                        WHERE m.message_id IN (j.user_message_id, j.assistant_message_id)
                          AND m.user_id <> j.user_id)
         ORDER BY j.job_id LIMIT 5
    ) j;
    IF forged IS NULL THEN
        SELECT string_agg(format('event %s', e.event_id), ', ') INTO forged FROM (
            SELECT e.event_id FROM memory_events e
             WHERE EXISTS (SELECT 1 FROM memories y
                            WHERE y.memory_id = e.memory_id AND y.user_id <> e.user_id)
                OR EXISTS (SELECT 1 FROM memory_events o
                            WHERE o.memory_id = e.memory_id AND o.user_id <> e.user_id)
             ORDER BY e.event_id LIMIT 5
        ) e;
    END IF;
    IF forged IS NOT NULL THEN
        RAISE EXCEPTION 'rows that name another user''s session, message or memory: %; '
            'they were not written by memchat: inspect and delete them as the database owner, '
            'then start memchat again', forged;
    END IF;
END
$$;

-- The owner rewrites ids in every table below; FORCEd row-level security
-- would show it no rows. Forced again at the end.
ALTER TABLE users NO FORCE ROW LEVEL SECURITY;
ALTER TABLE sessions NO FORCE ROW LEVEL SECURITY;
ALTER TABLE messages NO FORCE ROW LEVEL SECURITY;
ALTER TABLE memories NO FORCE ROW LEVEL SECURITY;
ALTER TABLE memory_events NO FORCE ROW LEVEL SECURITY;
ALTER TABLE memory_jobs NO FORCE ROW LEVEL SECURITY;

-- Lower-casing a parent id would break every child row on the way; the keys
-- come back, unchanged, once all tables agree.
ALTER TABLE sessions DROP CONSTRAINT sessions_user_id_fkey;
ALTER TABLE messages DROP CONSTRAINT messages_user_id_session_id_fkey;
ALTER TABLE memories DROP CONSTRAINT memories_user_id_fkey;
ALTER TABLE memories DROP CONSTRAINT memories_user_id_source_message_id_fkey;
ALTER TABLE memories DROP CONSTRAINT memories_user_id_source_session_id_fkey;
ALTER TABLE memory_events DROP CONSTRAINT memory_events_user_id_fkey;
ALTER TABLE memory_jobs DROP CONSTRAINT memory_jobs_user_id_fkey;

UPDATE users SET user_id = lower(user_id) WHERE user_id <> lower(user_id);
UPDATE sessions SET user_id = lower(user_id) WHERE user_id <> lower(user_id);
UPDATE messages SET user_id = lower(user_id) WHERE user_id <> lower(user_id);
UPDATE memories SET user_id = lower(user_id) WHERE user_id <> lower(user_id);
UPDATE memory_events SET user_id = lower(user_id) WHERE user_id <> lower(user_id);
UPDATE memory_jobs SET user_id = lower(user_id) WHERE user_id <> lower(user_id);

ALTER TABLE users ADD CONSTRAINT users_user_id_folded CHECK (user_id = lower(user_id));

ALTER TABLE sessions ADD CONSTRAINT sessions_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (user_id) ON DELETE CASCADE;
ALTER TABLE messages ADD CONSTRAINT messages_user_id_session_id_fkey
    FOREIGN KEY (user_id, session_id) REFERENCES sessions (user_id, session_id) ON DELETE CASCADE;
ALTER TABLE memories ADD CONSTRAINT memories_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (user_id) ON DELETE CASCADE;
ALTER TABLE memories ADD CONSTRAINT memories_user_id_source_message_id_fkey
    FOREIGN KEY (user_id, source_message_id) REFERENCES messages (user_id, message_id)
    ON DELETE SET NULL (source_message_id);
ALTER TABLE memories ADD CONSTRAINT memories_user_id_source_session_id_fkey
    FOREIGN KEY (user_id, source_session_id) REFERENCES sessions (user_id, session_id)
    ON DELETE SET NULL (source_session_id);
ALTER TABLE memory_events ADD CONSTRAINT memory_events_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (user_id) ON DELETE CASCADE;
ALTER TABLE memory_jobs ADD CONSTRAINT memory_jobs_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (user_id) ON DELETE CASCADE;

-- 2. memory_jobs -> its session and messages, by (user_id, id).
UPDATE memory_jobs j SET session_id = NULL
 WHERE session_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = j.session_id);
UPDATE memory_jobs j SET user_message_id = NULL
 WHERE user_message_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.message_id = j.user_message_id);
UPDATE memory_jobs j SET assistant_message_id = NULL
 WHERE assistant_message_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.message_id = j.assistant_message_id);
ALTER TABLE memory_jobs ADD CONSTRAINT memory_jobs_session_fkey
    FOREIGN KEY (user_id, session_id) REFERENCES sessions (user_id, session_id)
    ON DELETE SET NULL (session_id);
ALTER TABLE memory_jobs ADD CONSTRAINT memory_jobs_user_message_fkey
    FOREIGN KEY (user_id, user_message_id) REFERENCES messages (user_id, message_id)
    ON DELETE SET NULL (user_message_id);
ALTER TABLE memory_jobs ADD CONSTRAINT memory_jobs_assistant_message_fkey
    FOREIGN KEY (user_id, assistant_message_id) REFERENCES messages (user_id, message_id)
    ON DELETE SET NULL (assistant_message_id);
-- The referencing side of a foreign key wants an index for deletes of the parent.
CREATE INDEX memory_jobs_by_session ON memory_jobs (session_id) WHERE session_id IS NOT NULL;
CREATE INDEX memory_jobs_by_user_message ON memory_jobs (user_message_id)
    WHERE user_message_id IS NOT NULL;
CREATE INDEX memory_jobs_by_assistant_message ON memory_jobs (assistant_message_id)
    WHERE assistant_message_id IS NOT NULL;

-- 3. The registry of memory ids, and memory_events -> it.
CREATE TABLE memory_ids (
    memory_id uuid PRIMARY KEY,
    user_id   text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    UNIQUE (user_id, memory_id)
);
INSERT INTO memory_ids (memory_id, user_id)
SELECT memory_id, user_id FROM memories
UNION
SELECT memory_id, user_id FROM memory_events;

ALTER TABLE memory_events ADD CONSTRAINT memory_events_memory_fkey
    FOREIGN KEY (user_id, memory_id) REFERENCES memory_ids (user_id, memory_id)
    ON DELETE CASCADE;

-- Registered by the table owner (SECURITY DEFINER): the runtime role gets no
-- write access to the registry, so the only way in is creating a memory.
-- A memory id reused after its memory was deleted stays its first user's:
-- another user's insert of it fails on the registry's primary key.
CREATE FUNCTION memchat_register_memory_id() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    INSERT INTO memory_ids (memory_id, user_id) VALUES (NEW.memory_id, NEW.user_id)
    ON CONFLICT (user_id, memory_id) DO NOTHING;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION memchat_register_memory_id() FROM PUBLIC;
CREATE TRIGGER memories_register_id AFTER INSERT ON memories
    FOR EACH ROW EXECUTE FUNCTION memchat_register_memory_id();

-- Row-level security like every user-owned table (the owner's own policy
-- lets the trigger function write). No grant to the runtime role: it never
-- reads the registry; the foreign-key checks run as the owner.
ALTER TABLE memory_ids ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory_ids FORCE ROW LEVEL SECURITY;
CREATE POLICY memory_ids_user_scope ON memory_ids
    USING (user_id = current_setting('memchat.user_id', true))
    WITH CHECK (user_id = current_setting('memchat.user_id', true));
CREATE POLICY memory_ids_owner ON memory_ids TO CURRENT_USER USING (true) WITH CHECK (true);

ALTER TABLE users FORCE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
ALTER TABLE messages FORCE ROW LEVEL SECURITY;
ALTER TABLE memories FORCE ROW LEVEL SECURITY;
ALTER TABLE memory_events FORCE ROW LEVEL SECURITY;
ALTER TABLE memory_jobs FORCE ROW LEVEL SECURITY;
