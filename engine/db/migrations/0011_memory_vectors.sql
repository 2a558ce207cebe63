-- memchat schema: memory vectors with pgvector (issue 15, item 3, the vector half).
--
-- With an embeddings endpoint configured (memory.embeddings_model), a prompt's
-- memories are ranked by cosine similarity to the turn as well as by full text
-- and recency (engine/recall.py). This migration gives that its storage, where
-- the server can: pgvector ships with the embedded PostgreSQL, but an external
-- server may not have it, or memchat's login may not be allowed to create it
-- (it is not a trusted extension: a superuser creates it). Then nothing below
-- that needs the extension is created, the migration still succeeds, and
-- retrieval stays full text (`memchat doctor` says why). Once a superuser has
-- run `CREATE EXTENSION vector` in the database, the owner runs
-- `SELECT memchat_setup_vectors()` (or a superuser does it all at once).
--
-- * memory_vectors: one vector per memory and embeddings model (a new model
--   makes the old vectors missing, to be computed again; dimensions may differ
--   between models, so the column has none). Row-level security like every
--   user table, its user checked against the memory id registry (0005), rows
--   gone with their memory; a trigger drops a memory's vector when its content
--   changes, so no vector describes words a memory no longer has.
-- * memchat_recall_vector(): like memchat_recall (0009), SECURITY DEFINER and
--   scoped by memchat.user_id, answering ids and ranks for the scope's user
--   only: the nearest vectors (exact cosine distance over the user's own rows:
--   an approximate index over all users would need one dimension for all and
--   would filter users after the index), fused with memchat_recall's full-text
--   ranking by reciprocal rank fusion, then the newest in their places.
-- * memchat_grant_runtime_roles: 0009's version with one step more (4d).

-- Creates what needs pgvector, when the server has it and we may create it.
-- Answers 'ready' or why not; run again it changes nothing.
CREATE FUNCTION memchat_setup_vectors() RETURNS text
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $setup$
DECLARE
    v_app text;
    v_admin text;
BEGIN
    IF to_regclass('public.memory_vectors') IS NOT NULL THEN
        RETURN 'ready';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
            RETURN 'the pgvector extension is not installed on this server';
        END IF;
        BEGIN
            CREATE EXTENSION vector;
        EXCEPTION WHEN insufficient_privilege OR undefined_file OR feature_not_supported THEN
            RETURN format('could not create the vector extension: %s', SQLERRM);
        END;
    END IF;

    -- The statements below name the vector type: run only now that it exists.
    EXECUTE $ddl$
        CREATE TABLE memory_vectors (
            memory_id  uuid PRIMARY KEY REFERENCES memories (memory_id) ON DELETE CASCADE,
            user_id    text NOT NULL,
            model      text NOT NULL,
            embedding  vector NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            FOREIGN KEY (user_id, memory_id) REFERENCES memory_ids (user_id, memory_id)
                ON DELETE CASCADE
        )
    $ddl$;
    -- A search reads every vector of the user: kept in the row up to a page
    -- (1,536 dimensions: 6 kB) instead of TOASTed out of line, which made
    -- reading them cost more than comparing them (190 ms against 70 ms for
    -- 10,000 such vectors, docs/architecture.md). Larger ones are TOASTed still.
    EXECUTE 'ALTER TABLE memory_vectors SET (toast_tuple_target = 8160)';
    EXECUTE 'ALTER TABLE memory_vectors ALTER COLUMN embedding SET STORAGE MAIN';
    EXECUTE 'CREATE INDEX memory_vectors_by_user ON memory_vectors (user_id, model)';
    EXECUTE 'ALTER TABLE memory_vectors ENABLE ROW LEVEL SECURITY';
    EXECUTE 'ALTER TABLE memory_vectors FORCE ROW LEVEL SECURITY';
    EXECUTE $ddl$
        CREATE POLICY memory_vectors_user_scope ON memory_vectors
            USING (user_id = current_setting('memchat.user_id', true))
            WITH CHECK (user_id = current_setting('memchat.user_id', true))
    $ddl$;
    -- The owner's own (the stale-vector trigger and the search run as the owner).
    EXECUTE 'CREATE POLICY memory_vectors_owner ON memory_vectors TO CURRENT_USER '
            'USING (true) WITH CHECK (true)';

    EXECUTE $ddl$
        CREATE FUNCTION memchat_drop_stale_vector() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $fn$
        BEGIN
            DELETE FROM memory_vectors WHERE memory_id = NEW.memory_id;
            RETURN NEW;
        END
        $fn$
    $ddl$;
    EXECUTE 'REVOKE ALL ON FUNCTION memchat_drop_stale_vector() FROM PUBLIC';
    EXECUTE $ddl$
        CREATE TRIGGER memories_vector_stale AFTER UPDATE OF content ON memories
            FOR EACH ROW WHEN (OLD.content IS DISTINCT FROM NEW.content)
            EXECUTE FUNCTION memchat_drop_stale_vector()
    $ddl$;

    -- The memories a prompt carries for the current scope's user, at most
    -- p_limit: relevant first (rank: the reciprocal rank fusion, k = 60, of the
    -- nearest vectors and memchat_recall's full-text matches), the newest
    -- keeping p_recent places. A vector at cosine distance 1 or more (no
    -- similarity at all) is not near. p_embedding is the turn's vector as text
    -- ('[0.1,0.2,...]'), from the model p_model.
    EXECUTE $ddl$
        CREATE FUNCTION memchat_recall_vector(p_text text, p_embedding text, p_model text,
                                              p_limit integer, p_recent integer)
        RETURNS TABLE (memory_id uuid, rank real)
        LANGUAGE sql
        STABLE
        ROWS 50
        SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $fn$
        WITH query AS MATERIALIZED (
            SELECT p_embedding::vector AS q
        ), nearest AS (
            SELECT v.memory_id,
                   row_number() OVER (ORDER BY v.embedding <=> (SELECT q FROM query),
                                      v.memory_id) AS place
            FROM memory_vectors AS v
            WHERE v.user_id = current_setting('memchat.user_id', true)
              AND v.model = p_model
              AND vector_dims(v.embedding) = vector_dims((SELECT q FROM query))
              AND v.embedding <=> (SELECT q FROM query) < 1
            ORDER BY v.embedding <=> (SELECT q FROM query), v.memory_id
            LIMIT greatest(p_limit - p_recent, 0)
        ), words AS (
            SELECT r.memory_id, row_number() OVER (ORDER BY r.rank DESC, r.memory_id) AS place
            FROM memchat_recall(p_text, p_limit, p_recent) AS r
            WHERE r.rank IS NOT NULL
        ), fused AS (
            SELECT f.memory_id, sum(1.0 / (60 + f.place))::real AS rank
            FROM (SELECT n.memory_id, n.place FROM nearest AS n
                  UNION ALL
                  SELECT w.memory_id, w.place FROM words AS w) AS f
            GROUP BY f.memory_id
            ORDER BY rank DESC, f.memory_id
            LIMIT greatest(p_limit - p_recent, 0)
        ), recent AS (
            SELECT m.memory_id
            FROM memories AS m
            WHERE m.user_id = current_setting('memchat.user_id', true)
            ORDER BY m.updated_at DESC, m.created_at DESC, m.memory_id
            LIMIT greatest(p_limit, 0)
        )
        SELECT both_kinds.memory_id, max(both_kinds.rank)
        FROM (SELECT u.memory_id, u.rank FROM fused AS u
              UNION ALL
              SELECT n.memory_id, NULL FROM recent AS n) AS both_kinds
        GROUP BY both_kinds.memory_id
        $fn$
    $ddl$;
    EXECUTE 'REVOKE ALL ON FUNCTION memchat_recall_vector(text, text, text, integer, integer) '
            'FROM PUBLIC';

    -- A database whose roles were granted already: grant the new objects now
    -- (step 4d of memchat_grant_runtime_roles, which runs again only when the
    -- roles change). A new database is granted after its migrations.
    v_app := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'app');
    v_admin := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'admin');
    IF v_app IS NOT NULL AND v_admin IS NOT NULL THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON memory_vectors TO %I', v_app);
        EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_recall_vector(text, text, text, '
                       'integer, integer) TO %I', v_app);
        EXECUTE format('CREATE POLICY memory_vectors_admin_read ON memory_vectors FOR SELECT '
                       'TO %I USING (true)', v_admin);
        EXECUTE format('GRANT SELECT ON memory_vectors TO %I', v_admin);
    END IF;
    RETURN 'ready';
END
$setup$;
REVOKE ALL ON FUNCTION memchat_setup_vectors() FROM PUBLIC;

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

    -- 4d. (0011) memory vectors, where this database has them (pgvector):
    --     app reads and writes its own scope's rows, admin reads across users.
    IF to_regclass('public.memory_vectors') IS NOT NULL THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON memory_vectors TO %I', p_app);
        EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_recall_vector(text, text, text, '
                       'integer, integer) TO %I', p_app);
        EXECUTE 'DROP POLICY IF EXISTS memory_vectors_admin_read ON memory_vectors';
        EXECUTE format('CREATE POLICY memory_vectors_admin_read ON memory_vectors FOR SELECT '
                       'TO %I USING (true)', p_admin);
        EXECUTE format('GRANT SELECT ON memory_vectors TO %I', p_admin);
    END IF;

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

-- Last, so that a database already granted gets the vector grants (see above).
DO $$
BEGIN
    RAISE NOTICE 'memory vectors: %', memchat_setup_vectors();
END
$$;
