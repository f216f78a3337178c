-- Poison events a projection could not apply (DESIGN.md §3.7): parked here in the same
-- transaction that moves the checkpoint past them, so they are visible, never silently skipped.
-- `stream_seq` is null when a rebuild parked the event; the log key is null when the bus message
-- itself could not be decoded.
CREATE TABLE projection_dead_letters
(
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection  text        NOT NULL,
    partition   integer     NOT NULL,
    stream_seq  bigint,
    txid        bigint,
    gpos        bigint,
    message_id  text,
    event       jsonb,
    error       text        NOT NULL,
    attempts    integer     NOT NULL,
    source      text        NOT NULL CHECK (source IN ('live', 'rebuild')),
    parked_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    resolution  text CHECK (resolution IN ('retried', 'skipped'))
);
-- One entry per event and projection, whichever of the live worker or a rebuild parks it first.
CREATE UNIQUE INDEX projection_dead_letters_event
    ON projection_dead_letters (projection, txid, gpos) WHERE txid IS NOT NULL;
CREATE INDEX projection_dead_letters_open
    ON projection_dead_letters (projection) WHERE resolved_at IS NULL;
