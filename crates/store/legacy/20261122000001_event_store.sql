-- The event store. The first two tables are postgres-es' own (so postgres-es reads and writes them
-- unchanged); the columns after `metadata` are Rookery's and all have defaults.
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         jsonb                        NOT NULL,
    metadata        jsonb                        NOT NULL,
    -- Rookery: the log key is (transaction_id, global_position); see DESIGN.md §4.
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz                  NOT NULL DEFAULT now(),
    -- A stable 32-bit hash of the aggregate id; bus partition = partition_key % partitions.
    -- Computed here so SQL and the relay agree without re-implementing the hash.
    partition_key   bigint GENERATED ALWAYS AS (('x' || substr(md5(aggregate_id), 1, 8))::bit(32)::bigint) STORED,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_log_key ON events (transaction_id, global_position);
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          jsonb                                NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Wakes the relay at commit (NOTIFY is transactional and folded per transaction).
CREATE FUNCTION rookery_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('rookery_events', '');
    RETURN NULL;
END $$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION rookery_notify_events();

-- Cross-aggregate uniqueness (community name, platform server link, platform identity, email).
-- A claim is written in the same transaction as the events that take or release it.
CREATE TABLE claims
(
    kind           text        NOT NULL,
    key            text        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);

-- Small key/value settings the system generates for itself (e.g. the JWT secret in `up`).
CREATE TABLE settings
(
    key        text PRIMARY KEY,
    value      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Relay cursor: the last log key confirmed by JetStream, per stream.
CREATE TABLE relay_cursors
(
    stream     text PRIMARY KEY,
    txid       bigint      NOT NULL DEFAULT 0,
    gpos       bigint      NOT NULL DEFAULT 0,
    published  bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
