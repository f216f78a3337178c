//! JSON Schemas of the event enums, generated from the types. `events/schemas/*.json` holds the
//! committed copies; `schemas_match_committed_files` fails when they drift (regenerate with
//! `ROOKERY_WRITE_SCHEMAS=1 cargo test -p rookery-events`).

use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// `(file stem, JSON Schema)` for every event enum.
pub fn event_schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "community",
            document::<crate::CommunityEvent>("CommunityEvent"),
        ),
        (
            "membership",
            document::<crate::MembershipEvent>("MembershipEvent"),
        ),
        ("user", document::<crate::UserEvent>("UserEvent")),
        ("message", document::<crate::MessageEvent>("MessageEvent")),
        (
            "activity",
            document::<crate::ActivityEvent>("ActivityEvent"),
        ),
    ]
}

fn document<T: ToSchema + PartialSchema>(title: &str) -> Value {
    let mut deps: Vec<(String, RefOr<Schema>)> = Vec::new();
    T::schemas(&mut deps);
    let mut defs = Map::new();
    for (name, schema) in deps {
        defs.insert(name, serde_json::to_value(schema).unwrap_or(Value::Null));
    }
    let mut doc = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
    });
    if let (Some(obj), Ok(Value::Object(body))) =
        (doc.as_object_mut(), serde_json::to_value(T::schema()))
    {
        obj.extend(body);
        obj.insert("$defs".into(), Value::Object(defs));
    }
    // OpenAPI references point into components; a standalone schema keeps them in $defs.
    let text = doc.to_string().replace("#/components/schemas/", "#/$defs/");
    serde_json::from_str(&text).unwrap_or(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn schemas_match_committed_files() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let write = std::env::var_os("ROOKERY_WRITE_SCHEMAS").is_some();
        for (stem, schema) in event_schemas() {
            let path = dir.join(format!("{stem}.json"));
            let text = serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n";
            if write {
                std::fs::create_dir_all(&dir).expect("create schemas dir");
                std::fs::write(&path, &text).expect("write schema");
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                committed,
                text,
                "{} drifted from the event types; if the change is intended (with a new \
                 event_version where stored events change meaning) regenerate with \
                 ROOKERY_WRITE_SCHEMAS=1 cargo test -p rookery-events",
                path.display()
            );
        }
    }
}
