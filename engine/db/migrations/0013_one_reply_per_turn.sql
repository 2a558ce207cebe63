-- memchat schema: a user message ends with one reply, the one stored last
-- (red-team finding R2).
--
-- A regenerate that starts while the same turn's reply is still streaming
-- (another process: `memchat chat`, a second tab of the same user) answers the
-- reply-less message too. It replaces replies under the session's row lock
-- (UserScope.replace_reply), but the streaming turn then appended its own
-- reply after it: the turn ended with two.
--
-- Now storing a reply removes any earlier reply to the same user message (the
-- assistant messages between the session's previous user message and it).
-- In a trigger, not in the reply's INSERT statement: the INSERT waits on the
-- session row (its `UPDATE sessions`) while a regenerate holds it, and then
-- reads with the snapshot it started with, which does not show the
-- regenerate's reply; each statement of this VOLATILE function takes a fresh
-- snapshot under READ COMMITTED and does. Either order ends with one reply:
-- a regenerate stored last deletes the turn's reply itself; a turn's reply
-- stored last deletes the regenerate's here. A reply's memory job keeps its
-- row either way (its reply reference becomes NULL, as for any replaced reply).
--
-- The DELETE runs as whoever inserts: the app's login deletes under its scope
-- policy and messages_delete_replies (0008), so only its own user's replies.

CREATE FUNCTION memchat_one_reply_per_turn()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
    DELETE FROM messages AS earlier
     WHERE earlier.session_id = NEW.session_id
       AND earlier.role = 'assistant'
       AND earlier.message_id < NEW.message_id
       AND earlier.message_id > COALESCE((
               SELECT max(asked.message_id) FROM messages AS asked
                WHERE asked.session_id = NEW.session_id
                  AND asked.role = 'user'
                  AND asked.message_id < NEW.message_id), 0);
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION memchat_one_reply_per_turn() FROM PUBLIC;

CREATE TRIGGER messages_one_reply_per_turn
    AFTER INSERT ON messages
    FOR EACH ROW WHEN (NEW.role = 'assistant')
    EXECUTE FUNCTION memchat_one_reply_per_turn();
