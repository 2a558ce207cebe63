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
-- The column is part of memories, so row-level security and the existing
-- grants cover it: nothing new to grant.

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
