//! Tollgate: a self-hosted API gateway for metered APIs. The modules follow the request
//! path and its layers; docs/architecture.md has the module map and which may import
//! which.
pub mod admin;
pub mod auth;
pub mod base;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod limits;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod router;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod usage;
