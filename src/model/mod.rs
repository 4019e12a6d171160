//! The domain types several layers share — plans, consumers, API keys, subjects, scopes
//! and usage rows — with no behaviour beyond parsing and printing themselves. This module
//! imports nothing else of the crate (docs/architecture.md, "Modules").

mod catalog;
mod subject;
mod usage;

pub use catalog::{ApiKey, Consumer, GroupQuota, PartitionMode, Plan, StateData};
pub use subject::{Scope, Subject, SubjectRef};
pub use usage::{StoredRow, UsageRow};
