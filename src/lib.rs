//! Tollgate: a self-hosted API gateway for metered APIs.
pub mod admin;
pub mod cli;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod upstream;
pub mod state;
pub mod auth;
