-- memchat schema, version 12 (issue 15): three parts.
--
-- 1. The runtime roles' grants as rows, not as code (memchat_runtime_grants).
-- 2. Memory retrieval without the sample: per-user word counts (memory_words).
-- 3. An approximate (HNSW) index for vector search, where pgvector is.
--
-- ---------------------------------------------------------------------------
-- 1. Grants as rows.
--
-- Until now each migration that granted something new to the app, admin or
-- worker login copied memchat_grant_runtime_roles whole (0006, 0007, 0008,
-- 0009, 0011) with one step more. Now what each kind of login may do is a row
-- of memchat_runtime_grants, and the function reads them: a later migration
-- inserts its rows and calls memchat_apply_runtime_grants(<its version>) (for
-- a database whose roles were granted already), and copies nothing.
--
-- The grants are exactly those 0011's function gave (tests/engine/
-- test_runtime_grants.py compares every ACL and policy before and after).
-- The table is the owner's: no runtime login can read or change it.

CREATE TABLE memchat_runtime_grants (
    grant_id    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('app', 'admin', 'worker')),
    -- POLICY: a permissive SELECT policy <table>_<kind>_read, USING (true): a
    -- read across users (the admin's), where row-level security would
    -- otherwise show it nothing.
    object_type text NOT NULL CHECK (object_type IN ('SCHEMA', 'TABLE', 'FUNCTION', 'POLICY')),
    -- A table's name, or a function's signature as to_regprocedure reads it.
    object_name text NOT NULL,
    -- Keywords only (it is pasted into GRANT): 'SELECT, INSERT', 'EXECUTE'.
    privileges  text NOT NULL CHECK (privileges ~ '^[A-Z]+(, [A-Z]+)*$'),
    -- Skipped while the object does not exist (memory_vectors on a server
    -- without pgvector); any other missing object is an error, not a silent gap.
    optional    boolean NOT NULL DEFAULT false,
    -- The migration that added the row.
    since       integer NOT NULL,
    UNIQUE (kind, object_type, object_name, privileges)
);

INSERT INTO memchat_runtime_grants (kind, object_type, object_name, privileges, optional, since)
VALUES
    -- 0006: the three logins and what each does.
    ('app', 'SCHEMA', 'public', 'USAGE', false, 6),
    ('admin', 'SCHEMA', 'public', 'USAGE', false, 6),
    ('worker', 'SCHEMA', 'public', 'USAGE', false, 6),
    -- app: a user's rows through the scope policies, nothing else.
    ('app', 'TABLE', 'users', 'SELECT, INSERT, UPDATE, DELETE', false, 6),
    ('app', 'TABLE', 'sessions', 'SELECT, INSERT, UPDATE, DELETE', false, 6),
    ('app', 'TABLE', 'memories', 'SELECT, INSERT, UPDATE, DELETE', false, 6),
    ('app', 'TABLE', 'memory_jobs', 'SELECT, INSERT, UPDATE, DELETE', false, 6),
    ('app', 'TABLE', 'messages', 'SELECT, INSERT', false, 6),
    ('app', 'TABLE', 'memory_events', 'SELECT, INSERT', false, 6),
    -- admin: SELECT across users, through policies for it alone.
    ('admin', 'POLICY', 'users', 'SELECT', false, 6),
    ('admin', 'POLICY', 'sessions', 'SELECT', false, 6),
    ('admin', 'POLICY', 'messages', 'SELECT', false, 6),
    ('admin', 'POLICY', 'memories', 'SELECT', false, 6),
    ('admin', 'POLICY', 'memory_events', 'SELECT', false, 6),
    ('admin', 'POLICY', 'memory_jobs', 'SELECT', false, 6),
    ('admin', 'TABLE', 'users', 'SELECT', false, 6),
    ('admin', 'TABLE', 'sessions', 'SELECT', false, 6),
    ('admin', 'TABLE', 'messages', 'SELECT', false, 6),
    ('admin', 'TABLE', 'memories', 'SELECT', false, 6),
    ('admin', 'TABLE', 'memory_events', 'SELECT', false, 6),
    ('admin', 'TABLE', 'memory_jobs', 'SELECT', false, 6),
    ('admin', 'TABLE', 'memchat_migrations', 'SELECT', false, 6),
    ('admin', 'TABLE', 'memchat_queue_limits', 'SELECT', false, 6),
    ('admin', 'FUNCTION', 'memchat_job_counts()', 'EXECUTE', false, 6),
    -- worker: the queue functions and nothing else.
    ('worker', 'FUNCTION', 'memchat_claim_jobs(text, double precision, integer)', 'EXECUTE',
     false, 6),
    ('worker', 'FUNCTION', 'memchat_requeue_expired_jobs()', 'EXECUTE', false, 6),
    ('worker', 'FUNCTION', 'memchat_job_counts()', 'EXECUTE', false, 6),
    -- 0007: the queue's rule and channel.
    ('app', 'FUNCTION', 'memchat_queue_head(text, bigint)', 'EXECUTE', false, 7),
    ('app', 'FUNCTION', 'memchat_job_channel()', 'EXECUTE', false, 7),
    ('admin', 'FUNCTION', 'memchat_job_channel()', 'EXECUTE', false, 7),
    ('worker', 'FUNCTION', 'memchat_job_channel()', 'EXECUTE', false, 7),
    -- 0008: a reply may be replaced (the restrictive policy
    -- messages_delete_replies keeps user messages undeletable).
    ('app', 'TABLE', 'messages', 'DELETE', false, 8),
    -- 0009: the memory search, for the app's own scope's user only.
    ('app', 'FUNCTION', 'memchat_recall(text, integer, integer)', 'EXECUTE', false, 9),
    -- 0011: memory vectors, where this database has them (pgvector).
    ('app', 'TABLE', 'memory_vectors', 'SELECT, INSERT, UPDATE, DELETE', true, 11),
    ('app', 'FUNCTION', 'memchat_recall_vector(text, text, text, integer, integer)', 'EXECUTE',
     true, 11),
    ('admin', 'POLICY', 'memory_vectors', 'SELECT', true, 11),
    ('admin', 'TABLE', 'memory_vectors', 'SELECT', true, 11);

-- Gives p_app, p_admin, p_worker what the rows from migration p_since on say.
CREATE FUNCTION memchat_apply_grants(p_app text, p_admin text, p_worker text, p_since integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    g memchat_runtime_grants;
    v_role text;
    v_object text;
BEGIN
    FOR g IN SELECT * FROM memchat_runtime_grants WHERE since >= p_since ORDER BY grant_id LOOP
        v_role := CASE g.kind WHEN 'app' THEN p_app WHEN 'admin' THEN p_admin ELSE p_worker END;
        -- The object as the catalogue names it (quoted where it must be), or NULL.
        v_object := CASE g.object_type
            WHEN 'SCHEMA' THEN (SELECT quote_ident(nspname) FROM pg_namespace
                                 WHERE nspname = g.object_name)
            WHEN 'FUNCTION' THEN to_regprocedure(g.object_name)::text
            ELSE to_regclass(g.object_name)::text
        END;
        IF v_object IS NULL THEN
            IF g.optional THEN
                CONTINUE;
            END IF;
            RAISE EXCEPTION 'memchat_runtime_grants row %: no % %', g.grant_id, g.object_type,
                g.object_name;
        END IF;
        IF g.object_type = 'POLICY' THEN
            EXECUTE format('DROP POLICY IF EXISTS %I ON %s',
                           g.object_name || '_' || g.kind || '_read', v_object);
            EXECUTE format('CREATE POLICY %I ON %s FOR %s TO %I USING (true)',
                           g.object_name || '_' || g.kind || '_read', v_object, g.privileges,
                           v_role);
        ELSE
            EXECUTE format('GRANT %s ON %s %s TO %I', g.privileges, g.object_type, v_object,
                           v_role);
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION memchat_apply_grants(text, text, text, integer) FROM PUBLIC;

-- For a later migration: give the roles this database was granted to (if it
-- was: a new database is granted after its migrations) the rows it added.
CREATE FUNCTION memchat_apply_runtime_grants(p_since integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_app text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'app');
    v_admin text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'admin');
    v_worker text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'worker');
BEGIN
    IF v_app IS NOT NULL AND v_admin IS NOT NULL AND v_worker IS NOT NULL THEN
        PERFORM memchat_apply_grants(v_app, v_admin, v_worker, p_since);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION memchat_apply_runtime_grants(integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION memchat_grant_runtime_roles(p_app text, p_admin text, p_worker text)
RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_role text;
BEGIN
    -- 1. Whoever held this database's grants before, and is not one of the new roles.
    FOR v_role IN
        SELECT r.rolname FROM pg_roles r
         WHERE r.rolname IN (SELECT rolname FROM memchat_runtime_roles
                             UNION ALL SELECT 'memchat_app' UNION ALL SELECT 'memchat_admin')
           AND r.rolname <> ALL (ARRAY[p_app, p_admin, p_worker])
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

    -- 2. What each kind may do: memchat_runtime_grants, every row.
    PERFORM memchat_apply_grants(p_app, p_admin, p_worker, 0);

    -- 3. Only these roles (and the owner, superusers) may connect, where we may say so:
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

-- ---------------------------------------------------------------------------
-- 2. Memory retrieval without the sample (issue 15: p95 <= 5 ms at 10,000
-- memories a user, 1 M in the database).
--
-- memchat_recall (0009) judged which of the turn's words are too common to
-- pick a memory out by reading the user's 128 newest memories and unnesting
-- their lexemes at every search: two thirds of the function's time at 1 M
-- rows (EXPLAIN ANALYZE: 0.7 of 1.1 ms). Now each user's document frequency
-- is kept as it changes, in memory_words, one row per (user, lexeme): in how
-- many of the user's memories the word is; the lexeme '' counts the user's
-- memories. A search reads the turn's words' rows (one index probe each,
-- at most 16) and the user's '' row.
--
-- A word is too common when it is in COMMON_HITS (32) or more of the user's
-- memories and in a quarter of them or more (engine/recall.py): for a user with
-- up to 128 memories exactly what the 128-row sample said; for a larger one the
-- same share, counted over every memory instead of the newest 128.
--
-- Kept by statement-level triggers on memories (transition tables: a bulk
-- insert costs one aggregate, not a trigger call per row). Every change to a
-- user's counts updates the user's '' row first (the rows go in (user,
-- lexeme) order and '' sorts first), so two transactions writing one user's
-- memories queue on that row instead of deadlocking on the others; an update
-- that changes no memory's words writes nothing. Nobody but the owner reads or
-- writes the table (no grants); the triggers and memchat_recall run as the
-- owner.

CREATE TABLE memory_words (
    user_id  text NOT NULL,
    lexeme   text NOT NULL,
    memories integer NOT NULL,
    PRIMARY KEY (user_id, lexeme)
);

CREATE FUNCTION memchat_count_memory_words() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    -- A memory counts under each of its words and under '' (itself): +1 for
    -- its words now, -1 for its words before. A user whose words did not
    -- change (an update of other columns) is not touched; one whose did has
    -- its '' row written too, first (the lock order above). The same
    -- statement three times, over the transition tables each trigger has:
    -- static SQL keeps its plan (EXECUTE'd SQL cost 0.25 ms a write more).
    IF TG_OP = 'INSERT' THEN
        WITH changed AS (
            SELECT n.user_id, n.search, 1 AS by FROM new_memories AS n
        ), delta AS (
            SELECT c.user_id, l.lexeme, sum(c.by)::integer AS by
              FROM changed AS c,
                   unnest(array_append(tsvector_to_array(c.search), '')) AS l(lexeme)
             GROUP BY c.user_id, l.lexeme
        )
        INSERT INTO memory_words AS w (user_id, lexeme, memories)
        SELECT d.user_id, d.lexeme, d.by
          FROM delta AS d
         WHERE d.user_id IN (SELECT e.user_id FROM delta AS e WHERE e.by <> 0)
           AND (d.by <> 0 OR d.lexeme = '')
         ORDER BY d.user_id, d.lexeme
        ON CONFLICT (user_id, lexeme) DO UPDATE SET memories = w.memories + excluded.memories;
    ELSIF TG_OP = 'DELETE' THEN
        WITH changed AS (
            SELECT o.user_id, o.search, -1 AS by FROM old_memories AS o
        ), delta AS (
            SELECT c.user_id, l.lexeme, sum(c.by)::integer AS by
              FROM changed AS c,
                   unnest(array_append(tsvector_to_array(c.search), '')) AS l(lexeme)
             GROUP BY c.user_id, l.lexeme
        )
        INSERT INTO memory_words AS w (user_id, lexeme, memories)
        SELECT d.user_id, d.lexeme, d.by
          FROM delta AS d
         WHERE d.user_id IN (SELECT e.user_id FROM delta AS e WHERE e.by <> 0)
           AND (d.by <> 0 OR d.lexeme = '')
         ORDER BY d.user_id, d.lexeme
        ON CONFLICT (user_id, lexeme) DO UPDATE SET memories = w.memories + excluded.memories;
    ELSE
        WITH changed AS (
            SELECT n.user_id, n.search, 1 AS by FROM new_memories AS n
            UNION ALL
            SELECT o.user_id, o.search, -1 FROM old_memories AS o
        ), delta AS (
            SELECT c.user_id, l.lexeme, sum(c.by)::integer AS by
              FROM changed AS c,
                   unnest(array_append(tsvector_to_array(c.search), '')) AS l(lexeme)
             GROUP BY c.user_id, l.lexeme
        )
        INSERT INTO memory_words AS w (user_id, lexeme, memories)
        SELECT d.user_id, d.lexeme, d.by
          FROM delta AS d
         WHERE d.user_id IN (SELECT e.user_id FROM delta AS e WHERE e.by <> 0)
           AND (d.by <> 0 OR d.lexeme = '')
         ORDER BY d.user_id, d.lexeme
        ON CONFLICT (user_id, lexeme) DO UPDATE SET memories = w.memories + excluded.memories;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        -- Words no memory of the user has any more.
        DELETE FROM memory_words AS w
         USING (SELECT DISTINCT o.user_id, l.lexeme
                  FROM old_memories AS o,
                       unnest(array_append(tsvector_to_array(o.search), '')) AS l(lexeme)) AS o
         WHERE w.user_id = o.user_id AND w.lexeme = o.lexeme AND w.memories <= 0;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION memchat_count_memory_words() FROM PUBLIC;

CREATE FUNCTION memchat_forget_memory_words() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    TRUNCATE memory_words;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION memchat_forget_memory_words() FROM PUBLIC;

CREATE TRIGGER memories_words_inserted AFTER INSERT ON memories
    REFERENCING NEW TABLE AS new_memories
    FOR EACH STATEMENT EXECUTE FUNCTION memchat_count_memory_words();
CREATE TRIGGER memories_words_updated AFTER UPDATE ON memories
    REFERENCING OLD TABLE AS old_memories NEW TABLE AS new_memories
    FOR EACH STATEMENT EXECUTE FUNCTION memchat_count_memory_words();
CREATE TRIGGER memories_words_deleted AFTER DELETE ON memories
    REFERENCING OLD TABLE AS old_memories
    FOR EACH STATEMENT EXECUTE FUNCTION memchat_count_memory_words();
CREATE TRIGGER memories_words_truncated AFTER TRUNCATE ON memories
    FOR EACH STATEMENT EXECUTE FUNCTION memchat_forget_memory_words();

-- The memories there are already.
INSERT INTO memory_words (user_id, lexeme, memories)
SELECT m.user_id, l.lexeme, count(*)
  FROM memories AS m, unnest(array_append(tsvector_to_array(m.search), '')) AS l(lexeme)
 GROUP BY m.user_id, l.lexeme;

-- 0009's search, with the counts instead of the sample; the same signature,
-- results and grants (memchat_recall_vector calls it as before).
CREATE OR REPLACE FUNCTION memchat_recall(p_text text, p_limit integer, p_recent integer)
RETURNS TABLE (memory_id uuid, rank real)
LANGUAGE sql
STABLE
ROWS 50
SECURITY DEFINER
SET search_path = public, pg_temp
AS $fn$
WITH words AS (
    SELECT word
    FROM unnest(tsvector_to_array(to_tsvector('simple', coalesce(p_text, '')))) AS word
    WHERE length(word) > 1
    ORDER BY length(word) DESC, word
    LIMIT 16
), counts AS MATERIALIZED (
    -- The turn's words' counts and the user's memories (''): one index probe each.
    SELECT w.lexeme, w.memories
    FROM memory_words AS w
    WHERE w.user_id = current_setting('memchat.user_id', true)
      AND w.lexeme = ANY (ARRAY(SELECT word FROM words) || ''::text)
), common AS (
    SELECT c.lexeme
    FROM counts AS c
    WHERE c.lexeme <> ''
      AND c.memories >= 32
      AND c.memories * 4 >= (SELECT t.memories FROM counts AS t WHERE t.lexeme = '')
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
$fn$;

-- ---------------------------------------------------------------------------
-- 3. An approximate index for vector search (where pgvector is: 0011).
--
-- memchat_recall_vector (0011) compared the turn with every vector of the
-- user: 60-90 ms at 10,000 x 1,536 dimensions here. memory_vectors.embedding
-- has no dimension (models differ), and HNSW needs one, so the index is on an
-- expression cast to the model's dimension, partial to that model and
-- dimension:
--     hnsw ((embedding::vector(<dims>)) vector_cosine_ops)
--     WHERE model = '<model>' AND vector_dims(embedding) = <dims>
-- memchat_index_vectors(model) creates it once the model's dimension is known
-- (from its stored vectors): run as the owner when memchat starts with
-- memory.embeddings_model set (engine/db/database.py); the runtime logins get
-- no new right. The search then asks the index for the user's nearest with
-- pgvector 0.8's iterative scans (hnsw.iterative_scan = relaxed_order: the
-- index keeps going until enough of this user's vectors pass the filter) and
-- re-sorts them by exact distance. Without the index (another model, more
-- than 2,000 dimensions, pgvector < 0.8) it is the exact scan of 0011.

-- The index's name for a model and dimension.
CREATE FUNCTION memchat_vector_index_name(p_model text, p_dims integer) RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = public, pg_temp
RETURN 'memory_vectors_hnsw_' || left(md5(p_model || '/' || p_dims), 16);
REVOKE ALL ON FUNCTION memchat_vector_index_name(text, integer) FROM PUBLIC;

-- The search, replaced where the table exists (memchat_index_vectors installs
-- it too, for a database that gets pgvector later). Dynamic SQL throughout:
-- the vector type may not exist when this migration runs.
CREATE FUNCTION memchat_install_recall_vector() RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $install$
BEGIN
    -- The SET below names pgvector 0.8's setting; with an older one, 0011's
    -- exact search stays.
    IF to_regclass('public.memory_vectors') IS NULL
       OR (SELECT string_to_array(extversion, '.')::int[] FROM pg_extension
            WHERE extname = 'vector') < ARRAY[0, 8] THEN
        RETURN;
    END IF;
    -- Same signature, results and grants as 0011's; the fusion is unchanged.
    EXECUTE $ddl$
        CREATE OR REPLACE FUNCTION memchat_recall_vector(p_text text, p_embedding text,
                                                         p_model text, p_limit integer,
                                                         p_recent integer)
        RETURNS TABLE (memory_id uuid, rank real)
        LANGUAGE plpgsql
        STABLE
        ROWS 50
        SECURITY DEFINER
        SET search_path = public, pg_temp
        -- Restored when the function returns.
        SET hnsw.iterative_scan = relaxed_order
        AS $fn$
        -- The result columns are variables here too: names in the queries are columns.
        #variable_conflict use_column
        DECLARE
            v_query vector := p_embedding::vector;
            v_dims integer := vector_dims(p_embedding::vector);
            v_near uuid[];
        BEGIN
            IF to_regclass(memchat_vector_index_name(p_model, v_dims)) IS NOT NULL THEN
                -- Literal model and dimension: the index's predicate and
                -- expression must match the query's.
                EXECUTE format($q$
                    SELECT array_agg(n.memory_id ORDER BY n.distance, n.memory_id)
                    FROM (SELECT v.memory_id,
                                 v.embedding::vector(%1$s) <=> $1::vector(%1$s) AS distance
                          FROM memory_vectors AS v
                          WHERE v.model = %2$L AND vector_dims(v.embedding) = %1$s
                            AND v.user_id = current_setting('memchat.user_id', true)
                          ORDER BY v.embedding::vector(%1$s) <=> $1::vector(%1$s)
                          LIMIT $2) AS n
                    WHERE n.distance < 1
                $q$, v_dims, p_model)
                INTO v_near USING v_query, greatest(p_limit - p_recent, 0);
            ELSE
                SELECT array_agg(n.memory_id ORDER BY n.distance, n.memory_id) INTO v_near
                FROM (SELECT v.memory_id, v.embedding <=> v_query AS distance
                      FROM memory_vectors AS v
                      WHERE v.user_id = current_setting('memchat.user_id', true)
                        AND v.model = p_model
                        AND vector_dims(v.embedding) = v_dims
                        AND v.embedding <=> v_query < 1
                      ORDER BY v.embedding <=> v_query, v.memory_id
                      LIMIT greatest(p_limit - p_recent, 0)) AS n;
            END IF;
            RETURN QUERY
            WITH nearest AS (
                SELECT u.memory_id, u.place
                FROM unnest(v_near) WITH ORDINALITY AS u(memory_id, place)
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
            SELECT both_kinds.memory_id, max(both_kinds.rank)::real
            FROM (SELECT u.memory_id, u.rank FROM fused AS u
                  UNION ALL
                  SELECT n.memory_id, NULL FROM recent AS n) AS both_kinds
            GROUP BY both_kinds.memory_id;
        END
        $fn$
    $ddl$;
END
$install$;
REVOKE ALL ON FUNCTION memchat_install_recall_vector() FROM PUBLIC;

-- Creates the index for p_model's vectors (once they exist); answers what it
-- did or why not. Run again it changes nothing. The owner's only.
CREATE FUNCTION memchat_index_vectors(p_model text) RETURNS text
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_dims integer;
    v_name text;
BEGIN
    IF to_regclass('public.memory_vectors') IS NULL THEN
        RETURN 'no memory vectors in this database (pgvector)';
    END IF;
    IF (SELECT string_to_array(extversion, '.')::int[] FROM pg_extension
         WHERE extname = 'vector') < ARRAY[0, 8] THEN
        RETURN 'exact search: pgvector 0.8 or later is needed for filtered index scans';
    END IF;
    PERFORM memchat_install_recall_vector();
    -- A model's vectors have one dimension; the newest says which.
    EXECUTE 'SELECT vector_dims(embedding) FROM memory_vectors WHERE model = $1 '
            'ORDER BY created_at DESC LIMIT 1' INTO v_dims USING p_model;
    IF v_dims IS NULL THEN
        RETURN format('exact search: no vectors of %s yet', p_model);
    END IF;
    IF v_dims > 2000 THEN
        -- HNSW's limit for the vector type.
        RETURN format('exact search: %s dimensions (an HNSW index takes up to 2,000)', v_dims);
    END IF;
    v_name := memchat_vector_index_name(p_model, v_dims);
    IF to_regclass(v_name) IS NULL THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON memory_vectors USING hnsw '
                       '((embedding::vector(%s)) vector_cosine_ops) '
                       'WHERE model = %L AND vector_dims(embedding) = %s',
                       v_name, v_dims, p_model, v_dims);
        -- Without statistics on vector_dims(embedding) the planner guesses
        -- that 0.5 % of a user's vectors have the dimension, and sorts them
        -- all rather than use the index (EXPLAIN: 120 ms against 6 ms).
        EXECUTE 'CREATE STATISTICS IF NOT EXISTS memory_vectors_dims '
                'ON (vector_dims(embedding)) FROM memory_vectors';
        EXECUTE 'ANALYZE memory_vectors';
    END IF;
    RETURN format('HNSW index for %s (%s dimensions)', p_model, v_dims);
END
$$;
REVOKE ALL ON FUNCTION memchat_index_vectors(text) FROM PUBLIC;

SELECT memchat_install_recall_vector();
