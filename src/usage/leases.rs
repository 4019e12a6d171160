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
use crate::model::{PartitionMode, Subject, SubjectRef};

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
    /// Not a claim but a release: this node stopped at `local` and gives back the rest of
    /// the lease it held up to `release_from` (the authority applies it only if its
    /// record still says so).
    pub release_from: Option<u64>,
}

/// What the authority answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// The new `until` and the size of the grant (0: nothing left).
    Lease { until: u64, grant: u64 },
    /// The authority could not be reached.
    Unreachable,
    /// A release was recorded (or found superseded).
    Released,
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
    /// Leases granted and maybe not spent, checked for idleness by [`UsageTable::release_idle`].
    held: Mutex<std::collections::HashSet<(Subject, LeaseWindow)>>,
}

/// A lease unused for this long is given back, so quota a node holds but no longer needs
/// (its callers moved to other nodes) is not lost to the others.
pub const RELEASE_IDLE_SECS: u32 = 2;

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

    fn forget(&self, subject: &Subject, window: LeaseWindow) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(subject.clone(), window));
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
                    release_from: None,
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
                Granted::Released => {}
                Granted::Lease { until, grant } => {
                    held.until = held.until.max(until);
                    held.grant = grant;
                    held.partitioned = false;
                    held.refused_at = if grant == 0 { now.secs() as u32 } else { 0 };
                    if grant > 0 {
                        self.leasing
                            .held
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((claim.subject.clone(), claim.window));
                    }
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

impl UsageTable {
    /// Gives back what idle leases still hold: a lease whose subject this node has not
    /// admitted for [`RELEASE_IDLE_SECS`] is cut to what was spent (here first, so nothing
    /// more is admitted on it) and a release goes to the authority. Called by the flusher.
    pub fn release_idle(&self, now: Now) {
        if !self.leasing.enabled.load(Ordering::Relaxed) {
            return;
        }
        let held: Vec<(Subject, LeaseWindow)> = {
            let held = self.leasing.held.lock().unwrap_or_else(|e| e.into_inner());
            held.iter().cloned().collect()
        };
        let now_secs = now.secs() as u32;
        for (subject, window) in held {
            let release = {
                let mut shard = lock(&self.shards[self.shard_of(subject.as_ref())]);
                let Some(entry) = shard.map.get_mut(&subject) else {
                    self.leasing.forget(&subject, window);
                    continue;
                };
                if now_secs.saturating_sub(entry.last_used) < RELEASE_IDLE_SECS {
                    continue;
                }
                let local = match window {
                    LeaseWindow::Day => Some(entry.day_total.local),
                    LeaseWindow::Month => entry.month_total().map(|s| s.local),
                };
                let window_id = match window {
                    LeaseWindow::Day => entry.day,
                    LeaseWindow::Month => entry.month,
                };
                let Some(local) = local else { continue };
                let Some(held) = entry
                    .extra
                    .as_mut()
                    .and_then(|e| e.leases.as_mut())
                    .map(|l| &mut l[window.index()])
                else {
                    continue;
                };
                if held.pending || held.window != window_id || held.until <= local {
                    None
                } else {
                    let from = held.until;
                    held.until = local;
                    held.grant = 0;
                    held.pending = true;
                    Some((from, local, window_id))
                }
            };
            self.leasing.forget(&subject, window);
            if let Some((from, local, window_id)) = release {
                self.leasing.send(Claim {
                    subject,
                    window,
                    window_id,
                    terms: LeaseTerms {
                        quota: 0,
                        nodes: self.leasing.nodes.load(Ordering::Relaxed),
                        mode: PartitionMode::Available,
                        allowance: 0,
                    },
                    local,
                    others_seen: 0,
                    release_from: Some(from),
                });
            }
        }
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
