//! The authority side of quota leases (docs/multi-region.md, "Quota leases"): for each
//! subject, one region — chosen by rendezvous hashing over the known regions, so no
//! region is special and losing one affects only the subjects it owns — keeps a record per
//! window in its `tollgate_leases_<region>` KV bucket: what each node may count up to.
//! A claim is a compare-and-set on that record (the "row lock" of a credit ledger), made
//! off the request path by [`NatsBackend::serve_claims`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::regions::Log;
use super::wire::id_token;
use super::{NatsBackend, nats_error};
use crate::base::{Shutdown, stopped};
use crate::limits::lease;
use crate::state::StateError;
use crate::usage::{Claim, Granted};

pub const LEASES_PREFIX: &str = "tollgate_leases_";
/// A claim that takes longer is answered `Unreachable` (the plan's partition mode applies
/// until a later claim gets through).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);
/// Compare-and-set attempts before a claim gives up (contention from every node at once).
const CAS_ATTEMPTS: usize = 32;

use crate::state::GrantSink;

/// FNV-1a: stable across builds and platforms, so every node picks the same owner.
fn fnv(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The region that keeps `subject`'s lease records: the highest score among `regions`.
pub(super) fn owner<'r>(regions: &'r [String], subject: &str) -> Option<&'r String> {
    regions.iter().max_by_key(|region| fnv(&[region, subject]))
}

impl NatsBackend {
    /// Answers claims until `shutdown`: each in its own task, so one slow authority does
    /// not hold up subjects owned elsewhere.
    pub(super) async fn serve_claims(
        self: Arc<Self>,
        mut claims: mpsc::UnboundedReceiver<Claim>,
        sink: GrantSink,
        mut shutdown: Shutdown,
    ) {
        let sink = Arc::new(sink);
        loop {
            let claim = tokio::select! {
                claim = claims.recv() => claim,
                _ = stopped(&mut shutdown) => None,
            };
            let Some(claim) = claim else { return };
            let (backend, sink) = (self.clone(), sink.clone());
            tokio::spawn(async move {
                let granted = match tokio::time::timeout(CLAIM_TIMEOUT, backend.claim(&claim)).await {
                    Ok(Ok(granted)) => granted,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, subject = %claim.subject, "quota lease claim failed");
                        Granted::Unreachable
                    }
                    Err(_) => Granted::Unreachable,
                };
                backend.count_claim(granted);
                sink(&claim, granted);
            });
        }
    }

    fn count_claim(&self, granted: Granted) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match granted {
            Granted::Released => &self.lease_stats.released,
            Granted::Lease { grant: 0, .. } => &self.lease_stats.refused,
            Granted::Lease { .. } => &self.lease_stats.granted,
            Granted::Unreachable => &self.lease_stats.unreachable,
        };
        counter.fetch_add(1, Relaxed);
    }

    async fn lease_bucket(&self, region: &str) -> Result<kv::Store, StateError> {
        if let Some(store) = self.lease_buckets.lock().unwrap_or_else(|e| e.into_inner()).get(region) {
            return Ok(store.clone());
        }
        let store = self
            .jet()?
            .js
            .get_key_value(format!("{LEASES_PREFIX}{region}"))
            .await
            .map_err(|e| nats_error("lease bucket", e))?;
        self.lease_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(region.to_string(), store.clone());
        Ok(store)
    }

    async fn claim(&self, claim: &Claim) -> Result<Granted, StateError> {
        if !self.connected() {
            // Cut off from this region's NATS: no authority is reachable; do not make the
            // waiting request wait out the timeout.
            return Ok(Granted::Unreachable);
        }
        let subject = claim.subject.to_string();
        let regions = self.regions.known(Log::Usage);
        let owner = owner(&regions, &subject)
            .cloned()
            .unwrap_or_else(|| self.region.clone());
        let store = self.lease_bucket(&owner).await?;
        let key = format!("{}.{}", claim.window.record(claim.window_id), id_token(&subject));
        for _ in 0..CAS_ATTEMPTS {
            let entry = store
                .entry(key.clone())
                .await
                .map_err(|e| nats_error("lease record", e))?;
            if let Some(from) = claim.release_from {
                let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                    return Ok(Granted::Released);
                };
                let mut record: BTreeMap<String, u64> = serde_json::from_slice(&entry.value).unwrap_or_default();
                // Only the lease being released: a grant recorded since is this node's too,
                // and lowering it would let others spend what this node may still admit.
                if record.get(&self.node) != Some(&from) {
                    return Ok(Granted::Released);
                }
                record.insert(self.node.clone(), claim.local);
                let value = Bytes::from(serde_json::to_vec(&record).map_err(|e| nats_error("encode", e))?);
                match store.update(&key, value, entry.revision).await {
                    Ok(_) => return Ok(Granted::Released),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(nats_error("lease record", e)),
                }
            }
            let (record, revision) = match &entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice::<BTreeMap<String, u64>>(&entry.value).unwrap_or_default(),
                    Some(entry.revision),
                ),
                Some(entry) => (BTreeMap::new(), Some(entry.revision)),
                None => (BTreeMap::new(), None),
            };
            let (until, grant) = lease::grant(&record, &self.node, claim.local, claim.others_seen, &claim.terms);
            if grant == 0 {
                return Ok(Granted::Lease { until, grant });
            }
            let mut record = record;
            record.insert(self.node.clone(), until);
            let value = Bytes::from(serde_json::to_vec(&record).map_err(|e| nats_error("encode", e))?);
            let written = match revision {
                Some(revision) => store
                    .update(&key, value, revision)
                    .await
                    .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
                None => store
                    .create(&key, value)
                    .await
                    .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
            };
            match written {
                Ok(_) => return Ok(Granted::Lease { until, grant }),
                // Another node wrote first: read again.
                Err((true, _)) => continue,
                Err((false, error)) => return Err(nats_error("lease record", error)),
            }
        }
        Err(nats_error("lease record", "too much contention"))
    }
}

/// Claims answered, by outcome (for `/metrics`).
#[derive(Default)]
pub(super) struct LeaseStats {
    pub(super) granted: std::sync::atomic::AtomicU64,
    pub(super) refused: std::sync::atomic::AtomicU64,
    pub(super) unreachable: std::sync::atomic::AtomicU64,
    pub(super) released: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_picks_the_same_owner_and_subjects_spread() {
        let regions: Vec<String> = ["eu", "us", "ap"].iter().map(|r| r.to_string()).collect();
        let mut owned = BTreeMap::new();
        for i in 0..300 {
            let subject = format!("key:key_{i}");
            let first = owner(&regions, &subject).unwrap();
            let mut reversed = regions.clone();
            reversed.reverse();
            assert_eq!(owner(&reversed, &subject).unwrap(), first);
            *owned.entry(first.clone()).or_insert(0) += 1;
        }
        assert_eq!(owned.len(), 3, "{owned:?}");
        assert!(owned.values().all(|&n| n > 60), "{owned:?}");
        // Losing a region moves only its subjects.
        let two: Vec<String> = regions[..2].to_vec();
        for i in 0..300 {
            let subject = format!("key:key_{i}");
            let before = owner(&regions, &subject).unwrap();
            if before != "ap" {
                assert_eq!(owner(&two, &subject).unwrap(), before);
            }
        }
    }
}
