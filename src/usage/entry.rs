//! One subject's counters: the day, the month where a quota needs it, the GCRA arrival
//! time and per-route and per-group slices — each counter a slot of this node plus the sum
//! of the other nodes' slots.

use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use super::Charge;
use crate::limits::{GroupLimits, Now};
use crate::model::{Scope, Subject, SubjectRef, UsageRow};

/// This node's slot and the sum of the other nodes' slots of one counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) local: u64,
    pub(super) remote: u64,
}

impl Slot {
    pub(super) fn total(self) -> u64 {
        self.local + self.remote
    }

    pub(super) fn add(&mut self, own: bool, count: u64) {
        if own {
            self.local += count;
        } else {
            self.remote += count;
        }
    }
}

#[derive(Debug)]
pub(super) struct Scoped {
    pub(super) scope: Scope,
    pub(super) day: Slot,
    pub(super) month: Slot,
}

/// What only some subjects need, boxed so an anonymous IP costs one pointer for it.
#[derive(Debug, Default)]
pub(super) struct Extra {
    pub(super) consumer: Option<Arc<str>>,
    pub(super) month: Option<Slot>,
    pub(super) scoped: Scopes,
    /// Global mode: what this node holds of the day and month quotas (keys only).
    pub(super) leases: Option<Box<[crate::limits::lease::WindowLease; 2]>>,
}

/// A subject's route and group counters. Most keys call one route, so the first counter
/// lives inline: one allocation (the `Extra`) holds everything a key touches per request.
#[derive(Debug, Default)]
pub(super) struct Scopes {
    pub(super) first: Option<Scoped>,
    pub(super) more: Vec<Scoped>,
}

impl Scopes {
    pub(super) fn iter(&self) -> impl Iterator<Item = &Scoped> {
        self.first.iter().chain(&self.more)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Scoped> {
        self.first.iter_mut().chain(&mut self.more)
    }

    pub(super) fn find_or_push(
        &mut self,
        matches: impl Fn(&Scope) -> bool,
        make: impl FnOnce() -> Scope,
    ) -> &mut Scoped {
        let in_first = self.first.as_ref().is_some_and(|s| matches(&s.scope));
        if !in_first && let Some(index) = self.more.iter().position(|s| matches(&s.scope)) {
            return &mut self.more[index];
        }
        let fresh = || Scoped {
            scope: make(),
            day: Slot::default(),
            month: Slot::default(),
        };
        if in_first || self.first.is_none() {
            return self.first.get_or_insert_with(fresh);
        }
        self.more.push(fresh());
        let last = self.more.len() - 1;
        &mut self.more[last]
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) day: u32,
    pub(super) month: u32,
    pub(super) day_total: Slot,
    /// GCRA theoretical arrival time, in ns since the Unix epoch.
    pub(super) tat: u64,
    /// Listed in the shard's `dirty` and not yet collected by the flusher.
    pub(super) queued: bool,
    /// Seconds since the Unix epoch of the last admitted request (least recently used
    /// anonymous entries are evicted first).
    pub(super) last_used: u32,
    pub(super) extra: Option<Box<Extra>>,
}

impl Entry {
    pub(super) fn new(now: Now) -> Entry {
        Entry {
            day: now.day(),
            month: now.month(),
            day_total: Slot::default(),
            tat: 0,
            queued: false,
            last_used: now.secs() as u32,
            extra: None,
        }
    }

    pub(super) fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    pub(super) fn month_total(&self) -> Option<Slot> {
        self.extra.as_ref().and_then(|e| e.month)
    }

    pub(super) fn group(&self, name: &Arc<str>) -> Option<&Scoped> {
        self.extra.as_ref()?.scoped.iter().find(|s| s.scope.is(true, name))
    }

    /// The counter of a route (or a route group), found by its shared name without
    /// cloning it.
    pub(super) fn scoped_mut(&mut self, group: bool, name: &Arc<str>) -> &mut Scoped {
        self.extra()
            .scoped
            .find_or_push(|s| s.is(group, name), || Scope::new(group, name))
    }

    /// Moves the entry into the windows of `now`. Unflushed counts of the ended day go
    /// to `retired` so the flusher still writes them.
    pub(super) fn roll(&mut self, subject: SubjectRef<'_>, now: Now, retired: &mut Vec<UsageRow>) {
        let day = now.day();
        // Equal, or the clock stepped back: keep counting in the newer window.
        if self.day >= day {
            return;
        }
        if self.queued {
            self.rows(subject, retired);
        }
        self.day = day;
        self.day_total = Slot::default();
        let month = now.month();
        let new_month = self.month != month;
        self.month = month;
        if let Some(extra) = &mut self.extra {
            if new_month && let Some(slot) = &mut extra.month {
                *slot = Slot::default();
            }
            for scoped in extra.scoped.iter_mut() {
                scoped.day = Slot::default();
                if new_month {
                    scoped.month = Slot::default();
                }
            }
        }
    }

    /// This node's slots of the entry's day, as rows for the store.
    pub(super) fn rows(&self, subject: SubjectRef<'_>, out: &mut Vec<UsageRow>) {
        let subject_text = subject.to_string();
        let consumer = self
            .extra
            .as_ref()
            .and_then(|e| e.consumer.as_deref())
            .map(str::to_string);
        if self.day_total.local > 0 {
            out.push(UsageRow {
                subject: subject_text.clone(),
                consumer: consumer.clone(),
                scope: Scope::Total,
                day: self.day,
                count: self.day_total.local,
            });
        }
        for scoped in self.extra.iter().flat_map(|e| e.scoped.iter()) {
            if scoped.day.local > 0 {
                out.push(UsageRow {
                    subject: subject_text.clone(),
                    consumer: consumer.clone(),
                    scope: scoped.scope.clone(),
                    day: self.day,
                    count: scoped.day.local,
                });
            }
        }
    }

    /// Ended and flushed: nothing of it is needed on the request path again.
    pub(super) fn expired(&self, now: Now) -> bool {
        !self.queued && self.day < now.day() && (self.month_total().is_none() || self.month < now.month())
    }
}

pub(super) type Map = hashbrown::HashMap<Subject, Entry, FxBuildHasher>;

/// The subject's entry; `fresh` is stored (and the name allocated) only when it is new.
pub(super) fn entry_of<'m>(map: &'m mut Map, subject: &SubjectRef<'_>, fresh: Entry) -> &'m mut Entry {
    match map.entry_ref(subject) {
        hashbrown::hash_map::EntryRef::Occupied(entry) => entry.into_mut(),
        hashbrown::hash_map::EntryRef::Vacant(vacant) => vacant.insert_with_key(Subject::from(subject), fresh),
    }
}

#[derive(Default)]
pub(super) struct Shard {
    pub(super) map: Map,
    pub(super) dirty: Vec<Subject>,
    pub(super) retired: Vec<UsageRow>,
    /// Anonymous subjects in `map`.
    pub(super) anonymous: usize,
    /// What evicted anonymous subjects had counted today (allocated at the first eviction).
    pub(super) evicted: Option<Box<Sketch>>,
}

const SKETCH_ROWS: usize = 4;
const SKETCH_WIDTH: usize = 1024;

/// The counts of evicted subjects in a fixed space: each is noted in one cell per row
/// (cells keep the largest count noted), and read back as the smallest of its cells, so a
/// returning subject never resumes below what it had counted (a count-min sketch with
/// max in place of sum; 48 KiB per shard). Collisions can only raise a subject's count.
pub struct Sketch {
    day: u32,
    month: u32,
    /// This node's day count, the day count of all nodes, the month count of all nodes.
    cells: Box<[[u32; 3]]>,
}

impl Sketch {
    pub(super) fn new(now: Now) -> Sketch {
        Sketch {
            day: now.day(),
            month: now.month(),
            cells: vec![[0; 3]; SKETCH_ROWS * SKETCH_WIDTH].into_boxed_slice(),
        }
    }

    /// A new day forgets day counts; a new month everything.
    pub(super) fn roll(&mut self, now: Now) {
        if self.day == now.day() {
            return;
        }
        let new_month = self.month != now.month();
        for cell in self.cells.iter_mut() {
            cell[0] = 0;
            cell[1] = 0;
            if new_month {
                cell[2] = 0;
            }
        }
        self.day = now.day();
        self.month = now.month();
    }

    fn cells_of(hash: u64) -> impl Iterator<Item = usize> {
        (0..SKETCH_ROWS).map(move |row| row * SKETCH_WIDTH + ((hash >> (row * 16)) as usize % SKETCH_WIDTH))
    }

    pub(super) fn record(&mut self, hash: u64, entry: &Entry, now: Now) {
        self.roll(now);
        if entry.day != self.day {
            return;
        }
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let counts = [
            clamp(entry.day_total.local),
            clamp(entry.day_total.total()),
            clamp(entry.month_total().map_or(0, Slot::total)),
        ];
        for index in Self::cells_of(hash) {
            let cell = &mut self.cells[index];
            for (kept, count) in cell.iter_mut().zip(counts) {
                *kept = (*kept).max(count);
            }
        }
    }

    /// Gives a fresh entry the counts its subject had when evicted today, if any.
    pub(super) fn restore(&mut self, hash: u64, entry: &mut Entry, now: Now) {
        self.roll(now);
        let mut counts = [u32::MAX; 3];
        for index in Self::cells_of(hash) {
            for (least, kept) in counts.iter_mut().zip(self.cells[index]) {
                *least = (*least).min(kept);
            }
        }
        let [local, day, month] = counts.map(u64::from);
        if day == 0 && month == 0 {
            return;
        }
        // This node's part is restored as its own, so its next row for the day is not
        // smaller than the one already stored.
        entry.day_total = Slot {
            local: local.min(day),
            remote: day.saturating_sub(local),
        };
        if month > 0 {
            entry.extra().month = Some(Slot {
                local: local.min(month),
                remote: month.saturating_sub(local),
            });
        }
    }
}

/// Counts an admitted request in every counter of `entry` it touches.
pub(super) fn commit(
    entry: &mut Entry,
    charge: &Charge<'_>,
    tat: Option<u64>,
    group: Option<&GroupLimits>,
    dirty: &mut Vec<Subject>,
    now: Now,
) {
    if let Some(tat) = tat {
        entry.tat = tat;
    }
    entry.last_used = now.secs() as u32;
    entry.day_total.local += 1;
    if let Some(consumer) = charge.consumer
        && entry.extra.as_ref().is_none_or(|e| e.consumer.is_none())
    {
        entry.extra().consumer = Some(consumer.clone());
    }
    if let Some(month) = entry.extra.as_mut().and_then(|e| e.month.as_mut()) {
        month.local += 1;
    }
    if let Some(group) = group {
        let scoped = entry.scoped_mut(true, &group.name);
        scoped.day.local += 1;
        scoped.month.local += 1;
    }
    if let Some(route) = charge.route {
        let scoped = entry.scoped_mut(false, route);
        scoped.day.local += 1;
        scoped.month.local += 1;
    }
    if !entry.queued {
        entry.queued = true;
        dirty.push(Subject::from(&charge.subject));
    }
}
