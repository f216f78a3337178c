-- Projection bookkeeping: a checkpoint per (projection, partition), written in the same
-- transaction as the read-model rows it covers (DESIGN.md §3.2, §6).
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

-- Read model: members. Rows are a pure fold of the log (no wall clock): times come from event
-- metadata. A rebuild fills shadow copies of these tables (`<table>__rebuild`, created LIKE these
-- INCLUDING ALL) and swaps them in one transaction.
--
-- `joined_at` is the time of the last MemberJoined, or for a row that never joined (a pending
-- request, a ban of a non-member) the time the row appeared. `updated_at`, `txid` and `gpos` come
-- from the last membership event applied to the row (never from user events, whose order
-- relative to membership events differs between live partitions and a rebuild).
CREATE TABLE members
(
    community_id uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    username     text        NOT NULL,
    role         text        NOT NULL,
    status       text        NOT NULL,
    joined_at    timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    txid         bigint      NOT NULL,
    gpos         bigint      NOT NULL,
    PRIMARY KEY (community_id, user_id)
);
-- Keyset pagination: one index per sort, filtered by status first (lists default to active).
CREATE INDEX members_by_joined ON members (community_id, status, joined_at, user_id);
CREATE INDEX members_by_username ON members (community_id, status, username, user_id);
-- A user's registration fills the username on all of their member rows.
CREATE INDEX members_by_user ON members (user_id);

-- Active members per community; a row exists for every community with a membership event.
CREATE TABLE member_counts
(
    community_id uuid PRIMARY KEY,
    member_count bigint NOT NULL
);

-- Hub users as the members projection knows them (username, platform identities sorted by
-- platform). A row also exists (username '') for a user seen only in membership events, so that
-- it can serve as the per-user lock that keeps denormalised usernames convergent.
CREATE TABLE member_users
(
    user_id    uuid PRIMARY KEY,
    username   text  NOT NULL,
    identities jsonb NOT NULL DEFAULT '[]'
);
