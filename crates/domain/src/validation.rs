//! Field rules shared by the aggregates and the API, so a request is refused with the same message
//! whether the API or the domain catches it first. Lengths count characters, not bytes.

use std::sync::LazyLock;

use regex::Regex;
use rookery_events::{Decimal4, ReputationPolicy};

use crate::DomainError;

static COMMUNITY_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9-]{2,62}$").expect("static regex"));
static USERNAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_.-]{3,32}$").expect("static regex"));
static EXTERNAL_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_.:-]{1,128}$").expect("static regex"));

/// A community's unique URL-safe name (`^[a-z0-9][a-z0-9-]{2,62}$`).
pub fn validate_community_name(name: &str) -> Result<(), DomainError> {
    if COMMUNITY_NAME.is_match(name) {
        Ok(())
    } else {
        Err(DomainError::validation(
            "name",
            "must be 3 to 63 lowercase letters, digits or hyphens, starting with a letter or digit",
        ))
    }
}

/// A human-readable name: 1 to 100 characters once trimmed, no control characters.
pub fn validate_display_name(display_name: &str) -> Result<(), DomainError> {
    validate_text("display_name", display_name, 100)
}

/// A community description: at most 2000 characters (line breaks allowed).
pub fn validate_description(description: &str) -> Result<(), DomainError> {
    max_chars("description", description, 2000)
}

/// A hub username (`^[A-Za-z0-9_.-]{3,32}$`).
pub fn validate_username(username: &str) -> Result<(), DomainError> {
    if USERNAME.is_match(username) {
        Ok(())
    } else {
        Err(DomainError::validation(
            "username",
            "must be 3 to 32 letters, digits, '_', '.' or '-'",
        ))
    }
}

/// A user's name on a chat platform, which follows that platform's rules rather than ours: 1 to
/// 100 characters once trimmed, no control characters.
pub fn validate_platform_username(username: &str) -> Result<(), DomainError> {
    validate_text("username", username, 100)
}

/// Trims and lower-cases an email address and checks its shape (`local@domain.tld`, at most 254
/// characters). Deliverability is not our concern; uniqueness is, hence the normal form.
pub fn normalize_email(email: &str) -> Result<String, DomainError> {
    let email = email.trim().to_lowercase();
    if email.chars().count() > 254 {
        return Err(DomainError::validation(
            "email",
            "must be at most 254 characters",
        ));
    }
    let well_formed = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if well_formed {
        Ok(email)
    } else {
        Err(DomainError::validation(
            "email",
            "must be an address like name@example.com",
        ))
    }
}

/// A password: 8 to 256 characters. The message never repeats the value.
pub fn validate_password(password: &str) -> Result<(), DomainError> {
    match password.chars().count() {
        0..8 => Err(DomainError::validation(
            "password",
            "must be at least 8 characters",
        )),
        8..=256 => Ok(()),
        _ => Err(DomainError::validation(
            "password",
            "must be at most 256 characters",
        )),
    }
}

/// A platform server (guild, channel, workspace) id: 1 to 128 of `[A-Za-z0-9_.:-]`.
pub fn validate_server_id(server_id: &str) -> Result<(), DomainError> {
    validate_external_id("server_id", server_id)
}

/// A user's account id on a platform: 1 to 128 of `[A-Za-z0-9_.:-]`.
pub fn validate_platform_user_id(platform_user_id: &str) -> Result<(), DomainError> {
    validate_external_id("platform_user_id", platform_user_id)
}

/// Why a moderator did something: at most 500 characters.
pub fn validate_reason(reason: &str) -> Result<(), DomainError> {
    max_chars("reason", reason, 500)
}

/// Why an admin changed a reputation: required, at most 500 characters.
pub fn validate_required_reason(reason: &str) -> Result<(), DomainError> {
    validate_text("reason", reason, 500)
}

/// A chat message: 1 to 10,000 characters; newlines and tabs are text, other control
/// characters are not.
pub fn validate_message_text(text: &str) -> Result<(), DomainError> {
    if text.trim().is_empty() {
        return Err(DomainError::validation("text", "must not be empty"));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        return Err(DomainError::validation(
            "text",
            "must not contain control characters other than newlines and tabs",
        ));
    }
    max_chars("text", text, 10_000)
}

/// A channel name: 1 to 100 characters.
pub fn validate_channel(channel: &str) -> Result<(), DomainError> {
    validate_text("channel", channel, 100)
}

/// A platform's id for a message or an activity: 1 to 128 of `[A-Za-z0-9_.:-]`.
pub fn validate_message_external_id(external_id: &str) -> Result<(), DomainError> {
    validate_external_id("external_id", external_id)
}

/// A currency code: 1 to 8 letters or digits (`USD`, `EUR`, `BITS`).
pub fn validate_currency(currency: &str) -> Result<(), DomainError> {
    if (1..=8).contains(&currency.len()) && currency.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(DomainError::validation(
            "data.currency",
            "must be 1 to 8 letters or digits",
        ))
    }
}

/// A reputation policy: `0 ≤ min < max ≤ 10,000`, `start` and the auto-ban threshold within
/// `[min, max]`, weights within ±1,000.
pub fn validate_reputation_policy(policy: &ReputationPolicy) -> Result<(), DomainError> {
    let (min, max) = (policy.min, policy.max);
    if min.is_negative() || max > Decimal4::units(10_000) || min >= max {
        return Err(DomainError::validation(
            "max",
            "the range must satisfy 0 <= min < max <= 10000",
        ));
    }
    if policy.start < min || policy.start > max {
        return Err(DomainError::validation(
            "start",
            "must be within [min, max]",
        ));
    }
    if policy.auto_ban.threshold < min || policy.auto_ban.threshold > max {
        return Err(DomainError::validation(
            "auto_ban.threshold",
            "must be within [min, max]",
        ));
    }
    let w = &policy.weights;
    let weights = [
        ("weights.chat_message", w.chat_message),
        ("weights.command_message", w.command_message),
        ("weights.follow", w.follow),
        ("weights.subscription_1000", w.subscription_1000),
        ("weights.subscription_2000", w.subscription_2000),
        ("weights.subscription_3000", w.subscription_3000),
        ("weights.gift_subscription", w.gift_subscription),
        ("weights.donation", w.donation),
        ("weights.cheer", w.cheer),
        ("weights.raid", w.raid),
        ("weights.boost", w.boost),
        ("weights.warn", w.warn),
        ("weights.timeout", w.timeout),
        ("weights.kick", w.kick),
        ("weights.ban", w.ban),
    ];
    for (field, weight) in weights {
        if weight.0.abs() > Decimal4::units(1_000).0 {
            return Err(DomainError::validation(field, "must be within ±1000"));
        }
    }
    Ok(())
}

fn validate_external_id(field: &'static str, id: &str) -> Result<(), DomainError> {
    if EXTERNAL_ID.is_match(id) {
        Ok(())
    } else {
        Err(DomainError::validation(
            field,
            "must be 1 to 128 letters, digits, '_', '.', ':' or '-'",
        ))
    }
}

fn validate_text(field: &'static str, text: &str, max: usize) -> Result<(), DomainError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DomainError::validation(field, "must not be empty"));
    }
    if text.chars().any(char::is_control) {
        return Err(DomainError::validation(
            field,
            "must not contain control characters",
        ));
    }
    max_chars(field, text, max)
}

fn max_chars(field: &'static str, text: &str, max: usize) -> Result<(), DomainError> {
    if text.chars().count() > max {
        Err(DomainError::validation(
            field,
            format!("must be at most {max} characters"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<(), DomainError>) -> Option<&'static str> {
        match result {
            Err(DomainError::Validation { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn community_names_are_lowercase_slugs() {
        for ok in ["abc", "rust-lang", "0day", &"a".repeat(63)] {
            assert_eq!(validate_community_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ab",
            "-abc",
            "Abc",
            "a_bc",
            "a bc",
            "abc\n",
            &"a".repeat(64),
            "",
        ] {
            assert_eq!(
                field_of(validate_community_name(bad)),
                Some("name"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn display_names_are_trimmed_nonempty_and_printable() {
        assert_eq!(validate_display_name("  Rust Lang  "), Ok(()));
        assert_eq!(validate_display_name(&"é".repeat(100)), Ok(()));
        for bad in ["", "   ", "tab\there", &"x".repeat(101)] {
            assert_eq!(
                field_of(validate_display_name(bad)),
                Some("display_name"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn descriptions_allow_line_breaks_up_to_2000_characters() {
        assert_eq!(validate_description("line one\nline two"), Ok(()));
        assert_eq!(validate_description(""), Ok(()));
        assert_eq!(
            field_of(validate_description(&"x".repeat(2001))),
            Some("description")
        );
    }

    #[test]
    fn usernames_follow_the_hub_pattern() {
        for ok in ["bob", "Bob_the.builder-2", &"a".repeat(32)] {
            assert_eq!(validate_username(ok), Ok(()), "{ok}");
        }
        for bad in ["bo", "bob smith", "bob@home", &"a".repeat(33)] {
            assert_eq!(
                field_of(validate_username(bad)),
                Some("username"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn platform_usernames_only_need_to_be_printable() {
        assert_eq!(validate_platform_username("Cool Streamer ✨"), Ok(()));
        assert_eq!(field_of(validate_platform_username(" ")), Some("username"));
    }

    #[test]
    fn emails_are_trimmed_and_lowercased() {
        assert_eq!(
            normalize_email("  Alice@Example.COM "),
            Ok("alice@example.com".to_string())
        );
    }

    #[test]
    fn malformed_emails_are_rejected() {
        let long = format!("{}@example.com", "a".repeat(250));
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@example",
            "a@b@c.com",
            "a b@c.com",
            &long,
        ] {
            let err = normalize_email(bad).expect_err(bad);
            assert!(
                matches!(err, DomainError::Validation { field: "email", .. }),
                "{bad}"
            );
        }
    }

    #[test]
    fn passwords_are_8_to_256_characters() {
        assert_eq!(validate_password("12345678"), Ok(()));
        assert_eq!(validate_password(&"p".repeat(256)), Ok(()));
        assert_eq!(field_of(validate_password("1234567")), Some("password"));
        assert_eq!(
            field_of(validate_password(&"p".repeat(257))),
            Some("password")
        );
    }

    #[test]
    fn external_ids_name_their_field() {
        assert_eq!(validate_server_id("123456789012345678"), Ok(()));
        assert_eq!(validate_platform_user_id("UC_x:y.z-1"), Ok(()));
        assert_eq!(field_of(validate_server_id("")), Some("server_id"));
        assert_eq!(
            field_of(validate_server_id(&"1".repeat(129))),
            Some("server_id")
        );
        assert_eq!(
            field_of(validate_platform_user_id("a/b")),
            Some("platform_user_id")
        );
    }

    #[test]
    fn reasons_are_at_most_500_characters() {
        assert_eq!(validate_reason(&"r".repeat(500)), Ok(()));
        assert_eq!(field_of(validate_reason(&"r".repeat(501))), Some("reason"));
    }
}
