//! Usage counters (docs/architecture.md, "Limits and usage counting"): grow-only counters
//! per (subject, window), one slot per node. The request path reads and raises them in
//! memory, under one shard lock that makes the check and the increment a single step; a
//! background service (`gateway::usage`) writes changed slots to the usage store every
//! `usage.flush_interval`. Nothing here does I/O.
//!
//! What is kept in memory: the current UTC day per subject, and the current month where
//! a quota needs it (always for keys; for anonymous subjects only when the anonymous plan
//! has a monthly quota, so a million IPs a day do not pile up for a month). Ended windows
//! are pruned from memory once flushed; the store keeps one row per (subject, scope, day,
//! node) for reports, and months are sums of days.

mod entry;
mod leases;
pub mod report;

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxBuildHasher;

use crate::limits::{self, Counts, GroupLimits, LimitStatus, Now, PlanLimits, Rejection};
pub use entry::Sketch;
use entry::{Entry, Shard, commit, entry_of};
pub use leases::{Claim, Granted, Leasing};

use crate::model::{Scope, StoredRow, Subject, SubjectRef, UsageRow};

const SHARDS: usize = 64;

/// One charge of a request: the subject, and for keys the consumer and route (reports).
pub struct Charge<'a> {
    pub subject: SubjectRef<'a>,
    pub consumer: Option<&'a Arc<str>>,
    pub route: Option<&'a Arc<str>>,
}

/// Everything one request is charged to: a key (or a JWT's consumer), or an anonymous
/// caller's IP and Referer host — never more than two subjects.
pub enum Charges<'a> {
    One(Charge<'a>),
    Two(Charge<'a>, Charge<'a>),
}

/// The usage counters of this node's view, by subject.
/// A shard on its own cache lines, so workers locking neighbouring shards do not contend.
#[repr(align(128))]
#[derive(Default)]
struct Padded(Mutex<Shard>);

pub struct UsageTable {
    shards: Box<[Padded]>,
    hasher: FxBuildHasher,
    /// Anonymous subjects keep a month counter only when their plan needs it.
    anonymous_month: std::sync::atomic::AtomicBool,
    /// Each shard's share of `anonymous.max_subjects` (0 = unbounded).
    max_anonymous_per_shard: std::sync::atomic::AtomicUsize,
    evictions: std::sync::atomic::AtomicU64,
    rows_dropped: std::sync::atomic::AtomicU64,
    /// Global mode: quota leases (off on a single node).
    pub leasing: Leasing,
}

impl Default for UsageTable {
    fn default() -> Self {
        UsageTable {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: FxBuildHasher,
            anonymous_month: Default::default(),
            max_anonymous_per_shard: Default::default(),
            evictions: Default::default(),
            rows_dropped: Default::default(),
            leasing: Leasing::default(),
        }
    }
}

fn lock(shard: &Padded) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard leaves counts that are still valid numbers.
    shard.0.lock().unwrap_or_else(|e| e.into_inner())
}

struct Decided {
    tat: Option<u64>,
    status: Option<LimitStatus>,
}

impl UsageTable {
    fn shard_of(&self, subject: SubjectRef<'_>) -> usize {
        // The map hashes the same value; mixing before taking the top bits keeps the shard
        // choice independent of the bits the map uses inside a shard.
        let hash = self.hasher.hash_one(subject).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (hash >> (64 - SHARDS.trailing_zeros())) as usize
    }

    /// Sets whether anonymous subjects (IPs, Referers) keep a month counter.
    pub fn set_anonymous_month(&self, on: bool) {
        self.anonymous_month.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn anonymous_month(&self) -> bool {
        self.anonymous_month.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn track_month(&self, subject: SubjectRef<'_>, plan: &PlanLimits) -> bool {
        subject.is_key() || plan.tracks_month() || self.anonymous_month()
    }

    /// Checks `plan` for every charge and, when all pass, counts the request against each
    /// (all or nothing). On admission, returns the status closest to exhaustion. A refused
    /// request creates no entry: a subject not in memory is decided on a fresh entry that
    /// is kept only if the request is admitted.
    pub fn admit(
        &self,
        charges: &Charges<'_>,
        plan: &PlanLimits,
        group: Option<&GroupLimits>,
        now: Now,
    ) -> Result<Option<LimitStatus>, Rejection> {
        match charges {
            Charges::One(one) => {
                let mut shard = lock(&self.shards[self.shard_of(one.subject)]);
                // The common case, a subject in memory: decided and counted in one lookup.
                let Shard {
                    map, dirty, retired, ..
                } = &mut *shard;
                if let Some(entry) = map.get_mut(&one.subject) {
                    let decided = self.decide(entry, one.subject, retired, plan, group, now)?;
                    commit(entry, one, decided.tat, group, dirty, now);
                    return Ok(decided.status);
                }
                let (decided, fresh) = self.decide_charge(&mut shard, one, plan, group, now)?;
                self.commit_charge(&mut shard, one, fresh, decided.tat, group, now);
                Ok(decided.status)
            }
            Charges::Two(first, second) => {
                let (one, two) = self.admit_two(first, second, plan, group, now)?;
                Ok(match (one.status, two.status) {
                    (Some(x), Some(y)) => Some(x.closer(&y).clone()),
                    (x, y) => x.or(y),
                })
            }
        }
    }

    /// Both subjects decided under their shard locks, then both counted.
    fn admit_two(
        &self,
        first: &Charge<'_>,
        second: &Charge<'_>,
        plan: &PlanLimits,
        group: Option<&GroupLimits>,
        now: Now,
    ) -> Result<(Decided, Decided), Rejection> {
        let (a, b) = (self.shard_of(first.subject), self.shard_of(second.subject));
        if a == b {
            let mut shard = lock(&self.shards[a]);
            let (one, fresh_one) = self.decide_charge(&mut shard, first, plan, group, now)?;
            let (two, fresh_two) = self.decide_charge(&mut shard, second, plan, group, now)?;
            self.commit_charge(&mut shard, first, fresh_one, one.tat, group, now);
            self.commit_charge(&mut shard, second, fresh_two, two.tat, group, now);
            return Ok((one, two));
        }
        // Shards are locked in index order, so two requests never wait on each other
        // crosswise.
        let (mut shard_a, mut shard_b) = if a < b {
            let low = lock(&self.shards[a]);
            (low, lock(&self.shards[b]))
        } else {
            let low = lock(&self.shards[b]);
            (lock(&self.shards[a]), low)
        };
        let (one, fresh_one) = self.decide_charge(&mut shard_a, first, plan, group, now)?;
        let (two, fresh_two) = self.decide_charge(&mut shard_b, second, plan, group, now)?;
        self.commit_charge(&mut shard_a, first, fresh_one, one.tat, group, now);
        self.commit_charge(&mut shard_b, second, fresh_two, two.tat, group, now);
        Ok((one, two))
    }

    /// Decides one charge on its subject's entry, or on a fresh one (returned, not yet
    /// stored) when the subject is not in memory — with the counts it had when it was
    /// evicted today, if it was.
    fn decide_charge(
        &self,
        shard: &mut Shard,
        charge: &Charge<'_>,
        plan: &PlanLimits,
        group: Option<&GroupLimits>,
        now: Now,
    ) -> Result<(Decided, Option<Entry>), Rejection> {
        let Shard {
            map, retired, evicted, ..
        } = shard;
        if let Some(entry) = map.get_mut(&charge.subject) {
            return Ok((self.decide(entry, charge.subject, retired, plan, group, now)?, None));
        }
        let mut fresh = Entry::new(now);
        if let Some(sketch) = evicted {
            sketch.restore(self.sketch_hash(charge.subject), &mut fresh, now);
        }
        let decided = self.decide(&mut fresh, charge.subject, retired, plan, group, now)?;
        Ok((decided, Some(fresh)))
    }

    /// Counts an admitted charge, storing its fresh entry; then keeps the shard's
    /// anonymous subjects within bounds.
    fn commit_charge(
        &self,
        shard: &mut Shard,
        charge: &Charge<'_>,
        fresh: Option<Entry>,
        tat: Option<u64>,
        group: Option<&GroupLimits>,
        now: Now,
    ) {
        let Shard {
            map, dirty, anonymous, ..
        } = &mut *shard;
        let entry = match fresh {
            Some(fresh) => {
                if !charge.subject.is_key() {
                    *anonymous += 1;
                }
                entry_of(map, &charge.subject, fresh)
            }
            None => match map.get_mut(&charge.subject) {
                Some(entry) => entry,
                None => return,
            },
        };
        commit(entry, charge, tat, group, dirty, now);
        self.bound(shard, now);
    }

    fn sketch_hash(&self, subject: SubjectRef<'_>) -> u64 {
        self.hasher
            .hash_one(subject)
            .rotate_left(29)
            .wrapping_mul(0xD6E8_FEB8_6659_FD93)
    }

    /// Sets the most anonymous subjects held in memory (`anonymous.max_subjects`).
    pub fn set_max_anonymous(&self, max: usize) {
        self.max_anonymous_per_shard
            .store(max.div_ceil(SHARDS), std::sync::atomic::Ordering::Relaxed);
    }

    /// Past its share of `anonymous.max_subjects`, a shard evicts its least recently used
    /// anonymous entries whose rate limit has recovered, flushed ones first: a flushed
    /// entry's counts are in the store; an unflushed one's rows go to `retired`, which the
    /// next flush writes, so nothing counted is lost either way. Each evicted subject's day
    /// counts are noted in the shard's sketch so a returning subject resumes from them.
    /// Down to 90 % of the share, so evictions come in batches rather than on every new
    /// subject.
    fn bound(&self, shard: &mut Shard, now: Now) {
        let cap = self.max_anonymous_per_shard.load(std::sync::atomic::Ordering::Relaxed);
        if cap == 0 || shard.anonymous <= cap {
            return;
        }
        let evictable = |subject: &Subject, entry: &Entry| !subject.is_key() && entry.tat <= now.0;
        // Unflushed entries sort after flushed ones of any age.
        let order = |entry: &Entry| (u64::from(entry.queued) << 32) | u64::from(entry.last_used);
        let mut orders: Vec<u64> = shard
            .map
            .iter()
            .filter(|(subject, entry)| evictable(subject, entry))
            .map(|(_, entry)| order(entry))
            .collect();
        if orders.is_empty() {
            return;
        }
        let want = (shard.anonymous - (cap - cap / 10)).min(orders.len());
        let (_, threshold, _) = orders.select_nth_unstable(want - 1);
        let threshold = *threshold;
        let Shard {
            map,
            retired,
            evicted: sketch,
            anonymous,
            ..
        } = shard;
        let sketch = sketch.get_or_insert_with(|| Box::new(entry::Sketch::new(now)));
        sketch.roll(now);
        let mut evicted = 0;
        let mut dropped = 0;
        map.retain(|subject, entry| {
            if evicted >= want || !evictable(subject, entry) || order(entry) > threshold {
                return true;
            }
            if entry.queued {
                // Still listed in `dirty`; `collect` skips subjects no longer in the map.
                // While the store keeps up, its rows wait for the next flush; when a flood
                // outruns the store, waiting rows would grow without bound, so past twice
                // the shard's share they are dropped and counted — the decision state stays
                // right (the sketch has the counts), the anonymous usage report undercounts.
                if retired.len() < 2 * cap {
                    entry.rows(subject.as_ref(), retired);
                } else {
                    dropped += 1 + entry.extra.as_ref().map_or(0, |e| e.scoped.iter().count() as u64);
                }
            }
            sketch.record(self.sketch_hash(subject.as_ref()), entry, now);
            evicted += 1;
            false
        });
        *anonymous -= evicted;
        self.evictions
            .fetch_add(evicted as u64, std::sync::atomic::Ordering::Relaxed);
        self.rows_dropped
            .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
    }

    /// Anonymous usage rows dropped since the last call (a flood outran the store).
    pub fn take_rows_dropped(&self) -> u64 {
        self.rows_dropped.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Anonymous subjects held in memory.
    pub fn anonymous_len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).anonymous).sum()
    }

    /// Anonymous subjects evicted since the last call.
    pub fn take_evictions(&self) -> u64 {
        self.evictions.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    fn decide(
        &self,
        entry: &mut Entry,
        subject: SubjectRef<'_>,
        retired: &mut Vec<UsageRow>,
        plan: &PlanLimits,
        group: Option<&GroupLimits>,
        now: Now,
    ) -> Result<Decided, Rejection> {
        entry.roll(subject, now, retired);
        let track_month = self.track_month(subject, plan);
        if track_month && entry.month_total().is_none() {
            // Tracking starts now (plan gained a monthly quota): from today's count.
            let today = entry.day_total;
            entry.extra().month = Some(today);
        }
        let grouped = group.and_then(|g| entry.group(&g.name));
        let counts = Counts {
            day: entry.day_total.total(),
            month: entry.month_total().unwrap_or(entry.day_total).total(),
            group_day: grouped.map_or(0, |s| s.day.total()),
            group_month: grouped.map_or(0, |s| s.month.total()),
        };
        let mut status = limits::check_quotas(plan, group, &counts, now)?;
        self.check_leases(entry, subject, plan, group, now)?;
        let tat = match &plan.rate {
            Some(gcra) => {
                let (admit, rate) = limits::check_rate(gcra, entry.tat, now)?;
                status = Some(match status {
                    Some(quota) => quota.closer(&rate).clone(),
                    None => rate,
                });
                Some(admit.tat)
            }
            None => None,
        };
        Ok(Decided { tat, status })
    }

    /// This node's changed slots since the last call, for the flusher.
    pub fn collect(&self, out: &mut Vec<UsageRow>) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            out.append(&mut shard.retired);
            let dirty = std::mem::take(&mut shard.dirty);
            for subject in &dirty {
                if let Some(entry) = shard.map.get_mut(subject) {
                    entry.queued = false;
                    entry.rows(subject.as_ref(), out);
                }
            }
        }
    }

    /// Drops entries whose windows have ended and whose counts are flushed.
    pub fn prune(&self, now: Now) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.map.len();
            let mut anonymous_removed = 0;
            shard.map.retain(|subject, entry| {
                let keep = !entry.expired(now);
                if !keep && !subject.is_key() {
                    anonymous_removed += 1;
                }
                keep
            });
            shard.anonymous -= anonymous_removed;
            removed += before - shard.map.len();
            // Flushed since they were last looked at: evict what is over the bound now.
            self.bound(&mut shard, now);
            if shard.map.capacity() > 4 * shard.map.len().max(1024) {
                shard.map.shrink_to_fit();
            }
        }
        removed
    }

    /// Loads a stored slot at start: today's rows into the day counters, earlier days of
    /// this month into the month counters of subjects that keep one.
    pub fn restore(&self, stored: &StoredRow, own_node: bool, now: Now) -> bool {
        self.credit(&stored.row, own_node, stored.row.count, now)
    }

    /// Adds what a replicated slot grew by (global mode): another node's to the `remote`
    /// sums; this node's own (replayed after a restart on an empty disk) to `local`.
    pub fn apply_replicated(&self, row: &UsageRow, own: bool, grown: u64, now: Now) -> bool {
        self.credit(row, own, grown, now)
    }

    fn credit(&self, row: &UsageRow, own_node: bool, count: u64, now: Now) -> bool {
        let Some(subject) = Subject::parse(&row.subject) else {
            return false;
        };
        let (day, month) = (now.day(), now.month());
        let row_day = row.day;
        if row_day > day || limits::window::month_of_day(row_day) != month {
            return false;
        }
        let track_month = subject.is_key() || self.anonymous_month();
        if row_day != day && !track_month {
            return false;
        }
        let subject = subject.as_ref();
        let mut shard = lock(&self.shards[self.shard_of(subject)]);
        let Shard {
            map,
            retired,
            anonymous,
            ..
        } = &mut *shard;
        if !map.contains_key(&subject) && !subject.is_key() {
            *anonymous += 1;
        }
        let entry = entry_of(map, &subject, Entry::new(now));
        entry.roll(subject, now, retired);
        if let Some(consumer) = &row.consumer
            && entry.extra.as_ref().is_none_or(|e| e.consumer.is_none())
        {
            entry.extra().consumer = Some(consumer.as_str().into());
        }
        if track_month && entry.month_total().is_none() {
            let today = entry.day_total;
            entry.extra().month = Some(today);
        }
        let (group, name) = match &row.scope {
            Scope::Total => {
                if row_day == day {
                    entry.day_total.add(own_node, count);
                }
                if let Some(month) = entry.extra.as_mut().and_then(|e| e.month.as_mut()) {
                    month.add(own_node, count);
                }
                return true;
            }
            Scope::Group(name) => (true, name),
            Scope::Route(name) => (false, name),
        };
        let scoped = entry.scoped_mut(group, name);
        if row_day == day {
            scoped.day.add(own_node, count);
        }
        scoped.month.add(own_node, count);
        true
    }

    /// Subjects held in memory.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A subject's usage in the current windows (all nodes).
    #[cfg(test)]
    pub fn current(&self, subject: &Subject, now: Now) -> (u64, Option<u64>) {
        let shard = lock(&self.shards[self.shard_of(subject.as_ref())]);
        match shard.map.get(subject) {
            Some(entry) if entry.day == now.day() => (
                entry.day_total.total(),
                entry
                    .month_total()
                    .filter(|_| entry.month == now.month())
                    .map(entry::Slot::total),
            ),
            Some(entry) if entry.month == now.month() => (0, entry.month_total().map(entry::Slot::total)),
            _ => (0, None),
        }
    }
}

#[cfg(test)]
mod tests;
