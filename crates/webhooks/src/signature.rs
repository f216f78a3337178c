//! Webhook signatures, each checked over the raw body bytes with a constant-time compare
//! (`Mac::verify_slice`):
//! - **Standard Webhooks v1** (`webhook-id`, `webhook-timestamp`, `webhook-signature`): base64
//!   HMAC-SHA256 of `id.timestamp.body` under the decoded `whsec_` secret; the header holds
//!   space-separated `v1,<signature>` entries (two during a secret's rotation), any one of which
//!   may match. Outbound deliveries are signed the same way.
//! - **Twitch EventSub**: `sha256=` hex HMAC-SHA256 of `message id ‖ timestamp ‖ body` under the
//!   subscription's secret, the timestamp RFC 3339.
//! - **`X-Hub-Signature-256`** (GitHub, Meta): `sha256=` hex HMAC-SHA256 of the body.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a secret in the Standard Webhooks form.
pub const SECRET_PREFIX: &str = "whsec_";

/// How far a Standard Webhooks timestamp may be from now, either way.
pub const STANDARD_TOLERANCE_SECS: i64 = 5 * 60;

/// The same for Twitch EventSub, which documents 10 minutes.
pub const TWITCH_TOLERANCE_SECS: i64 = 10 * 60;

/// Why a delivery's signature was not accepted. The messages name the header, never the secret
/// or the expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the `{0}` header is missing")]
    Missing(&'static str),
    #[error("the `{0}` header is malformed")]
    Malformed(&'static str),
    #[error("the timestamp is more than {0} seconds away from now")]
    Stale(i64),
    #[error("no signature matches")]
    Mismatch,
    #[error("the secret is invalid: {0}")]
    Secret(&'static str),
}

/// A signing key: the bytes an HMAC is keyed with. Shown as `whsec_<base64>` only by
/// [`Secret::expose`]; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A new random secret of 32 bytes (what a webhook endpoint or inbound source gets when
    /// none is supplied).
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Self(key)
    }

    /// A secret in the Standard Webhooks form: base64 of 24 to 64 bytes, with or without the
    /// `whsec_` prefix (the reference libraries accept both).
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = BASE64
            .decode(encoded.trim())
            .map_err(|_| SignatureError::Secret("not base64 after `whsec_`"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(SignatureError::Secret("must decode to 24 to 64 bytes"));
        }
        Ok(Self(key))
    }

    /// A secret used as it is written (Twitch's and GitHub's are plain strings), 1 to 1,024
    /// bytes.
    pub fn plain(text: &str) -> Result<Self, SignatureError> {
        if text.is_empty() || text.len() > 1024 {
            return Err(SignatureError::Secret("must be 1 to 1,024 bytes"));
        }
        Ok(Self(text.as_bytes().to_vec()))
    }

    /// The secret in the Standard Webhooks form, `whsec_<base64>`: shown to its owner once.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.0))
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
        for part in parts {
            mac.update(part);
        }
        mac
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Standard Webhooks v1.
pub mod standard {
    use super::*;

    /// The MAC of `id.timestamp.body`, what both signing and verifying compute.
    fn mac(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let ts = timestamp.to_string();
        secret.mac(&[id.as_bytes(), b".", ts.as_bytes(), b".", body])
    }

    /// `v1,<signature>` of one delivery under one secret.
    pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mac = mac(secret, id, timestamp, body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }

    /// The `webhook-signature` header under every secret in force (the current one first, the
    /// previous one during its rotation grace), space-separated.
    pub fn header(secrets: &[&Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
        secrets
            .iter()
            .map(|s| sign(s, id, timestamp, body))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Checks a delivery's headers against `secret` at `now` (Unix seconds): the timestamp
    /// within [`STANDARD_TOLERANCE_SECS`], then any `v1` entry of `signatures` matching.
    pub fn verify(
        secret: &Secret,
        id: Option<&str>,
        timestamp: Option<&str>,
        signatures: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        let id = required(id, "webhook-id")?;
        let ts_text = required(timestamp, "webhook-timestamp")?;
        let ts: i64 = ts_text
            .trim()
            .parse()
            .map_err(|_| SignatureError::Malformed("webhook-timestamp"))?;
        let signatures = required(signatures, "webhook-signature")?;
        if (now - ts).abs() > STANDARD_TOLERANCE_SECS {
            return Err(SignatureError::Stale(STANDARD_TOLERANCE_SECS));
        }
        let mac = mac(secret, id, ts, body);
        let mut any = false;
        for entry in signatures.split(' ').filter(|e| !e.is_empty()) {
            let Some((version, value)) = entry.split_once(',') else {
                continue;
            };
            any = true;
            if version != "v1" {
                continue;
            }
            if let Ok(sig) = BASE64.decode(value) {
                if mac.clone().verify_slice(&sig).is_ok() {
                    return Ok(());
                }
            }
        }
        if any {
            Err(SignatureError::Mismatch)
        } else {
            Err(SignatureError::Malformed("webhook-signature"))
        }
    }
}

/// Twitch EventSub.
pub mod twitch {
    use super::*;

    /// `sha256=<hex>` of a notification (what Twitch sends; for tests and tools).
    pub fn sign(secret: &Secret, message_id: &str, timestamp: &str, body: &[u8]) -> String {
        sha256_hex(secret.mac(&[message_id.as_bytes(), timestamp.as_bytes(), body]))
    }

    /// Checks `Twitch-Eventsub-Message-Id`, `-Timestamp` (RFC 3339, within
    /// [`TWITCH_TOLERANCE_SECS`] of `now`) and `-Signature`.
    pub fn verify(
        secret: &Secret,
        message_id: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        let id = required(message_id, "Twitch-Eventsub-Message-Id")?;
        let ts_text = required(timestamp, "Twitch-Eventsub-Message-Timestamp")?;
        let ts = DateTime::parse_from_rfc3339(ts_text)
            .map_err(|_| SignatureError::Malformed("Twitch-Eventsub-Message-Timestamp"))?;
        let signature = required(signature, "Twitch-Eventsub-Message-Signature")?;
        let limit = chrono::TimeDelta::seconds(TWITCH_TOLERANCE_SECS);
        let skew = now - ts.with_timezone(&Utc);
        if skew > limit || skew < -limit {
            return Err(SignatureError::Stale(TWITCH_TOLERANCE_SECS));
        }
        verify_sha256_hex(
            secret.mac(&[id.as_bytes(), ts_text.as_bytes(), body]),
            signature,
            "Twitch-Eventsub-Message-Signature",
        )
    }
}

/// `X-Hub-Signature-256` (GitHub, Meta).
pub mod hub {
    use super::*;

    /// The header's name.
    pub const HEADER: &str = "X-Hub-Signature-256";

    /// `sha256=<hex>` of `body`.
    pub fn sign(secret: &Secret, body: &[u8]) -> String {
        sha256_hex(secret.mac(&[body]))
    }

    /// Checks the header against `body`. These senders put no timestamp in the signature:
    /// replays are caught by the delivery id instead.
    pub fn verify(
        secret: &Secret,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        let signature = required(signature, HEADER)?;
        verify_sha256_hex(secret.mac(&[body]), signature, HEADER)
    }
}

/// A header's value; absent or empty is [`SignatureError::Missing`].
fn required<'a>(value: Option<&'a str>, header: &'static str) -> Result<&'a str, SignatureError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(SignatureError::Missing(header))
}

/// `sha256=<hex>` of a MAC (Twitch's and the hub headers' form).
fn sha256_hex(mac: HmacSha256) -> String {
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks `mac` against the `sha256=<hex>` value of `header`, in constant time.
fn verify_sha256_hex(
    mac: HmacSha256,
    value: &str,
    header: &'static str,
) -> Result<(), SignatureError> {
    let hex_part = value
        .trim()
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed(header))?;
    let sig = hex::decode(hex_part).map_err(|_| SignatureError::Malformed(header))?;
    if sig.len() != 32 {
        return Err(SignatureError::Malformed(header));
    }
    mac.verify_slice(&sig).map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn vector_secret() -> Secret {
        Secret::parse(VECTOR_SECRET).expect("the vector's secret")
    }

    /// The Standard Webhooks specification's published vector: what a receiver's own library
    /// computes is what Rookery sends, and what it sends Rookery accepts.
    #[test]
    fn the_standard_webhooks_test_vector_signs_and_verifies() {
        let secret = vector_secret();
        assert_eq!(
            standard::sign(&secret, VECTOR_ID, VECTOR_TS, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
        let verify = |sigs: &str, now: i64| {
            standard::verify(
                &secret,
                Some(VECTOR_ID),
                Some(&VECTOR_TS.to_string()),
                Some(sigs),
                VECTOR_BODY,
                now,
            )
        };
        assert_eq!(verify(VECTOR_SIGNATURE, VECTOR_TS), Ok(()));
        // Any entry may match: a rotation sends two, and unknown versions are skipped.
        assert_eq!(
            verify(&format!("v1,bm9wZQ== v2,x {VECTOR_SIGNATURE}"), VECTOR_TS),
            Ok(())
        );
        assert_eq!(
            verify("v1,bm9wZQ==", VECTOR_TS),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("garbage", VECTOR_TS),
            Err(SignatureError::Malformed("webhook-signature"))
        );
        // ±5 minutes, inclusive.
        assert_eq!(verify(VECTOR_SIGNATURE, VECTOR_TS + 300), Ok(()));
        assert_eq!(verify(VECTOR_SIGNATURE, VECTOR_TS - 300), Ok(()));
        assert_eq!(
            verify(VECTOR_SIGNATURE, VECTOR_TS + 301),
            Err(SignatureError::Stale(300))
        );
        assert_eq!(
            verify(VECTOR_SIGNATURE, VECTOR_TS - 301),
            Err(SignatureError::Stale(300))
        );
    }

    #[test]
    fn a_changed_byte_anywhere_fails_the_standard_signature() {
        let secret = vector_secret();
        let ts = VECTOR_TS.to_string();
        let ok = |id: &str, ts: &str, body: &[u8]| {
            standard::verify(
                &secret,
                Some(id),
                Some(ts),
                Some(VECTOR_SIGNATURE),
                body,
                VECTOR_TS,
            )
        };
        assert_eq!(
            ok("msg_p5jXN8AQM9LWM0D4loKWxJeK", &ts, VECTOR_BODY),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            ok(VECTOR_ID, &ts, br#"{"test": 2432232315}"#),
            Err(SignatureError::Mismatch)
        );
        let other = Secret::generate();
        assert_eq!(
            standard::verify(
                &other,
                Some(VECTOR_ID),
                Some(&ts),
                Some(VECTOR_SIGNATURE),
                VECTOR_BODY,
                VECTOR_TS
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            standard::verify(
                &secret,
                None,
                Some(&ts),
                Some(VECTOR_SIGNATURE),
                VECTOR_BODY,
                VECTOR_TS
            ),
            Err(SignatureError::Missing("webhook-id"))
        );
        assert_eq!(
            standard::verify(
                &secret,
                Some(VECTOR_ID),
                Some("soon"),
                Some(VECTOR_SIGNATURE),
                VECTOR_BODY,
                VECTOR_TS
            ),
            Err(SignatureError::Malformed("webhook-timestamp"))
        );
    }

    #[test]
    fn a_rotation_header_carries_both_signatures_and_each_verifies_alone() {
        let (new, old) = (Secret::generate(), Secret::generate());
        let header = standard::header(&[&new, &old], "msg_1", VECTOR_TS, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        for secret in [&new, &old] {
            assert_eq!(
                standard::verify(
                    secret,
                    Some("msg_1"),
                    Some(&VECTOR_TS.to_string()),
                    Some(&header),
                    b"{}",
                    VECTOR_TS
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn secrets_round_trip_in_the_whsec_form_and_bad_ones_are_refused() {
        let secret = Secret::generate();
        let shown = secret.expose();
        assert!(shown.starts_with("whsec_"), "{shown}");
        assert_eq!(BASE64.decode(&shown[6..]).map(|k| k.len()), Ok(32));
        assert_eq!(Secret::parse(&shown), Ok(secret.clone()));
        assert_eq!(Secret::parse(&shown[6..]), Ok(secret.clone()));
        assert_eq!(format!("{secret:?}"), "Secret(…)");
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert!(Secret::parse(&format!("whsec_{}", BASE64.encode([1u8; 16]))).is_err());
        assert!(Secret::parse(&format!("whsec_{}", BASE64.encode([1u8; 65]))).is_err());
        assert!(Secret::plain("").is_err());
    }

    #[test]
    fn twitch_signatures_cover_id_timestamp_and_body_within_ten_minutes() {
        let secret = Secret::plain("s3cRe7-of-the-subscription").expect("secret");
        let ts = "2026-12-08T01:00:00.123456789Z";
        let body = br#"{"subscription":{"type":"channel.follow"}}"#;
        let sig = twitch::sign(&secret, "e76c6bd4", ts, body);
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        let check = |sig: &str, now: &str| {
            twitch::verify(
                &secret,
                Some("e76c6bd4"),
                Some(ts),
                Some(sig),
                body,
                at(now),
            )
        };
        assert_eq!(check(&sig, "2026-12-08T01:09:59Z"), Ok(()));
        assert_eq!(
            check(&sig, "2026-12-08T01:10:01Z"),
            Err(SignatureError::Stale(600))
        );
        assert_eq!(
            check(&sig.replace("sha256=", "sha1="), "2026-12-08T01:00:00Z"),
            Err(SignatureError::Malformed(
                "Twitch-Eventsub-Message-Signature"
            ))
        );
        let other = twitch::sign(&secret, "e76c6bd5", ts, body);
        assert_eq!(
            check(&other, "2026-12-08T01:00:00Z"),
            Err(SignatureError::Mismatch)
        );
    }

    /// GitHub's documented example: secret "It's a Secret to Everybody", payload
    /// "Hello, World!".
    #[test]
    fn the_hub_signature_matches_githubs_documented_example() {
        let secret = Secret::plain("It's a Secret to Everybody").expect("secret");
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(hub::sign(&secret, b"Hello, World!"), expected);
        assert_eq!(
            hub::verify(&secret, Some(expected), b"Hello, World!"),
            Ok(())
        );
        assert_eq!(
            hub::verify(&secret, Some(expected), b"Hello, World?"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            hub::verify(&secret, None, b""),
            Err(SignatureError::Missing(hub::HEADER))
        );
        assert_eq!(
            hub::verify(&secret, Some("sha256=zz"), b""),
            Err(SignatureError::Malformed(hub::HEADER))
        );
    }
}
