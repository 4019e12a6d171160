//! The request path's side of quota leases (docs/multi-region.md, "Quota leases"): each
//! key entry holds what this node may admit of its day and month quotas; a request past
//! that asks the gateway's lease service for more through a channel, without waiting on
//! the shard lock for any I/O.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::sync::{Notify, mpsc};

use super::entry::Entry;
use super::{UsageTable, lock};
use crate::limits::lease::{self, LeaseTerms, LeaseVerdict, LeaseWindow, WindowLease};
use crate::limits::{Counts, GroupLimits, Now, PlanLimits, RejectKind, Rejection};
use crate::model::{Subject, SubjectRef};

const NODES_UNTIL_KNOWN: u32 = 64;

/// A request for more of a subject's quota, for the lease service.
#[derive(Debug, Clone)]
pub struct Claim {
    pub subject: Subject,
    pub window: LeaseWindow,
    /// The day or month number the claim is for.
    pub window_id: u32,
    pub terms: LeaseTerms,
    /// This node's count in the window when the claim was made.
    pub local: u64,
    /// What this node's view counts for every other node.
    pub others_seen: u64,
}

/// What the authority answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// The new `until` and the size of the grant (0: nothing left).
    Lease { until: u64, grant: u64 },
    /// The authority could not be reached.
    Unreachable,
}

/// Whether leases apply (global mode), and where claims go.
#[derive(Default)]
pub struct Leasing {
    enabled: AtomicBool,
    nodes: AtomicU32,
    claims: OnceLock<mpsc::UnboundedSender<Claim>>,
    /// Woken whenever a claim is answered, for requests waiting on one.
    pub answered: Notify,
    /// Claims sent and not yet answered: one per (subject, window) at a time.
    in_flight: Mutex<std::collections::HashSet<(Subject, LeaseWindow)>>,
}

impl Leasing {
    /// Turns leases on; claims go to `claims`.
    pub fn enable(&self, claims: mpsc::UnboundedSender<Claim>) {
        let _ = self.claims.set(claims);
        // Until heartbeats tell how many nodes share the quotas, assume many: tiny free
        // shares and small leases rather than over-admission at start.
        self.nodes.store(NODES_UNTIL_KNOWN, Ordering::Relaxed);
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn set_nodes(&self, nodes: u32) {
        self.nodes.store(nodes.max(1), Ordering::Relaxed);
    }

    fn send(&self, claim: Claim) {
        let fresh = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((claim.subject.clone(), claim.window));
        if fresh && let Some(tx) = self.claims.get() {
            let _ = tx.send(claim);
        }
    }

    fn done(&self, subject: &Subject, window: LeaseWindow) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(subject.clone(), window));
    }
}

impl UsageTable {
    /// Global mode: checks the key's day and month quotas against what this node holds;
    /// asks for more when it runs low. Called under the shard lock after the quotas passed
    /// on the view's counts.
    pub(super) fn check_leases(
        &self,
        entry: &mut Entry,
        subject: SubjectRef<'_>,
        plan: &PlanLimits,
        group: Option<&GroupLimits>,
        now: Now,
    ) -> Result<(), Rejection> {
        if !subject.is_key() || !self.leasing.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let nodes = self.leasing.nodes.load(Ordering::Relaxed).max(1);
        for (window, quota) in [(LeaseWindow::Day, plan.daily), (LeaseWindow::Month, plan.monthly)] {
            let Some(quota) = quota else { continue };
            let (window_id, slot) = match window {
                LeaseWindow::Day => (now.day(), Some(entry.day_total)),
                LeaseWindow::Month => (now.month(), entry.month_total()),
            };
            let Some(slot) = slot else { continue };
            let terms = LeaseTerms {
                quota,
                nodes,
                mode: plan.on_partition,
                allowance: plan
                    .partition_allowance
                    .unwrap_or_else(|| lease::default_allowance(quota)),
            };
            let held = &mut entry.extra().leases.get_or_insert_with(Default::default)[window.index()];
            if held.window != window_id {
                *held = WindowLease {
                    window: window_id,
                    ..Default::default()
                };
            }
            let verdict = lease::check(held, &terms, slot.local, now.secs() as u32);
            let claim = match verdict {
                LeaseVerdict::Admit { claim } | LeaseVerdict::Wait { claim } => claim,
                LeaseVerdict::Refuse => false,
            };
            if claim {
                held.pending = true;
                self.leasing.send(Claim {
                    subject: Subject::from(&subject),
                    window,
                    window_id,
                    terms,
                    local: slot.local,
                    others_seen: slot.remote,
                });
            }
            match verdict {
                LeaseVerdict::Admit { .. } => {}
                LeaseVerdict::Wait { .. } => {
                    let mut rejection = exhausted(plan, group, window, quota, now);
                    rejection.kind = RejectKind::LeasePending;
                    return Err(rejection);
                }
                LeaseVerdict::Refuse => return Err(exhausted(plan, group, window, quota, now)),
            }
        }
        Ok(())
    }

    /// Applies the authority's answer to a claim; wakes requests waiting on it.
    pub fn apply_grant(&self, claim: &Claim, granted: Granted, now: Now) {
        let subject = claim.subject.as_ref();
        {
            let mut shard = lock(&self.shards[self.shard_of(subject)]);
            let shard = &mut *shard;
            let entry = super::entry::entry_of(&mut shard.map, &subject, Entry::new(now));
            entry.roll(subject, now, &mut shard.retired);
            let held = &mut entry.extra().leases.get_or_insert_with(Default::default)[claim.window.index()];
            if held.window != claim.window_id {
                *held = WindowLease {
                    window: claim.window_id,
                    ..Default::default()
                };
            }
            held.pending = false;
            match granted {
                Granted::Lease { until, grant } => {
                    held.until = held.until.max(until);
                    held.grant = grant;
                    held.partitioned = false;
                    held.refused_at = if grant == 0 { now.secs() as u32 } else { 0 };
                }
                Granted::Unreachable => {
                    held.partitioned = true;
                    held.refused_at = now.secs() as u32;
                }
            }
        }
        self.leasing.done(&claim.subject, claim.window);
        self.leasing.answered.notify_waiters();
    }
}

/// The rejection of a request whose `window` quota is spent (as far as this node may).
fn exhausted(plan: &PlanLimits, group: Option<&GroupLimits>, window: LeaseWindow, quota: u64, now: Now) -> Rejection {
    let counts = match window {
        LeaseWindow::Day => Counts {
            day: quota,
            ..Default::default()
        },
        LeaseWindow::Month => Counts {
            month: quota,
            ..Default::default()
        },
    };
    match crate::limits::check_quotas(plan, group, &counts, now) {
        Err(rejection) => rejection,
        // Unreachable: the window's own quota is at its limit in `counts`.
        Ok(_) => Rejection {
            kind: RejectKind::QuotaExceeded,
            status: crate::limits::LimitStatus {
                name: crate::limits::LimitName::Daily,
                quota,
                window_secs: 86_400,
                remaining: 0,
                reset_secs: 1,
            },
            retry_after: 1,
        },
    }
}
