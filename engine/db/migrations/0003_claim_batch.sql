-- memchat schema, version 3: claim several jobs in one round trip.
--
-- One dispatcher per process now claims up to p_limit claimable jobs at once
-- (each the head of a different user's queue, by the same rule as
-- memchat_claim_job) instead of many worker loops each claiming one: with
-- hundreds of jobs in flight, one claim per job and a wake-up of every idle
-- worker per new job cost more than the jobs. The rule that keeps a user's
-- jobs in order is unchanged: a job is claimable only when no older job of
-- its user is open, and the head's row lock (SKIP LOCKED) decides who gets it.

CREATE FUNCTION memchat_claim_jobs(p_worker text, p_lease_seconds double precision, p_limit integer)
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
BEGIN
    RETURN QUERY
    WITH picked AS (
        SELECT j.job_id
          FROM memory_jobs j
         WHERE j.status = 'pending'
           AND j.run_after <= clock_timestamp()
           AND NOT EXISTS (
               SELECT 1 FROM memory_jobs older
                WHERE older.user_id = j.user_id
                  AND older.status IN ('pending', 'running')
                  AND older.job_id < j.job_id)
         ORDER BY j.job_id
         LIMIT greatest(p_limit, 0)
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE memory_jobs m
           SET status = 'running',
               attempts = m.attempts + 1,
               worker = p_worker,
               started_at = clock_timestamp(),
               lease_until = clock_timestamp() + make_interval(secs => p_lease_seconds)
          FROM picked
         WHERE m.job_id = picked.job_id
        RETURNING m.job_id, m.user_id, m.session_id, m.user_message_id,
                  m.assistant_message_id, m.attempts
    )
    SELECT c.job_id, c.user_id, c.session_id, c.user_message_id,
           c.assistant_message_id, c.attempts
      FROM claimed c
           CROSS JOIN LATERAL (
               SELECT pg_notify('memchat_jobs', json_build_object(
                   'user_id', c.user_id, 'job_id', c.job_id, 'state', 'running')::text)
           ) notified
     ORDER BY c.job_id;
END
$$;

REVOKE ALL ON FUNCTION memchat_claim_jobs(text, double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION memchat_claim_jobs(text, double precision, integer) TO memchat_app;
