//! Webhook secrets at rest: AES-256-GCM under the deployment's key (`ROOKERY_SECRET_KEY`,
//! base64 of 32 bytes). A sealed value is `v1.<base64 of nonce ‖ ciphertext ‖ tag>` with a
//! fresh random 96-bit nonce each time, and the row it belongs to (an endpoint's or a source's
//! id) as associated data, so a sealed secret copied onto another row does not open there.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use std::fmt;

const VERSION: &str = "v1.";
const NONCE_LEN: usize = 12;

/// Why a key or a sealed value was refused. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the key must be base64 of exactly 32 bytes")]
    BadKey,
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value does not open under this key for this row")]
    Unopenable,
}

/// The deployment's key for secrets at rest. `Debug` never prints it.
#[derive(Clone)]
pub struct SealingKey(Key<Aes256Gcm>);

impl SealingKey {
    /// A new random key (for a deployment that has none yet).
    pub fn generate() -> Self {
        Self(Aes256Gcm::generate_key(OsRng))
    }

    /// The key from its base64 form (`ROOKERY_SECRET_KEY`).
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let bytes = BASE64.decode(text.trim()).map_err(|_| SealError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        Ok(Self(*Key::<Aes256Gcm>::from_slice(&bytes)))
    }

    /// The key's base64 form, to store it.
    pub fn expose(&self) -> String {
        BASE64.encode(self.0.as_slice())
    }

    /// Seals `plaintext` for the row `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> String {
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let sealed = match Aes256Gcm::new(&self.0).encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        ) {
            Ok(sealed) => sealed,
            // Only a message beyond GCM's 64 GiB limit fails; secrets are bytes long.
            Err(_) => unreachable!("AES-GCM seals any message under 64 GiB"),
        };
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        format!("{VERSION}{}", BASE64.encode(out))
    }

    /// Opens a value [`SealingKey::seal`] made for the row `aad`.
    pub fn open(&self, sealed: &str, aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let body = sealed.strip_prefix(VERSION).ok_or(SealError::Malformed)?;
        let bytes = BASE64.decode(body).map_err(|_| SealError::Malformed)?;
        if bytes.len() < NONCE_LEN + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        Aes256Gcm::new(&self.0)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealError::Unopenable)
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_under_its_key_for_its_row() {
        let key = SealingKey::generate();
        let secret = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sealed = key.seal(secret, b"endpoint-1");
        assert!(sealed.starts_with("v1."), "{sealed}");
        assert!(!sealed.contains("MfKQ9r8G"), "{sealed}");
        assert_eq!(key.open(&sealed, b"endpoint-1"), Ok(secret.to_vec()));
        // A fresh nonce every time.
        assert_ne!(key.seal(secret, b"endpoint-1"), sealed);
        assert_eq!(key.open(&sealed, b"endpoint-2"), Err(SealError::Unopenable));
        let other = SealingKey::generate();
        assert_eq!(
            other.open(&sealed, b"endpoint-1"),
            Err(SealError::Unopenable)
        );
    }

    #[test]
    fn a_changed_byte_or_a_malformed_value_is_refused() {
        let key = SealingKey::generate();
        let sealed = key.seal(b"secret", b"row");
        let mut bytes = BASE64.decode(&sealed[3..]).expect("base64");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = format!("v1.{}", BASE64.encode(&bytes));
        assert_eq!(key.open(&tampered, b"row"), Err(SealError::Unopenable));
        assert_eq!(key.open(&sealed[3..], b"row"), Err(SealError::Malformed));
        assert_eq!(key.open("v1.!!", b"row"), Err(SealError::Malformed));
        assert_eq!(key.open("v1.AAAA", b"row"), Err(SealError::Malformed));
    }

    #[test]
    fn keys_round_trip_in_base64_and_short_ones_are_refused() {
        let key = SealingKey::generate();
        let again = SealingKey::parse(&key.expose()).expect("parse");
        let sealed = key.seal(b"x", b"r");
        assert_eq!(again.open(&sealed, b"r"), Ok(b"x".to_vec()));
        assert_eq!(format!("{key:?}"), "SealingKey(…)");
        assert!(SealingKey::parse(&BASE64.encode([0u8; 16])).is_err());
        assert!(SealingKey::parse("not base64").is_err());
    }
}
