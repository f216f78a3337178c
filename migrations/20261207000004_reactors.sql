-- Reactors: side effects driven by read models (the auto-ban reactor bans members whose
-- reputation fell below their community's threshold). Side effects never replay: a reactor
-- acts only on what a read model produced live, above where its last rebuild switched in
-- (`projection_state.rebuilt_through_*`) and above its own cursor, which moves in the same
-- transaction as the commands it issues.
ALTER TABLE projection_state
    ADD COLUMN rebuilt_through_txid bigint NOT NULL DEFAULT 0,
    ADD COLUMN rebuilt_through_gpos bigint NOT NULL DEFAULT 0;

CREATE TABLE reactor_cursors
(
    reactor    text PRIMARY KEY,
    txid       bigint      NOT NULL DEFAULT 0,
    gpos       bigint      NOT NULL DEFAULT 0,
    acted      bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
