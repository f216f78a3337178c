-- Read model: members (projections/src/models/members). Rows are a pure fold of the log (no wall
-- clock): times come from event metadata. A rebuild fills shadow copies of these tables
-- (`<table>__rebuild`, created LIKE these INCLUDING ALL) and swaps them in one transaction.
--
-- Until 2026-12 these tables were created by 20261122000003_projections.sql; databases migrated
-- then are recognised at start-up (rookery_store::db::migrate) and this migration is recorded as
-- applied without running.
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
