//! Quota leases (docs/multi-region.md, "Quota leases"): in global mode a node admits a
//! key's daily or monthly requests only within what it holds — a small free share it may
//! spend without asking anyone, plus leases granted by the subject's authority, which never
//! grants more in total than the quota. So the requests admitted everywhere stay within the
//! quota plus the free shares (at most max(1 %, 5) in all), however fast they arrive.
//! Pure decisions; the claims themselves are made by a background service.

use std::collections::BTreeMap;

use crate::model::PartitionMode;

/// A quota window a lease covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseWindow {
    Day,
    Month,
}

impl LeaseWindow {
    pub fn index(self) -> usize {
        match self {
            LeaseWindow::Day => 0,
            LeaseWindow::Month => 1,
        }
    }

    /// The authority's record name for window number `id` (a day or month number).
    pub fn record(self, id: u32) -> String {
        match self {
            LeaseWindow::Day => format!("d{id}"),
            LeaseWindow::Month => format!("m{id}"),
        }
    }
}

/// How long a claim that was refused (nothing left) or failed (authority unreachable) is
/// trusted before the node asks again, in seconds.
pub const RECLAIM_AFTER_SECS: u32 = 1;

/// What a node holds of one subject's quota in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowLease {
    /// The window number (day or month) this lease belongs to; another window starts empty.
    pub window: u32,
    /// The local count up to which this node may admit (0: no lease yet).
    pub until: u64,
    /// The size of the last grant (prefetching starts when half of it is left).
    pub grant: u64,
    /// A claim is on its way to the authority.
    pub pending: bool,
    /// When (seconds since the epoch) the last claim got nothing, or could not be made.
    pub refused_at: u32,
    /// The last claim could not reach the authority: the plan's partition mode applies.
    pub partitioned: bool,
}

/// The terms of one quota under leases.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTerms {
    pub quota: u64,
    /// Live gateway nodes (all regions).
    pub nodes: u32,
    pub mode: PartitionMode,
    /// Requests per node per window beyond its lease while partitioned (`available`).
    pub allowance: u64,
}

impl LeaseTerms {
    /// What a node may admit without asking: its share of max(1 % of the quota, 5).
    pub fn free_share(&self) -> u64 {
        (self.quota / 100).max(5) / u64::from(self.nodes.max(1))
    }
}

/// The partition allowance a plan gets when it names none: 10 % of the quota, at least 1.
pub fn default_allowance(quota: u64) -> u64 {
    (quota / 10).max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseVerdict {
    /// Admit; `claim`: ask for more now (prefetch), so the lease rarely runs dry.
    Admit { claim: bool },
    /// Nothing held; a claim is (or is now to be) on its way: wait for it.
    Wait { claim: bool },
    /// Nothing held and nothing left to grant (or partitioned in strict mode).
    Refuse,
}

/// Decides one request against a lease; `local`: this node's count in the window before
/// the request; `now_secs`: seconds since the epoch.
pub fn check(lease: &WindowLease, terms: &LeaseTerms, local: u64, now_secs: u32) -> LeaseVerdict {
    let recently_refused = lease.refused_at != 0 && now_secs.saturating_sub(lease.refused_at) < RECLAIM_AFTER_SECS;
    let may_claim = !lease.pending && !recently_refused;
    let mut allowed = lease.until.max(terms.free_share());
    if lease.partitioned && terms.mode == PartitionMode::Available {
        allowed += terms.allowance;
    }
    if local < allowed {
        let left_after = allowed - local - 1;
        let low = left_after <= lease.grant / 2 || lease.until == 0;
        return LeaseVerdict::Admit {
            claim: may_claim && low && !lease.partitioned,
        };
    }
    if lease.pending {
        return LeaseVerdict::Wait { claim: false };
    }
    if may_claim {
        return LeaseVerdict::Wait { claim: true };
    }
    LeaseVerdict::Refuse
}

/// The authority's side of a claim by `node`: `until` holds what each node may count up to;
/// `local`: the claimant's count now; `others_seen`: what the claimant's view counts for
/// every other node (a floor for nodes whose leases the record does not show). Returns the
/// claimant's new `until` and how much was granted (0: nothing left). Never lets the
/// record's total pass the quota.
pub fn grant(
    until: &BTreeMap<String, u64>,
    node: &str,
    local: u64,
    others_seen: u64,
    terms: &LeaseTerms,
) -> (u64, u64) {
    let others: u64 = until.iter().filter(|(n, _)| *n != node).map(|(_, u)| u).sum();
    let others = others.max(others_seen);
    let mine = until.get(node).copied().unwrap_or(0).max(local);
    let left = terms.quota.saturating_sub(others).saturating_sub(mine);
    if left == 0 {
        return (mine, 0);
    }
    // A share of what is left, so the last requests are spread in small leases and no
    // node sits on much of the quota others could use.
    let share = (left / (2 * u64::from(terms.nodes.max(1)))).max(1);
    (mine + share, share)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(quota: u64, nodes: u32) -> LeaseTerms {
        LeaseTerms {
            quota,
            nodes,
            mode: PartitionMode::Available,
            allowance: 3,
        }
    }

    #[test]
    fn free_shares_add_up_to_at_most_max_one_percent_or_five() {
        assert_eq!(terms(500, 6).free_share(), 0);
        assert_eq!(terms(1000, 6).free_share(), 1);
        assert_eq!(terms(100_000, 6).free_share(), 166);
        assert_eq!(terms(100_000, 1).free_share(), 1000);
        for (quota, nodes) in [(500, 6), (1000, 6), (7, 2), (100_000, 7)] {
            let t = terms(quota, nodes);
            assert!(t.free_share() * u64::from(nodes) <= (quota / 100).max(5));
        }
    }

    #[test]
    fn a_node_admits_within_its_lease_and_prefetches_at_half() {
        let t = terms(100_000, 6);
        let mut lease = WindowLease {
            until: 1000,
            grant: 800,
            ..Default::default()
        };
        assert_eq!(check(&lease, &t, 100, 0), LeaseVerdict::Admit { claim: false });
        assert_eq!(check(&lease, &t, 700, 0), LeaseVerdict::Admit { claim: true });
        lease.pending = true;
        assert_eq!(check(&lease, &t, 700, 0), LeaseVerdict::Admit { claim: false });
        assert_eq!(check(&lease, &t, 1000, 0), LeaseVerdict::Wait { claim: false });
        lease.pending = false;
        assert_eq!(check(&lease, &t, 1000, 0), LeaseVerdict::Wait { claim: true });
        lease.refused_at = 50;
        assert_eq!(check(&lease, &t, 1000, 50), LeaseVerdict::Refuse);
        assert_eq!(check(&lease, &t, 1000, 51), LeaseVerdict::Wait { claim: true });
    }

    #[test]
    fn the_free_share_needs_no_lease_but_asks_for_one() {
        let t = terms(100_000, 6);
        let lease = WindowLease::default();
        assert_eq!(check(&lease, &t, 0, 0), LeaseVerdict::Admit { claim: true });
        assert_eq!(check(&lease, &t, 166, 0), LeaseVerdict::Wait { claim: true });
    }

    #[test]
    fn a_partition_adds_the_allowance_only_in_available_mode() {
        let mut t = terms(1000, 6);
        let lease = WindowLease {
            until: 10,
            partitioned: true,
            refused_at: 100,
            ..Default::default()
        };
        assert_eq!(check(&lease, &t, 12, 100), LeaseVerdict::Admit { claim: false });
        assert_eq!(check(&lease, &t, 13, 100), LeaseVerdict::Refuse);
        t.mode = PartitionMode::Strict;
        assert_eq!(check(&lease, &t, 10, 100), LeaseVerdict::Refuse);
    }

    #[test]
    fn grants_never_pass_the_quota() {
        let t = terms(500, 6);
        let mut until = BTreeMap::new();
        let mut total_granted = 0;
        // Six nodes claiming in turn, each spending all it gets.
        for round in 0..200 {
            let node = format!("n{}", round % 6);
            let local = until.get(&node).copied().unwrap_or(0);
            let (new_until, granted) = grant(&until, &node, local, 0, &t);
            total_granted += granted;
            until.insert(node, new_until);
        }
        assert_eq!(total_granted, 500);
        assert_eq!(until.values().sum::<u64>(), 500);
        let (_, granted) = grant(&until, "n0", until["n0"], 0, &t);
        assert_eq!(granted, 0);
    }

    #[test]
    fn what_the_view_counts_for_others_is_a_floor() {
        let t = terms(100, 2);
        let (until, granted) = grant(&BTreeMap::new(), "a", 10, 80, &t);
        assert_eq!((until, granted), (12, 2));
        let (_, granted) = grant(&BTreeMap::new(), "a", 20, 80, &t);
        assert_eq!(granted, 0);
    }
}
