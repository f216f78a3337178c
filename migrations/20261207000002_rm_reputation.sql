-- Read model: reputation (projections/src/models/reputation). Folded in log order (one worker
-- over every partition): a score is clamped after every change, so the order of changes of
-- different aggregates matters. Scores, points and deltas are exact ten-thousandths (`*_e4`).

-- Each member's score in a community.
CREATE TABLE reputation_scores
(
    community_id uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    score_e4     bigint      NOT NULL,
    -- history rows of this member so far (the last one's seq)
    changes      bigint      NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (community_id, user_id)
);
-- The leaderboard: highest first, tie-broken by user id.
CREATE INDEX reputation_scores_leaderboard
    ON reputation_scores (community_id, score_e4 DESC, user_id);

-- Every change of a member's score, in the order it was applied: what it was worth under the
-- policy then (`points`, or the target of a `set`), what it changed after clamping (`delta`),
-- and the score after it.
CREATE TABLE reputation_history
(
    community_id uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    seq          bigint      NOT NULL,
    -- the log key and message id of the event that made the change
    txid         bigint      NOT NULL,
    gpos         bigint      NOT NULL,
    source_event text        NOT NULL,
    kind         text        NOT NULL,
    reason       text        NOT NULL,
    points_e4    bigint      NOT NULL,
    delta_e4     bigint      NOT NULL,
    score_e4     bigint      NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (community_id, user_id, seq)
);

-- The policy in force per community (the defaults when absent), as the log has set it so far.
CREATE TABLE reputation_policies
(
    community_id uuid PRIMARY KEY,
    policy       jsonb NOT NULL
);

-- Each hub user's score over every community: the default weights and range.
CREATE TABLE reputation_global
(
    user_id    uuid PRIMARY KEY,
    score_e4   bigint      NOT NULL,
    changes    bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);

-- Scores that fell below a community's auto-ban threshold while auto-ban was on, one row per
-- crossing; the auto-ban reactor acts on the ones above its own cursor.
CREATE TABLE reputation_crossings
(
    community_id uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    txid         bigint      NOT NULL,
    gpos         bigint      NOT NULL,
    score_e4     bigint      NOT NULL,
    threshold_e4 bigint      NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (community_id, user_id, txid, gpos)
);
CREATE INDEX reputation_crossings_by_key ON reputation_crossings (txid, gpos);
