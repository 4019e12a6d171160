//! The customer usage page (docs/customer-usage.md): a caller presents their own API key
//! at `[usage_page] path` and sees their plan, today's and this month's usage against its
//! quotas, when each resets, and the last 30 days — HTML for a browser, JSON when asked
//! (`Accept: application/json` or `?format=json`). It is charged to no quota; page views
//! are rate-limited per key. It shows the key's own usage and nothing of anyone else's.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, header};
use serde::Serialize;

use super::{Caller, Credentials, Head, ProxyBody, RequestCtx, Worker, presented_credentials};
use crate::auth::{self, Identity};
use crate::base::http1::field_text;
use crate::base::{ErrorKind, ProxyError};
use crate::gateway::{Snapshot, UsagePage};
use crate::limits::window::{self, Calendar};
use crate::usage::report::{self, ReportRow};

/// Days in the page's chart, today included.
const DAYS: u32 = 30;

/// Whether this request is for the page: its path, normalized as routes see it.
pub(super) fn requested(page: &UsagePage, head: Head<'_>, snapshot: &Snapshot) -> bool {
    let raw = head.uri.path();
    if raw == page.path {
        return true;
    }
    // Only paths that can normalize to it are normalized here (the route phase does it
    // again for everything else).
    raw.len() >= page.path.len()
        && matches!(crate::router::normalize(raw, &snapshot.path_rules), Ok(Some(normal)) if normal == page.path)
}

#[derive(Debug, Serialize)]
pub struct PageData {
    pub key: String,
    pub consumer: String,
    pub plan: PlanView,
    pub today: WindowUse,
    pub month: WindowUse,
    /// The last 30 days, oldest first, today last.
    pub days: Vec<DayUse>,
    /// Some region's usage was not heard from recently: the numbers may be behind.
    pub stale: bool,
    pub generated_at: String,
}

#[derive(Debug, Serialize)]
pub struct PlanView {
    pub name: String,
    /// Whether a plan of that name exists (calls are refused while it does not).
    pub defined: bool,
    pub rate_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct WindowUse {
    /// `YYYY-MM-DD` or `YYYY-MM` (UTC).
    pub window: String,
    pub used: u64,
    pub quota: Option<u64>,
    pub remaining: Option<u64>,
    pub resets_at: String,
    pub resets_in_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct DayUse {
    pub date: String,
    pub requests: u64,
}

impl Worker {
    /// Instead of `request_filter` for the page: the key (any of the places the proxy
    /// reads one), then the page's own rate limit.
    pub(super) fn usage_page_filter(
        &self,
        page: &UsagePage,
        ctx: &mut RequestCtx<'_>,
        head: Head<'_>,
    ) -> Result<(), ProxyError> {
        ctx.usage_page = true;
        if !matches!(*head.method, Method::GET | Method::HEAD) {
            ctx.allow = Some(HeaderValue::from_static("GET, HEAD"));
            return Err(ProxyError::new(ErrorKind::MethodNotAllowed));
        }
        let (key, source) = match presented_credentials(true, false, head) {
            Credentials::Key(key, source) => (key, source),
            _ => return Err(ProxyError::new(ErrorKind::MissingCredentials)),
        };
        let identity = ctx
            .conn
            .with_key_memo(|memo| auth::authenticate_key(&self.gateway.keys, Some(key), auth::unix_now, memo))
            .map_err(|e| self.key_refused(e))?;
        let now = self.gateway.usage.clock.now();
        let admitted = self.gateway.usage_page_rate.admit(&page.rate, &identity.key_id, now);
        ctx.caller = Caller::Key { identity, source };
        match admitted {
            Ok(status) => {
                ctx.limit = Some(status);
                Ok(())
            }
            Err(rejection) => {
                ctx.limit = Some(rejection.status);
                ctx.retry_after = Some(rejection.retry_after);
                Err(ProxyError::new(ErrorKind::RateLimited))
            }
        }
    }

    /// The page for the identified caller.
    pub(super) async fn usage_page(
        &self,
        ctx: &RequestCtx<'_>,
        head: Head<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let identity = ctx.identity().ok_or_else(|| ProxyError::new(ErrorKind::Internal))?;
        let data = self.page_data(identity).await?;
        let (body, content_type, policy) = if wants_json(head) {
            let json =
                serde_json::to_vec(&data).map_err(|e| ProxyError::with_cause(ErrorKind::Internal, e.to_string()))?;
            (json, "application/json", None)
        } else {
            // No script at all; the style sheet is inline.
            let policy = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
            (
                render_html(&data).into_bytes(),
                "text/html; charset=utf-8",
                Some(policy),
            )
        };
        let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        // One caller's numbers: never kept by a shared cache.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
        headers.insert(
            header::VARY,
            HeaderValue::from_static("Accept, Authorization, X-API-Key"),
        );
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        if let Some(policy) = policy {
            headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(policy));
        }
        Ok(response)
    }

    async fn page_data(&self, identity: &Identity) -> Result<PageData, ProxyError> {
        let usage = &self.gateway.usage;
        let now = usage.clock.now();
        let today = now.day();
        let calendar = Calendar::of(now);
        let key = identity.key_id.to_string();
        let first = today.saturating_sub(DAYS - 1);
        let days_query = report::parse_query(
            &[
                ("key".into(), key.clone()),
                ("from".into(), window::format_day(first)),
                ("to".into(), window::format_day(today)),
            ],
            today,
        );
        let month_query = report::parse_query(
            &[
                ("key".into(), key.clone()),
                ("window".into(), "month".into()),
                ("to".into(), window::format_day(today)),
            ],
            today,
        );
        let (Ok(days_query), Ok(month_query)) = (days_query, month_query) else {
            return Err(ProxyError::new(ErrorKind::Internal));
        };
        let unavailable =
            |e: &dyn std::fmt::Display| ProxyError::with_cause(ErrorKind::StateUnavailable, e.to_string());
        let days_rows = usage.report(&days_query).await.map_err(|e| unavailable(&e))?;
        let month_rows = usage.report(&month_query).await.map_err(|e| unavailable(&e))?;
        let plan = self.gateway.effective_plan(&identity.plan);
        let plan = PlanView {
            name: identity.plan.to_string(),
            defined: plan.is_some(),
            rate_per_second: plan.as_ref().and_then(|p| p.rate_per_second),
            burst: plan.as_ref().and_then(|p| p.burst.or(p.rate_per_second)),
            daily: plan.as_ref().and_then(|p| p.daily),
            monthly: plan.as_ref().and_then(|p| p.monthly),
        };
        Ok(build(
            identity,
            plan,
            &days_rows,
            &month_rows,
            (now.secs(), today, calendar),
            !usage.stale_regions().is_empty(),
        ))
    }
}

/// The page's numbers from the report rows: pure, so tested without a gateway.
fn build(
    identity: &Identity,
    plan: PlanView,
    days_rows: &[ReportRow],
    month_rows: &[ReportRow],
    (now_secs, today, calendar): (u64, u32, Calendar),
    stale: bool,
) -> PageData {
    let sum = |rows: &[ReportRow], window: &str| -> u64 {
        rows.iter().filter(|r| r.window == window).map(|r| r.requests).sum()
    };
    let first = today.saturating_sub(DAYS - 1);
    let days: Vec<DayUse> = (first..=today)
        .map(|day| {
            let date = window::format_day(day);
            DayUse {
                requests: sum(days_rows, &date),
                date,
            }
        })
        .collect();
    let month_label = window::format_month(window::month_of_day(today));
    let window_use = |window: String, used: u64, quota: Option<u64>, end: u64| WindowUse {
        window,
        used,
        quota,
        remaining: quota.map(|q| q.saturating_sub(used)),
        resets_at: window::format_timestamp(end),
        resets_in_seconds: end.saturating_sub(now_secs),
    };
    let today_used = days.last().map_or(0, |d| d.requests);
    PageData {
        key: identity.key_id.to_string(),
        consumer: identity.consumer_id.to_string(),
        today: window_use(window::format_day(today), today_used, plan.daily, calendar.day_end),
        month: window_use(
            month_label.clone(),
            sum(month_rows, &month_label),
            plan.monthly,
            calendar.month_end,
        ),
        plan,
        days,
        stale,
        generated_at: window::format_timestamp(now_secs),
    }
}

/// JSON for `Accept: application/json` (unless HTML is asked for as well) or
/// `?format=json`; HTML otherwise.
fn wants_json(head: Head<'_>) -> bool {
    let query_json = head
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair == "format=json"));
    let accept = head
        .fields
        .get_all(&header::ACCEPT)
        .filter_map(field_text)
        .collect::<Vec<_>>()
        .join(",");
    query_json || (accept.contains("application/json") && !accept.contains("text/html"))
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn duration(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds % 86_400 / 3600, seconds % 3600 / 60);
    match (days, hours) {
        (0, 0) => format!("{} min", minutes.max(1)),
        (0, h) => format!("{h} h {minutes} min"),
        (d, h) => format!("{d} d {h} h"),
    }
}

fn meter(out: &mut String, title: &str, id: &str, usage: &WindowUse) {
    let share = match usage.quota {
        Some(q) if q > 0 => (usage.used as f64 / q as f64).min(1.0),
        _ => 0.0,
    };
    let class = if share >= 0.9 { "meter hot" } else { "meter" };
    let _ = write!(
        out,
        "<section class=\"window\" id=\"{id}\"><h2>{title} <small>{}</small></h2>",
        escape(&usage.window)
    );
    match usage.quota {
        Some(quota) => {
            let _ = write!(
                out,
                "<div class=\"{class}\"><div class=\"fill\" style=\"width:{:.1}%\"></div><span><b data-used=\"{}\">{}</b> of {} requests</span></div>\
                 <p>{} left · resets in {} (<time datetime=\"{}\">{}</time>)</p>",
                share * 100.0,
                usage.used,
                thousands(usage.used),
                thousands(quota),
                thousands(usage.remaining.unwrap_or(0)),
                duration(usage.resets_in_seconds),
                escape(&usage.resets_at),
                escape(&usage.resets_at.replace('T', " ").replace(":00Z", " UTC")),
            );
        }
        None => {
            let _ = write!(
                out,
                "<p><b data-used=\"{}\">{}</b> requests · no quota · period ends in {}</p>",
                usage.used,
                thousands(usage.used),
                duration(usage.resets_in_seconds)
            );
        }
    }
    out.push_str("</section>");
}

/// The 30-day bar chart, with the daily quota as a dashed line.
fn chart(out: &mut String, days: &[DayUse], daily: Option<u64>) {
    let (width, height, left, bottom, top) = (720.0, 200.0, 44.0, 22.0, 12.0);
    let peak = days
        .iter()
        .map(|d| d.requests)
        .max()
        .unwrap_or(0)
        .max(daily.unwrap_or(0))
        .max(1) as f64
        * 1.08;
    let y = |v: f64| top + (1.0 - v / peak) * (height - top - bottom);
    let slot = (width - left - 6.0) / days.len().max(1) as f64;
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"requests per day, last 30 days\" data-bars=\"{}\">",
        days.len()
    );
    for i in 0..=4 {
        let v = peak / 1.08 * f64::from(i) / 4.0;
        let _ = write!(
            out,
            "<line x1=\"{left}\" x2=\"{width}\" y1=\"{0:.1}\" y2=\"{0:.1}\" class=\"grid\"/><text x=\"{1}\" y=\"{2:.1}\" class=\"axis\" text-anchor=\"end\">{3}</text>",
            y(v),
            left - 6.0,
            y(v) + 4.0,
            thousands(v.round() as u64)
        );
    }
    for (i, day) in days.iter().enumerate() {
        let x = left + i as f64 * slot + slot * 0.15;
        let over = daily.is_some_and(|q| day.requests > q);
        let _ = write!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"2\" class=\"{}\" data-date=\"{}\" data-requests=\"{}\"><title>{}: {} requests</title></rect>",
            y(day.requests as f64),
            slot * 0.7,
            (y(0.0) - y(day.requests as f64)).max(0.0),
            if over { "bar over" } else { "bar" },
            day.date,
            day.requests,
            day.date,
            thousands(day.requests)
        );
        if i % 5 == 0 || i + 1 == days.len() {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\" text-anchor=\"middle\">{}</text>",
                x + slot * 0.35,
                height - 6.0,
                day.date.get(5..).unwrap_or("")
            );
        }
    }
    if let Some(quota) = daily {
        let _ = write!(
            out,
            "<line x1=\"{left}\" x2=\"{width}\" y1=\"{0:.1}\" y2=\"{0:.1}\" class=\"quota\"/><text x=\"{1}\" y=\"{2:.1}\" class=\"axis\" text-anchor=\"end\">daily quota {3}</text>",
            y(quota as f64),
            width - 4.0,
            y(quota as f64) - 4.0,
            thousands(quota)
        );
    }
    out.push_str("</svg>");
}

const STYLE: &str = "body{margin:0;font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;background:#f4f6fa;color:#1b2433}\
main{max-width:780px;margin:32px auto;padding:0 16px}header{display:flex;justify-content:space-between;align-items:baseline;flex-wrap:wrap;gap:8px}\
h1{font-size:22px;margin:0}h2{font-size:15px;margin:0 0 8px;color:#1f3a5f}h2 small{color:#66728a;font-weight:400}\
.card{background:#fff;border:1px solid #e3e8f0;border-radius:12px;padding:18px 20px;margin-top:16px}\
.muted,p{color:#66728a}p{margin:6px 0 0}.plan b{color:#1b2433}.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}\
.meter{position:relative;height:30px;border-radius:8px;background:#edf1f7;overflow:hidden}.meter .fill{position:absolute;inset:0 auto 0 0;background:#9cc0ff}\
.meter.hot .fill{background:#f3a3a3}.meter span{position:relative;padding:0 10px;line-height:30px;color:#1b2433}\
.stale{background:#fff5e5;border:1px solid #f5d9a8;color:#8a5300;border-radius:8px;padding:8px 12px;margin-top:16px}\
svg{width:100%;height:auto}.grid line,line.grid{stroke:#edf0f5}.axis{fill:#8591a7;font-size:11px}.bar{fill:#2f6fde}.bar.over{fill:#d64545}\
line.quota{stroke:#d64545;stroke-width:1.5;stroke-dasharray:6 4}footer{margin:16px 0;color:#8591a7;font-size:12px}";

/// The page as HTML: no script, every value escaped.
pub fn render_html(data: &PageData) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>API usage · {key}</title><style>{STYLE}</style></head><body><main>\
         <header><h1>Your API usage</h1><span class=\"muted\">key <code id=\"key\">{key}</code> · {consumer}</span></header>",
        key = escape(&data.key),
        consumer = escape(&data.consumer),
    );
    if data.stale {
        out.push_str("<div class=\"stale\" id=\"stale\">Some regions have not reported recently: these numbers may be a little behind.</div>");
    }
    let plan = &data.plan;
    let _ = write!(
        out,
        "<div class=\"card plan\" id=\"plan\"><h2>Plan <b>{}</b></h2><p>",
        escape(&plan.name)
    );
    if !plan.defined {
        out.push_str("This plan is not defined: calls with this key are refused. Contact the API provider.");
    } else {
        let mut parts = Vec::new();
        if let Some(rate) = plan.rate_per_second {
            parts.push(format!(
                "{} requests/s (bursts of {})",
                thousands(u64::from(rate)),
                thousands(u64::from(plan.burst.unwrap_or(rate)))
            ));
        }
        if let Some(daily) = plan.daily {
            parts.push(format!("{} requests a day", thousands(daily)));
        }
        if let Some(monthly) = plan.monthly {
            parts.push(format!("{} requests a month", thousands(monthly)));
        }
        if parts.is_empty() {
            parts.push("no limits".to_string());
        }
        out.push_str(&escape(&parts.join(" · ")));
    }
    out.push_str("</p></div><div class=\"card grid\">");
    meter(&mut out, "Today", "today", &data.today);
    meter(&mut out, "This month", "month", &data.month);
    out.push_str("</div><div class=\"card\"><h2>Last 30 days <small>requests per day (UTC)</small></h2>");
    chart(&mut out, &data.days, data.plan.daily);
    let _ = write!(
        out,
        "</div><footer>Updated {} · the same numbers as JSON: send <code>Accept: application/json</code>.</footer></main></body></html>",
        escape(&data.generated_at)
    );
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::limits::window::{Now, parse_day};

    fn row(window: &str, requests: u64) -> ReportRow {
        ReportRow {
            window: window.into(),
            subject: Some("key:k1".into()),
            consumer: Some("acme".into()),
            route: None,
            requests,
        }
    }

    fn plan(daily: Option<u64>) -> PlanView {
        PlanView {
            name: "pro<b>".into(),
            defined: true,
            rate_per_second: Some(10),
            burst: Some(20),
            daily,
            monthly: Some(1000),
        }
    }

    fn data(daily: Option<u64>) -> PageData {
        let identity = Identity::new("k1".into(), Arc::from("acme & co"), Arc::from("pro"));
        let today = parse_day("2026-12-05").unwrap();
        let now = Now::from_secs(u64::from(today) * 86_400 + 3600);
        build(
            &identity,
            plan(daily),
            &[row("2026-12-05", 40), row("2026-11-20", 7), row("2026-10-01", 99)],
            &[row("2026-12", 45)],
            (now.secs(), today, Calendar::of(now)),
            false,
        )
    }

    #[test]
    fn thirty_days_end_today_and_windows_reset_at_utc_boundaries() {
        let page = data(Some(50));
        assert_eq!(page.days.len(), 30);
        assert_eq!(page.days[0].date, "2026-11-06");
        assert_eq!(page.days[29].date, "2026-12-05");
        assert_eq!(
            page.days.iter().map(|d| d.requests).sum::<u64>(),
            47,
            "October is outside"
        );
        assert_eq!(
            (page.today.used, page.today.quota, page.today.remaining),
            (40, Some(50), Some(10))
        );
        assert_eq!(page.today.resets_at, "2026-12-06T00:00:00Z");
        assert_eq!(page.today.resets_in_seconds, 23 * 3600);
        assert_eq!(
            (page.month.window.as_str(), page.month.used, page.month.remaining),
            ("2026-12", 45, Some(955))
        );
        assert_eq!(page.month.resets_at, "2027-01-01T00:00:00Z");
    }

    #[test]
    fn html_escapes_every_value_and_draws_the_quota_line() {
        let html = render_html(&data(Some(50)));
        assert!(html.contains("pro&lt;b&gt;") && !html.contains("pro<b>"));
        assert!(html.contains("acme &amp; co"));
        assert!(html.contains("class=\"quota\""));
        assert!(html.contains("data-bars=\"30\""));
        assert!(!html.contains("<script"));
        let no_quota = render_html(&data(None));
        assert!(!no_quota.contains("class=\"quota\""));
    }

    #[test]
    fn json_when_asked() {
        let request = |accept: Option<&str>, uri: &str| {
            let mut builder = http::Request::builder().uri(uri);
            if let Some(accept) = accept {
                builder = builder.header(header::ACCEPT, accept);
            }
            builder.body(()).unwrap()
        };
        let json = |r: &http::Request<()>| wants_json(Head::of(r));
        assert!(json(&request(Some("application/json"), "/usage")));
        assert!(json(&request(None, "/usage?format=json")));
        assert!(!json(&request(None, "/usage")));
        assert!(!json(&request(Some("*/*"), "/usage")));
        assert!(!json(&request(
            Some("text/html,application/xhtml+xml,application/json;q=0.9"),
            "/usage"
        )));
    }
}
