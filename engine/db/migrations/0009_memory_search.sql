-- memchat schema: a bounded, relevant memory context (issue 15, item 3).
--
-- A prompt no longer carries every memory of a user: engine/recall.py picks at
-- most memory.context_limit of them by full-text relevance to the turn plus
-- recency, in one statement. This migration gives it what that needs:
--
-- * memories.search, a generated tsvector of the content in the 'simple'
--   configuration: lower-casing only, no stemming or stop words, so a memory
--   in any language or script is searchable the same way;
-- * one GIN index on (user_id, search), so that a user's matches are found
--   without visiting other users' rows (the btree_gin extension gives GIN its
--   text operator class; it is a trusted extension, so the database owner may
--   create it). A server without btree_gin (contrib not installed, or no right
--   to create it) gets a GIN index on search alone: the same results, with the
--   user's rows filtered after the index.
--   fastupdate is off: a search would otherwise scan the index's pending list
--   of recent inserts (up to 4 MB) every time, and memories are read at every
--   turn but written only a few at a time.
--
-- The search itself is memchat_recall(), SECURITY DEFINER: under row-level
-- security the planner may not use a GIN index for `search @@ query` (the
-- operator is not leakproof), so as the app login every search read all of the
-- user's rows (180 ms at 3,000 memories). The function reads as the owner
-- (through memories_owner_read, like memory_ids_owner in 0005) and is scoped
-- by the same setting as the user_scope policies: the scope's user, nobody
-- else; without a scope it finds nothing. It returns ids and ranks only; the
-- caller reads the rows themselves through row-level security. Granted to the
-- app login only, by memchat_grant_runtime_roles (replaced here: 0008's version
-- with one step more).

ALTER TABLE memories
    ADD COLUMN search tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED;

DO $$
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS btree_gin;
    EXCEPTION WHEN undefined_file OR insufficient_privilege OR feature_not_supported THEN
        RAISE NOTICE 'btree_gin unavailable (%): memories_search indexes search alone', SQLERRM;
    END;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'btree_gin') THEN
        CREATE INDEX memories_search ON memories USING gin (user_id, search)
            WITH (fastupdate = off);
    ELSE
        CREATE INDEX memories_search ON memories USING gin (search) WITH (fastupdate = off);
    END IF;
END
$$;

CREATE POLICY memories_owner_read ON memories FOR SELECT TO CURRENT_USER USING (true);

-- The memories a prompt carries for the current scope's user: at most p_limit,
-- the most relevant to p_text first (full-text rank), then the newest; the
-- newest always keep p_recent places. Words found in 32 or more of the user's
-- 128 newest memories pick none out and do not count (engine/recall.py says why).
CREATE FUNCTION memchat_recall(p_text text, p_limit integer, p_recent integer)
RETURNS TABLE (memory_id uuid, rank real)
LANGUAGE sql
STABLE
-- About p_limit rows (the default estimate, 1000, would plan the caller's join
-- over all of the user's memories).
ROWS 50
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
WITH words AS (
    SELECT word
    FROM unnest(tsvector_to_array(to_tsvector('simple', coalesce(p_text, '')))) AS word
    WHERE length(word) > 1
    ORDER BY length(word) DESC, word
    LIMIT 16
), sample AS MATERIALIZED (
    -- How common a word is, judged on the user's newest memories: one index
    -- scan, however many memories the user has.
    SELECT m.search
    FROM memories AS m
    WHERE m.user_id = current_setting('memchat.user_id', true)
    ORDER BY m.updated_at DESC
    LIMIT 128
), common AS (
    -- tsvector_to_array: unnest(tsvector) builds position and weight arrays
    -- for every lexeme, which cost more than the rest of the search.
    SELECT u.lexeme
    FROM sample, unnest(tsvector_to_array(sample.search)) AS u(lexeme)
    WHERE u.lexeme IN (SELECT word FROM words)
    GROUP BY u.lexeme
    HAVING count(*) >= 32
), query AS MATERIALIZED (
    SELECT websearch_to_tsquery('simple', string_agg(word, ' or ')) AS q
    FROM words
    WHERE word NOT IN (SELECT lexeme FROM common)
), relevant AS (
    -- The query as a scalar subquery: a parameter the GIN index can take.
    SELECT m.memory_id, ts_rank(m.search, (SELECT q FROM query)) AS rank
    FROM memories AS m
    WHERE m.user_id = current_setting('memchat.user_id', true)
      AND m.search @@ (SELECT q FROM query)
    ORDER BY rank DESC, m.updated_at DESC, m.memory_id
    LIMIT greatest(p_limit - p_recent, 0)
), recent AS (
    SELECT m.memory_id
    FROM memories AS m
    WHERE m.user_id = current_setting('memchat.user_id', true)
    ORDER BY m.updated_at DESC, m.created_at DESC, m.memory_id
    LIMIT greatest(p_limit, 0)
)
SELECT both_kinds.memory_id, max(both_kinds.rank)
FROM (SELECT r.memory_id, r.rank FROM relevant AS r
      UNION ALL
      SELECT n.memory_id, NULL FROM recent AS n) AS both_kinds
GROUP BY both_kinds.memory_id
$$;
REVOKE ALL ON FUNCTION memchat_recall(text, integer, integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION memchat_grant_runtime_roles(p_app text, p_admin text, p_worker text)
RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_role text;
    v_table text;
    v_user_tables text[] := ARRAY['users', 'sessions', 'messages', 'memories',
                                  'memory_events', 'memory_jobs'];
    v_new text[] := ARRAY[p_app, p_admin, p_worker];
BEGIN
    -- 1. Whoever held this database's grants before, and is not one of the new roles.
    FOR v_role IN
        SELECT r.rolname FROM pg_roles r
         WHERE r.rolname IN (SELECT rolname FROM memchat_runtime_roles
                             UNION ALL SELECT 'memchat_app' UNION ALL SELECT 'memchat_admin')
           AND r.rolname <> ALL (v_new)
    LOOP
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', v_role);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I', v_role);
        EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM %I', v_role);
        EXECUTE format('REVOKE ALL ON SCHEMA public FROM %I', v_role);
        IF pg_has_role(current_user, (SELECT datdba FROM pg_database
                                       WHERE datname = current_database()), 'MEMBER') THEN
            EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), v_role);
        END IF;
    END LOOP;

    -- 2. app: a user's rows through the scope policies, nothing else.
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I, %I, %I', p_app, p_admin, p_worker);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON users, sessions, memories, '
                   'memory_jobs TO %I', p_app);
    EXECUTE format('GRANT SELECT, INSERT ON messages, memory_events TO %I', p_app);

    -- 3. admin: SELECT across users, through policies for it alone.
    FOREACH v_table IN ARRAY v_user_tables LOOP
        EXECUTE format('DROP POLICY IF EXISTS %I ON %I', v_table || '_admin_read', v_table);
        EXECUTE format('CREATE POLICY %I ON %I FOR SELECT TO %I USING (true)',
                       v_table || '_admin_read', v_table, p_admin);
    END LOOP;
    EXECUTE format('GRANT SELECT ON users, sessions, messages, memories, memory_events, '
                   'memory_jobs, memchat_migrations, memchat_queue_limits TO %I', p_admin);
    EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_job_counts() TO %I', p_admin);

    -- 4. worker: the queue functions and nothing else.
    EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_claim_jobs(text, double precision, '
                   'integer), memchat_requeue_expired_jobs(), memchat_job_counts() TO %I',
                   p_worker);

    -- 4a. (0007) the queue's rule and channel: app claims its own head job with the
    --     rule, and anyone connected may read the channel's name.
    EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_queue_head(text, bigint) TO %I', p_app);
    EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_job_channel() TO %I, %I, %I',
                   p_app, p_admin, p_worker);

    -- 4b. (0008) a reply may be replaced (regenerate): the app deletes its own
    --     assistant rows; the restrictive policy messages_delete_replies keeps
    --     user messages undeletable (a session's delete cascades as before).
    EXECUTE format('GRANT DELETE ON messages TO %I', p_app);

    -- 4c. (0009) the memory search: app, for its own scope's user only.
    EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_recall(text, integer, integer) TO %I',
                   p_app);

    -- 5. Only these roles (and the owner, superusers) may connect, where we may say so:
    --    another deployment's logins on this cluster cannot even open this database.
    --    (Needs the database's owner; otherwise PUBLIC keeps CONNECT, and the tables'
    --    grants above are what keeps other logins out.)
    IF EXISTS (SELECT 1 FROM pg_database d WHERE d.datname = current_database()
                 AND pg_has_role(current_user, d.datdba, 'MEMBER')) THEN
        EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I, %I, %I',
                       current_database(), p_app, p_admin, p_worker);
    END IF;

    DELETE FROM memchat_runtime_roles;
    INSERT INTO memchat_runtime_roles VALUES ('app', p_app), ('admin', p_admin),
                                             ('worker', p_worker);
END
$$;

-- A database whose roles were granted before this migration: grant the new
-- function now (memchat_grant_runtime_roles runs again only when the roles
-- change). A new database is granted after its migrations.
DO $$
DECLARE
    v_app text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'app');
BEGIN
    IF v_app IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_recall(text, integer, integer) TO %I',
                       v_app);
    END IF;
END
$$;
