//! The protective limits counted in `tollgate_protections_total{limit}` (docs/security.md).

use crate::base::ErrorKind;

/// A protective limit that refused a request or closed a connection (docs/security.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `server.max_connections_per_ip`.
    ConnectionsPerIp,
    /// `server.max_connections` (per worker).
    ConnectionsPerWorker,
    /// `server.max_requests_per_connection`: the connection was closed after its last.
    RequestsPerConnection,
    /// A malformed request head or body framing (RFC 9112).
    Malformed,
    /// `header_read_timeout`.
    HeaderTimeout,
    /// `max_header_bytes`.
    HeaderSize,
    /// A route's `max_body_bytes`.
    BodySize,
    /// `client_body_timeout`.
    BodyTimeout,
    /// `send_timeout`: the client stopped reading the response.
    SendTimeout,
    /// HTTP/2 streams reset by the client before their response (rapid reset).
    PrematureResets,
    /// HTTP/2 connections with no stream for `idle_timeout`.
    Http2Idle,
    /// An `Upgrade` not in `server.upgrades`.
    UpgradeRefused,
    /// A tunnel (WebSocket) idle for `tunnel_idle_timeout`.
    TunnelIdle,
    /// A Referer host longer than `anonymous.max_referer_host`: counted by IP only.
    RefererTooLong,
}

impl Protection {
    pub const ALL: [Protection; 14] = [
        Protection::ConnectionsPerIp,
        Protection::ConnectionsPerWorker,
        Protection::RequestsPerConnection,
        Protection::Malformed,
        Protection::HeaderTimeout,
        Protection::HeaderSize,
        Protection::BodySize,
        Protection::BodyTimeout,
        Protection::SendTimeout,
        Protection::PrematureResets,
        Protection::Http2Idle,
        Protection::UpgradeRefused,
        Protection::TunnelIdle,
        Protection::RefererTooLong,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Protection::ConnectionsPerIp => "max_connections_per_ip",
            Protection::ConnectionsPerWorker => "max_connections",
            Protection::RequestsPerConnection => "max_requests_per_connection",
            Protection::Malformed => "malformed_request",
            Protection::HeaderTimeout => "header_read_timeout",
            Protection::HeaderSize => "max_header_bytes",
            Protection::BodySize => "max_body_bytes",
            Protection::BodyTimeout => "client_body_timeout",
            Protection::SendTimeout => "send_timeout",
            Protection::PrematureResets => "http2_premature_resets",
            Protection::Http2Idle => "http2_idle_timeout",
            Protection::UpgradeRefused => "upgrade_not_allowed",
            Protection::TunnelIdle => "tunnel_idle_timeout",
            Protection::RefererTooLong => "max_referer_host",
        }
    }

    /// The protection that answered a request with this error, if any.
    pub fn of_error(kind: ErrorKind) -> Option<Protection> {
        match kind {
            ErrorKind::BadRequest | ErrorKind::NotImplemented => Some(Protection::Malformed),
            ErrorKind::HeaderTimeout => Some(Protection::HeaderTimeout),
            ErrorKind::HeadersTooLarge => Some(Protection::HeaderSize),
            ErrorKind::PayloadTooLarge => Some(Protection::BodySize),
            ErrorKind::BodyTimeout => Some(Protection::BodyTimeout),
            _ => None,
        }
    }
}
