//! Endpoint selection policies, as pure functions over weights and in-flight counts.

use std::sync::atomic::{AtomicUsize, Ordering};

use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per unit of weight on the consistent-hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 100;

#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round robin, precomputed into a schedule walked by an atomic cursor.
    RoundRobin { schedule: Box<[u32]>, cursor: AtomicUsize },
    /// Power of two choices over weighted random picks; lower in-flight/weight wins.
    LeastRequests { cumulative: Box<[u64]> },
    /// Ring of (point, endpoint) sorted by point; a key goes to the first point at or after its hash.
    ConsistentHash { ring: Box<[(u64, u32)]> },
}

impl Balancer {
    pub fn round_robin(weights: &[u32]) -> Self {
        Balancer::RoundRobin {
            schedule: smooth_weighted_schedule(weights).into(),
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn least_requests(weights: &[u32]) -> Self {
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                total += u64::from(*w);
                total
            })
            .collect();
        Balancer::LeastRequests { cumulative }
    }

    pub fn consistent_hash(names: &[&str], weights: &[u32]) -> Self {
        let mut ring = Vec::new();
        for (index, (name, weight)) in names.iter().zip(weights).enumerate() {
            for point in 0..weight * RING_POINTS_PER_WEIGHT {
                ring.push((xxh3_64(format!("{name}#{point}").as_bytes()), index as u32));
            }
        }
        ring.sort_unstable();
        Balancer::ConsistentHash { ring: ring.into() }
    }

    /// Picks an endpoint index among `len`, preferring ones where `usable(i)`.
    pub fn pick(
        &self,
        len: usize,
        hash: Option<&[u8]>,
        usable: impl Fn(usize) -> bool,
        inflight: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        if len == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin { schedule, cursor } => {
                // A load and a store, not a locked `fetch_add`: when two workers step the
                // cursor at once, one step is lost and an endpoint takes one request out
                // of turn, which round robin across threads never ruled out. A locked
                // instruction per request cost more (docs/benchmarks.md, "Request ids
                // inline").
                let start = cursor.load(Ordering::Relaxed);
                cursor.store(start.wrapping_add(1), Ordering::Relaxed);
                (0..schedule.len())
                    .map(|step| schedule[(start + step) % schedule.len()] as usize)
                    .find(|&i| usable(i))
            }
            Balancer::LeastRequests { cumulative } => {
                let total = *cumulative.last()?;
                let weighted = |r: u64| cumulative.partition_point(|&c| c <= r);
                let a = weighted(fastrand::u64(0..total));
                let mut b = weighted(fastrand::u64(0..total));
                if len > 1 && b == a {
                    b = (a + 1 + fastrand::usize(0..len - 1)) % len;
                }
                let load = |i: usize| {
                    // Compare in-flight per unit of weight without floats.
                    let weight = cumulative[i] - if i == 0 { 0 } else { cumulative[i - 1] };
                    (inflight(i) as u64 * 1_000_000) / weight.max(1)
                };
                match (usable(a), usable(b)) {
                    (true, true) => Some(if load(b) < load(a) { b } else { a }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => (0..len).filter(|&i| usable(i)).min_by_key(|&i| load(i)),
                }
            }
            Balancer::ConsistentHash { ring } => {
                let key = hash.map_or_else(|| fastrand::u64(..), xxh3_64);
                let start = ring.partition_point(|&(point, _)| point < key);
                (0..ring.len())
                    .map(|step| ring[(start + step) % ring.len()].1 as usize)
                    .find(|&i| usable(i))
            }
        }
    }
}

/// nginx's smooth weighted round robin, unrolled: weights 5,1,1 give a,a,b,a,c,a,a rather than
/// five a's in a row. Weights are reduced by their gcd to keep the schedule short.
fn smooth_weighted_schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
            .unwrap_or((0, &0));
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(balancer: &Balancer, len: usize, picks: usize, hash: impl Fn(usize) -> Option<Vec<u8>>) -> Vec<usize> {
        let mut counts = vec![0; len];
        for n in 0..picks {
            let key = hash(n);
            let i = balancer.pick(len, key.as_deref(), |_| true, |_| 0).expect("pick");
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(smooth_weighted_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_weighted_schedule(&[2, 2]), vec![0, 1]);
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unusable() {
        let rr = Balancer::round_robin(&[1, 2, 1]);
        assert_eq!(counts(&rr, 3, 400, |_| None), vec![100, 200, 100]);
        let picks: Vec<usize> = (0..4).map(|_| rr.pick(3, None, |i| i != 1, |_| 0).unwrap()).collect();
        assert!(picks.iter().all(|&i| i != 1));
        assert_eq!(rr.pick(3, None, |_| false, |_| 0), None);
    }

    #[test]
    fn least_requests_prefers_idle_endpoint() {
        let lr = Balancer::least_requests(&[1, 1, 1]);
        let busy = [50, 0, 50];
        let picks = (0..1000)
            .filter(|_| lr.pick(3, None, |_| true, |i| busy[i]) == Some(1))
            .count();
        // Endpoint 1 wins whenever it is one of the two choices: 2/3 of picks in expectation.
        assert!(picks > 550, "{picks}");
        let even = counts(&lr, 3, 3000, |_| None);
        assert!(even.iter().all(|&c| c > 800), "{even:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_spread() {
        let ch = Balancer::consistent_hash(&["a:1", "b:1", "c:1"], &[1, 1, 1]);
        let first = ch.pick(3, Some(b"user-42"), |_| true, |_| 0);
        for _ in 0..10 {
            assert_eq!(ch.pick(3, Some(b"user-42"), |_| true, |_| 0), first);
        }
        let spread = counts(&ch, 3, 3000, |n| Some(format!("user-{n}").into_bytes()));
        assert!(spread.iter().all(|&c| c > 600), "{spread:?}");
        // Removing one endpoint only moves the keys that were on it.
        let moved = (0..1000)
            .filter(|n| {
                let key = format!("user-{n}");
                let before = ch.pick(3, Some(key.as_bytes()), |_| true, |_| 0).unwrap();
                let after = ch.pick(3, Some(key.as_bytes()), |i| i != 2, |_| 0).unwrap();
                before != 2 && before != after
            })
            .count();
        assert_eq!(moved, 0);
    }
}
