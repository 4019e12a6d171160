//! Durations as operators write them, and the wall clock in Unix seconds.

use std::time::Duration;

/// `"200ms"`, `"10s"`, `"1m"`: the one spelling of durations in configuration and stored
/// records.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?} ({e}); write e.g. \"200ms\", \"10s\", \"1m\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_say_how_to_write_them() {
        assert_eq!(parse_duration(" 200ms "), Ok(Duration::from_millis(200)));
        assert!(parse_duration("soon").unwrap_err().contains("\"10s\""));
    }
}
