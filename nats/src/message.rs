//! Bus messages built from log entries: subject, headers and body.
//!
//! The body is the JSON of [`RecordedEvent`](rookery_events::RecordedEvent), but written here field by field so that `payload`
//! and `metadata` go from Postgres' text straight into it: decoding them into
//! `serde_json::Value` and encoding them again cost more CPU than everything else the relay
//! does per event. A test keeps the two encodings byte-identical.

use crate::headers;
use async_nats::header::HeaderName;
use async_nats::{HeaderMap, HeaderValue, Subject};
use bytes::Bytes;
use rookery_events::LogPosition;
use rookery_store::log::RawLogEntry;
use rookery_store::LogEntry;
use std::fmt::Write as _;
use std::io::Write as _;

// Custom header names built once from static strings (`&str` names are copied per message).
// `Nats-Msg-Id` and `Nats-Expected-Last-Msg-Id` are the client's standard names and cost nothing.
const POSITION: HeaderName = HeaderName::from_static(headers::POSITION);
const AGGREGATE_TYPE: HeaderName = HeaderName::from_static(headers::AGGREGATE_TYPE);
const AGGREGATE_ID: HeaderName = HeaderName::from_static(headers::AGGREGATE_ID);
const SEQUENCE: HeaderName = HeaderName::from_static(headers::SEQUENCE);
const EVENT_TYPE: HeaderName = HeaderName::from_static(headers::EVENT_TYPE);
const RECORDED_AT: HeaderName = HeaderName::from_static(headers::RECORDED_AT);

/// One event, ready to publish.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) position: LogPosition,
    /// `Nats-Msg-Id` as sent (line breaks replaced), so also the next message's chain link.
    pub(crate) id: String,
    pub(crate) subject: Subject,
    /// Every header but the chain link, which depends on what is still unconfirmed at send.
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

impl Outgoing {
    pub(crate) fn from_raw(
        entry: RawLogEntry<'_>,
        subject_prefix: &str,
        partitions: u32,
    ) -> std::io::Result<Self> {
        let payload = Bytes::from(body(&entry)?);
        let id = header_safe(rookery_events::recorded::message_id(
            entry.aggregate_type,
            entry.aggregate_id,
            entry.sequence,
        ));
        let subject = subject(
            subject_prefix,
            entry.partition(partitions),
            entry.aggregate_type,
            entry.event_type,
        );
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, HeaderValue::from(id.clone()));
        h.insert(POSITION, HeaderValue::from(entry.position.to_string()));
        h.insert(AGGREGATE_TYPE, header_value(entry.aggregate_type));
        h.insert(AGGREGATE_ID, header_value(entry.aggregate_id));
        h.insert(SEQUENCE, HeaderValue::from(entry.sequence));
        h.insert(EVENT_TYPE, header_value(entry.event_type));
        h.insert(
            RECORDED_AT,
            HeaderValue::from(
                entry
                    .recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        );
        Ok(Self {
            position: entry.position,
            id,
            subject,
            headers: h,
            payload,
        })
    }

    /// The same message from a decoded entry (callers that already hold [`LogEntry`]s).
    pub(crate) fn from_entry(
        entry: &LogEntry,
        subject_prefix: &str,
        partitions: u32,
    ) -> std::io::Result<Self> {
        let e = &entry.event;
        let payload = serde_json::to_string(&e.payload)?;
        let metadata = serde_json::to_string(&e.metadata)?;
        let raw = RawLogEntry {
            position: e.position,
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            event_version: &e.event_version,
            payload: &payload,
            metadata: &metadata,
            partition_key: entry.partition_key,
            recorded_at: entry.recorded_at,
        };
        Self::from_raw(raw, subject_prefix, partitions)
    }
}

/// The JSON of the [`RecordedEvent`](rookery_events::RecordedEvent) the entry decodes to, byte for byte what serde writes for
/// it when `payload` and `metadata` are compact (jsonb's blanks are dropped).
fn body(e: &RawLogEntry<'_>) -> std::io::Result<Vec<u8>> {
    let strings =
        e.aggregate_type.len() + e.aggregate_id.len() + e.event_type.len() + e.event_version.len();
    let mut out = Vec::with_capacity(160 + strings + e.payload.len() + e.metadata.len());
    write!(out, "{{\"position\":\"{}\",\"aggregate_type\":", e.position)?;
    serde_json::to_writer(&mut out, e.aggregate_type)?;
    out.extend_from_slice(b",\"aggregate_id\":");
    serde_json::to_writer(&mut out, e.aggregate_id)?;
    write!(out, ",\"sequence\":{},\"event_type\":", e.sequence)?;
    serde_json::to_writer(&mut out, e.event_type)?;
    out.extend_from_slice(b",\"event_version\":");
    serde_json::to_writer(&mut out, e.event_version)?;
    out.extend_from_slice(b",\"payload\":");
    push_compact(&mut out, e.payload);
    out.extend_from_slice(b",\"metadata\":");
    push_compact(&mut out, e.metadata);
    out.push(b'}');
    Ok(out)
}

/// Appends JSON text without the blanks between tokens (jsonb writes `", "` and `": "`); blanks
/// inside strings are kept. The input is trusted to be valid JSON: it comes from a jsonb column
/// or from serde. Copies runs between blanks rather than byte by byte.
fn push_compact(out: &mut Vec<u8>, json: &str) {
    let bytes = json.as_bytes();
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b' ' | b'\n' | b'\r' | b'\t' => {
                out.extend_from_slice(&bytes[run..i]);
                i += 1;
                run = i;
            }
            _ => i += 1,
        }
    }
    out.extend_from_slice(bytes.get(run..).unwrap_or_default());
}

/// `<prefix>.<partition>.<aggregate_type>.<event_type>`, the free-text tokens made safe.
pub(crate) fn subject(
    prefix: &str,
    partition: u32,
    aggregate_type: &str,
    event_type: &str,
) -> Subject {
    let mut s = String::with_capacity(prefix.len() + 12 + aggregate_type.len() + event_type.len());
    // Writing to a String cannot fail.
    let _ = write!(s, "{prefix}.{partition}.");
    push_token(&mut s, aggregate_type);
    s.push('.');
    push_token(&mut s, event_type);
    Subject::from(s)
}

/// One subject token from free text: the characters NATS gives meaning to (`.` separates
/// tokens, `*` and `>` are wildcards, whitespace ends the subject) become `_`.
pub(crate) fn push_token(out: &mut String, s: &str) {
    if s.is_empty() {
        out.push('_');
        return;
    }
    out.extend(s.chars().map(|c| match c {
        '.' | '*' | '>' => '_',
        c if c.is_whitespace() || c.is_control() => '_',
        c => c,
    }));
}

/// NATS header values cannot carry line breaks (the client panics on them).
fn header_safe(s: String) -> String {
    if s.contains(['\r', '\n']) {
        s.replace(['\r', '\n'], " ")
    } else {
        s
    }
}

fn header_value(s: &str) -> HeaderValue {
    if s.contains(['\r', '\n']) {
        HeaderValue::from(s.replace(['\r', '\n'], " "))
    } else {
        HeaderValue::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rookery_events::RecordedEvent;
    use serde_json::json;

    /// What a consumer decodes from a body.
    fn decode(body: &[u8]) -> RecordedEvent {
        serde_json::from_slice(body).expect("a relayed body decodes")
    }

    fn entry(payload: serde_json::Value, metadata: serde_json::Value) -> LogEntry {
        LogEntry {
            event: RecordedEvent {
                position: LogPosition::new(7_000_000_123, 42),
                aggregate_type: "membership".into(),
                aggregate_id: "c0ffee/\"quoted\" \\ id\nline".into(),
                sequence: 3,
                event_type: "MemberJoined".into(),
                event_version: "1.0".into(),
                payload,
                metadata,
            },
            partition_key: 0xdead_beef,
            recorded_at: chrono::Utc
                .with_ymd_and_hms(2026, 11, 22, 3, 30, 0)
                .single()
                .expect("a valid time"),
        }
    }

    fn tricky_payload() -> serde_json::Value {
        json!({
            "MemberJoined": {
                "text": "a, b: c \"d\" \\\" e\tf\u{1}",
                "nested": [1, 2.5, -3e-7, {"k": null}, true, false, ""],
                "unicode": "zoë 🐦",
                "big": 12345678901234567_i64
            }
        })
    }

    #[test]
    fn the_body_is_exactly_what_serde_writes_for_the_event() {
        let e = entry(
            tricky_payload(),
            json!({"actor": {"id": "u 1"}, "request_id": "r"}),
        );
        let msg = Outgoing::from_entry(&e, "rk", 4).expect("builds");
        let serde = serde_json::to_vec(&e.event).expect("encodes");
        assert_eq!(
            String::from_utf8_lossy(&msg.payload),
            String::from_utf8_lossy(&serde)
        );
        assert_eq!(decode(&msg.payload), e.event);
    }

    #[test]
    fn jsonb_text_is_spliced_compact_and_decodes_to_the_same_event() {
        let e = entry(tricky_payload(), json!({"a": [1, {"b": " x : y , "}]}));
        // jsonb's text form: blanks after `,` and `:`, keys in its own order.
        let payload = r#"{"MemberJoined": {"big": 12345678901234567, "text": "a, b: c \"d\" \\\" e\tf\u0001", "nested": [1, 2.5, -3e-7, {"k": null}, true, false, ""], "unicode": "zoë 🐦"}}"#;
        let raw = RawLogEntry {
            position: e.event.position,
            aggregate_type: &e.event.aggregate_type,
            aggregate_id: &e.event.aggregate_id,
            sequence: e.event.sequence,
            event_type: &e.event.event_type,
            event_version: &e.event.event_version,
            payload,
            metadata: "{\"a\": [1, {\"b\": \" x : y , \"}]}",
            partition_key: e.partition_key,
            recorded_at: e.recorded_at,
        };
        let msg = Outgoing::from_raw(raw, "rk", 4).expect("builds");
        assert_eq!(decode(&msg.payload), e.event);
        // Only the key order differs from serde's encoding, never the size.
        let from_entry = Outgoing::from_entry(&e, "rk", 4).expect("builds");
        assert_eq!(msg.payload.len(), from_entry.payload.len());
    }

    #[test]
    fn subject_and_headers_name_the_event() {
        let mut e = entry(json!({}), json!({}));
        e.event.aggregate_type = "a.b*c>d e".into();
        let msg = Outgoing::from_entry(&e, "rk.events", 4).expect("builds");
        assert_eq!(
            msg.subject.as_str(),
            format!("rk.events.{}.a_b_c_d_e.MemberJoined", 0xdead_beef_u32 % 4)
        );
        let h = &msg.headers;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_string());
        assert_eq!(
            get(headers::MSG_ID).as_deref(),
            Some("a.b*c>d e/c0ffee/\"quoted\" \\ id line/3")
        );
        assert_eq!(msg.id, "a.b*c>d e/c0ffee/\"quoted\" \\ id line/3");
        assert_eq!(get(headers::POSITION).as_deref(), Some("7000000123.42"));
        assert_eq!(
            get(headers::AGGREGATE_ID).as_deref(),
            Some("c0ffee/\"quoted\" \\ id line")
        );
        assert_eq!(get(headers::SEQUENCE).as_deref(), Some("3"));
        assert_eq!(get(headers::EVENT_TYPE).as_deref(), Some("MemberJoined"));
        assert_eq!(
            get(headers::RECORDED_AT).as_deref(),
            Some("2026-11-22T03:30:00.000000Z")
        );
        assert_eq!(get(headers::EXPECTED_LAST_MSG_ID), None);
    }

    #[test]
    fn compacting_keeps_blanks_inside_strings_only() {
        let mut out = Vec::new();
        push_compact(&mut out, "{\"a b\": [1, \"x \\\" y\", {\"c\": \" \"}]}");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "{\"a b\":[1,\"x \\\" y\",{\"c\":\" \"}]}"
        );
        out.clear();
        push_compact(
            &mut out,
            "{\"k\": \"ends in a backslash \\\\\", \"n\": [1, 2]}",
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "{\"k\":\"ends in a backslash \\\\\",\"n\":[1,2]}"
        );
    }
}
