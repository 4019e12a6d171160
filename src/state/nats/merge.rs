//! How catalog writes made in different regions converge (docs/multi-region.md, "Merge
//! rules"): every write carries a hybrid logical clock stamp; plans and consumers are
//! last-writer-wins by (stamp, node); a key is created once (its secret, consumer and
//! creation time never change afterwards) and its revocation wins over anything later.
//! Pure functions: the same writes in any order give the same state.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::wire::KeyRecord;
use crate::model::{ApiKey, Consumer, Plan};

/// Bits of an HLC stamp below the milliseconds: a logical counter for writes within one
/// millisecond (or behind a clock that stepped back).
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock: never behind the wall clock, never behind any stamp seen, and
/// strictly increasing on this node.
#[derive(Default)]
pub(super) struct Hlc(Mutex<u64>);

impl Hlc {
    pub(super) fn stamp(&self, wall_ms: u64) -> u64 {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last + 1).max(wall_ms << LOGICAL_BITS);
        *last
    }

    /// A stamp received from another node: later local stamps order after it.
    pub(super) fn observe(&self, seen: u64) {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(seen);
    }
}

pub(super) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Kind {
    Plan,
    Consumer,
    Key,
}

impl Kind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Kind::Plan => "plan",
            Kind::Consumer => "consumer",
            Kind::Key => "key",
        }
    }
}

/// One catalog write as published to the writing region's catalog stream. A plan or
/// consumer event without a body is a deletion (kept, so an older write cannot revive it).
#[derive(Serialize, Deserialize)]
pub(super) struct CatalogEvent {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) hlc: u64,
    pub(super) node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) plan: Option<Plan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) consumer: Option<Consumer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<KeyRecord>,
}

/// Whether a write stamped `incoming` replaces one stamped `stored` (ties, which need
/// the same millisecond and counter on two nodes, go to the larger node id).
pub(super) fn newer(incoming: (u64, &str), stored: Option<(u64, &str)>) -> bool {
    stored.is_none_or(|stored| incoming > stored)
}

/// The key after merging `incoming` into `stored`; `None` when nothing changes.
/// `incoming_newer`: its plan, expiry and routes win.
pub(super) fn merge_key(stored: Option<&ApiKey>, incoming: ApiKey, incoming_newer: bool) -> Option<ApiKey> {
    let Some(stored) = stored else {
        return Some(incoming);
    };
    let mut merged = stored.clone();
    if incoming_newer {
        merged.plan = incoming.plan;
        merged.expires_at = incoming.expires_at;
        merged.allowed_routes = incoming.allowed_routes;
    }
    merged.revoked = stored.revoked || incoming.revoked;
    (merged != *stored).then_some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(plan: Option<&str>, revoked: bool) -> ApiKey {
        ApiKey {
            id: "key_1".into(),
            consumer: "acme".into(),
            plan: plan.map(str::to_string),
            hash: [7; 32],
            prefix: "tg_live_abcd".into(),
            created_at: 1,
            expires_at: None,
            allowed_routes: vec![],
            revoked,
        }
    }

    #[test]
    fn clock_is_monotonic_and_follows_what_it_sees() {
        let hlc = Hlc::default();
        let a = hlc.stamp(1000);
        let b = hlc.stamp(1000);
        assert!(b > a);
        // The wall clock stepped back: still later.
        assert!(hlc.stamp(900) > b);
        hlc.observe(5000 << LOGICAL_BITS);
        assert!(hlc.stamp(1000) > 5000 << LOGICAL_BITS);
    }

    #[test]
    fn last_writer_wins_with_node_as_tie_break() {
        assert!(newer((2, "a"), Some((1, "z"))));
        assert!(!newer((1, "z"), Some((2, "a"))));
        assert!(newer((2, "b"), Some((2, "a"))));
        assert!(!newer((2, "a"), Some((2, "a"))));
        assert!(newer((0, "a"), None));
    }

    #[test]
    fn revocation_wins_whatever_the_order() {
        // Region A revokes; region B (later stamp) changes the plan.
        let revoked = key(None, true);
        let replanned = key(Some("pro"), false);
        let one = merge_key(Some(&revoked), replanned.clone(), true).unwrap();
        let two = merge_key(Some(&replanned), revoked.clone(), false).unwrap();
        assert_eq!(one, two);
        assert!(one.revoked);
        assert_eq!(one.plan.as_deref(), Some("pro"));
        // An echo changes nothing.
        assert_eq!(merge_key(Some(&one), one.clone(), false), None);
    }

    #[test]
    fn a_key_is_created_once() {
        let stored = key(None, false);
        let mut other = key(Some("pro"), false);
        other.hash = [9; 32];
        other.consumer = "mallory".into();
        let merged = merge_key(Some(&stored), other, true).unwrap();
        assert_eq!(merged.hash, [7; 32]);
        assert_eq!(merged.consumer, "acme");
        assert_eq!(merged.plan.as_deref(), Some("pro"));
    }
}
