-- Projection bookkeeping: a checkpoint per (projection, partition), written in the same
-- transaction as the read-model rows it covers.
CREATE TABLE projection_checkpoints
(
    projection text        NOT NULL,
    partition  integer     NOT NULL,
    txid       bigint      NOT NULL DEFAULT 0,
    gpos       bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition)
);

-- State per projection: running/paused/rebuilding/failed, last error, rebuild progress.
CREATE TABLE projection_state
(
    projection   text PRIMARY KEY,
    version      integer     NOT NULL DEFAULT 1,
    state        text        NOT NULL DEFAULT 'running',
    last_error   text,
    rebuild_txid bigint,
    rebuild_gpos bigint,
    rebuild_done bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Read model: members. Rows are a pure fold of the log (no wall clock): times come from event
-- metadata. A rebuild fills shadow copies of these tables and swaps them in one transaction.
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
CREATE INDEX members_by_joined ON members (community_id, joined_at, user_id);
CREATE INDEX members_by_username ON members (community_id, username, user_id);

CREATE TABLE member_counts
(
    community_id uuid PRIMARY KEY,
    member_count bigint NOT NULL
);

-- Hub users as the members projection knows them (username, platform identities).
CREATE TABLE member_users
(
    user_id    uuid PRIMARY KEY,
    username   text  NOT NULL,
    identities jsonb NOT NULL DEFAULT '[]'
);
