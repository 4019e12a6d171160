//! Catalog writes made through this node (the admin API): each goes to the catalog first,
//! then to the in-memory tables the proxy reads. The catalog call runs on the blocking
//! pool with no lock on the in-memory data held; writes are serialised among themselves
//! so memory sees them in the catalog's order.

use super::{DEFAULT_PLAN, Gateway};
use crate::model::{ApiKey, Consumer, Plan};
use crate::state::{Catalog, StateError};

/// A change to a key's plan, expiry or routes; `None` leaves the field as it is.
#[derive(Debug, Default)]
pub struct KeyChange {
    /// `Some(None)` clears the key's own plan (it follows its consumer's again).
    pub plan: Option<Option<String>>,
    pub expires_at: Option<Option<i64>>,
    pub routes: Option<Vec<String>>,
}

impl Gateway {
    /// Runs a blocking catalog call off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Catalog) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || call(catalog.as_ref()))
            .await
            .map_err(|e| StateError::Backend(e.to_string()))?
    }

    pub fn consumers(&self) -> Vec<Consumer> {
        self.read_data().consumers.values().cloned().collect()
    }

    pub fn consumer(&self, id: &str) -> Option<Consumer> {
        self.read_data().consumers.get(id).cloned()
    }

    /// Creates or replaces a stored plan; applies from the next request.
    pub async fn put_plan(&self, plan: Plan) -> Result<(), StateError> {
        let _write = self.writes.lock().await;
        let stored = plan.clone();
        self.blocking(move |c| c.put_plan(&stored)).await?;
        let mut data = self.write_data();
        data.plans.insert(plan.name.clone(), plan);
        self.rebuild_plans(&data);
        Ok(())
    }

    pub async fn delete_plan(&self, name: &str) -> Result<(), StateError> {
        let _write = self.writes.lock().await;
        let target = name.to_string();
        self.blocking(move |c| c.delete_plan(&target)).await?;
        let mut data = self.write_data();
        data.plans.remove(name);
        self.rebuild_plans(&data);
        Ok(())
    }

    pub async fn create_consumer(&self, consumer: Consumer) -> Result<(), StateError> {
        let _write = self.writes.lock().await;
        let stored = consumer.clone();
        self.blocking(move |c| c.create_consumer(&stored)).await?;
        self.write_data().consumers.insert(consumer.id.clone(), consumer);
        Ok(())
    }

    /// Sets (or with `None`, clears) a consumer's plan. Keys without a plan of their own
    /// follow it; usage stays with the keys.
    pub async fn set_consumer_plan(&self, id: &str, plan: Option<Option<String>>) -> Result<Consumer, StateError> {
        let _write = self.writes.lock().await;
        let mut consumer = self
            .consumer(id)
            .ok_or_else(|| StateError::NotFound(format!("consumer {id}")))?;
        if let Some(plan) = plan {
            consumer.plan = plan;
        }
        let stored = consumer.clone();
        let owner = id.to_string();
        let keys = self
            .blocking(move |c| {
                c.update_consumer(&stored)?;
                c.consumer_keys(&owner)
            })
            .await?;
        let mut data = self.write_data();
        data.consumers.insert(id.to_string(), consumer.clone());
        for key in &keys {
            self.keys.upsert(key, &data, DEFAULT_PLAN);
        }
        Ok(consumer)
    }

    /// Deletes a consumer; its keys are revoked with it.
    pub async fn delete_consumer(&self, id: &str) -> Result<(), StateError> {
        let _write = self.writes.lock().await;
        let owner = id.to_string();
        let keys = self
            .blocking(move |c| {
                c.delete_consumer(&owner)?;
                c.consumer_keys(&owner)
            })
            .await?;
        let mut data = self.write_data();
        data.consumers.remove(id);
        // The consumer is gone from `data`, so its keys load as revoked.
        for key in &keys {
            self.keys.upsert(key, &data, DEFAULT_PLAN);
        }
        Ok(())
    }

    pub async fn create_key(&self, key: ApiKey) -> Result<(), StateError> {
        let _write = self.writes.lock().await;
        let stored = key.clone();
        self.blocking(move |c| c.create_key(&stored)).await?;
        let data = self.write_data();
        self.keys.upsert(&key, &data, DEFAULT_PLAN);
        Ok(())
    }

    pub async fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError> {
        let target = id.to_string();
        self.blocking(move |c| c.get_key(&target)).await
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>, StateError> {
        self.blocking(|c| c.list_keys()).await
    }

    /// Changes a key's plan, expiry or routes. A plan change applies from the next
    /// request and keeps the key's usage: quotas are counted per key, not per plan.
    pub async fn update_key(&self, id: &str, change: KeyChange) -> Result<ApiKey, StateError> {
        let _write = self.writes.lock().await;
        let target = id.to_string();
        let key = self
            .blocking(move |c| {
                let mut key = c
                    .get_key(&target)?
                    .ok_or_else(|| StateError::NotFound(format!("key {target}")))?;
                if let Some(plan) = change.plan {
                    key.plan = plan;
                }
                if let Some(expires_at) = change.expires_at {
                    key.expires_at = expires_at;
                }
                if let Some(routes) = change.routes {
                    key.allowed_routes = routes;
                }
                c.update_key(&key)?;
                Ok(key)
            })
            .await?;
        let data = self.write_data();
        self.keys.upsert(&key, &data, DEFAULT_PLAN);
        Ok(key)
    }

    /// Revokes a key on every node; `NotFound` when there is none.
    pub async fn revoke_key(&self, id: &str) -> Result<(), StateError> {
        let _write = self.writes.lock().await;
        let target = id.to_string();
        let key = self
            .blocking(move |c| {
                c.revoke_key(&target)?;
                c.get_key(&target)
            })
            .await?
            .ok_or_else(|| StateError::NotFound(format!("key {id}")))?;
        let data = self.write_data();
        self.keys.upsert(&key, &data, DEFAULT_PLAN);
        Ok(())
    }
}

/// Whether a caller-chosen id is safe in URLs, KV keys and logs.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::limits::window::Clock;
    use crate::metrics::Metrics;
    use crate::state::{Backends, MemoryBackend};

    fn config() -> crate::config::Config {
        let dir = std::env::temp_dir();
        crate::config::parse(
            &dir.join("catalog-test.toml"),
            "[upstreams.api]\nendpoints = [\"127.0.0.1:9\"]\n\n[[routes]]\nname = \"r\"\npath = \"/\"\nupstream = \"api\"\nauth = [\"api_key\"]\n\n[plans.free]\ndaily = 5\n",
        )
        .unwrap()
    }

    async fn gateway() -> Arc<Gateway> {
        let memory = Arc::new(MemoryBackend::default());
        let backends = Backends {
            catalog: memory.clone(),
            usage: memory,
            replica: None,
        };
        Gateway::new(
            config(),
            Arc::new(Metrics::default()),
            1,
            backends,
            Clock::default(),
            None,
        )
        .await
        .unwrap()
    }

    fn key(id: &str, consumer: &str, secret: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            consumer: consumer.into(),
            plan: None,
            hash: crate::auth::hash_key(secret),
            prefix: "tg_live_abcd".into(),
            created_at: 0,
            expires_at: None,
            allowed_routes: vec![],
            revoked: false,
        }
    }

    #[tokio::test]
    async fn writes_reach_the_request_path_tables() {
        let gateway = gateway().await;
        gateway
            .create_consumer(Consumer {
                id: "acme".into(),
                plan: Some("free".into()),
                created_at: 0,
            })
            .await
            .unwrap();
        gateway
            .create_key(key("key_1", "acme", "tg_live_secret"))
            .await
            .unwrap();
        let hash = crate::auth::hash_key("tg_live_secret");
        assert_eq!(&*gateway.keys.get(&hash).unwrap().plan, "free");
        // The consumer's plan changes: its keys follow it.
        gateway
            .put_plan(Plan {
                name: "pro".into(),
                rate_per_second: None,
                burst: None,
                daily: Some(1000),
                monthly: None,
                groups: Default::default(),
                on_partition: None,
                partition_allowance: None,
            })
            .await
            .unwrap();
        assert_eq!(gateway.with_plans(|plans| plans.get("pro").unwrap().daily), Some(1000));
        let consumer = gateway
            .set_consumer_plan("acme", Some(Some("pro".into())))
            .await
            .unwrap();
        assert_eq!(consumer.plan.as_deref(), Some("pro"));
        assert_eq!(&*gateway.keys.get(&hash).unwrap().plan, "pro");
        // A key's own plan wins over its consumer's.
        let change = KeyChange {
            plan: Some(Some("free".into())),
            ..Default::default()
        };
        assert_eq!(
            gateway.update_key("key_1", change).await.unwrap().plan.as_deref(),
            Some("free")
        );
        assert_eq!(&*gateway.keys.get(&hash).unwrap().plan, "free");
        gateway.revoke_key("key_1").await.unwrap();
        assert!(gateway.keys.get(&hash).unwrap().revoked);
        assert!(matches!(
            gateway.revoke_key("key_9").await,
            Err(StateError::NotFound(_))
        ));
        // Deleting a consumer revokes its keys.
        gateway.create_key(key("key_2", "acme", "tg_live_other")).await.unwrap();
        gateway.delete_consumer("acme").await.unwrap();
        assert!(
            gateway
                .keys
                .get(&crate::auth::hash_key("tg_live_other"))
                .unwrap()
                .revoked
        );
        assert!(gateway.consumer("acme").is_none());
        gateway.delete_plan("pro").await.unwrap();
        assert!(
            gateway.with_plans(|plans| plans.get("pro").is_none()),
            "a deleted plan is no plan"
        );
    }

    #[tokio::test]
    async fn readers_do_not_wait_for_a_write_in_progress() {
        let gateway = gateway().await;
        // A write holds the write lock across its catalog call; reads do not take it.
        let _write = gateway.writes.lock().await;
        assert!(gateway.consumers().is_empty());
        assert!(gateway.effective_plans().contains_key("free"));
        assert!(gateway.list_keys().await.unwrap().is_empty());
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("jane@example.com") && valid_id("a-b_c.1"));
        assert!(!valid_id("") && !valid_id("a b") && !valid_id(&"x".repeat(129)) && !valid_id("a/b"));
    }
}
