//! Who is calling: API keys looked up in memory. One hash and one map lookup per request;
//! no I/O. The tables are rebuilt from the state backend at start and updated per shard
//! after each admin write, so a write copies 1/256 of the keys, not all of them.

mod client_ip;
pub mod jwks_fetch;
pub mod jwt;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use compact_str::CompactString;
use sha2::{Digest, Sha256};

pub use client_ip::{client_ip, referer_host};

use crate::model::{ApiKey, StateData};

/// Readable start of every secret, so leaked keys are recognisable (and scannable).
pub const KEY_PREFIX: &str = "tg_live_";
const SHARDS: usize = 256;

/// What the proxy needs to know about a key at request time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Inline (ids are 24 bytes): the usage lookup reads it from the line the key lookup
    /// has just loaded instead of chasing one more pointer.
    pub key_id: CompactString,
    pub consumer_id: Arc<str>,
    pub plan: Arc<str>,
    pub expires_at: Option<i64>,
    pub allowed_routes: Box<[Box<str>]>,
    pub revoked: bool,
    /// The consumer and key id need no escaping in a JSON string, checked once here so
    /// that the access log copies them without a check per record. It fits where the
    /// entry was padding.
    pub plain_names: bool,
}

/// The caller once authenticated: the key's entry itself, shared. Holding the entry (one
/// reference count, on a line the lookup has just read) instead of copies of its names
/// keeps the request path off the consumer's and plan's shared counters, which every core
/// would otherwise write on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity(Arc<KeyEntry>);

impl Identity {
    /// An identity that no stored key backs (a verified JWT's consumer).
    pub fn new(key_id: CompactString, consumer_id: Arc<str>, plan: Arc<str>) -> Identity {
        Identity(Arc::new(KeyEntry {
            plain_names: plain_names(&key_id, &consumer_id),
            key_id,
            consumer_id,
            plan,
            expires_at: None,
            allowed_routes: Box::default(),
            revoked: false,
        }))
    }
}

impl std::ops::Deref for Identity {
    type Target = KeyEntry;

    fn deref(&self) -> &KeyEntry {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    MissingCredentials,
    InvalidApiKey,
    KeyRevoked,
    KeyExpired,
    RouteNotAllowed,
}

/// Keys are SHA-256 digests, so a fast non-keyed hash spreads them as well as SipHash.
type Shard = HashMap<[u8; 32], Arc<KeyEntry>, rustc_hash::FxBuildHasher>;

/// Key hash → entry, in shards by the hash's first byte.
pub struct KeyTable {
    shards: Box<[ArcSwap<Shard>]>,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            shards: (0..SHARDS).map(|_| ArcSwap::from_pointee(Shard::default())).collect(),
        }
    }
}

/// The plan a key runs under: its own, else its consumer's, else `default`.
fn effective_plan<'a>(key: &'a ApiKey, data: &'a StateData, default: &'a str) -> &'a str {
    key.plan
        .as_deref()
        .or_else(|| data.consumers.get(&key.consumer).and_then(|c| c.plan.as_deref()))
        .unwrap_or(default)
}

fn entry(key: &ApiKey, data: &StateData, default_plan: &str, names: &mut Names) -> Arc<KeyEntry> {
    let plan = effective_plan(key, data, default_plan);
    Arc::new(KeyEntry {
        key_id: CompactString::from(key.id.as_str()),
        consumer_id: names.intern(&key.consumer),
        plan: names.intern(plan),
        expires_at: key.expires_at,
        allowed_routes: key.allowed_routes.iter().map(|r| r.as_str().into()).collect(),
        revoked: key.revoked || !data.consumers.contains_key(&key.consumer),
        plain_names: plain_names(&key.id, &key.consumer),
    })
}

fn plain_names(key_id: &str, consumer: &str) -> bool {
    crate::base::json::plain_string(key_id.as_bytes()) && crate::base::json::plain_string(consumer.as_bytes())
}

/// One shared copy of each consumer and plan name: with a million keys and a few thousand
/// consumers, per-key copies would be most of the table.
#[derive(Default)]
struct Names(HashMap<Arc<str>, ()>);

impl Names {
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some((shared, _)) = self.0.get_key_value(name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(name);
        self.0.insert(shared.clone(), ());
        shared
    }
}

impl KeyTable {
    /// Replaces every shard with the keys `each_key` feeds in (from a backend's stream).
    pub fn load<E>(
        &self,
        data: &StateData,
        default_plan: &str,
        each_key: impl FnOnce(&mut dyn FnMut(ApiKey)) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut shards: Vec<Shard> = (0..SHARDS).map(|_| Shard::default()).collect();
        let mut names = Names::default();
        each_key(&mut |key: ApiKey| {
            shards[key.hash[0] as usize].insert(key.hash, entry(&key, data, default_plan, &mut names));
        })?;
        for (slot, shard) in self.shards.iter().zip(shards) {
            slot.store(Arc::new(shard));
        }
        Ok(())
    }

    /// Updates the shard of one key (created, revoked, or its plan changed).
    pub fn upsert(&self, key: &ApiKey, data: &StateData, default_plan: &str) {
        let slot = &self.shards[key.hash[0] as usize];
        let mut shard = Shard::clone(&slot.load());
        shard.insert(key.hash, entry(key, data, default_plan, &mut Names::default()));
        slot.store(Arc::new(shard));
    }

    pub fn get(&self, hash: &[u8; 32]) -> Option<Arc<KeyEntry>> {
        self.shards[hash[0] as usize].load().get(hash).cloned()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.load().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Seconds since the Unix epoch: the clock key expiry is judged by.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The key a connection presented last, with its hash. Clients send the same key on every
/// request of a keep-alive connection, and hashing a 72-byte key is two SHA-256 blocks,
/// about 1 % of a proxied request's CPU (docs/benchmarks.md, "A connection's key hashed
/// once"). Only the hash is remembered as the key's identity: the entry is looked up in
/// the current table on every request, so a revoked, expired or deleted key is refused
/// on the next request as it would be without the memo.
///
/// The presented key is compared in constant time, and whole: a connection a CDN or a
/// shared proxy holds carries many callers' keys, and one caller's key must never match
/// another's remembered one. Its bytes are zeroed when replaced and on drop, so a
/// connection's memory holds at most the one key it was last sent.
#[derive(Default)]
pub struct KeyMemo {
    presented: Vec<u8>,
    hash: [u8; 32],
}

/// Longer keys are hashed every time rather than kept (ours are 72 bytes).
const MEMO_MAX_KEY: usize = 256;

impl KeyMemo {
    /// `hash_key(presented)`, from the memo when `presented` is the key it holds.
    pub fn hash(&mut self, presented: &str) -> [u8; 32] {
        let bytes = presented.as_bytes();
        if !self.presented.is_empty() && same_secret(&self.presented, bytes) {
            return self.hash;
        }
        let hash = hash_key(presented);
        zeroize::Zeroize::zeroize(&mut self.presented);
        if bytes.len() <= MEMO_MAX_KEY {
            self.presented.extend_from_slice(bytes);
            self.hash = hash;
        }
        hash
    }
}

/// `a == b` in a time that depends on their lengths only: every word is compared, with
/// no early exit. Eight bytes at a time: `subtle`'s byte-wise comparison cost about 1,000
/// instructions for a 72-byte key, more than the memo saved in instructions.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let ((a_words, a_rest), (b_words, b_rest)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    let mut difference = 0u64;
    for (x, y) in a_words.iter().zip(b_words) {
        difference |= u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y);
    }
    for (x, y) in a_rest.iter().zip(b_rest) {
        difference |= u64::from(x ^ y);
    }
    // Kept opaque so the compiler cannot turn the loop into one that stops early.
    std::hint::black_box(difference) == 0
}

impl Drop for KeyMemo {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.presented);
    }
}

impl std::fmt::Debug for KeyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("KeyMemo")
            .field("held", &!self.presented.is_empty())
            .finish()
    }
}

/// A new secret: the prefix and 32 random bytes in hex. Only its hash is stored.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let mut secret = String::with_capacity(KEY_PREFIX.len() + 64);
    secret.push_str(KEY_PREFIX);
    for b in bytes {
        secret.push_str(&format!("{b:02x}"));
    }
    Ok(secret)
}

/// Checks a presented key for `route` at unix time `now`.
/// `now`: the Unix time, read only for a key that has an expiry (most have none, and the
/// clock read is one of several per request). `memo`: the connection's last key.
pub fn authenticate(
    table: &KeyTable,
    presented: Option<&str>,
    route: &str,
    now: impl FnOnce() -> i64,
    memo: &mut KeyMemo,
) -> Result<Identity, AuthError> {
    let identity = authenticate_key(table, presented, now, memo)?;
    if !identity.allowed_routes.is_empty() && !identity.allowed_routes.iter().any(|r| &**r == route) {
        return Err(AuthError::RouteNotAllowed);
    }
    Ok(identity)
}

/// Checks a presented key whatever routes it may call (the customer usage page shows a
/// key its own usage).
pub fn authenticate_key(
    table: &KeyTable,
    presented: Option<&str>,
    now: impl FnOnce() -> i64,
    memo: &mut KeyMemo,
) -> Result<Identity, AuthError> {
    let presented = presented
        .filter(|k| !k.is_empty())
        .ok_or(AuthError::MissingCredentials)?;
    let entry = table.get(&memo.hash(presented)).ok_or(AuthError::InvalidApiKey)?;
    if entry.revoked {
        return Err(AuthError::KeyRevoked);
    }
    if entry.expires_at.is_some_and(|at| now() >= at) {
        return Err(AuthError::KeyExpired);
    }
    Ok(Identity(entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Consumer;

    fn load(table: &KeyTable, (data, keys): &(StateData, Vec<ApiKey>)) {
        table
            .load(data, "free", |add| {
                keys.iter().cloned().for_each(add);
                Ok::<(), ()>(())
            })
            .unwrap();
    }

    fn data_with(secret: &str, mutate: impl FnOnce(&mut ApiKey)) -> (StateData, Vec<ApiKey>) {
        let mut data = StateData::default();
        data.consumers.insert(
            "acme".into(),
            Consumer {
                id: "acme".into(),
                plan: Some("pro".into()),
                created_at: 0,
            },
        );
        let mut key = ApiKey {
            id: "key_1".into(),
            consumer: "acme".into(),
            plan: None,
            hash: hash_key(secret),
            prefix: secret[..12].into(),
            created_at: 0,
            expires_at: None,
            allowed_routes: vec![],
            revoked: false,
        };
        mutate(&mut key);
        (data, vec![key])
    }

    #[test]
    fn names_that_need_escaping_are_marked() {
        let plain = Identity::new("key_0123".into(), Arc::from("acme-corp@x.io"), Arc::from("free"));
        assert!(plain.plain_names);
        let quoted = Identity::new("sub\"1".into(), Arc::from("acme"), Arc::from("free"));
        assert!(!quoted.plain_names);
        let control = Identity::new("key_1".into(), Arc::from("line\nbreak"), Arc::from("free"));
        assert!(!control.plain_names);
    }

    #[test]
    fn every_outcome() {
        let secret = generate_secret().unwrap();
        assert!(secret.starts_with(KEY_PREFIX) && secret.len() == KEY_PREFIX.len() + 64);
        let table = KeyTable::default();
        load(&table, &data_with(&secret, |_| {}));
        let id = authenticate(&table, Some(&secret), "lookup", || 10, &mut KeyMemo::default()).unwrap();
        assert_eq!((&*id.consumer_id, &*id.plan, &*id.key_id), ("acme", "pro", "key_1"));
        assert_eq!(
            authenticate(&table, None, "lookup", || 10, &mut KeyMemo::default()),
            Err(AuthError::MissingCredentials)
        );
        assert_eq!(
            authenticate(&table, Some(""), "lookup", || 10, &mut KeyMemo::default()),
            Err(AuthError::MissingCredentials)
        );
        assert_eq!(
            authenticate(&table, Some("tg_live_nope"), "lookup", || 10, &mut KeyMemo::default()),
            Err(AuthError::InvalidApiKey)
        );

        load(&table, &data_with(&secret, |k| k.expires_at = Some(10)));
        assert_eq!(
            authenticate(&table, Some(&secret), "lookup", || 9, &mut KeyMemo::default()).map(|_| ()),
            Ok(())
        );
        assert_eq!(
            authenticate(&table, Some(&secret), "lookup", || 10, &mut KeyMemo::default()),
            Err(AuthError::KeyExpired)
        );

        load(&table, &data_with(&secret, |k| k.allowed_routes = vec!["batch".into()]));
        assert_eq!(
            authenticate(&table, Some(&secret), "lookup", || 0, &mut KeyMemo::default()),
            Err(AuthError::RouteNotAllowed)
        );
        assert!(authenticate(&table, Some(&secret), "batch", || 0, &mut KeyMemo::default()).is_ok());

        let mut state = data_with(&secret, |k| k.plan = Some("gold".into()));
        load(&table, &state);
        assert_eq!(
            &*authenticate(&table, Some(&secret), "x", || 0, &mut KeyMemo::default())
                .unwrap()
                .plan,
            "gold"
        );
        state.1[0].revoked = true;
        table.upsert(&state.1[0], &state.0, "free");
        assert_eq!(
            authenticate(&table, Some(&secret), "x", || 0, &mut KeyMemo::default()),
            Err(AuthError::KeyRevoked)
        );
        assert_eq!(table.len(), 1);
    }

    /// One memo, as one keep-alive connection holds it: a remembered key still answers
    /// to the table as it is now, and no other key ever reads as the remembered one.
    #[test]
    fn a_connections_remembered_key_is_judged_as_the_table_is_now() {
        let (first, second) = (generate_secret().unwrap(), generate_secret().unwrap());
        let table = KeyTable::default();
        let mut state = data_with(&first, |_| {});
        let mut other = state.1[0].clone();
        other.id = "key_2".into();
        other.hash = hash_key(&second);
        state.1.push(other);
        load(&table, &state);
        let mut memo = KeyMemo::default();
        let key_id = |result: Result<Identity, AuthError>| result.map(|id| id.key_id.to_string());
        // The same key twice; another caller on the same connection (a CDN's) gets its
        // own identity; then the first again.
        for (key, id) in [
            (&first, "key_1"),
            (&first, "key_1"),
            (&second, "key_2"),
            (&first, "key_1"),
        ] {
            assert_eq!(
                key_id(authenticate(&table, Some(key), "x", || 0, &mut memo)),
                Ok(id.into())
            );
        }
        // Same length, one character off; a prefix; the key with more after it.
        let mut near = first.clone().into_bytes();
        near[40] = if near[40] == b'0' { b'1' } else { b'0' };
        let near = String::from_utf8(near).unwrap();
        for wrong in [near.as_str(), &first[..first.len() - 1], &format!("{first}0")] {
            assert_eq!(
                authenticate(&table, Some(wrong), "x", || 0, &mut memo),
                Err(AuthError::InvalidApiKey)
            );
        }
        assert_eq!(
            key_id(authenticate(&table, Some(&first), "x", || 0, &mut memo)),
            Ok("key_1".into())
        );
        // Revoked, expired, deleted after it was remembered: refused on the next request.
        state.1[0].revoked = true;
        table.upsert(&state.1[0], &state.0, "free");
        assert_eq!(
            authenticate(&table, Some(&first), "x", || 0, &mut memo),
            Err(AuthError::KeyRevoked)
        );
        state.1[0].revoked = false;
        state.1[0].expires_at = Some(5);
        table.upsert(&state.1[0], &state.0, "free");
        assert_eq!(
            authenticate(&table, Some(&first), "x", || 5, &mut memo),
            Err(AuthError::KeyExpired)
        );
        load(&table, &(state.0.clone(), vec![state.1[1].clone()]));
        assert_eq!(
            authenticate(&table, Some(&first), "x", || 0, &mut memo),
            Err(AuthError::InvalidApiKey)
        );
        // A key too long to keep is still judged, every time.
        let long = format!("{first}{}", "0".repeat(MEMO_MAX_KEY));
        for _ in 0..2 {
            assert_eq!(
                authenticate(&table, Some(&long), "x", || 0, &mut memo),
                Err(AuthError::InvalidApiKey)
            );
        }
        assert_eq!(memo.hash(&second), hash_key(&second));
        assert_eq!(memo.hash(&second), hash_key(&second));
        assert!(!format!("{memo:?}").contains(&second[8..]));
    }

    #[test]
    fn secrets_are_the_same_only_when_every_byte_is() {
        for len in [1, 7, 8, 9, 72, 75] {
            let a: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(31)).collect();
            assert!(same_secret(&a, &a.clone()));
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_secret(&a, &b), "length {len}, byte {at}");
            }
            assert!(!same_secret(&a, &a[..len - 1]));
        }
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn lookup_with_many_keys() {
        let mut state = data_with("tg_live_seed0000", |_| {});
        for i in 0..50_000 {
            let secret = format!("tg_live_{i:064}");
            let mut key = state.1[0].clone();
            key.id = format!("key_n{i}");
            key.hash = hash_key(&secret);
            state.1.push(key);
        }
        let table = KeyTable::default();
        load(&table, &state);
        assert_eq!(table.len(), 50_001);
        let id = authenticate(
            &table,
            Some(&format!("tg_live_{:064}", 31_337)),
            "x",
            || 0,
            &mut KeyMemo::default(),
        )
        .unwrap();
        assert_eq!(&*id.key_id, "key_n31337");
    }
}
