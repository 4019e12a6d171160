//! Regions as equal peers (docs/multi-region.md, "No home region"): each region's nodes
//! write only to that region's own streams, and every node follows every region's streams
//! itself, so losing one region (or the link to it) stops nothing among the others.
//!
//! Two logs per region: usage batches and catalog writes. A follower per (log, region)
//! replays its stream into this node's disk from where it stopped, and records when it
//! last heard from that region: a region not heard from recently makes reports stale and,
//! when most regions are unheard, unknown keys unanswerable (503).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::{NatsBackend, nats_error};
use crate::base::stopped;
use crate::state::StateError;

/// A region not heard from for this long is reported stale.
pub(super) const FRESH_WITHIN: Duration = Duration::from_secs(3);
/// How often an idle follower asks its stream where it stands (also how a follower notices
/// a restarted server forgot its consumer), and how soon it retries after an error.
const POLL: Duration = Duration::from_millis(1000);
const RETRY: Duration = Duration::from_millis(250);
/// Well above a request's round trip between regions, well below the 5 s default: a
/// follower stuck on a request lost in a cut link notices the link is back this soon.
pub(super) const FOLLOW_TIMEOUT: Duration = Duration::from_millis(750);
/// How often the streams are listed for regions this node does not follow yet (a heartbeat
/// from a node of a new region triggers a listing at once).
const DISCOVER_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Log {
    Usage,
    Catalog,
}

impl Log {
    fn prefix(self) -> &'static str {
        match self {
            Log::Usage => "TOLLGATE_USAGE_",
            Log::Catalog => "TOLLGATE_CATALOG_",
        }
    }

    pub(super) fn stream(self, region: &str) -> String {
        format!("{}{region}", self.prefix())
    }

    /// Subjects of a region's stream; the old single-stream layout used `tollgate.usage.>`,
    /// so these never overlap it.
    pub(super) fn subjects(self, region: &str) -> String {
        format!("{}.>", self.subject_root(region))
    }

    pub(super) fn subject_root(self, region: &str) -> String {
        match self {
            Log::Usage => format!("tg.usage.{region}"),
            Log::Catalog => format!("tg.catalog.{region}"),
        }
    }

    /// The meta row holding how far this node has applied a region's stream.
    pub(super) fn sequence_meta(self, region: &str) -> String {
        match self {
            Log::Usage => format!("usage_seq.{region}"),
            Log::Catalog => format!("catalog_seq.{region}"),
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Log::Usage => "usage",
            Log::Catalog => "catalog",
        }
    }
}

/// When each (log, region) was last read successfully, and which followers run.
#[derive(Default)]
pub(super) struct Regions {
    heard: Mutex<BTreeMap<(Log, String), Option<Instant>>>,
    /// (applied, tail): the last sequence this node applied of each stream, and the last
    /// the stream was seen to hold; their difference is the replication lag.
    progress: Mutex<BTreeMap<(Log, String), (u64, u64)>>,
    /// Wakes the discovery loops early: a heartbeat came from a region not followed yet.
    wake: tokio::sync::Notify,
}

impl Regions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Log, String), Option<Instant>>> {
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a follower; `false` when one already runs.
    fn claim(&self, log: Log, region: &str) -> bool {
        let mut heard = self.lock();
        if heard.contains_key(&(log, region.to_string())) {
            return false;
        }
        heard.insert((log, region.to_string()), None);
        true
    }

    fn heard(&self, log: Log, region: &str) {
        self.lock().insert((log, region.to_string()), Some(Instant::now()));
    }

    fn progressed(&self, log: Log, region: &str, applied: u64, tail: u64) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let entry = progress.entry((log, region.to_string())).or_default();
        entry.0 = applied;
        entry.1 = tail.max(applied);
    }

    /// Every followed stream: its region, how long since it was last read, and how far
    /// this node trails it (docs/console.md, "Cluster").
    pub(super) fn status(&self) -> Vec<crate::state::RegionStatus> {
        let heard = self.lock().clone();
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut regions: BTreeMap<String, crate::state::RegionStatus> = BTreeMap::new();
        for ((log, region), at) in heard {
            let (applied, tail) = progress.get(&(log, region.clone())).copied().unwrap_or_default();
            let stream = crate::state::StreamStatus {
                heard_ms_ago: at.map(|at| at.elapsed().as_millis() as u64),
                stale: at.is_none_or(|at| at.elapsed() > FRESH_WITHIN),
                applied,
                behind: tail.saturating_sub(applied),
            };
            let entry = regions
                .entry(region.clone())
                .or_insert_with(|| crate::state::RegionStatus {
                    region,
                    usage: None,
                    catalog: None,
                });
            match log {
                Log::Usage => entry.usage = Some(stream),
                Log::Catalog => entry.catalog = Some(stream),
            }
        }
        regions.into_values().collect()
    }

    /// A node of `region` is alive: when its streams are not followed yet, look now
    /// rather than at the next periodic listing.
    pub(super) fn seen_node_of(&self, region: &str) {
        let unknown = !self.lock().contains_key(&(Log::Usage, region.to_string()));
        if unknown {
            self.wake.notify_waiters();
        }
    }

    /// Regions of `log` not heard from within [`FRESH_WITHIN`].
    pub(super) fn stale(&self, log: Log) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|((l, _), at)| *l == log && at.is_none_or(|at| at.elapsed() > FRESH_WITHIN))
            .map(|((_, region), _)| region.clone())
            .collect()
    }

    pub(super) fn known(&self, log: Log) -> Vec<String> {
        self.lock()
            .keys()
            .filter(|(l, _)| *l == log)
            .map(|(_, region)| region.clone())
            .collect()
    }

    /// (fresh, known) regions of `log`.
    pub(super) fn fresh(&self, log: Log) -> (usize, usize) {
        let heard = self.lock();
        let known = heard.keys().filter(|(l, _)| *l == log).count();
        let fresh = heard
            .iter()
            .filter(|((l, _), at)| *l == log && at.is_some_and(|at| at.elapsed() <= FRESH_WITHIN))
            .count();
        (fresh, known)
    }
}

/// What a follower does with one message of its stream (off the async runtime).
pub(super) type Handler = Arc<dyn Fn(&NatsBackend, &str, Bytes) -> Result<(), StateError> + Send + Sync>;

impl NatsBackend {
    /// JetStream with a short request timeout, for asking other regions: a call that waits
    /// 5 s (the default) on a region that is gone or coming back delays starts and
    /// convergence by as much.
    pub(super) fn quick_js(&self) -> Result<async_nats::jetstream::Context, StateError> {
        let mut js = self.jet()?.js.clone();
        js.set_timeout(FOLLOW_TIMEOUT);
        Ok(js)
    }

    /// Regions with a stream of `log`: those listed by JetStream now, those this disk has
    /// followed before, and this node's own.
    pub(super) async fn known_regions(&self, log: Log) -> Vec<String> {
        let mut regions = std::collections::BTreeSet::from([self.region.clone()]);
        let prefix = log.sequence_meta("");
        if let Ok(followed) = self.local.meta_names(&prefix) {
            regions.extend(followed.into_iter().map(|name| name[prefix.len()..].to_string()));
        }
        if let Ok(jet) = self.jet() {
            let mut names = jet.js.stream_names();
            let listed = tokio::time::timeout(Duration::from_secs(2), async {
                let mut found = Vec::new();
                while let Some(Ok(name)) = names.next().await {
                    if let Some(region) = name.strip_prefix(log.prefix()) {
                        found.push(region.to_string());
                    }
                }
                found
            })
            .await;
            regions.extend(listed.unwrap_or_default());
        }
        regions.into_iter().collect()
    }

    /// Follows `log` in every region, starting followers for regions as they appear.
    /// `caught_up` fires once every region known at start has been replayed to the tail
    /// it had then, or found unreachable (its part is then served stale until it answers).
    pub(super) async fn follow_regions(self: Arc<Self>, log: Log, handler: Handler, caught_up: oneshot::Sender<()>) {
        let mut shutdown = self.shutdown.clone();
        let mut first = Vec::new();
        let known = self.known_regions(log).await;
        self.source_others(log, &known).await;
        for region in known {
            if self.regions.claim(log, &region) {
                let (done, wait) = oneshot::channel();
                first.push(wait);
                tokio::spawn(self.clone().follow(log, region, handler.clone(), Some(done)));
            }
        }
        tokio::spawn(async move {
            for wait in first {
                let _ = wait.await;
            }
            let _ = caught_up.send(());
        });
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DISCOVER_EVERY) => {}
                _ = self.regions.wake.notified() => {}
                _ = stopped(&mut shutdown) => return,
            }
            let known = self.known_regions(log).await;
            let mut new = false;
            for region in &known {
                if self.regions.claim(log, region) {
                    tracing::info!(region, log = log.name(), "following a new region");
                    tokio::spawn(self.clone().follow(log, region.clone(), handler.clone(), None));
                    new = true;
                }
            }
            if new || self.sources_missing.load(std::sync::atomic::Ordering::Relaxed) {
                self.source_others(log, &known).await;
            }
        }
    }

    /// Makes this region's stream of `log` source every other region's own writes, so the
    /// region holds a complete copy: a node starting here on an empty disk while another
    /// region is unreachable still gets that region's catalog and usage (up to the loss).
    /// Needs JetStream's meta leader; retried at the next discovery when it fails.
    async fn source_others(&self, log: Log, regions: &[String]) {
        let result: Result<(), StateError> = async {
            let js = &self.jet()?.js;
            let mut stream = js
                .get_stream(log.stream(&self.region))
                .await
                .map_err(|e| nats_error("own stream", e))?;
            let mut config = stream
                .info()
                .await
                .map_err(|e| nats_error("own stream", e))?
                .config
                .clone();
            let wanted: Vec<stream::Source> = regions
                .iter()
                .filter(|r| **r != self.region)
                .map(|r| stream::Source {
                    name: log.stream(r),
                    // Only that region's own writes: what it sources from others is
                    // sourced here directly, and copies never travel in circles.
                    filter_subject: Some(log.subjects(r)),
                    ..Default::default()
                })
                .collect();
            let have: std::collections::BTreeSet<&str> =
                config.sources.iter().flatten().map(|s| s.name.as_str()).collect();
            if wanted.iter().all(|s| have.contains(s.name.as_str())) {
                return Ok(());
            }
            config.sources = Some(wanted);
            js.update_stream(&config)
                .await
                .map_err(|e| nats_error("sourcing other regions", e))?;
            tracing::info!(log = log.name(), regions = ?regions, "this region's stream now sources every other region");
            Ok(())
        }
        .await;
        let failed = result.is_err();
        if let Err(error) = result {
            tracing::debug!(%error, "could not update this region's sources yet");
        }
        self.sources_missing.store(failed, std::sync::atomic::Ordering::Relaxed);
    }

    async fn follow(
        self: Arc<Self>,
        log: Log,
        region: String,
        handler: Handler,
        caught_up: Option<oneshot::Sender<()>>,
    ) {
        let mut shutdown = self.shutdown.clone();
        let mut caught_up = caught_up;
        loop {
            tokio::select! {
                result = self.follow_once(log, &region, &handler, &mut caught_up) => {
                    if let Err(error) = result {
                        tracing::debug!(%error, region, log = log.name(), "region stream interrupted; resuming");
                    }
                }
                _ = stopped(&mut shutdown) => return,
            }
            // Another region unreachable at start: do not hold readiness; it is served
            // stale. This region's own stream (which holds copies of the others') is
            // retried until replayed.
            if region != self.region
                && let Some(done) = caught_up.take()
            {
                let _ = done.send(());
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    async fn follow_once(
        self: &Arc<Self>,
        log: Log,
        region: &str,
        handler: &Handler,
        caught_up: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), StateError> {
        let meta = log.sequence_meta(region);
        let local = self.clone();
        let meta_name = meta.clone();
        let start = tokio::task::spawn_blocking(move || local.local.meta(&meta_name))
            .await
            .map_err(|e| nats_error("meta", e))??
            .unwrap_or(0)
            + 1;
        let mut stream = self
            .quick_js()?
            .get_stream(log.stream(region))
            .await
            .map_err(|e| nats_error("region stream", e))?;
        let info = stream.info().await.map_err(|e| nats_error("region stream", e))?;
        let tail = info.state.last_sequence;
        // Behind what the stream still holds (aged out): start at its first message; the
        // snapshot loaded at start covers what is gone.
        let start = start.max(info.state.first_sequence);
        self.regions.heard(log, region);
        self.regions.progressed(log, region, start.saturating_sub(1), tail);
        if tail < start
            && let Some(done) = caught_up.take()
        {
            let _ = done.send(());
        }
        // This region's stream also holds copies of the others' writes (sourced): all of it.
        let filter_subject = if region == self.region {
            String::new()
        } else {
            log.subjects(region)
        };
        let ordered = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error("region consumer", e))?;
        let mut messages = ordered.messages().await.map_err(|e| nats_error("region consumer", e))?;
        let mut applied = start.saturating_sub(1);
        loop {
            let message = match tokio::time::timeout(POLL, messages.next()).await {
                Ok(Some(message)) => message.map_err(|e| nats_error("region stream", e))?,
                Ok(None) => return Ok(()),
                Err(_) => {
                    // A consumer can outlive its server (a restarted NATS forgets it): when
                    // the stream has moved past what arrived, start a new one.
                    let last = stream
                        .info()
                        .await
                        .map_err(|e| nats_error("region stream", e))?
                        .state
                        .last_sequence;
                    self.regions.heard(log, region);
                    self.regions.progressed(log, region, applied, last);
                    if last > applied {
                        return Err(nats_error("region stream", "consumer stalled behind the stream"));
                    }
                    continue;
                }
            };
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            applied = sequence;
            self.regions.heard(log, region);
            let local = self.clone();
            let handler = handler.clone();
            let (meta, payload) = (meta.clone(), message.payload.clone());
            let region_name = region.to_string();
            tokio::task::spawn_blocking(move || -> Result<(), StateError> {
                handler(&local, &region_name, payload)?;
                local.local.set_meta(&meta, sequence)
            })
            .await
            .map_err(|e| nats_error("applying", e))??;
            self.regions.progressed(log, region, sequence, tail);
            if sequence >= tail
                && let Some(done) = caught_up.take()
            {
                let _ = done.send(());
            }
        }
    }
}

/// Opens this region's stream of `log`, creating it when missing. Two nodes starting at
/// once may both create it: JetStream answers an identical create with the stream.
pub(super) async fn own_stream(
    js: &async_nats::jetstream::Context,
    log: Log,
    region: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<(), StateError> {
    let config = stream::Config {
        name: log.stream(region),
        subjects: vec![log.subjects(region)],
        num_replicas: replicas,
        storage: stream::StorageType::File,
        // Catalog: the last write of each record per region is all a merge needs.
        max_messages_per_subject: if log == Log::Catalog { 1 } else { 0 },
        max_age: if log == Log::Usage { max_age } else { Duration::ZERO },
        ..Default::default()
    };
    retry_race(|| async {
        js.get_or_create_stream(config.clone())
            .await
            .map(|_| ())
            .map_err(|e| nats_error(&format!("creating stream {}", config.name), e))
    })
    .await
}

/// Runs a create-if-missing twice: a node that lost a creation race finds the winner's.
pub(super) async fn retry_race<T, F, Fut>(mut create: F) -> Result<T, StateError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StateError>>,
{
    match create().await {
        Ok(done) => Ok(done),
        Err(first) => {
            tracing::debug!(error = %first, "creating JetStream state raced; retrying once");
            tokio::time::sleep(Duration::from_millis(200)).await;
            create().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_region_has_its_streams_and_subjects() {
        assert_eq!(Log::Usage.stream("eu"), "TOLLGATE_USAGE_eu");
        assert_eq!(Log::Catalog.subjects("eu"), "tg.catalog.eu.>");
    }

    #[test]
    fn a_region_never_heard_is_stale() {
        let regions = Regions::default();
        assert!(regions.claim(Log::Usage, "a"));
        assert!(!regions.claim(Log::Usage, "a"));
        assert!(regions.claim(Log::Usage, "b"));
        regions.heard(Log::Usage, "b");
        assert_eq!(regions.stale(Log::Usage), vec!["a".to_string()]);
        assert_eq!(regions.fresh(Log::Usage), (1, 2));
        assert_eq!(regions.fresh(Log::Catalog), (0, 0));
    }
}
