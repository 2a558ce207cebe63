-- memchat schema, version 7: one head-of-queue rule, one channel name.
--
-- The rule that keeps a user's jobs in order ("a job may run when no older job
-- of its user is open") was written twice: in memchat_claim_jobs (the
-- dispatcher) and in the own-user claim of `memchat chat` (engine/queue.py).
-- It is now memchat_queue_head, used by both. It is SECURITY INVOKER: called
-- from the app login it reads that user's jobs through row-level security;
-- called from memchat_claim_jobs (SECURITY DEFINER) it reads every user's.
--
-- The channel a job's change is announced on is memchat_job_channel(), the
-- same text as engine/queue.py's JOB_CHANNEL (a test holds them equal).
--
-- memchat_claim_jobs and memchat_requeue_expired_jobs are replaced with the
-- same signatures, so their grants stay. The two new functions are granted
-- like every other: by memchat_grant_runtime_roles (replaced here, with one
-- step more), to this database's login roles only, never to PUBLIC.

CREATE FUNCTION memchat_job_channel()
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$ SELECT 'memchat_jobs'::text $$;

CREATE FUNCTION memchat_queue_head(p_user_id text, p_job_id bigint)
RETURNS boolean
LANGUAGE sql
STABLE
-- No SET clause (it would be one more function call per row); the table is
-- named with its schema instead, so a caller's search_path cannot redirect it.
AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM public.memory_jobs older
         WHERE older.user_id = p_user_id
           AND older.status IN ('pending', 'running')
           AND older.job_id < p_job_id)
$$;

REVOKE ALL ON FUNCTION memchat_job_channel() FROM PUBLIC;
REVOKE ALL ON FUNCTION memchat_queue_head(text, bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION memchat_claim_jobs(
    p_worker text, p_lease_seconds double precision, p_limit integer)
RETURNS TABLE (
    job_id bigint,
    user_id text,
    session_id uuid,
    user_message_id bigint,
    assistant_message_id bigint,
    attempts integer
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
-- One dispatcher connection calls this all the time, so plpgsql would soon
-- use a generic plan, which (not knowing p_limit) reads every job; a custom
-- plan per call keeps to the queue heads.
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_lease double precision;
BEGIN
    PERFORM memchat_assert_unscoped('memchat_claim_jobs');
    SELECT least(greatest(coalesce(p_lease_seconds, 0), 1), l.max_lease_seconds)
      INTO v_lease FROM memchat_queue_limits l;
    RETURN QUERY
    WITH picked AS (
        SELECT j.job_id
          FROM memory_jobs j
         WHERE j.status = 'pending'
           AND j.run_after <= clock_timestamp()
           AND memchat_queue_head(j.user_id, j.job_id)
         ORDER BY j.job_id
         LIMIT greatest(p_limit, 0)
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE memory_jobs m
           SET status = 'running',
               attempts = m.attempts + 1,
               worker = p_worker,
               started_at = clock_timestamp(),
               lease_until = clock_timestamp() + make_interval(secs => v_lease)
          FROM picked
         WHERE m.job_id = picked.job_id
        RETURNING m.job_id, m.user_id, m.session_id, m.user_message_id,
                  m.assistant_message_id, m.attempts
    )
    SELECT c.job_id, c.user_id, c.session_id, c.user_message_id,
           c.assistant_message_id, c.attempts
      FROM claimed c
           CROSS JOIN LATERAL (
               SELECT pg_notify(memchat_job_channel(), json_build_object(
                   'user_id', c.user_id, 'job_id', c.job_id, 'state', 'running')::text)
           ) notified
     ORDER BY c.job_id;
END
$$;

CREATE OR REPLACE FUNCTION memchat_requeue_expired_jobs()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM memchat_assert_unscoped('memchat_requeue_expired_jobs');
    WITH expired AS (
        UPDATE memory_jobs
           SET status = 'pending', worker = NULL, lease_until = NULL,
               run_after = clock_timestamp(),
               last_error = coalesce(last_error || '; ', '') || 'lease expired (worker lost)'
         WHERE status = 'running' AND lease_until < clock_timestamp()
        RETURNING user_id, job_id
    )
    SELECT count(*) INTO v_count FROM (
        SELECT pg_notify(memchat_job_channel(), json_build_object(
                   'user_id', user_id, 'job_id', job_id, 'state', 'pending')::text)
          FROM expired
    ) notified;
    RETURN v_count;
END
$$;

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
-- functions to the same roles now (memchat_grant_runtime_roles runs again
-- only when the roles change). A new database is granted after its migrations.
DO $$
DECLARE
    v_app text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'app');
    v_admin text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'admin');
    v_worker text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'worker');
BEGIN
    IF v_app IS NOT NULL AND v_admin IS NOT NULL AND v_worker IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_queue_head(text, bigint) TO %I', v_app);
        EXECUTE format('GRANT EXECUTE ON FUNCTION memchat_job_channel() TO %I, %I, %I',
                       v_app, v_admin, v_worker);
    END IF;
END
$$;
