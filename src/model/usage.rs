//! Usage as it is stored and replicated: one row per counter slot of one node and day.

use super::Scope;

/// One counter slot of this node for one day, as the store keeps it. Writing a row is
/// idempotent: the store keeps the larger of the stored and the written count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub subject: String,
    pub consumer: Option<String>,
    pub scope: Scope,
    pub day: u32,
    pub count: u64,
}

/// A stored slot read back at start (any node's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub row: UsageRow,
    pub node: String,
}
