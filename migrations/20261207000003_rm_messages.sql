-- Read model: messages (projections/src/models/messages). Chat history per community and
-- channel, newest first; a moderator's delete shows `[deleted]` here while the log keeps what
-- was said. Text search uses the `simple` configuration (no stemming, any language).
CREATE TABLE messages
(
    message_id       uuid PRIMARY KEY,
    community_id     uuid        NOT NULL,
    channel          text        NOT NULL,
    sender_id        uuid        NOT NULL,
    sender_username  text        NOT NULL,
    platform         text,
    platform_user_id text,
    external_id      text,
    text             text        NOT NULL,
    sent_at          timestamptz NOT NULL,
    edited_at        timestamptz,
    deleted          boolean     NOT NULL,
    -- log key of the last event applied to the row
    txid             bigint      NOT NULL,
    gpos             bigint      NOT NULL
);
-- History pages, newest first: the whole community, one channel, one sender.
CREATE INDEX messages_history ON messages (community_id, sent_at DESC, message_id DESC);
CREATE INDEX messages_by_channel ON messages (community_id, channel, sent_at DESC, message_id DESC);
CREATE INDEX messages_by_sender ON messages (community_id, sender_id, sent_at DESC, message_id DESC);
CREATE INDEX messages_text ON messages USING gin (to_tsvector('simple', text));

-- Shadow users whose platform account a registered user claimed: their messages are shown,
-- and found, as the registered user's.
CREATE TABLE message_senders
(
    sender_id uuid PRIMARY KEY,
    user_id   uuid NOT NULL
);
CREATE INDEX message_senders_by_user ON message_senders (user_id);
