//! `limit_filter`: the caller's plan decided and counted in memory, with no I/O.

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
        let plans = self.gateway.plans();
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
                let ip = snapshot.anonymous_by_ip.then_some(SubjectRef::Ip(ctx.caller_ip));
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
        let group = plan.group(route.group.as_deref());
        let outcome = usage.table.admit(&charges, plan, group, usage.clock.now());
        plan.decisions.record(outcome.as_ref().map(|_| ()).map_err(|r| r.kind));
        match outcome {
            Ok(status) => {
                ctx.limit = status;
                Ok(())
            }
            Err(rejection) => {
                ctx.limit = Some(rejection.status);
                ctx.retry_after = Some(rejection.retry_after);
                Err(ProxyError::new(match rejection.kind {
                    RejectKind::RateLimited => ErrorKind::RateLimited,
                    RejectKind::QuotaExceeded => ErrorKind::QuotaExceeded,
                }))
            }
        }
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
