//! A rate limit per name held in one small map, for endpoints that are not routes (the
//! customer usage page, docs/customer-usage.md): not on the proxy's hot path, so a lock
//! is fine, and bounded so a stream of names cannot grow it without end.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Gcra, LimitStatus, Now, Rejection, check_rate};

/// Names held before the idle ones (whose arrival time has passed) are dropped.
const MAX_NAMES: usize = 100_000;

#[derive(Default)]
pub struct KeyedRate {
    tats: Mutex<HashMap<String, u64>>,
}

impl KeyedRate {
    /// Admits one request of `name` under `gcra` at `now`, or refuses it (429).
    pub fn admit(&self, gcra: &Gcra, name: &str, now: Now) -> Result<LimitStatus, Rejection> {
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        if tats.len() >= MAX_NAMES && !tats.contains_key(name) {
            tats.retain(|_, tat| *tat > now.0);
            if tats.len() >= MAX_NAMES {
                // Every name is active: refuse the newcomer (as one whose burst is spent)
                // rather than forget a limit.
                let full = now.0.saturating_add(gcra.capacity_ns());
                return check_rate(gcra, full, now).map(|(_, status)| status);
            }
        }
        let tat = tats.get(name).copied().unwrap_or(0);
        let (admit, status) = check_rate(gcra, tat, now)?;
        tats.insert(name.to_string(), admit.tat);
        Ok(status)
    }
}

impl Gcra {
    /// `per_minute` requests per minute, all of them at once at most.
    pub fn per_minute(per_minute: u32) -> Option<Gcra> {
        (per_minute > 0).then(|| Gcra {
            per_second: per_minute.div_ceil(60),
            burst: per_minute,
            interval_ns: 60 * super::NANOS / u64::from(per_minute),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_has_its_own_minute() {
        let gcra = Gcra::per_minute(3).unwrap();
        let rate = KeyedRate::default();
        let now = Now::from_secs(1_000);
        for _ in 0..3 {
            assert!(rate.admit(&gcra, "a", now).is_ok());
        }
        let refused = rate.admit(&gcra, "a", now).unwrap_err();
        assert_eq!(refused.retry_after, 20);
        assert_eq!(refused.status.quota, 3);
        assert!(rate.admit(&gcra, "b", now).is_ok());
        // One more every 20 s.
        assert!(rate.admit(&gcra, "a", Now::from_secs(1_020)).is_ok());
        assert!(rate.admit(&gcra, "a", Now::from_secs(1_020)).is_err());
    }
}
