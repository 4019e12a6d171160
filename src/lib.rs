//! Tollgate: a self-hosted API gateway for metered APIs.
pub mod config;
pub mod router;
pub mod upstream;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod admin;
pub mod cli;
