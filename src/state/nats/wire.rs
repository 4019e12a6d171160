//! Records as JetStream holds them: ids as subject and KV-key tokens, API keys (the secret's hash, never the
//! secret), usage batches and snapshots with short field names.

use serde::{Deserialize, Serialize};

use crate::model::{ApiKey, Scope, UsageRow};

/// An id as one token of a subject or KV key: ids may hold bytes neither allows (`@` in
/// consumer ids) and `.` separates tokens, so anything but `[-_a-zA-Z0-9]` is written as
/// `=XX`.
pub(super) fn id_token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The id a token was made from by [`id_token`] (tests: the escaping is reversible, so
/// two ids never share a token).
#[cfg(test)]
fn token_id(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'=')
            .then(|| key.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An API key as stored in the keys bucket (the secret's SHA-256 in hex, never the secret).
#[derive(Serialize, Deserialize)]
pub(super) struct KeyRecord {
    pub(super) id: String,
    pub(super) consumer: String,
    pub(super) plan: Option<String>,
    pub(super) hash: String,
    pub(super) prefix: String,
    pub(super) created_at: i64,
    pub(super) expires_at: Option<i64>,
    pub(super) routes: Vec<String>,
    pub(super) revoked: bool,
}

impl From<&ApiKey> for KeyRecord {
    fn from(key: &ApiKey) -> Self {
        KeyRecord {
            id: key.id.clone(),
            consumer: key.consumer.clone(),
            plan: key.plan.clone(),
            hash: key.hash.iter().map(|b| format!("{b:02x}")).collect(),
            prefix: key.prefix.clone(),
            created_at: key.created_at,
            expires_at: key.expires_at,
            routes: key.allowed_routes.clone(),
            revoked: key.revoked,
        }
    }
}

impl KeyRecord {
    pub(super) fn into_key(self) -> Option<ApiKey> {
        let mut hash = [0u8; 32];
        if self.hash.len() != 64 {
            return None;
        }
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(self.hash.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ApiKey {
            id: self.id,
            consumer: self.consumer,
            plan: self.plan,
            hash,
            prefix: self.prefix,
            created_at: self.created_at,
            expires_at: self.expires_at,
            allowed_routes: self.routes,
            revoked: self.revoked,
        })
    }
}

/// One published batch of a node's usage slots.
#[derive(Serialize, Deserialize)]
pub(super) struct UsageBatch {
    pub(super) node: String,
    pub(super) region: String,
    pub(super) rows: Vec<BatchRow>,
}

/// One slot on the wire, with short field names (a batch or snapshot holds many).
#[derive(Serialize, Deserialize)]
pub(super) struct BatchRow {
    pub(super) s: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) c: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) p: String,
    pub(super) d: u32,
    pub(super) n: u64,
}

impl From<UsageRow> for BatchRow {
    fn from(row: UsageRow) -> BatchRow {
        BatchRow {
            s: row.subject,
            c: row.consumer,
            p: row.scope.to_string(),
            d: row.day,
            n: row.count,
        }
    }
}

impl BatchRow {
    /// The row back; `None` for a scope no version of Tollgate writes.
    pub(super) fn into_row(self) -> Option<UsageRow> {
        Some(UsageRow {
            scope: Scope::parse(&self.p)?,
            subject: self.s,
            consumer: self.c,
            day: self.d,
            count: self.n,
        })
    }
}

/// A compacted copy of one node's usage view: every node's slots of this month and the
/// last, and how far into each region's usage stream they include.
#[derive(Serialize, Deserialize)]
pub(super) struct Snapshot {
    pub(super) node: String,
    #[serde(default)]
    pub(super) sequences: std::collections::BTreeMap<String, u64>,
    pub(super) rows: Vec<SnapshotRow>,
}

/// A slot of any node: the batch fields plus the owner.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotRow {
    #[serde(flatten)]
    pub(super) row: BatchRow,
    pub(super) o: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_escape_what_nats_tokens_do_not_allow() {
        assert_eq!(id_token("key_ab12"), "key_ab12");
        assert_eq!(id_token("jane@example.com"), "jane=40example=2Ecom");
        assert_eq!(id_token("a=b"), "a=3Db");
        for id in ["jane@example.com", "a=b", "plain-id_1.x"] {
            assert_eq!(token_id(&id_token(id)), id);
        }
        let key = ApiKey {
            id: "key_1".into(),
            consumer: "acme".into(),
            plan: Some("pro".into()),
            hash: [0xab; 32],
            prefix: "tg_live_abcd".into(),
            created_at: 1,
            expires_at: None,
            allowed_routes: vec!["lookup".into()],
            revoked: false,
        };
        let decode = |bytes: &[u8]| serde_json::from_slice::<KeyRecord>(bytes).ok()?.into_key();
        let encoded = serde_json::to_vec(&KeyRecord::from(&key)).unwrap();
        assert_eq!(decode(&encoded), Some(key));
        assert_eq!(decode(b"{}"), None);
    }
}
