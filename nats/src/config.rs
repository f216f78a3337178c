//! Settings for the bus connection and the relay, with defaults that need no configuration on a
//! machine running NATS beside Rookery.

use std::time::Duration;

/// Where the bus lives and how its stream and consumers are defined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusConfig {
    /// NATS server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// JetStream stream name (no `.`, `*`, `>` or whitespace).
    pub stream: String,
    /// First subject token(s); the stream captures `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// Number of partitions events are spread over (by aggregate id). Changing it re-routes
    /// aggregates to other partitions, so consumers must be rebuilt afterwards.
    pub partitions: u32,
    /// How long JetStream remembers a `Nats-Msg-Id`. Re-publishing after a relay crash is only
    /// de-duplicated within this window, so it must exceed any expected relay outage.
    pub duplicate_window: Duration,
    /// Deliveries of one message before the server stops redelivering it (the projection parks
    /// it as poison well before that).
    pub max_deliver: i64,
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
}

impl BusConfig {
    /// One partition unless more worker processes share the work: every partition batches on
    /// its own, so on one machine more partitions mean more, smaller transactions (at 400
    /// commands/s, four partitions made one-event batches; one made batches four times larger
    /// and raised commands/s by a third).
    pub const DEFAULT_PARTITIONS: u32 = 1;
    pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60 * 60);
    pub const DEFAULT_MAX_DELIVER: i64 = 10;
    pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

    pub fn new(
        url: impl Into<String>,
        stream: impl Into<String>,
        subject_prefix: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
            partitions: Self::DEFAULT_PARTITIONS,
            duplicate_window: Self::DEFAULT_DUPLICATE_WINDOW,
            max_deliver: Self::DEFAULT_MAX_DELIVER,
            ack_wait: Self::DEFAULT_ACK_WAIT,
        }
    }
}

/// How the relay tails the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most events read per query. A caught-up relay reads what has committed since its last
    /// read, usually far fewer; the size matters when catching up, where each batch costs a
    /// read round trip and (for [`crate::Relay::relay_once`]) an ack drain and a cursor save.
    /// A built message takes about 1.5 KB, and a catching-up relay holds a few batches at once.
    pub batch_size: i64,
    /// Fallback poll when no NOTIFY arrives: an event held back behind an older in-flight
    /// transaction becomes readable when that transaction ends, which may send no notification.
    pub poll_interval: Duration,
    /// Least time between the starts of two reads of a caught-up relay. Under load commits
    /// arrive faster than this, and each read then takes all of them: a bounded delay that
    /// turns hundreds of one-event reads, publishes and cursor saves per second into a few
    /// larger ones. Reads that follow a full batch (catching up) never wait.
    pub min_read_interval: Duration,
    /// Least time between two saves of the cursor. A lagging cursor only means re-publishing
    /// more after a crash (de-duplicated by message id); saving after every read cost a round
    /// trip per read.
    pub min_save_interval: Duration,
    /// How often a standby relay tries to take over.
    pub standby_retry: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            poll_interval: Duration::from_millis(100),
            min_read_interval: Duration::from_millis(1),
            min_save_interval: Duration::from_millis(20),
            standby_retry: Duration::from_secs(1),
        }
    }
}
