-- Projection bookkeeping: a checkpoint per (projection, partition), written in the same
-- transaction as the read-model rows it covers (docs/architecture.md).
--
-- A delivery is already applied when `stream_seq <= checkpoint.stream_seq` or its log key is at
-- or below `max((txid, gpos), (floor_txid, floor_gpos))`. The floor means "every event of this
-- partition with a key at or below it is applied": an idle worker raises it to the relay cursor,
-- and a rebuild's switch raises it to the head it folded up to.
CREATE TABLE projection_checkpoints
(
    projection    text        NOT NULL,
    partition     integer     NOT NULL,
    -- last applied (or parked) log key
    txid          bigint      NOT NULL DEFAULT 0,
    gpos          bigint      NOT NULL DEFAULT 0,
    -- last handled JetStream stream sequence (consumers restart after it)
    stream_seq    bigint      NOT NULL DEFAULT 0,
    floor_txid    bigint      NOT NULL DEFAULT 0,
    floor_gpos    bigint      NOT NULL DEFAULT 0,
    applied       bigint      NOT NULL DEFAULT 0,
    -- consecutive failed attempts on the partition's next event, and why
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    last_error_at timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition)
);

-- State per projection. `version` is the version of the code that built the live tables.
-- `state` is 'running', 'rebuilding' (a rebuild is filling the shadow tables; `rebuild_*` is its
-- resumable cursor) or 'failed' (the last rebuild stopped on an error; run it again to resume).
-- Pausing is separate so a rebuild does not unpause the live workers.
CREATE TABLE projection_state
(
    projection         text PRIMARY KEY,
    version            integer     NOT NULL DEFAULT 1,
    state              text        NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'rebuilding', 'failed')),
    paused             boolean     NOT NULL DEFAULT false,
    last_error         text,
    last_error_at      timestamptz,
    rebuild_version    integer,
    rebuild_txid       bigint,
    rebuild_gpos       bigint,
    rebuild_done       bigint,
    rebuild_total      bigint,
    rebuild_started_at timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
