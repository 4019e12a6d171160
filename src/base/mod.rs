//! Primitives every layer may use and that use nothing else of the crate: the request
//! path's error kind and its JSON body, deadlines, the shutdown signal, the state a
//! connection shares with its responses, request ids and durations, HTTP/1.1 wire helpers (docs/architecture.md,
//! "Modules").

pub mod armed;
pub mod conn;
pub mod deadline;
pub mod error;
pub mod http1;
pub mod json;
pub mod shutdown;
pub mod sock;
pub mod time;

pub use conn::{ConnPhase, ConnStreams, Phase, StreamGuard};
pub use deadline::Deadline;
pub use error::{ErrorKind, ErrorSource, ProxyError, RequestId, error_body, new_request_id, raw_error_response};
pub use shutdown::{Shutdown, stopped, stopped_armed};
