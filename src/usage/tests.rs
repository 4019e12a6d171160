use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::limits::window::{parse_day, parse_timestamp};
use crate::limits::{Gcra, GroupLimits, LimitName, PlanLimits, RejectKind};

fn plan(daily: Option<u64>, monthly: Option<u64>) -> PlanLimits {
    PlanLimits::with_quotas(daily, monthly)
}

fn at(text: &str) -> Now {
    parse_timestamp(text).unwrap()
}

fn key(id: &str) -> Subject {
    Subject::Key(id.into())
}

fn charge(subject: &Subject) -> Charge<'_> {
    Charge {
        subject: subject.as_ref(),
        consumer: None,
        route: None,
    }
}

fn admit_n(table: &UsageTable, subject: &Subject, plan: &PlanLimits, now: Now, n: usize) -> usize {
    (0..n)
        .filter(|_| table.admit(&Charges::One(charge(subject)), plan, None, now).is_ok())
        .count()
}

#[test]
fn exactly_the_quota_is_admitted_under_contention() {
    let table = Arc::new(UsageTable::default());
    let plan = Arc::new(plan(Some(1000), Some(5000)));
    let admitted = Arc::new(AtomicU64::new(0));
    let now = at("2026-11-23T12:00:00Z");
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (table, plan, admitted) = (table.clone(), plan.clone(), admitted.clone());
            std::thread::spawn(move || {
                let subject = key("shared");
                for _ in 0..50 {
                    if table.admit(&Charges::One(charge(&subject)), &plan, None, now).is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(admitted.load(Ordering::Relaxed), 1000);
    assert_eq!(table.current(&key("shared"), now), (1000, Some(1000)));
}

#[test]
fn windows_roll_over_on_the_calendar() {
    let table = UsageTable::default();
    let plan = plan(Some(2), Some(3));
    let k = key("k");
    // Jan 31 → Feb 1: both the day and the month start again.
    assert_eq!(admit_n(&table, &k, &plan, at("2026-01-31T23:59:59Z"), 5), 2);
    assert_eq!(admit_n(&table, &k, &plan, at("2026-02-01T00:00:00Z"), 5), 2);
    // Feb 2: a new day, but the month's 3 are nearly gone.
    assert_eq!(admit_n(&table, &k, &plan, at("2026-02-02T08:00:00Z"), 5), 1);
    let rejection = table
        .admit(&Charges::One(charge(&k)), &plan, None, at("2026-02-02T08:00:00Z"))
        .unwrap_err();
    assert_eq!(rejection.status.name, LimitName::Monthly);
    // 26 days and 16 hours until March 1.
    assert_eq!(rejection.retry_after, 26 * 86_400 + 16 * 3600);
    // Dec → Jan crosses the year.
    let k2 = key("k2");
    assert_eq!(admit_n(&table, &k2, &plan, at("2026-12-31T23:00:00Z"), 3), 2);
    assert_eq!(table.current(&k2, at("2027-01-01T00:00:01Z")), (0, None));
    assert_eq!(admit_n(&table, &k2, &plan, at("2027-01-01T00:00:01Z"), 3), 2);
    // Leap year: Feb 29 is a new day of the same month; March 1 a new month.
    let k3 = key("k3");
    assert_eq!(admit_n(&table, &k3, &plan, at("2028-02-28T12:00:00Z"), 1), 1);
    assert_eq!(admit_n(&table, &k3, &plan, at("2028-02-29T12:00:00Z"), 5), 2);
    assert_eq!(admit_n(&table, &k3, &plan, at("2028-02-29T23:59:59Z"), 5), 0);
    assert_eq!(admit_n(&table, &k3, &plan, at("2028-03-01T00:00:00Z"), 5), 2);
}

#[test]
fn unflushed_counts_of_an_ended_day_are_still_written() {
    let table = UsageTable::default();
    let plan = plan(Some(100), None);
    let k = key("k");
    admit_n(&table, &k, &plan, at("2026-01-31T23:59:00Z"), 7);
    admit_n(&table, &k, &plan, at("2026-02-01T00:00:01Z"), 2);
    let mut rows = Vec::new();
    table.collect(&mut rows);
    let mut seen: Vec<(String, u64)> = rows
        .iter()
        .map(|r| (crate::limits::window::format_day(r.day), r.count))
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("2026-01-31".into(), 7), ("2026-02-01".into(), 2)]);
    // Nothing changed since: nothing to write.
    rows.clear();
    table.collect(&mut rows);
    assert!(rows.is_empty());
}

#[test]
fn an_anonymous_request_is_charged_to_all_its_subjects_or_none() {
    let table = UsageTable::default();
    let plan = plan(Some(3), None);
    let now = at("2026-11-23T10:00:00Z");
    let ip_a = Subject::Ip("10.0.0.1".parse().unwrap());
    let ip_b = Subject::Ip("10.0.0.2".parse().unwrap());
    let referer = Subject::Referer("shop.example".into());
    let both = |ip| Charges::Two(charge(ip), charge(&referer));
    // Two IPs share one Referer: the Referer's quota runs out first.
    assert!(table.admit(&both(&ip_a), &plan, None, now).is_ok());
    assert!(table.admit(&both(&ip_a), &plan, None, now).is_ok());
    assert!(table.admit(&both(&ip_b), &plan, None, now).is_ok());
    let rejection = table.admit(&both(&ip_b), &plan, None, now).unwrap_err();
    assert_eq!(rejection.kind, RejectKind::QuotaExceeded);
    // The refused request charged nobody.
    assert_eq!(table.current(&ip_b, now).0, 1);
    assert_eq!(table.current(&referer, now).0, 3);
    // One IP with two Referers: the IP's quota runs out.
    let other = Subject::Referer("blog.example".into());
    assert!(
        table
            .admit(&Charges::Two(charge(&ip_a), charge(&other)), &plan, None, now)
            .is_ok()
    );
    assert!(
        table
            .admit(&Charges::Two(charge(&ip_a), charge(&other)), &plan, None, now)
            .is_err()
    );
    assert_eq!(table.current(&other, now).0, 1);
}

#[test]
fn rate_and_quota_together_report_the_closest_limit() {
    let table = UsageTable::default();
    let mut limited = plan(Some(1000), None);
    limited.rate = Gcra::new(10, Some(5));
    let k = key("k");
    let now = at("2026-11-23T10:00:00Z");
    let status = table
        .admit(&Charges::One(charge(&k)), &limited, None, now)
        .unwrap()
        .unwrap();
    assert_eq!((status.name, status.remaining, status.quota), (LimitName::Rate, 4, 5));
    assert_eq!(admit_n(&table, &k, &limited, now, 10), 4);
    let rejection = table.admit(&Charges::One(charge(&k)), &limited, None, now).unwrap_err();
    assert_eq!((rejection.kind, rejection.retry_after), (RejectKind::RateLimited, 1));
    // Rate-limited requests are not counted against the quota.
    assert_eq!(table.current(&k, now).0, 5);
    // A second later two more tokens (and more) are back.
    assert_eq!(admit_n(&table, &k, &limited, Now(now.0 + 1_000_000_000), 20), 5);
}

#[test]
fn group_quotas_count_only_their_routes() {
    let table = UsageTable::default();
    let mut grouped = plan(Some(100), None);
    grouped.groups.push(GroupLimits {
        name: "batch".into(),
        daily: Some(2),
        monthly: None,
    });
    let group = grouped.group(Some("batch"));
    let k = key("k");
    let now = at("2026-11-23T10:00:00Z");
    let admit = |group| table.admit(&Charges::One(charge(&k)), &grouped, group, now);
    assert!(admit(group).is_ok() && admit(group).is_ok());
    assert_eq!(admit(group).unwrap_err().status.name.policy(), "batch-daily");
    assert!(admit(None).is_ok(), "other routes are not limited by the group");
    assert_eq!(table.current(&k, now).0, 3);
}

#[test]
fn a_plan_change_keeps_the_count() {
    let table = UsageTable::default();
    let k = key("k");
    let now = at("2026-11-23T10:00:00Z");
    assert_eq!(admit_n(&table, &k, &plan(Some(5), None), now, 3), 3);
    assert_eq!(admit_n(&table, &k, &plan(Some(4), None), now, 3), 1);
    assert_eq!(admit_n(&table, &k, &plan(Some(10), None), now, 10), 6);
    assert_eq!(table.current(&k, now).0, 10);
}

#[test]
fn restore_rebuilds_days_and_months_from_stored_rows() {
    let table = UsageTable::default();
    let now = at("2026-11-23T10:00:00Z");
    let today = now.day();
    let stored = |subject: &str, scope: &str, day, node: &str, count| StoredRow {
        row: UsageRow {
            subject: subject.into(),
            consumer: Some("acme".into()),
            scope: Scope::parse(scope).unwrap(),
            day,
            count,
        },
        node: node.into(),
    };
    for row in [
        stored("key:k", "", today, "local", 4),
        stored("key:k", "", today, "other", 1),
        stored("key:k", "", today - 3, "local", 10),
        stored("key:k", "route:lookup", today, "local", 4),
        stored("ip:10.0.0.9", "", today, "local", 2),
        // Earlier days of an IP are not needed without a monthly anonymous quota.
        stored("ip:10.0.0.9", "", today - 1, "local", 50),
        // Last month's rows are reports only.
        stored("key:k", "", parse_day("2026-10-31").unwrap(), "local", 99),
    ] {
        let own = row.node == "local";
        table.restore(&row, own, now);
    }
    assert_eq!(table.current(&key("k"), now), (5, Some(15)));
    assert_eq!(table.current(&Subject::Ip("10.0.0.9".parse().unwrap()), now), (2, None));
    // The node's own slot continues from the stored value, so a write never goes back.
    let plan = plan(Some(100), None);
    table
        .admit(
            &Charges::One(Charge {
                subject: key("k").as_ref(),
                consumer: None,
                route: Some(&Arc::from("lookup")),
            }),
            &plan,
            None,
            now,
        )
        .unwrap();
    let mut rows = Vec::new();
    table.collect(&mut rows);
    rows.sort_by(|a, b| a.scope.cmp(&b.scope));
    let counts: Vec<(String, u64)> = rows.iter().map(|r| (r.scope.to_string(), r.count)).collect();
    assert_eq!(counts, vec![("".into(), 5), ("route:lookup".into(), 5)]);
    assert_eq!(rows[0].consumer.as_deref(), Some("acme"));
}

#[test]
fn ended_windows_leave_memory_once_flushed() {
    let table = UsageTable::default();
    let anonymous = plan(Some(10), None);
    let keyed = plan(Some(10), Some(100));
    let day1 = at("2026-11-23T10:00:00Z");
    for i in 0..1000u32 {
        let ip = Subject::Ip(std::net::IpAddr::from(i.to_be_bytes()));
        table.admit(&Charges::One(charge(&ip)), &anonymous, None, day1).unwrap();
    }
    table
        .admit(&Charges::One(charge(&key("k"))), &keyed, None, day1)
        .unwrap();
    assert_eq!(table.len(), 1001);
    let day2 = at("2026-11-24T00:00:01Z");
    // Not yet flushed: kept.
    assert_eq!(table.prune(day2), 0);
    table.collect(&mut Vec::new());
    // IPs go; the key stays for its month.
    assert_eq!(table.prune(day2), 1000);
    assert_eq!(table.current(&key("k"), day2), (0, Some(1)));
    table.collect(&mut Vec::new());
    assert_eq!(table.prune(at("2026-12-01T00:00:00Z")), 1);
    assert!(table.is_empty());
}

#[test]
fn subjects_render_and_parse() {
    for text in ["key:key_1", "ip:10.1.2.3", "ip:2001:db8::1", "referer:shop.example"] {
        assert_eq!(Subject::parse(text).unwrap().to_string(), text);
    }
    for bad in ["key:", "ip:not-an-ip", "user:1", "nothing"] {
        assert_eq!(Subject::parse(bad), None, "{bad}");
    }
}

fn ip(n: u32) -> Subject {
    Subject::Ip(std::net::IpAddr::from(n.to_be_bytes()))
}

#[test]
fn anonymous_subjects_are_bounded_and_evicted_ones_resume_their_counts() {
    let table = UsageTable::default();
    table.set_max_anonymous(640);
    let plan = plan(Some(5), None);
    let now = at("2026-11-23T12:00:00Z");
    let returning = ip(7);
    assert_eq!(admit_n(&table, &returning, &plan, now, 3), 3);
    let mut rows = Vec::new();
    // Many new subjects, flushed as they go (only flushed entries may be evicted).
    for n in 1000..6000 {
        assert_eq!(admit_n(&table, &ip(n), &plan, now, 1), 1);
        if n % 100 == 0 {
            table.collect(&mut rows);
        }
    }
    table.collect(&mut rows);
    table.prune(now);
    assert!(table.anonymous_len() <= 640, "{} held", table.anonymous_len());
    assert!(table.take_evictions() >= 4000);
    assert!(rows.iter().any(|r| r.subject == returning.to_string() && r.count == 3));
    // Keys are never evicted.
    let key = key("k");
    admit_n(&table, &key, &plan, now, 1);
    table.collect(&mut rows);
    table.prune(now);
    assert_eq!(table.current(&key, now).0, 1);
    // The returning subject was evicted (it is the least recently used) and resumes
    // from the 3 it had counted: 2 more of its 5, not 5.
    assert_eq!(table.current(&returning, now).0, 0, "evicted");
    assert_eq!(admit_n(&table, &returning, &plan, now, 5), 2);
    // Its next row is not smaller than the stored one.
    let mut rows = Vec::new();
    table.collect(&mut rows);
    assert!(rows.iter().any(|r| r.subject == returning.to_string() && r.count == 5));
}

#[test]
fn a_refused_charge_creates_no_entry() {
    let table = UsageTable::default();
    let one = plan(Some(1), None);
    let none = plan(Some(0), None);
    let now = at("2026-11-23T12:00:00Z");
    let (address, referer) = (ip(1), Subject::Referer("shop.example".into()));
    fn both<'a>(address: &'a Subject, referer: &'a Subject) -> Charges<'a> {
        Charges::Two(charge(address), charge(referer))
    }
    assert!(table.admit(&both(&address, &referer), &one, None, now).is_ok());
    assert_eq!(table.len(), 2);
    // The IP is over its quota: the new Referer is not stored.
    let other = Subject::Referer("other.example".into());
    assert!(table.admit(&both(&address, &other), &one, None, now).is_err());
    assert_eq!(table.len(), 2);
    // A fresh subject refused on its own (a zero quota) leaves nothing either.
    assert!(table.admit(&Charges::One(charge(&ip(2))), &none, None, now).is_err());
    assert_eq!(table.len(), 2);
}

#[test]
fn unflushed_anonymous_subjects_are_evicted_and_their_rows_kept_or_counted_as_dropped() {
    let table = UsageTable::default();
    table.set_max_anonymous(640);
    let plan = plan(Some(5), None);
    let now = at("2026-11-23T12:00:00Z");
    // No flush at all (a store that cannot keep up): the bound holds anyway.
    for n in 0..5000 {
        assert_eq!(admit_n(&table, &ip(n), &plan, now, 1), 1);
    }
    assert!(table.anonymous_len() <= 640, "{} held", table.anonymous_len());
    // Rows wait for the store up to twice the bound; past that they are dropped and
    // counted. Every subject's row is one or the other.
    let mut rows = Vec::new();
    table.collect(&mut rows);
    let subjects: std::collections::HashSet<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
    assert!(subjects.len() <= 640 + 2 * 640, "{} rows kept", subjects.len());
    assert_eq!(subjects.len() as u64 + table.take_rows_dropped(), 5000);
    assert!(rows.iter().all(|r| r.count == 1));

    // A store that keeps up loses nothing: flushed as they go, no row is dropped.
    let table = UsageTable::default();
    table.set_max_anonymous(640);
    let mut rows = Vec::new();
    for n in 0..5000 {
        assert_eq!(admit_n(&table, &ip(n), &plan, now, 1), 1);
        if n % 50 == 0 {
            table.collect(&mut rows);
        }
    }
    table.collect(&mut rows);
    assert_eq!(table.take_rows_dropped(), 0);
    let subjects: std::collections::HashSet<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
    assert_eq!(subjects.len(), 5000);
}

#[test]
fn with_leases_a_node_admits_what_it_holds_and_gives_back_what_it_idles_on() {
    let table = UsageTable::default();
    let (claims, mut sent) = tokio::sync::mpsc::unbounded_channel();
    table.leasing.enable(claims);
    table.leasing.set_nodes(6);
    let plan = plan(Some(1000), None);
    let subject = key("hot");
    let now = at("2026-11-23T12:00:00Z");
    // Free share: max(1 %, 5) / 6 nodes = 1; then it waits for a lease.
    assert_eq!(admit_n(&table, &subject, &plan, now, 1), 1);
    let claim = sent.try_recv().expect("a claim for the day");
    assert_eq!(
        (claim.window, claim.local, claim.release_from),
        (crate::limits::lease::LeaseWindow::Day, 0, None)
    );
    let refused = table
        .admit(&Charges::One(charge(&subject)), &plan, None, now)
        .unwrap_err();
    assert_eq!(refused.kind, RejectKind::LeasePending);
    // The authority grants up to 40.
    table.apply_grant(&claim, Granted::Lease { until: 40, grant: 40 }, now);
    assert_eq!(admit_n(&table, &subject, &plan, now, 50), 39);
    // Used a second ago: kept. (Drop the prefetch claim made at half.)
    while sent.try_recv().is_ok() {}
    table.release_idle(Now::from_secs(now.secs() + 1));
    assert!(sent.try_recv().is_err(), "a lease in use is not released");
    let mut granted = claim.clone();
    granted.local = 40;
    table.apply_grant(&granted, Granted::Lease { until: 60, grant: 20 }, now);
    assert_eq!(admit_n(&table, &subject, &plan, now, 5), 5);
    // Idle for the release delay: the rest goes back, and nothing more is admitted on it.
    let later = Now::from_secs(now.secs() + 3);
    table.release_idle(later);
    let release = sent.try_recv().expect("a release");
    assert_eq!((release.local, release.release_from), (45, Some(60)));
    let refused = table
        .admit(&Charges::One(charge(&subject)), &plan, None, later)
        .unwrap_err();
    assert_eq!(
        refused.kind,
        RejectKind::LeasePending,
        "released: a new claim is needed"
    );
}
