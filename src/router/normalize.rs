//! Request paths normalized before routing, so no route's auth or quota can be bypassed by
//! spelling a path differently (`/public/../v1/x`, `/public/%2e%2e/v1/x`): the normalized
//! path is what routes match and what the upstream receives (docs/config.md, `[server]`).

/// What to do with `%2F` and `%5C` (an encoded `/` or `\`) in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// `400 bad_request`: upstreams disagree on whether they separate segments.
    Reject,
    /// Left encoded (upper-case), an opaque part of its segment.
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRules {
    /// Off: paths are routed and forwarded as received.
    pub normalize: bool,
    /// `//` counts as `/`.
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathRules {
    fn default() -> Self {
        PathRules {
            normalize: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
        }
    }
}

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C` with `escaped_slashes = "reject"`.
    EscapedSlash,
    /// A raw `\`, which some servers take for `/`.
    Backslash,
    /// `%` not followed by two hex digits.
    BadEscape,
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The normalized form of `path`, or `None` when it already is one (the common case costs
/// one scan). Percent-escapes of unreserved characters are decoded and the rest
/// upper-cased, `//` merged when the rules say so, and `.` and `..` segments removed
/// (RFC 3986 §5.2.4; `..` never climbs above the root).
pub fn normalize(path: &str, rules: &PathRules) -> Result<Option<String>, PathError> {
    if !rules.normalize || !path.starts_with('/') {
        return Ok(None);
    }
    let bytes = path.as_bytes();
    // One pass, erring towards work: any escape or backslash, `//` when merged, and any
    // segment that starts with `.` (a superset of `.` and `..`, which the full pass sorts
    // out: `/.well-known` comes back unchanged).
    let mut previous = 0u8;
    let needs_work = bytes.iter().any(|&b| {
        let work = b == b'%' || b == b'\\' || (previous == b'/' && (b == b'.' || (b == b'/' && rules.merge_slashes)));
        previous = b;
        work
    });
    if !needs_work {
        return Ok(None);
    }
    let decoded = decode(bytes, rules)?;
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let trailing = matches!(segments.last(), Some(&"" | &"." | &".."));
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            "" if rules.merge_slashes || i == last => {}
            segment => out.push(segment),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() || trailing {
        normalized.push('/');
    }
    Ok((normalized != path).then_some(normalized))
}

/// Decodes unreserved escapes, upper-cases the others, applies the slash rules.
fn decode(bytes: &[u8], rules: &PathRules) -> Result<String, PathError> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    // Bytes, not chars: a path may hold UTF-8 (the `http` crate takes bytes past ASCII in
    // a target), and each of its bytes as a char of its own would re-encode it.
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let value = match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(high), Some(low)) => high << 4 | low,
                    _ => return Err(PathError::BadEscape),
                };
                if is_unreserved(value) {
                    out.push(value);
                } else if matches!(value, b'/' | b'\\') && rules.escaped_slashes == EscapedSlashes::Reject {
                    return Err(PathError::EscapedSlash);
                } else {
                    out.extend_from_slice(format!("%{value:02X}").as_bytes());
                }
                i += 3;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    // Escapes add ASCII only, and every other byte of the UTF-8 input is copied in order,
    // so this holds; an error rather than a panic if it ever did not.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, PathError> {
        normalize(path, &PathRules::default()).map(|n| n.unwrap_or_else(|| path.to_string()))
    }

    #[test]
    fn dot_segments_and_escapes_cannot_reach_another_route() {
        assert_eq!(normal("/public/../v1/x").unwrap(), "/v1/x");
        assert_eq!(normal("/public/%2e%2e/v1/x").unwrap(), "/v1/x");
        assert_eq!(normal("/public/%2E%2e/v1/x").unwrap(), "/v1/x");
        assert_eq!(normal("/public/./../v1/./x/").unwrap(), "/v1/x/");
        assert_eq!(normal("/../../etc").unwrap(), "/etc");
        assert_eq!(normal("/a/..").unwrap(), "/");
        assert_eq!(normal("/a/b/.").unwrap(), "/a/b/");
        // An encoded slash cannot hide a segment boundary.
        assert_eq!(normal("/public/..%2fv1/x"), Err(PathError::EscapedSlash));
        assert_eq!(normal("/public/..%5Cv1/x"), Err(PathError::EscapedSlash));
        assert_eq!(normal("/public\\..\\v1"), Err(PathError::Backslash));
        assert_eq!(normal("/bad%zz"), Err(PathError::BadEscape));
        assert_eq!(normal("/bad%2"), Err(PathError::BadEscape));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept_upper_case() {
        assert_eq!(normal("/v1/%7Euser/%41").unwrap(), "/v1/~user/A");
        assert_eq!(normal("/q/a%20b%3f").unwrap(), "/q/a%20b%3F");
        assert_eq!(normal("/v1//lookup///x").unwrap(), "/v1/lookup/x");
    }

    #[test]
    fn bytes_past_ascii_are_kept_as_they_are() {
        // Found by tests/fuzz.rs: each byte of a UTF-8 sequence was written as a char of
        // its own, so the path changed and changed again when normalized twice.
        assert_eq!(normal("/.FP\u{50f}").unwrap(), "/.FP\u{50f}");
        assert_eq!(normal("/caf\u{e9}/../\u{1f600}/%41/./x").unwrap(), "/\u{1f600}/A/x");
        assert_eq!(normal("/\u{e9}//%c3%a9").unwrap(), "/\u{e9}/%C3%A9");
    }

    #[test]
    fn normal_paths_cost_nothing_and_rules_are_honoured() {
        for path in [
            "/",
            "/v1/lookup/8.8.8.8",
            "/v1/lookup/",
            "/a.b/c..d/.e",
            "/.well-known/x",
            "/a/..b",
        ] {
            assert_eq!(normalize(path, &PathRules::default()), Ok(None), "{path}");
        }
        let keep = PathRules {
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::Keep,
            ..PathRules::default()
        };
        assert_eq!(normalize("/a//b/%2f/../c", &keep), Ok(Some("/a//b/c".into())));
        assert_eq!(normalize("/a/%2fb", &keep), Ok(Some("/a/%2Fb".into())));
        let off = PathRules {
            normalize: false,
            ..PathRules::default()
        };
        assert_eq!(normalize("/public/../v1", &off), Ok(None));
    }
}
