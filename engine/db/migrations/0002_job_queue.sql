-- memchat schema, version 2: the memory job queue.
--
-- A job is claimable when it is the head of its user's queue: pending, due,
-- and no older job of the same user is still open (pending or running). So a
-- user's jobs run one at a time, in order, across every process, while
-- different users' jobs run in parallel. The head's row lock (FOR UPDATE SKIP
-- LOCKED) decides which worker gets it.
--
-- Claiming looks across users, so it is a SECURITY DEFINER function owned by
-- the schema owner; memchat_app may only EXECUTE it. It returns the job and
-- nothing of any user's content. The owner gets a policy on memory_jobs so the
-- function works when the owner is not a superuser (FORCE applies to owners).

CREATE INDEX memory_jobs_open_by_user ON memory_jobs (user_id, job_id)
    WHERE status IN ('pending', 'running');
CREATE INDEX memory_jobs_pending ON memory_jobs (job_id) WHERE status = 'pending';
DROP INDEX memory_jobs_open;
CREATE INDEX memory_jobs_running_lease ON memory_jobs (lease_until) WHERE status = 'running';

CREATE POLICY memory_jobs_queue_owner ON memory_jobs TO CURRENT_USER USING (true) WITH CHECK (true);

CREATE FUNCTION memchat_claim_job(p_worker text, p_lease_seconds double precision)
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
AS $$
DECLARE
    v_job memory_jobs%ROWTYPE;
BEGIN
    SELECT j.* INTO v_job
      FROM memory_jobs j
     WHERE j.status = 'pending'
       AND j.run_after <= clock_timestamp()
       AND NOT EXISTS (
           SELECT 1 FROM memory_jobs older
            WHERE older.user_id = j.user_id
              AND older.status IN ('pending', 'running')
              AND older.job_id < j.job_id)
     ORDER BY j.job_id
     LIMIT 1
     FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE memory_jobs m
       SET status = 'running',
           attempts = m.attempts + 1,
           worker = p_worker,
           started_at = clock_timestamp(),
           lease_until = clock_timestamp() + make_interval(secs => p_lease_seconds)
     WHERE m.job_id = v_job.job_id;
    PERFORM pg_notify('memchat_jobs', json_build_object(
        'user_id', v_job.user_id, 'job_id', v_job.job_id, 'state', 'running')::text);
    RETURN QUERY SELECT v_job.job_id, v_job.user_id, v_job.session_id,
                        v_job.user_message_id, v_job.assistant_message_id, v_job.attempts + 1;
END
$$;

-- A running job whose lease ran out belongs to a worker that died (or hung):
-- put it back at the head of its user's queue. Returns how many were reset.
CREATE FUNCTION memchat_requeue_expired_jobs()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    WITH expired AS (
        UPDATE memory_jobs
           SET status = 'pending', worker = NULL, lease_until = NULL,
               run_after = clock_timestamp(),
               last_error = coalesce(last_error || '; ', '') || 'lease expired (worker lost)'
         WHERE status = 'running' AND lease_until < clock_timestamp()
        RETURNING user_id, job_id
    )
    SELECT count(*) INTO v_count FROM (
        SELECT pg_notify('memchat_jobs', json_build_object(
                   'user_id', user_id, 'job_id', job_id, 'state', 'pending')::text)
          FROM expired
    ) notified;
    RETURN v_count;
END
$$;

-- Counts across users, for the header's "N jobs running" and for waiting until
-- a load has been processed; no user content.
CREATE FUNCTION memchat_job_counts()
RETURNS TABLE (pending bigint, running bigint, failed bigint, done bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE status = 'pending'),
           count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'done')
      FROM memory_jobs
$$;

REVOKE ALL ON FUNCTION memchat_claim_job(text, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION memchat_requeue_expired_jobs() FROM PUBLIC;
REVOKE ALL ON FUNCTION memchat_job_counts() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION memchat_claim_job(text, double precision) TO memchat_app;
GRANT EXECUTE ON FUNCTION memchat_requeue_expired_jobs() TO memchat_app;
GRANT EXECUTE ON FUNCTION memchat_job_counts() TO memchat_app, memchat_admin;
