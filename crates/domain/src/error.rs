use thiserror::Error;

/// Why the domain refused a command. A value, not a string, so the API can map each kind to its
/// status; every message is written for the person who sent the command.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum DomainError {
    /// A field breaks its format rule. Return 422 Unprocessable Entity naming `field`.
    #[error("invalid {field}: {message}")]
    Validation {
        field: &'static str,
        message: String,
    },
    /// The actor's role does not allow this. Return 403 Forbidden.
    #[error("{0}")]
    Forbidden(String),
    /// The thing the command addresses does not exist (e.g. "community"). Return 404 Not Found.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The command collides with what already exists (e.g. already a member). Return 409 Conflict.
    #[error("{0}")]
    Conflict(String),
    /// A business rule forbids this in the current state (e.g. the owner leaving). Return 409
    /// Conflict.
    #[error("{0}")]
    InvalidState(String),
}

impl DomainError {
    pub(crate) fn validation(field: &'static str, message: impl Into<String>) -> Self {
        DomainError::Validation {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        DomainError::Forbidden(message.into())
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        DomainError::Conflict(message.into())
    }

    pub(crate) fn invalid_state(message: impl Into<String>) -> Self {
        DomainError::InvalidState(message.into())
    }
}
