//! What the catalog holds: plans, consumers and API keys, as every layer sees them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Plan {
    pub name: String,
    /// Requests per second (GCRA), with `burst` requests at once.
    pub rate_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
    /// Quotas of route groups (`group = "..."` on routes), by group name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupQuota>,
    /// Global mode: what a node does with this plan's quotas while it cannot reach a
    /// subject's lease authority (docs/multi-region.md, "Quota leases"). Default `available`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_partition: Option<PartitionMode>,
    /// `available` mode: requests each node may admit per window beyond its lease while
    /// cut off. Default: 10 % of the quota, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_allowance: Option<u64>,
}

/// Availability (keep admitting, bounded by an allowance) or strictness (refuse once the
/// lease is spent) while a quota's lease authority is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionMode {
    #[default]
    Available,
    Strict,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupQuota {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Consumer {
    pub id: String,
    /// The plan of the consumer's keys unless a key names its own.
    pub plan: Option<String>,
    pub created_at: i64,
}

/// A stored API key: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub consumer: String,
    pub plan: Option<String>,
    pub hash: [u8; 32],
    /// The readable start of the secret (`tg_live_ab12…`), to recognise a key in listings.
    pub prefix: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// Route names this key may call; empty = all.
    pub allowed_routes: Vec<String>,
    pub revoked: bool,
}

/// Plans and consumers, held in memory by the admin API. Keys are not: a million of them
/// are read from the backend straight into the request-path table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateData {
    pub plans: BTreeMap<String, Plan>,
    pub consumers: BTreeMap<String, Consumer>,
}
