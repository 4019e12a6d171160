//! Tollgate: a self-hosted API gateway for metered APIs.
pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod state;
pub mod upstream;
pub mod usage;
