//! The one JSON style of every command's `--json` output (docs/JSON.md): kebab-case keys,
//! times as integers (milliseconds unless the key says `-us` or `-ns`), and a top-level
//! `"schema-version"` in every document and every line.

use std::io::Write;

use serde::Serialize;
use serde_json::Value;

/// The version of the JSON output's shape; raised when a key changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// `body`'s fields after a `schema-version` (serde flattens `body`: a struct, a map or an
/// internally tagged enum).
#[derive(Serialize)]
struct Versioned<'a, T: ?Sized> {
    #[serde(rename = "schema-version")]
    schema_version: u32,
    #[serde(flatten)]
    body: &'a T,
}

fn versioned<T: Serialize + ?Sized>(body: &T) -> Versioned<'_, T> {
    Versioned {
        schema_version: SCHEMA_VERSION,
        body,
    }
}

/// `body` as one JSON line (no newline), `schema-version` first.
pub fn line<T: Serialize + ?Sized>(body: &T) -> Result<String, String> {
    serde_json::to_string(&versioned(body)).map_err(|e| format!("writing JSON: {e}"))
}

/// `body` as a pretty JSON document, `schema-version` first.
pub fn document<T: Serialize + ?Sized>(body: &T) -> Result<String, String> {
    serde_json::to_string_pretty(&versioned(body)).map_err(|e| format!("writing JSON: {e}"))
}

/// Print `body` as one JSON line on stdout and flush it (a reader sees each line as it
/// comes). A closed stdout is ignored: nobody is left to tell.
pub fn print_line<T: Serialize + ?Sized>(body: &T) -> Result<(), String> {
    let l = line(body)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{l}");
    let _ = out.flush();
    Ok(())
}

/// Keys of `v`, recursively, from snake_case to kebab-case (for structs of other crates that
/// serialise Rust's field names).
pub fn kebab_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.replace('_', "-"), kebab_keys(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(kebab_keys).collect()),
        v => v,
    }
}

/// Fields of `v`, recursively, whose key ends in `_s` and whose value is a number of seconds,
/// as integer nanoseconds under the key ending `_ns` instead (`null` stays `null`).
pub fn seconds_to_ns(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| match k.strip_suffix("_s") {
                    Some(stem) if v.is_number() || v.is_null() => {
                        let ns = v
                            .as_f64()
                            .map(|s| Value::from((s * 1e9).round().max(0.0) as u64))
                            .unwrap_or(Value::Null);
                        (format!("{stem}_ns"), ns)
                    }
                    _ => (k, seconds_to_ns(v)),
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(seconds_to_ns).collect()),
        v => v,
    }
}

/// Fields of `v` (not recursively) whose key has an `ms` part (`downtime-ms`,
/// `downtime-ms-median`) and whose value is a number, as an integer (`12.0` → `12`;
/// fractions are rounded).
pub fn integer_ms(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| match v.as_f64() {
                    Some(f) if k.split('-').any(|w| w == "ms") && !v.is_u64() => {
                        (k, Value::from(f.round().max(0.0) as u64))
                    }
                    _ => (k, v),
                })
                .collect(),
        ),
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Serialize)]
    #[serde(tag = "event", rename_all = "kebab-case")]
    enum E {
        Progress {
            #[serde(rename = "elapsed-ms")]
            elapsed_ms: u64,
        },
    }

    #[test]
    fn schema_version_comes_first() {
        let l = line(&E::Progress { elapsed_ms: 5 }).unwrap();
        assert_eq!(
            l,
            r#"{"schema-version":1,"event":"progress","elapsed-ms":5}"#
        );
        let d = document(&json!({"a": 1})).unwrap();
        assert!(d.starts_with("{\n  \"schema-version\": 1,"), "{d}");
    }

    #[test]
    fn conversions() {
        let v = json!({"get_s": 4.027e-6, "bare_get_avg_s": null, "iterations": [{"dirty_memory_s": 0.5}], "is_s": "x"});
        let v = kebab_keys(seconds_to_ns(v));
        assert_eq!(
            v,
            json!({"get-ns": 4027, "bare-get-avg-ns": null, "iterations": [{"dirty-memory-ns": 500000000}], "is-s": "x"})
        );
        let v = integer_ms(json!({"downtime-ms": 12.0, "x-ms-max": 1.6, "mbps": 1.5, "n-ms": 3}));
        assert_eq!(
            v,
            json!({"downtime-ms": 12, "x-ms-max": 2, "mbps": 1.5, "n-ms": 3})
        );
    }
}
