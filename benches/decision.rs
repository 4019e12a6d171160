//! Decision cost on the request path: key lookup + auth with 100k and 1M keys loaded, then
//! the same with the plan's limits (rate + daily + monthly quota) checked and counted, and
//! an anonymous caller charged to IP and Referer among 1M distinct IPs; and the keyed case
//! with global mode's quota leases on.
//! `cargo bench --bench decision`; results in docs/benchmarks.md.

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use std::sync::Arc;

use tollgate::auth::{KeyMemo, KeyTable, authenticate, hash_key};
use tollgate::limits::{Gcra, Now, PlanLimits};
use tollgate::model::{ApiKey, Consumer, StateData};
use tollgate::model::{Subject, SubjectRef};
use tollgate::usage::{Charge, Charges, UsageTable};

/// Limits that never refuse, so every iteration takes the admit-and-count path.
fn generous_plan() -> PlanLimits {
    PlanLimits {
        name: "pro".into(),
        rate: Gcra::new(1_000_000, Some(1_000_000)),
        daily: Some(u64::MAX / 2),
        monthly: Some(u64::MAX / 2),
        groups: vec![],
        decisions: Default::default(),
        on_partition: Default::default(),
        partition_allowance: None,
    }
}

fn table_with(keys: usize) -> (KeyTable, Vec<String>) {
    let mut data = StateData::default();
    data.consumers.insert(
        "acme".into(),
        Consumer {
            id: "acme".into(),
            plan: Some("pro".into()),
            created_at: 0,
        },
    );
    let mut secrets = Vec::with_capacity(keys);
    let mut rows = Vec::with_capacity(keys);
    for i in 0..keys {
        let secret = format!("tg_live_{i:064x}");
        rows.push(ApiKey {
            id: format!("key_{i}"),
            consumer: "acme".into(),
            plan: None,
            hash: hash_key(&secret),
            prefix: secret[..12].to_string(),
            created_at: 0,
            expires_at: None,
            allowed_routes: vec![],
            revoked: false,
        });
        secrets.push(secret);
    }
    let table = KeyTable::default();
    table
        .load(&data, "default", |add| {
            rows.into_iter().for_each(add);
            Ok::<(), ()>(())
        })
        .ok();
    (table, secrets)
}

/// The next presented secret, a fresh copy outside the timed part: a request's secret has
/// just been parsed from its head, so it is in cache; only the tables are cold.
fn presented(secrets: &[String]) -> impl FnMut() -> String + '_ {
    let mut i = 0usize;
    move || {
        i = (i + 7919) % secrets.len();
        secrets[i].clone()
    }
}

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("authenticate");
    // `cargo test --all-targets` runs benches once as a smoke test: keep that quick.
    let measuring = std::env::args().any(|a| a == "--bench");
    // `DECISION_KEYS=1000` measures with every table in cache (pure CPU cost).
    let chosen: Option<Vec<usize>> = std::env::var("DECISION_KEYS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect());
    let sizes: &[usize] = match &chosen {
        Some(sizes) => sizes,
        None if measuring => &[100_000, 1_000_000],
        None => &[1_000],
    };
    for &keys in sizes {
        let (table, secrets) = table_with(keys);
        let mut next = presented(&secrets);
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
            b.iter_batched_ref(
                &mut next,
                // A fresh memo: every call hashes, as a connection's first request does.
                |secret| {
                    authenticate(&table, Some(secret), "lookup", || 0, &mut KeyMemo::default()).map(|id| id.plan.len())
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    let plan = generous_plan();
    let route: Arc<str> = Arc::from("lookup");
    // Global mode adds quota leases (every key holds one after its first request; claims
    // go to a channel nobody answers, as a running gateway's go to its lease service).
    for (name, leases) in [("authenticate+limits", false), ("authenticate+limits+leases", true)] {
        let mut group = c.benchmark_group(name);
        for &keys in sizes {
            let (table, secrets) = table_with(keys);
            let usage = UsageTable::default();
            let (claims, _unanswered) = tokio::sync::mpsc::unbounded_channel();
            if leases {
                usage.leasing.enable(claims);
                usage.leasing.set_nodes(6);
            }
            let mut next = presented(&secrets);
            group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
                b.iter_batched_ref(
                    &mut next,
                    |secret| {
                        let identity =
                            authenticate(&table, Some(secret), "lookup", || 0, &mut KeyMemo::default()).ok()?;
                        let charge = Charge {
                            subject: SubjectRef::Key(&identity.key_id),
                            consumer: Some(&identity.consumer_id),
                            route: Some(&route),
                        };
                        usage.admit(&Charges::One(charge), &plan, None, Now::system()).ok()
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        group.finish();
    }

    // Anonymous callers: IP + Referer charged together, over many distinct IPs (RSS for
    // this case is measured on a running gateway by bench/anonymous_rss.py).
    let mut group = c.benchmark_group("anonymous");
    let ips: u32 = if measuring { 1_000_000 } else { 1_000 };
    let usage = UsageTable::default();
    let referers: Vec<Subject> = (0..1000)
        .map(|i| Subject::Referer(format!("site{i}.example").into()))
        .collect();
    for n in 0..ips {
        let ip = Subject::Ip(std::net::IpAddr::from((0x0a00_0000 + n).to_be_bytes()));
        let _ = usage.admit(
            &Charges::Two(charge(&ip), charge(&referers[n as usize % referers.len()])),
            &plan,
            None,
            Now::system(),
        );
    }
    let mut n = 0u32;
    group.bench_function(BenchmarkId::from_parameter(ips), |b| {
        b.iter(|| {
            n = (n + 7919) % ips;
            let ip = Subject::Ip(std::net::IpAddr::from((0x0a00_0000 + n).to_be_bytes()));
            usage
                .admit(
                    &Charges::Two(charge(&ip), charge(&referers[n as usize % referers.len()])),
                    &plan,
                    None,
                    Now::system(),
                )
                .ok()
        })
    });
    group.finish();
}

fn charge(subject: &Subject) -> Charge<'_> {
    Charge {
        subject: subject.as_ref(),
        consumer: None,
        route: None,
    }
}

criterion_group!(benches, decision);
criterion_main!(benches);
