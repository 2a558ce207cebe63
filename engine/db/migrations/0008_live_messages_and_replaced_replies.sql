-- memchat schema, version 8: live messages and replies that can be replaced.
--
-- 1. Every change of a message is announced on 'memchat_messages' (engine/store.py's
--    MESSAGE_CHANNEL) by a trigger, so a pane showing a
--    session sees messages another process wrote (the CLI, another memchat).
--    Like every channel here the payload carries ids only ("look again"):
--    anyone connected may send one, and listeners re-read through the user's
--    scope. The trigger function runs with the rights of whoever writes the
--    row; pg_notify is open to every role.
-- 2. Regenerating a reply replaces it: in one transaction the old assistant row
--    is deleted and the new one appended (engine/store.py: replace_reply). The
--    app may now DELETE from messages, under its scope policy and a restrictive
--    policy that allows assistant rows only: what a user wrote stays append-only.
--    memchat_grant_runtime_roles is replaced with that one grant more.

CREATE FUNCTION memchat_notify_message()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_row messages%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_row := OLD;
    ELSE
        v_row := NEW;
    END IF;
    -- The channel's one spelling in SQL (a test listens on MESSAGE_CHANNEL).
    PERFORM pg_notify('memchat_messages', json_build_object(
        'user_id', v_row.user_id, 'session_id', v_row.session_id,
        'message_id', v_row.message_id, 'op', lower(TG_OP))::text);
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION memchat_notify_message() FROM PUBLIC;

CREATE TRIGGER messages_notify
    AFTER INSERT OR UPDATE OR DELETE ON messages
    FOR EACH ROW EXECUTE FUNCTION memchat_notify_message();

-- Restrictive: combined with AND with the scope policy, for DELETE only.
CREATE POLICY messages_delete_replies ON messages AS RESTRICTIVE FOR DELETE
    USING (role = 'assistant');

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

-- A database whose roles were granted before this migration: grant the same to
-- them now (memchat_grant_runtime_roles runs again only when the roles change).
DO $$
DECLARE
    v_app text := (SELECT rolname FROM memchat_runtime_roles WHERE kind = 'app');
BEGIN
    IF v_app IS NOT NULL THEN
        EXECUTE format('GRANT DELETE ON messages TO %I', v_app);
    END IF;
END
$$;
