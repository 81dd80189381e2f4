//! Argument helpers for [`CommandHandler`](super::CommandHandler) implementations, with QEMU's
//! error wording.

use super::QmpError;
use serde_json::{Map, Value};

fn bad_type(name: &str, expected: &str) -> QmpError {
    QmpError::InvalidParameter(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// Fails with "Parameter 'x' is unexpected" for any key not in `allowed`.
pub fn reject_unknown(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QmpError::InvalidParameter(format!(
            "Parameter '{k}' is unexpected"
        ))),
        None => Ok(()),
    }
}

/// An optional string argument.
pub fn opt_str<'a>(args: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad_type(name, "string")),
    }
}

/// A required string argument ("Parameter 'x' is missing" when absent).
pub fn str<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
    opt_str(args, name)?.ok_or_else(|| missing(name))
}

/// An optional boolean argument.
pub fn opt_bool(args: &Map<String, Value>, name: &str) -> Result<Option<bool>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad_type(name, "boolean")),
    }
}

/// An optional non-negative integer argument.
pub fn opt_u64(args: &Map<String, Value>, name: &str) -> Result<Option<u64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| bad_type(name, "uint64")),
    }
}

/// A required non-negative integer argument.
pub fn u64(args: &Map<String, Value>, name: &str) -> Result<u64, QmpError> {
    opt_u64(args, name)?.ok_or_else(|| missing(name))
}

/// The "Parameter 'x' is missing" error.
pub fn missing(name: &str) -> QmpError {
    QmpError::InvalidParameter(format!("Parameter '{name}' is missing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn helpers_check_types_and_presence() {
        let mut a = Map::new();
        a.insert("n".into(), json!(-1));
        a.insert("s".into(), json!("v"));
        assert_eq!(str(&a, "s").unwrap(), "v");
        assert_eq!(
            u64(&a, "n").unwrap_err().to_string(),
            "Invalid parameter type for 'n', expected: uint64"
        );
        assert_eq!(
            u64(&a, "m").unwrap_err().to_string(),
            "Parameter 'm' is missing"
        );
        assert_eq!(opt_str(&a, "m").unwrap(), None);
    }
}
