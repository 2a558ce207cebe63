-- memchat schema, version 4: what the model spent, and what a job has to say.
--
-- Token usage is kept per stored reply and per memory job when the endpoint
-- reports it (NULL when it does not: unknown is not zero). A memory job that
-- succeeded can still have something to say: changes refused by the bounds
-- (memory.max_calls_per_job, memory.max_per_user), or a model that answered
-- in no usable form. That goes in `note`, apart from `last_error`, which is
-- only for failures and is cleared when a job succeeds. `extraction` records
-- the form the job's answer was asked in (tools or json).

ALTER TABLE messages
    ADD COLUMN prompt_tokens integer,
    ADD COLUMN completion_tokens integer;

ALTER TABLE memory_jobs
    ADD COLUMN note text,
    ADD COLUMN extraction text,
    ADD COLUMN prompt_tokens integer,
    ADD COLUMN completion_tokens integer;
