//! Reading the TOML document: one section at a time after `${ENV}` substitution, every
//! error recorded with the span of the field it is about.

use std::ops::Range;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml_edit::{Item, Value};

use super::error::ErrorSink;

/// Deserializes one section on its own, after `${ENV}` substitution, recording any error.
pub(super) fn read_section<T: DeserializeOwned>(sink: &mut ErrorSink<'_>, item: &Item, field: &str) -> Option<T> {
    let mut substituted = item.clone();
    substitute_env(sink, &mut substituted, item, field);
    let value = match substituted.into_value() {
        Ok(value) => value,
        Err(_) => {
            sink.push(item.span(), field, "expected a value");
            return None;
        }
    };
    // serde stops at the first bad field; to report every one, drop the offending key and
    // try again until the rest parses or an error cannot be pinned to a key.
    let mut value = value;
    for _ in 0..64 {
        match T::deserialize(value.clone().into_deserializer()) {
            // A section parsed without its bad keys (defaults in their place) still goes
            // through the semantic checks, so one run reports those errors too; the
            // configuration as a whole is refused because errors were recorded.
            Ok(section) => return Some(section),
            Err(e) => {
                let span = e.span().or_else(|| item_span(item));
                let inner = span.as_ref().and_then(|s| field_at(item, s.start)).unwrap_or_default();
                let path = if inner.is_empty() {
                    field.to_string()
                } else {
                    format!("{field}.{inner}")
                };
                sink.push(span, &path, e.message().to_string());
                let top_key = inner.split(['.', '[']).next().unwrap_or("");
                let removed =
                    !top_key.is_empty() && value.as_inline_table_mut().is_some_and(|t| t.remove(top_key).is_some());
                if !removed {
                    return None;
                }
            }
        }
    }
    None
}

/// Replaces `${NAME}` in every string value with the environment variable `NAME`.
fn substitute_env(sink: &mut ErrorSink<'_>, item: &mut Item, original: &Item, field: &str) {
    match item {
        Item::Value(value) => substitute_value(sink, value, original.span(), field),
        Item::Table(table) => {
            for (key, child) in table.iter_mut() {
                let child_field = format!("{field}.{}", key.get());
                let orig = original.get(key.get()).unwrap_or(&Item::None);
                substitute_env(sink, child, orig, &child_field);
            }
        }
        Item::ArrayOfTables(array) => {
            for (i, table) in array.iter_mut().enumerate() {
                for (key, child) in table.iter_mut() {
                    let child_field = format!("{field}[{i}].{}", key.get());
                    substitute_env(sink, child, &Item::None, &child_field);
                }
            }
        }
        Item::None => {}
    }
}

fn substitute_value(sink: &mut ErrorSink<'_>, value: &mut Value, span: Option<Range<usize>>, field: &str) {
    match value {
        Value::String(s) if s.value().contains("${") => match expand_env(s.value()) {
            Ok(expanded) => *value = Value::from(expanded),
            Err(message) => sink.push(span.or_else(|| value.span()), field, message),
        },
        Value::Array(array) => {
            for v in array.iter_mut() {
                let span = v.span();
                substitute_value(sink, v, span, field);
            }
        }
        Value::InlineTable(table) => {
            for (key, v) in table.iter_mut() {
                let span = v.span();
                let child_field = format!("{field}.{}", key.get());
                substitute_value(sink, v, span, &child_field);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` from the process environment; `$${` is a literal `${`.
pub fn expand_env(text: &str) -> Result<String, String> {
    expand_with(text, |name| std::env::var(name).ok())
}

pub(super) fn expand_with(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(format!("unterminated ${{...}} in {text:?}"));
            };
            let name = &after[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("environment variable {name} is not set")),
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        other => other.span(),
    }
}

/// The span of `key` inside a table-like item (its value, else its key), or the item's
/// own span when the key is absent.
pub(super) fn field_span(item: &Item, key: &str) -> Option<Range<usize>> {
    key_span(item, key).or_else(|| item_span(item))
}

pub(super) fn key_span(item: &Item, key: &str) -> Option<Range<usize>> {
    let table = item.as_table_like()?;
    let (k, v) = table.get_key_value(key)?;
    v.span().or_else(|| k.span())
}

/// The span of element `index` of the array under `key`.
pub(super) fn element_span(item: &Item, key: &str, index: usize) -> Option<Range<usize>> {
    let array = item.as_table_like()?.get(key)?.as_array()?;
    array.get(index)?.span().or_else(|| field_span(item, key))
}

/// The dotted path (relative to `item`) of the deepest key whose key or value contains `offset`.
pub(super) fn field_at(item: &Item, offset: usize) -> Option<String> {
    let contains =
        |span: Option<Range<usize>>| span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1));
    if let Some(table) = item.as_table_like() {
        for (key, child) in table.iter() {
            let key_span = table.get_key_value(key).and_then(|(k, _)| k.span());
            let inner = field_at(child, offset);
            if contains(key_span) || contains(child.span()) || inner.is_some() {
                return Some(match inner {
                    Some(inner) if inner.starts_with('[') => format!("{key}{inner}"),
                    Some(inner) if !inner.is_empty() => format!("{key}.{inner}"),
                    _ => key.to_string(),
                });
            }
        }
    }
    if let Some(Value::Array(array)) = item.as_value() {
        for (i, v) in array.iter().enumerate() {
            if contains(v.span()) {
                let inner = field_at(&Item::Value(v.clone()), offset).unwrap_or_default();
                return Some(if inner.is_empty() {
                    format!("[{i}]")
                } else {
                    format!("[{i}].{inner}")
                });
            }
        }
    }
    None
}
