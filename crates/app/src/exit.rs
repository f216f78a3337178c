//! Exit codes: each start-up failure an operator can fix has its own code and one clear line
//! (the README lists them).

use rookery_store::NewerSchema;

/// Success.
pub const OK: u8 = 0;
/// Any other failure.
pub const FAILURE: u8 = 1;
/// Invalid command line (clap's own code).
pub const USAGE: u8 = 2;
/// Invalid configuration value.
pub const CONFIG: u8 = 3;
/// Postgres unreachable or refused us (e.g. a wrong password).
pub const POSTGRES: u8 = 4;
/// NATS unreachable, or JetStream disabled.
pub const NATS: u8 = 5;
/// The HTTP address is in use.
pub const ADDRESS_IN_USE: u8 = 6;
/// The database was migrated by a newer version.
pub const NEWER_SCHEMA: u8 = 7;
/// No server answers and none can be started here (binaries missing).
pub const NO_SERVERS: u8 = 8;

/// A failure that already knows its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Classified {
    pub code: u8,
    pub message: String,
}

impl Classified {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The exit code for `err`, from the most specific cause in its chain.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Classified>() {
            return c.code;
        }
        if cause.downcast_ref::<NewerSchema>().is_some() {
            return NEWER_SCHEMA;
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return ADDRESS_IN_USE;
            }
        }
        if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
            if matches!(
                e,
                sqlx::Error::Database(_)
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::Configuration(_)
            ) {
                return POSTGRES;
            }
        }
    }
    let text = format!("{err:#}");
    if text.contains("NATS") || text.contains("JetStream") {
        return NATS;
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_come_from_the_cause_chain() {
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let err = anyhow::Error::new(in_use).context("cannot listen on 127.0.0.1:8080");
        assert_eq!(code_for(&err), ADDRESS_IN_USE);
        let err = anyhow::Error::new(NewerSchema(99)).context("starting");
        assert_eq!(code_for(&err), NEWER_SCHEMA);
        let err: anyhow::Result<()> = Err(anyhow::anyhow!(
            "JetStream is not enabled on nats://x; start nats-server with -js"
        ));
        assert_eq!(
            code_for(&err.context("connecting").expect_err("an error")),
            NATS
        );
        assert_eq!(
            code_for(&anyhow::Error::new(Classified::new(CONFIG, "bad"))),
            CONFIG
        );
        assert_eq!(code_for(&anyhow::anyhow!("something else")), FAILURE);
    }
}
