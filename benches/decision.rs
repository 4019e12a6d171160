//! Decision cost on the request path: key lookup + auth with 100k and 1M keys loaded.
//! `cargo bench --bench decision`; results in docs/benchmarks.md.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tollgate::auth::{KeyTable, authenticate, hash_key};
use tollgate::state::{ApiKey, Consumer, StateData};

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

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("authenticate");
    // `cargo test --all-targets` runs benches once as a smoke test: keep that quick.
    let measuring = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if measuring { &[100_000, 1_000_000] } else { &[1_000] };
    for &keys in sizes {
        let (table, secrets) = table_with(keys);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
            b.iter(|| {
                i = (i + 7919) % secrets.len();
                authenticate(&table, Some(&secrets[i]), "lookup", 0).map(|id| id.plan.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
