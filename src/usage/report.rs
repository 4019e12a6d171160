//! Usage reports: parsing a report query and summing stored day slots into rows. Pure
//! functions over rows, so the admin API and the tests share them and no backend has to
//! know about grouping.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::limits::window;
use crate::model::{Scope, StoredRow, Subject};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Day,
    Month,
}

impl Window {
    fn label(self, day: u32) -> String {
        match self {
            Window::Day => window::format_day(day),
            Window::Month => window::format_month(window::month_of_day(day)),
        }
    }
}

/// Which stored rows a report reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeFilter {
    /// Every row (restoring counters at start).
    All,
    /// Per-subject totals.
    Total,
    /// Per-route rows (keys only).
    AnyRoute,
    /// The rows of the route of this name.
    Route(String),
}

/// What a backend scans for a report; the finer filtering and summing happen here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageScan {
    pub from_day: u32,
    pub to_day: u32,
    pub subject: Option<String>,
    /// `key:`, `ip:` or `referer:`.
    pub subject_prefix: Option<&'static str>,
    pub consumer: Option<String>,
    pub scope: ScopeFilter,
}

impl UsageScan {
    /// Whether a stored row is one this scan asks for (backends without a query language).
    pub fn matches(&self, stored: &StoredRow) -> bool {
        let row = &stored.row;
        (self.from_day..=self.to_day).contains(&row.day)
            && self.subject.as_ref().is_none_or(|s| *s == row.subject)
            && self.subject_prefix.is_none_or(|p| row.subject.starts_with(p))
            && self.consumer.as_ref().is_none_or(|c| Some(c) == row.consumer.as_ref())
            && match &self.scope {
                ScopeFilter::All => true,
                ScopeFilter::Total => row.scope == Scope::Total,
                ScopeFilter::AnyRoute => row.scope.route().is_some(),
                ScopeFilter::Route(route) => row.scope.route() == Some(route.as_str()),
            }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GroupBy {
    pub subject: bool,
    pub consumer: bool,
    pub route: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub window: Window,
    pub scan: UsageScan,
    pub group_by: GroupBy,
    pub csv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportRow {
    pub window: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub requests: u64,
}

fn parse_window(value: &str) -> Result<Window, String> {
    match value {
        "day" => Ok(Window::Day),
        "month" => Ok(Window::Month),
        _ => Err(format!("parameter `window`: expected `day` or `month`, got {value:?}")),
    }
}

/// A day, or for `end` the last day of a month given as `YYYY-MM`.
fn parse_date(name: &str, value: &str, end: bool) -> Result<u32, String> {
    if let Some(day) = window::parse_day(value) {
        return Ok(day);
    }
    if let Some(month) = window::parse_month(value) {
        return Ok(if end {
            window::month_start(month + 1) - 1
        } else {
            window::month_start(month)
        });
    }
    Err(format!(
        "parameter `{name}`: {value:?} is not a date (YYYY-MM-DD or YYYY-MM)"
    ))
}

/// Longest range one report may cover.
const MAX_DAYS: u32 = 800;

/// Parses `GET /v1/usage` parameters. Unknown parameters are errors, not ignored.
/// `group_by=subject,consumer,route` (`key` is `subject`).
fn parse_group_by(value: &str) -> Result<GroupBy, String> {
    let mut by = GroupBy::default();
    for field in value.split(',').filter(|f| !f.is_empty()) {
        match field {
            "subject" | "key" => by.subject = true,
            "consumer" => by.consumer = true,
            "route" => by.route = true,
            other => {
                return Err(format!(
                    "parameter `group_by`: unknown field {other:?} (subject, consumer, route)"
                ));
            }
        }
    }
    Ok(by)
}

/// `kind=key|ip|referer`, as a subject prefix.
fn parse_kind(value: &str) -> Result<&'static str, String> {
    match value {
        "key" => Ok("key:"),
        "ip" => Ok("ip:"),
        "referer" => Ok("referer:"),
        other => Err(format!("parameter `kind`: expected key, ip or referer, got {other:?}")),
    }
}

/// `format=csv` (true) or `format=json`.
fn parse_csv(value: &str) -> Result<bool, String> {
    match value {
        "csv" => Ok(true),
        "json" => Ok(false),
        other => Err(format!("parameter `format`: expected `json` or `csv`, got {other:?}")),
    }
}

pub fn parse_query(pairs: &[(String, String)], today: u32) -> Result<UsageQuery, String> {
    let mut window = Window::Day;
    let mut from = None;
    let mut to = None;
    let mut subject = None;
    let mut consumer = None;
    let mut route = None;
    let mut group_by = None;
    let mut csv = false;
    for (name, value) in pairs {
        match name.as_str() {
            "window" => window = parse_window(value)?,
            "from" => from = Some(parse_date("from", value, false)?),
            "to" => to = Some(parse_date("to", value, true)?),
            "subject" => {
                Subject::parse(value).ok_or_else(|| {
                    format!("parameter `subject`: {value:?} is not `key:ID`, `ip:ADDRESS` or `referer:HOST`")
                })?;
                subject = Some(value.clone());
            }
            "key" if !value.is_empty() => subject = Some(format!("key:{value}")),
            "consumer" if !value.is_empty() => consumer = Some(value.clone()),
            "route" if !value.is_empty() => route = Some(value.clone()),
            "group_by" => group_by = Some(parse_group_by(value)?),
            "format" => csv = parse_csv(value)?,
            "key" | "consumer" | "route" => return Err(format!("parameter `{name}` is empty")),
            other => {
                return Err(format!(
                    "unknown parameter `{other}` (window, from, to, subject, key, consumer, route, group_by, format)"
                ));
            }
        }
    }
    let to = to.unwrap_or(today);
    let from = from.unwrap_or_else(|| window::month_start(window::month_of_day(to)));
    if from > to {
        return Err("parameter `from` is after `to`".into());
    }
    if to - from >= MAX_DAYS {
        return Err(format!("a report covers at most {MAX_DAYS} days"));
    }
    let group_by = group_by.unwrap_or(GroupBy {
        subject: true,
        consumer: consumer.is_some(),
        route: route.is_some(),
    });
    let scope = match &route {
        Some(route) => ScopeFilter::Route(route.clone()),
        None if group_by.route => ScopeFilter::AnyRoute,
        None => ScopeFilter::Total,
    };
    // Consumers own keys; an anonymous request is charged to its IP *and* its Referer, so
    // counting those under a consumer column would count it twice.
    let subject_prefix = (group_by.consumer || consumer.is_some()).then_some("key:");
    Ok(UsageQuery {
        window,
        scan: UsageScan {
            from_day: from,
            to_day: to,
            subject,
            subject_prefix,
            consumer,
            scope,
        },
        group_by,
        csv,
    })
}

type GroupKey = (String, Option<String>, Option<String>, Option<String>);

/// Sums every node's slots into one row per window and requested grouping, in window
/// order, then by most requests.
pub fn aggregate(rows: impl IntoIterator<Item = StoredRow>, query: &UsageQuery) -> Vec<ReportRow> {
    let by = query.group_by;
    let mut sums: BTreeMap<GroupKey, u64> = BTreeMap::new();
    for stored in rows {
        let row = stored.row;
        let key = (
            query.window.label(row.day),
            by.subject.then(|| row.subject.clone()),
            by.consumer.then(|| row.consumer.clone().unwrap_or_default()),
            by.route.then(|| row.scope.route().unwrap_or_default().to_string()),
        );
        *sums.entry(key).or_default() += row.count;
    }
    let mut out: Vec<ReportRow> = sums
        .into_iter()
        .map(|((window, subject, consumer, route), requests)| ReportRow {
            window,
            subject,
            consumer,
            route,
            requests,
        })
        .collect();
    out.sort_by(|a, b| a.window.cmp(&b.window).then(b.requests.cmp(&a.requests)));
    out
}

/// The `limit` rows with most requests.
pub fn top(mut rows: Vec<ReportRow>, limit: usize) -> Vec<ReportRow> {
    rows.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.subject.cmp(&b.subject)));
    rows.truncate(limit);
    rows
}

/// Parameters of `GET /v1/usage/top`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopQuery {
    pub query: UsageQuery,
    pub limit: usize,
}

/// Parses `GET /v1/usage/top`: the busiest subjects (or consumers) of one window.
pub fn parse_top(pairs: &[(String, String)], today: u32) -> Result<TopQuery, String> {
    let mut window = Window::Day;
    let mut date = None;
    let mut limit = 20;
    let mut by_consumer = false;
    let mut prefix = None;
    let mut csv = false;
    for (name, value) in pairs {
        match name.as_str() {
            "window" => window = parse_window(value)?,
            "date" => date = Some(value.clone()),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| format!("parameter `limit`: expected 1..=10000, got {value:?}"))?;
            }
            "by" => match value.as_str() {
                "subject" => by_consumer = false,
                "consumer" => by_consumer = true,
                other => {
                    return Err(format!(
                        "parameter `by`: expected `subject` or `consumer`, got {other:?}"
                    ));
                }
            },
            "kind" => prefix = Some(parse_kind(value)?),
            "format" => csv = parse_csv(value)?,
            other => {
                return Err(format!(
                    "unknown parameter `{other}` (window, date, limit, by, kind, format)"
                ));
            }
        }
    }
    let (from, to) = match (window, date) {
        (Window::Day, None) => (today, today),
        (Window::Month, None) => (window::month_start(window::month_of_day(today)), today),
        (Window::Day, Some(date)) => {
            let day = window::parse_day(&date)
                .ok_or_else(|| format!("parameter `date`: {date:?} is not a day (YYYY-MM-DD)"))?;
            (day, day)
        }
        (Window::Month, Some(date)) => {
            let month = window::parse_month(&date)
                .ok_or_else(|| format!("parameter `date`: {date:?} is not a month (YYYY-MM)"))?;
            (window::month_start(month), window::month_start(month + 1) - 1)
        }
    };
    if by_consumer {
        prefix = Some("key:");
    }
    Ok(TopQuery {
        query: UsageQuery {
            window,
            scan: UsageScan {
                from_day: from,
                to_day: to,
                subject: None,
                subject_prefix: prefix,
                consumer: None,
                scope: ScopeFilter::Total,
            },
            group_by: GroupBy {
                subject: !by_consumer,
                consumer: by_consumer,
                route: false,
            },
            csv,
        },
        limit,
    })
}

fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// The rows as CSV with a header line; only the grouped columns appear.
pub fn to_csv(rows: &[ReportRow], by: GroupBy) -> String {
    let mut out = String::from("window");
    for (on, name) in [(by.subject, "subject"), (by.consumer, "consumer"), (by.route, "route")] {
        if on {
            out.push(',');
            out.push_str(name);
        }
    }
    out.push_str(",requests\n");
    for row in rows {
        out.push_str(&row.window);
        for value in [&row.subject, &row.consumer, &row.route].into_iter().flatten() {
            out.push(',');
            csv_field(&mut out, value);
        }
        let _ = writeln!(out, ",{}", row.requests);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UsageRow;

    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn day(text: &str) -> u32 {
        window::parse_day(text).unwrap()
    }

    fn stored(subject: &str, consumer: Option<&str>, scope: &str, date: &str, node: &str, count: u64) -> StoredRow {
        StoredRow {
            row: UsageRow {
                subject: subject.into(),
                consumer: consumer.map(Into::into),
                scope: Scope::parse(scope).unwrap(),
                day: day(date),
                count,
            },
            node: node.into(),
        }
    }

    #[test]
    fn parses_and_rejects_parameters() {
        let today = day("2026-11-23");
        let q = parse_query(&pairs("subject=key:k1&window=month&from=2026-01&to=2026-02"), today).unwrap();
        assert_eq!(q.window, Window::Month);
        assert_eq!((q.scan.from_day, q.scan.to_day), (day("2026-01-01"), day("2026-02-28")));
        assert_eq!(q.scan.subject.as_deref(), Some("key:k1"));
        let q = parse_query(&[], today).unwrap();
        assert_eq!((q.scan.from_day, q.scan.to_day), (day("2026-11-01"), today));
        assert_eq!(q.scan.scope, ScopeFilter::Total);
        let q = parse_query(&pairs("consumer=acme&group_by=consumer,route&format=csv"), today).unwrap();
        assert!(q.csv && q.group_by.route && q.group_by.consumer && !q.group_by.subject);
        assert_eq!(q.scan.scope, ScopeFilter::AnyRoute);
        let q = parse_query(&pairs("route=lookup"), today).unwrap();
        assert_eq!(q.scan.scope, ScopeFilter::Route("lookup".into()));

        for (bad, mentions) in [
            ("colour=red", "unknown parameter `colour`"),
            ("from=2026-02-30", "`from`"),
            ("to=yesterday", "`to`"),
            ("window=week", "`window`"),
            ("subject=user:1", "`subject`"),
            ("from=2026-11-20&to=2026-11-01", "after"),
            ("from=2020-01-01&to=2026-01-01", "at most"),
            ("group_by=planet", "`group_by`"),
            ("format=xml", "`format`"),
            ("key=", "empty"),
        ] {
            let error = parse_query(&pairs(bad), today).unwrap_err();
            assert!(error.contains(mentions), "{bad}: {error}");
        }
        assert!(parse_top(&pairs("limit=0"), today).is_err());
        assert!(parse_top(&pairs("date=2026-13"), today).is_err());
        assert!(parse_top(&pairs("window=month&date=2026-13"), today).is_err());
        assert!(
            parse_top(&pairs("since=now"), today)
                .unwrap_err()
                .contains("unknown parameter")
        );
        let top = parse_top(&pairs("window=month&date=2028-02&kind=ip&limit=5"), today).unwrap();
        assert_eq!(top.query.scan.to_day, day("2028-02-29"));
        assert_eq!((top.query.scan.subject_prefix, top.limit), (Some("ip:"), 5));
    }

    #[test]
    fn sums_nodes_days_and_routes() {
        let rows = vec![
            stored("key:a", Some("acme"), "", "2026-11-01", "n1", 5),
            stored("key:a", Some("acme"), "", "2026-11-01", "n2", 7),
            stored("key:a", Some("acme"), "", "2026-11-02", "n1", 1),
            stored("key:b", Some("acme"), "", "2026-11-02", "n1", 10),
            stored("ip:10.0.0.1", None, "", "2026-11-02", "n1", 3),
        ];
        let today = day("2026-11-23");
        let by_day = aggregate(rows.clone(), &parse_query(&[], today).unwrap());
        let flat: Vec<_> = by_day
            .iter()
            .map(|r| (r.window.as_str(), r.subject.as_deref().unwrap(), r.requests))
            .collect();
        assert_eq!(
            flat,
            vec![
                ("2026-11-01", "key:a", 12),
                ("2026-11-02", "key:b", 10),
                ("2026-11-02", "ip:10.0.0.1", 3),
                ("2026-11-02", "key:a", 1)
            ]
        );
        let monthly = aggregate(
            rows.clone(),
            &parse_query(&pairs("window=month&group_by=consumer"), today).unwrap(),
        );
        assert_eq!(monthly.len(), 2);
        assert_eq!(monthly[0].consumer.as_deref(), Some("acme"));
        assert_eq!(monthly[0].requests, 23);
        assert_eq!(monthly[1].consumer.as_deref(), Some(""));

        let q = parse_query(&pairs("group_by=subject,route&format=csv"), today).unwrap();
        let routed = vec![
            stored("key:a", Some("acme"), "route:lookup", "2026-11-01", "n1", 4),
            stored("key:a", Some("acme"), "route:batch,x", "2026-11-01", "n1", 2),
        ];
        let csv = to_csv(&aggregate(routed, &q), q.group_by);
        assert_eq!(
            csv,
            "window,subject,route,requests\n2026-11-01,key:a,lookup,4\n2026-11-01,key:a,\"batch,x\",2\n"
        );
        let top = top(by_day, 2);
        assert_eq!(top.iter().map(|r| r.requests).collect::<Vec<_>>(), vec![12, 10]);
    }
}
