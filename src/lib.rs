//! Tollgate: a self-hosted API gateway for metered APIs.
pub mod config;
