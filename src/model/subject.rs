//! Who a request is charged to, and which slice of their usage a counter holds.

use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use compact_str::CompactString;

/// Who a request is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    // Inline strings (up to 24 bytes, which key ids and most hosts fit): comparing a
    // stored subject reads the map's own bucket, not another allocation.
    Key(CompactString),
    Ip(IpAddr),
    Referer(CompactString),
}

/// A subject borrowed from the request: the request path finds counters with it and
/// allocates (or touches a shared reference count) only when a counter is created or
/// queued for the flusher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectRef<'a> {
    Key(&'a str),
    Ip(IpAddr),
    Referer(&'a str),
}

impl Hash for Subject {
    // Hashes as its borrowed form, so a map of `Subject`s is searched with `SubjectRef`s.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

impl hashbrown::Equivalent<Subject> for SubjectRef<'_> {
    fn equivalent(&self, key: &Subject) -> bool {
        *self == key.as_ref()
    }
}

impl From<&SubjectRef<'_>> for Subject {
    fn from(subject: &SubjectRef<'_>) -> Subject {
        match *subject {
            SubjectRef::Key(id) => Subject::Key(id.into()),
            SubjectRef::Ip(ip) => Subject::Ip(ip),
            SubjectRef::Referer(host) => Subject::Referer(host.into()),
        }
    }
}

impl SubjectRef<'_> {
    pub fn is_key(&self) -> bool {
        matches!(self, SubjectRef::Key(_))
    }
}

impl fmt::Display for SubjectRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectRef::Key(id) => write!(f, "key:{id}"),
            SubjectRef::Ip(ip) => write!(f, "ip:{ip}"),
            SubjectRef::Referer(host) => write!(f, "referer:{host}"),
        }
    }
}

impl Subject {
    pub fn parse(text: &str) -> Option<Subject> {
        let (kind, value) = text.split_once(':')?;
        if value.is_empty() {
            return None;
        }
        match kind {
            "key" => Some(Subject::Key(value.into())),
            "ip" => value.parse().ok().map(Subject::Ip),
            "referer" => Some(Subject::Referer(value.into())),
            _ => None,
        }
    }

    pub fn is_key(&self) -> bool {
        self.as_ref().is_key()
    }

    pub fn as_ref(&self) -> SubjectRef<'_> {
        match self {
            Subject::Key(id) => SubjectRef::Key(id),
            Subject::Ip(ip) => SubjectRef::Ip(*ip),
            Subject::Referer(host) => SubjectRef::Referer(host),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_ref().fmt(f)
    }
}

/// A counter's slice of a subject's usage. Stored and replicated as text: `""`,
/// `route:NAME` or `group:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every request of the subject.
    Total,
    /// One route's requests, for reports.
    Route(Arc<str>),
    /// One route group's requests, for the group's quotas.
    Group(Arc<str>),
}

impl Scope {
    /// The route (`group = false`) or route group named `name`.
    pub fn new(group: bool, name: &Arc<str>) -> Scope {
        if group {
            Scope::Group(name.clone())
        } else {
            Scope::Route(name.clone())
        }
    }

    /// Whether this is the route (or group) `name`; tries the shared name's pointer first
    /// (the common case on the request path: the route's own `Arc`).
    pub fn is(&self, group: bool, name: &Arc<str>) -> bool {
        match self {
            Scope::Route(r) if !group => Arc::ptr_eq(r, name) || r == name,
            Scope::Group(g) if group => Arc::ptr_eq(g, name) || g == name,
            _ => false,
        }
    }

    /// The route's name, for a route scope.
    pub fn route(&self) -> Option<&str> {
        match self {
            Scope::Route(name) => Some(name),
            _ => None,
        }
    }

    /// The stored form back; `None` for text no version of Tollgate writes.
    pub fn parse(text: &str) -> Option<Scope> {
        if text.is_empty() {
            return Some(Scope::Total);
        }
        match text.split_once(':')? {
            ("route", name) if !name.is_empty() => Some(Scope::Route(name.into())),
            ("group", name) if !name.is_empty() => Some(Scope::Group(name.into())),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Total => Ok(()),
            Scope::Route(name) => write!(f, "route:{name}"),
            Scope::Group(name) => write!(f, "group:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_scopes_read_back_what_they_print() {
        for text in ["key:key_1", "ip:10.0.0.1", "ip:2001:db8::1", "referer:example.com"] {
            assert_eq!(Subject::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Subject::parse("ip:not-an-ip"), None);
        assert_eq!(Subject::parse("key:"), None);
        assert_eq!(Subject::parse("user:x"), None);
        for text in ["", "route:lookup", "group:batch"] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Scope::parse("route:"), None);
        assert_eq!(Scope::parse("zone:x"), None);
        let name: Arc<str> = "lookup".into();
        assert!(Scope::new(false, &name).is(false, &name));
        assert!(!Scope::new(false, &name).is(true, &name));
        assert_eq!(Scope::Route(name.clone()).route(), Some("lookup"));
        assert_eq!(Scope::Total.route(), None);
    }
}
