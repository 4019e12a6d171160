//! `limit_filter`: the caller's plan decided and counted in memory, with no I/O.

use std::net::{IpAddr, Ipv6Addr};

use super::{Caller, RequestCtx, Worker};
use crate::base::{ErrorKind, ProxyError};
use crate::gateway::{Route, Snapshot};
use crate::limits::RejectKind;
use crate::model::SubjectRef;
use crate::usage::{Charge, Charges};

impl Worker {
    /// Charges the request to its subjects under the caller's plan: the key (or JWT
    /// consumer), or the client IP and Referer host of an anonymous caller. Refuses with
    /// 429 when a rate limit or quota is exhausted; nothing is charged then.
    pub(super) fn limit_filter(
        &self,
        snapshot: &Snapshot,
        route: &Route,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<(), ProxyError> {
        let usage = &self.gateway.usage;
        // Under this thread's copy of the plans, borrowed rather than loaded.
        self.gateway.with_plans(|plans| {
            let (plan, charges) = match &ctx.caller {
                Caller::Key { identity, .. } | Caller::Jwt(identity) => (
                    plans.get(&identity.plan),
                    Charges::One(Charge {
                        subject: SubjectRef::Key(&identity.key_id),
                        consumer: Some(&identity.consumer_id),
                        route: Some(&route.name),
                    }),
                ),
                Caller::Anonymous { referer_host } => {
                    let ip = snapshot
                        .anonymous_by_ip
                        .then(|| SubjectRef::Ip(client_network(ctx.caller_ip, snapshot.config.anonymous.ipv6_prefix)));
                    let referer = referer_host.as_deref().map(SubjectRef::Referer);
                    let charges = match anonymous_charges(ip, referer) {
                        Some(charges) => charges,
                        // Counted by neither (`by = []`, or Referer only and none sent).
                        None => return Ok(()),
                    };
                    (plans.get(&snapshot.config.anonymous.plan), charges)
                }
                Caller::Public => return Ok(()),
            };
            // An undefined plan is a configuration mistake: refused, never unlimited.
            let plan = plan.ok_or_else(|| ProxyError::new(ErrorKind::PlanNotFound))?;
            let group = plan.group(route.group.as_deref());
            let outcome = usage.table.admit(
                &charges,
                plan,
                group,
                usage.clock.at(ctx.decided_at.unwrap_or(ctx.start).into_std()),
            );
            plan.decisions.record(outcome.as_ref().map(|_| ()).map_err(|r| r.kind));
            match outcome {
                Ok(status) => {
                    ctx.limit = status;
                    Ok(())
                }
                Err(rejection) if rejection.kind == RejectKind::LeasePending => {
                    ctx.lease_pending = true;
                    Err(ProxyError::with_cause(
                        ErrorKind::StateUnavailable,
                        "no quota lease from the subject's authority in time".to_string(),
                    ))
                }
                Err(rejection) => {
                    ctx.limit = Some(rejection.status);
                    ctx.retry_after = Some(rejection.retry_after);
                    Err(ProxyError::new(match rejection.kind {
                        RejectKind::RateLimited => ErrorKind::RateLimited,
                        _ => ErrorKind::QuotaExceeded,
                    }))
                }
            }
        })
    }
}

/// The address an anonymous IPv6 caller is counted by: its network of `prefix` bits
/// (one subscriber usually holds a whole /64 and can rotate through it at will).
fn client_network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if prefix < 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        ip => ip,
    }
}

/// What an anonymous request is charged to: its IP and its Referer host, as configured
/// and present.
fn anonymous_charges<'a>(ip: Option<SubjectRef<'a>>, referer: Option<SubjectRef<'a>>) -> Option<Charges<'a>> {
    let charge = |subject| Charge {
        subject,
        consumer: None,
        route: None,
    };
    match (ip, referer) {
        (Some(ip), Some(referer)) => Some(Charges::Two(charge(ip), charge(referer))),
        (Some(subject), None) | (None, Some(subject)) => Some(Charges::One(charge(subject))),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_callers_are_counted_by_network() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(client_network(a, 64), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(client_network(a, 64), client_network(b, 64));
        assert_ne!(client_network(a, 128), client_network(b, 128));
        assert_eq!(client_network(a, 0), "::".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_network(v4, 64), v4);
    }

    #[test]
    fn anonymous_callers_are_charged_to_what_is_known_of_them() {
        let ip = SubjectRef::Ip("10.0.0.1".parse().unwrap());
        let referer = SubjectRef::Referer("shop.example");
        let subjects = |charges: Option<Charges<'_>>| match charges {
            Some(Charges::One(a)) => vec![a.subject.to_string()],
            Some(Charges::Two(a, b)) => vec![a.subject.to_string(), b.subject.to_string()],
            None => vec![],
        };
        assert_eq!(
            subjects(anonymous_charges(Some(ip), Some(referer))),
            ["ip:10.0.0.1", "referer:shop.example"]
        );
        assert_eq!(subjects(anonymous_charges(Some(ip), None)), ["ip:10.0.0.1"]);
        assert_eq!(
            subjects(anonymous_charges(None, Some(referer))),
            ["referer:shop.example"]
        );
        assert!(subjects(anonymous_charges(None, None)).is_empty());
    }
}
