// The Tollgate operator console (docs/console.md). Plain script, no build step, no
// third-party code: every value shown is read from the admin API with the token typed
// into the login form, kept in this tab's sessionStorage. Values are put on the page as
// text (never as markup): subjects such as Referer hosts come from the open internet.
"use strict";

const TOKEN = "tollgate.token";
const state = { view: null, timer: null, upstreams: new Map(), changes: [], traffic: null, plans: [], consumers: [], keys: [] };

// ---------- helpers ----------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    // Through the CSSOM: the page's policy refuses inline style attributes.
    else if (name === "style") for (const rule of value.split(";")) { const [prop, val] = rule.split(":"); if (val) node.style.setProperty(prop.trim(), val.trim()); }
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en-US");
const num = (n) => (n === null || n === undefined ? "–" : fmt.format(n));
const fixed = (n, d) => (n === null || n === undefined ? "–" : Number(n).toFixed(d));
const pct = (r) => (r === null || r === undefined ? "–" : (r * 100).toFixed(r < 0.01 && r > 0 ? 2 : 1) + " %");
const clock = (secs) => new Date(secs * 1000).toISOString().slice(11, 19);
const dateOf = (secs) => (secs ? new Date(secs * 1000).toISOString().slice(0, 10) : "–");

function notice(message, kind) {
  const box = $("notice");
  box.textContent = message;
  box.className = "notice " + (kind || "error");
  box.hidden = !message;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options) {
  const init = Object.assign({ method: "GET", headers: {} }, options || {});
  init.headers = Object.assign({ Authorization: "Bearer " + (sessionStorage.getItem(TOKEN) || "") }, init.headers);
  if (init.json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.json);
    delete init.json;
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    signOut("The admin token was refused. Sign in again.");
    throw new ApiError(401, "unauthorized", "unauthorized");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "error", error.message || response.statusText);
  }
  return body;
}

function table(node, headers, rows, empty) {
  node.replaceChildren();
  node.append(el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, empty || "Nothing yet.")));
  for (const row of rows) body.append(row);
  node.append(body);
}

function card(label, value, hint, id) {
  return el("div", { class: "stat", "data-stat": id }, el("div", { class: "stat-label" }, label), el("div", { class: "stat-value" }, value), hint ? el("div", { class: "stat-hint muted" }, hint) : null);
}

// ---------- charts (SVG drawn here) ----------

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children.flat()) if (child) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function short(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(value >= 1e7 ? 0 : 1) + "M";
  if (value >= 1e3) return (value / 1e3).toFixed(value >= 1e4 ? 0 : 1) + "k";
  if (value >= 10 || value === 0) return String(Math.round(value));
  return value.toFixed(value >= 1 ? 1 : 2);
}

// series: [{label, color, points: [[x, y], ...]}]; x is unix seconds.
function lineChart(series, opts) {
  const width = 600, height = 200, left = 54, right = 12, top = 10, bottom = 24;
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1]).filter((y) => y !== null));
  const count = series.reduce((n, s) => n + s.points.length, 0);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart-svg", role: "img", "data-points": count, "aria-label": opts.label || "chart" });
  if (xs.length === 0) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" }, "No traffic sampled yet"));
    return root;
  }
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const yMax = niceMax(Math.max(...ys, opts.minMax || 0));
  const px = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const py = (y) => top + (1 - y / yMax) * (height - top - bottom);
  for (let i = 0; i <= 4; i++) {
    const y = (yMax * i) / 4;
    root.append(svg("line", { x1: left, x2: width - right, y1: py(y), y2: py(y), class: "grid" }));
    root.append(svg("text", { x: left - 6, y: py(y) + 4, "text-anchor": "end", class: "axis" }, (opts.format || short)(y)));
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4;
    root.append(svg("text", { x: px(x), y: height - 6, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle", class: "axis" }, clock(x).slice(0, x1 - x0 < 300 ? 8 : 5)));
  }
  for (const s of series) {
    const points = s.points.filter((p) => p[1] !== null);
    if (points.length === 0) continue;
    if (points.length === 1) {
      root.append(svg("circle", { cx: px(points[0][0]), cy: py(points[0][1]), r: 3, fill: s.color }));
    } else {
      const area = `M${px(points[0][0])},${py(0)} ` + points.map((p) => `L${px(p[0])},${py(p[1])}`).join(" ") + ` L${px(points[points.length - 1][0])},${py(0)} Z`;
      if (series.length === 1) root.append(svg("path", { d: area, fill: s.color, opacity: 0.12 }));
      root.append(svg("polyline", { points: points.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "stroke-linejoin": "round", class: "series", "data-series": s.label }));
    }
  }
  if (series.length > 1) {
    let x = left + 8;
    for (const s of series) {
      root.append(svg("rect", { x, y: top + 2, width: 10, height: 10, fill: s.color, rx: 2 }));
      root.append(svg("text", { x: x + 14, y: top + 11, class: "legend" }, s.label));
      x += 24 + s.label.length * 7;
    }
  }
  return root;
}

// bars: [{label, value}]; lines: [{label, value, color}] drawn across (quota lines).
function barChart(bars, lines) {
  const width = 1100, height = 230, left = 52, right = 10, top = 16, bottom = 28;
  const yMax = niceMax(Math.max(1, ...bars.map((b) => b.value), ...lines.map((l) => l.value * 1.05)));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart-svg", role: "img", "data-bars": bars.length, "aria-label": "daily usage" });
  const py = (y) => top + (1 - y / yMax) * (height - top - bottom);
  for (let i = 0; i <= 4; i++) {
    const y = (yMax * i) / 4;
    root.append(svg("line", { x1: left, x2: width - right, y1: py(y), y2: py(y), class: "grid" }));
    root.append(svg("text", { x: left - 6, y: py(y) + 4, "text-anchor": "end", class: "axis" }, short(y)));
  }
  const slot = (width - left - right) / Math.max(bars.length, 1);
  bars.forEach((b, i) => {
    const x = left + i * slot + slot * 0.15;
    const over = lines.some((l) => b.value > l.value);
    const bar = svg("rect", { x, y: py(b.value), width: slot * 0.7, height: Math.max(0, py(0) - py(b.value)), rx: 2, class: over ? "bar over" : "bar", "data-value": b.value });
    bar.append(svg("title", {}, `${b.label}: ${fmt.format(b.value)}`));
    root.append(bar);
    if (i % Math.ceil(bars.length / 10) === 0) root.append(svg("text", { x: x + slot * 0.35, y: height - 8, "text-anchor": "middle", class: "axis" }, b.label.slice(5)));
  });
  for (const l of lines) {
    root.append(svg("line", { x1: left, x2: width - right, y1: py(l.value), y2: py(l.value), class: "quota-line", stroke: l.color, "data-quota": l.value }));
    root.append(svg("text", { x: width - right - 4, y: py(l.value) - 4, "text-anchor": "end", class: "legend" }, `${l.label} ${fmt.format(l.value)}`));
  }
  return root;
}

function meter(used, limit) {
  if (!limit) return el("span", { class: "muted" }, "no quota");
  const share = Math.min(1, used / limit);
  return el("div", { class: "meter" + (share >= 0.9 ? " hot" : "") }, el("div", { class: "meter-fill", style: `width:${(share * 100).toFixed(1)}%` }), el("span", {}, `${num(used)} / ${num(limit)}`));
}

// ---------- views ----------

const views = {
  traffic: { load: loadTraffic, every: 5000 },
  upstreams: { load: loadUpstreams, every: 2000 },
  usage: { load: loadUsage, every: 15000 },
  keys: { load: loadKeys, every: 0 },
  cluster: { load: loadCluster, every: 3000 },
};

async function loadTraffic() {
  const minutes = $("traffic-minutes").value;
  const body = await api(`/v1/traffic?minutes=${minutes}`);
  state.traffic = body;
  const traffic = body.traffic;
  const select = $("traffic-route");
  const chosen = select.value || "(all)";
  select.replaceChildren(...traffic.routes.map((r) => el("option", { value: r, selected: r === chosen }, r === "(all)" ? "all routes" : r)));
  const all = traffic.series["(all)"] || [];
  const last = all[all.length - 1];
  const hour = all.reduce((n, p) => n + p.requests, 0);
  const errors = all.reduce((n, p) => n + p.errors, 0);
  $("traffic-cards").replaceChildren(
    card("Requests/s", last ? fixed(last.rps, 1) : "–", "last sample", "rps"),
    card("Error rate", last ? pct(last.error_rate) : "–", "5xx, last sample", "error-rate"),
    card("p50 / p99", last && last.p50_ms !== null ? `${fixed(last.p50_ms, 1)} / ${fixed(last.p99_ms, 1)} ms` : "–", "last sample", "latency"),
    card("Requests", num(hour), `last ${minutes} min, ${num(errors)} errors`, "requests"),
    card("Open connections", num(body.open_connections), "now", "connections"),
  );
  drawTraffic();
  // Labels with no requests in the window (no route matched, the usage page) are left out.
  const busy = traffic.routes.filter((r) => r !== "(all)" && (traffic.series[r] || []).some((p) => p.requests > 0));
  const rows = busy.map((route) => {
    const points = traffic.series[route] || [];
    const requests = points.reduce((n, p) => n + p.requests, 0);
    const failed = points.reduce((n, p) => n + p.errors, 0);
    const refused = points.reduce((n, p) => n + p.refused, 0);
    const seconds = points.length * traffic.interval_seconds;
    const latest = [...points].reverse().find((p) => p.p99_ms !== null);
    return el("tr", { "data-route": route },
      el("td", {}, route), el("td", { class: "n", "data-requests": requests }, num(requests)), el("td", { class: "n" }, seconds ? fixed(requests / seconds, 2) : "–"),
      el("td", { class: "n" }, num(failed)), el("td", { class: "n" }, requests ? pct(failed / requests) : "–"), el("td", { class: "n" }, num(refused)),
      el("td", { class: "n" }, latest ? fixed(latest.p50_ms, 1) : "–"), el("td", { class: "n" }, latest ? fixed(latest.p99_ms, 1) : "–"));
  });
  table($("routes-table"), ["Route", "Requests", "Avg req/s", "5xx", "Error rate", "4xx", "p50 ms", "p99 ms"], rows, "No requests in this window.");
}

function drawTraffic() {
  if (!state.traffic) return;
  const traffic = state.traffic.traffic;
  const route = $("traffic-route").value || "(all)";
  const points = traffic.series[route] || [];
  const pick = (f) => points.map((p) => [p.t, f(p)]);
  $("chart-rps").replaceChildren(lineChart([{ label: "req/s", color: "#2f6fde", points: pick((p) => p.rps) }], { label: "requests per second" }));
  $("chart-errors").replaceChildren(lineChart([{ label: "5xx", color: "#d64545", points: pick((p) => p.error_rate * 100) }], { label: "error rate", minMax: 1, format: (v) => short(v) + "%" }));
  $("chart-latency").replaceChildren(lineChart([
    { label: "p50", color: "#2f9e6e", points: pick((p) => p.p50_ms) },
    { label: "p99", color: "#e08a1e", points: pick((p) => p.p99_ms) },
  ], { label: "latency", format: (v) => short(v) + "ms" }));
  $("chart-refused").replaceChildren(lineChart([{ label: "4xx/s", color: "#8a5cd6", points: pick((p) => p.refused / traffic.interval_seconds) }], { label: "refused per second" }));
}

const UPSTREAM_FIELDS = ["available", "healthy", "breaker", "inflight", "consecutive_failures", "failures", "ejections"];

async function loadUpstreams() {
  const body = await api("/v1/upstreams");
  const now = Math.floor(Date.now() / 1000);
  const pools = $("upstream-pools");
  pools.replaceChildren();
  for (const pool of body.upstreams) {
    const rows = pool.endpoints.map((e) => {
      const key = `${pool.name} ${e.address}`;
      const before = state.upstreams.get(key);
      const changed = new Set();
      if (before) {
        for (const field of UPSTREAM_FIELDS) {
          if (before[field] === e[field]) continue;
          changed.add(field);
          // Counters moving are traffic; state flips are what an operator looks for.
          if (["available", "healthy", "breaker", "ejections"].includes(field)) {
            state.changes.unshift({ at: now, text: `${pool.name} ${e.address}: ${field} ${before[field]} → ${e[field]}` });
          }
        }
      }
      state.upstreams.set(key, e);
      const cell = (field, content, extra) => el("td", { class: [extra, changed.has(field) ? "changed" : ""].filter(Boolean).join(" ") }, content);
      const status = e.available ? el("span", { class: "pill ok" }, "up") : el("span", { class: "pill bad" }, "down");
      const breaker = el("span", { class: "pill " + (e.breaker === "closed" ? "ok" : e.breaker === "open" ? "bad" : "warn") }, e.breaker.replace("_", "-"));
      return el("tr", { "data-endpoint": e.address, class: e.available ? "" : "row-bad" },
        el("td", {}, e.address), el("td", { class: "n" }, e.weight), cell("available", status), cell("healthy", pool.active_checks ? (e.healthy ? "passing" : "failing") : "not checked"),
        cell("breaker", breaker), cell("inflight", e.inflight, "n"), cell("consecutive_failures", e.consecutive_failures, "n"), cell("failures", num(e.failures), "n"), cell("ejections", e.ejections, "n"));
    });
    const up = pool.endpoints.filter((e) => e.available).length;
    const t = el("table", { class: "table" });
    table(t, ["Endpoint", "Weight", "Status", "Health check", "Breaker", "In flight", "Failures in a row", "Failures", "Ejections"], rows);
    pools.append(el("div", { class: "card", "data-pool": pool.name }, el("div", { class: "toolbar" }, el("h3", {}, pool.name), el("span", { class: "pill " + (up === pool.endpoints.length ? "ok" : up === 0 ? "bad" : "warn") }, `${up}/${pool.endpoints.length} available`)), t));
  }
  if (body.upstreams.length === 0) pools.append(el("div", { class: "card muted" }, "No upstreams configured."));
  state.changes = state.changes.slice(0, 50);
  if (state.changes.length) $("upstream-changes").replaceChildren(...state.changes.map((c) => el("li", {}, el("span", { class: "muted" }, clock(c.at) + " "), c.text)));
}

function topTable(node, rows, subjectColumn) {
  const max = Math.max(1, ...rows.map((r) => r.requests));
  const trs = rows.map((r, i) => {
    const name = subjectColumn ? r.subject : r.consumer;
    const kind = subjectColumn ? (name.startsWith("key:") ? "key" : null) : "consumer";
    const label = kind ? el("a", { href: "#usage", onclick: (ev) => { ev.preventDefault(); showDetail(kind, kind === "key" ? name.slice(4) : name); } }, name) : name;
    return el("tr", { "data-name": name },
      el("td", { class: "n muted" }, i + 1), el("td", { class: "name" }, label),
      el("td", { class: "n", "data-requests": r.requests }, num(r.requests)),
      el("td", { class: "bar-cell" }, el("div", { class: "hbar", style: `width:${((r.requests / max) * 100).toFixed(1)}%` })));
  });
  table(node, ["#", subjectColumn ? "Subject" : "Consumer", "Requests", ""], trs, "No usage recorded.");
}

async function loadUsage() {
  const kind = $("usage-kind").value;
  const k = kind ? `&kind=${kind}` : "";
  const [day, month, cday, cmonth] = await Promise.all([
    api(`/v1/usage/top?window=day&limit=10${k}`),
    api(`/v1/usage/top?window=month&limit=10${k}`),
    api(`/v1/usage/top?window=day&by=consumer&limit=10`),
    api(`/v1/usage/top?window=month&by=consumer&limit=10`),
  ]);
  topTable($("top-day"), day.rows, true);
  topTable($("top-month"), month.rows, true);
  topTable($("top-consumers-day"), cday.rows.filter((r) => r.consumer), false);
  topTable($("top-consumers-month"), cmonth.rows.filter((r) => r.consumer), false);
  if (day.stale) notice(`Usage from regions ${day.stale_regions.join(", ")} may be behind (not heard from recently).`, "warn");
}

function addDays(day, n) {
  const d = new Date(day + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}

async function planOf(kind, id) {
  let name = null;
  if (kind === "key") {
    const key = await api(`/v1/keys/${encodeURIComponent(id)}`);
    name = key.plan;
    if (!name) name = (await api(`/v1/consumers/${encodeURIComponent(key.consumer)}`)).plan;
  } else {
    name = (await api(`/v1/consumers/${encodeURIComponent(id)}`)).plan;
  }
  name = name || "default";
  try {
    return await api(`/v1/plans/${encodeURIComponent(name)}`);
  } catch (e) {
    return { name, missing: true };
  }
}

async function showDetail(kind, id) {
  $("detail-kind").value = kind;
  $("detail-id").value = id;
  const out = $("detail");
  out.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  const param = `${kind}=${encodeURIComponent(id)}`;
  try {
    // The gateway's today (its clock), then the 30 days up to it.
    const month = await api(`/v1/usage?window=month&${param}&group_by=subject`);
    const today = month.to;
    const days = await api(`/v1/usage?window=day&${param}&group_by=subject&from=${addDays(today, -29)}&to=${today}`);
    const plan = await planOf(kind, id);
    const byDay = new Map();
    for (const r of days.rows) byDay.set(r.window, (byDay.get(r.window) || 0) + r.requests);
    const bars = [];
    for (let i = -29; i <= 0; i++) {
      const d = addDays(today, i);
      bars.push({ label: d, value: byDay.get(d) || 0 });
    }
    const lines = [];
    if (plan.daily && kind === "key") lines.push({ label: "daily quota", value: plan.daily, color: "#d64545" });
    const monthUsed = month.rows.filter((r) => r.window === today.slice(0, 7)).reduce((n, r) => n + r.requests, 0);
    const todayUsed = byDay.get(today) || 0;
    out.replaceChildren(...[
      el("div", { class: "cards" },
        card("Plan", plan.name + (plan.missing ? " (undefined)" : ""), plan.rate_per_second ? `${plan.rate_per_second}/s, burst ${plan.burst || plan.rate_per_second}` : "no rate limit", "plan"),
        el("div", { class: "stat", "data-stat": "today" }, el("div", { class: "stat-label" }, `Today (${today})`), kind === "key" ? meter(todayUsed, plan.daily) : el("div", { class: "stat-value" }, num(todayUsed))),
        el("div", { class: "stat", "data-stat": "month" }, el("div", { class: "stat-label" }, `This month (${today.slice(0, 7)})`), kind === "key" ? meter(monthUsed, plan.monthly) : el("div", { class: "stat-value" }, num(monthUsed)))),
      el("div", { class: "chart wide", id: "detail-chart" }, barChart(bars, lines)),
      kind === "consumer" ? el("p", { class: "muted" }, "Quotas apply per key; a consumer's chart sums its keys.") : null,
    ].filter(Boolean));
  } catch (e) {
    out.replaceChildren(el("p", { class: "error" }, e.status === 404 ? `No ${kind} ${id}.` : e.message));
  }
}

function planOptions(select, blank) {
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, blank), ...state.plans.map((p) => el("option", { value: p.name, selected: p.name === current }, p.name)));
}

function renderKeys() {
  const query = $("key-search").value.trim().toLowerCase();
  const keys = state.keys.filter((k) => !query || [k.id, k.consumer, k.plan || "", k.prefix].some((v) => v.toLowerCase().includes(query)));
  keys.sort((a, b) => b.created_at - a.created_at);
  const rows = keys.slice(0, 500).map((k) => {
    const plan = el("select", { "aria-label": `plan of ${k.id}`, disabled: k.revoked, onchange: (ev) => changePlan("keys", k.id, ev.target.value, "its consumer's plan") },
      el("option", { value: "" }, "consumer's plan"), ...state.plans.map((p) => el("option", { value: p.name, selected: p.name === k.plan }, p.name)));
    const revoke = k.revoked ? el("span", { class: "pill bad" }, "revoked") : el("button", { class: "danger small", type: "button", "data-revoke": k.id, onclick: () => revokeKey(k) }, "Revoke");
    return el("tr", { "data-key": k.id, class: k.revoked ? "row-muted" : "" },
      el("td", {}, el("a", { href: "#usage", onclick: (ev) => { ev.preventDefault(); location.hash = "#usage"; showDetail("key", k.id); } }, k.id)),
      el("td", {}, el("code", {}, k.prefix + "…")), el("td", {}, k.consumer), el("td", {}, plan),
      el("td", {}, dateOf(k.created_at)), el("td", {}, k.expires_at ? dateOf(k.expires_at) : "never"),
      el("td", {}, k.routes.length ? k.routes.join(", ") : "all"), el("td", {}, revoke));
  });
  table($("keys-table"), ["Id", "Prefix", "Consumer", "Plan", "Created", "Expires", "Routes", ""], rows, query ? "No key matches." : "No keys yet.");
  if (keys.length > 500) $("keys-table").append(el("caption", {}, `${keys.length - 500} more; narrow the search.`));
}

async function loadKeys() {
  const [plans, consumers, keys] = await Promise.all([api("/v1/plans"), api("/v1/consumers"), api("/v1/keys")]);
  state.plans = plans.plans;
  state.consumers = consumers.consumers;
  state.keys = keys.keys;
  planOptions($("key-plan"), "consumer's plan");
  planOptions($("consumer-plan"), "default plan");
  const chosen = $("key-consumer").value;
  $("key-consumer").replaceChildren(...state.consumers.map((c) => el("option", { value: c.id, selected: c.id === chosen }, c.id)));
  renderKeys();
  table($("consumers-table"), ["Id", "Plan", "Created", "Keys"], state.consumers.map((c) => el("tr", { "data-consumer": c.id },
    el("td", {}, c.id),
    el("td", {}, el("select", { "aria-label": `plan of ${c.id}`, onchange: (ev) => changePlan("consumers", c.id, ev.target.value, "the default plan") }, el("option", { value: "" }, "default plan"), ...state.plans.map((p) => el("option", { value: p.name, selected: p.name === c.plan }, p.name)))),
    el("td", {}, dateOf(c.created_at)), el("td", { class: "n" }, state.keys.filter((k) => k.consumer === c.id && !k.revoked).length))), "No consumers yet.");
  const q = (v) => (v === null || v === undefined ? "–" : num(v));
  table($("plans-table"), ["Plan", "Rate/s", "Burst", "Daily", "Monthly", "Groups", "On partition"], state.plans.map((p) => el("tr", { "data-plan": p.name },
    el("td", {}, p.name), el("td", { class: "n" }, q(p.rate_per_second)), el("td", { class: "n" }, q(p.burst)), el("td", { class: "n" }, q(p.daily)), el("td", { class: "n" }, q(p.monthly)),
    el("td", {}, Object.keys(p.groups || {}).join(", ") || "–"), el("td", {}, p.on_partition || "available"))), "No plans.");
}

// `kind` is "keys" or "consumers"; an empty plan clears it (`fallback` says what applies then).
async function changePlan(kind, id, plan, fallback) {
  try {
    await api(`/v1/${kind}/${encodeURIComponent(id)}`, { method: "PATCH", json: { plan: plan || null } });
    notice(`${id} now on ${plan || fallback}.`, "ok");
    await loadKeys();
  } catch (e) {
    notice(`Could not change the plan of ${id}: ${e.message}`);
  }
}

async function revokeKey(key) {
  if (!window.confirm(`Revoke key ${key.id} (${key.prefix}…) of ${key.consumer}? Calls with it will be refused.`)) return;
  try {
    await api(`/v1/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
    notice(`Key ${key.id} revoked.`, "ok");
    await loadKeys();
  } catch (e) {
    notice(`Could not revoke ${key.id}: ${e.message}`);
  }
}

async function createKey(ev) {
  ev.preventDefault();
  const body = { consumer: $("key-consumer").value };
  if ($("key-plan").value) body.plan = $("key-plan").value;
  if ($("key-expires").value) body.expires_at = Math.floor(Date.parse($("key-expires").value + "T23:59:59Z") / 1000);
  const routes = $("key-routes").value.split(",").map((r) => r.trim()).filter(Boolean);
  if (routes.length) body.routes = routes;
  if (!body.consumer) return notice("Create a consumer first.");
  try {
    const key = await api("/v1/keys", { method: "POST", json: body });
    $("secret-value").textContent = key.key;
    $("secret").hidden = false;
    $("secret").dataset.key = key.id;
    notice(`Key ${key.id} created for ${key.consumer}.`, "ok");
    $("key-form").reset();
    await loadKeys();
  } catch (e) {
    notice(`Could not create the key: ${e.message}`);
  }
}

async function createConsumer(ev) {
  ev.preventDefault();
  const body = { id: $("consumer-id").value.trim() };
  if ($("consumer-plan").value) body.plan = $("consumer-plan").value;
  try {
    await api("/v1/consumers", { method: "POST", json: body });
    notice(`Consumer ${body.id} created.`, "ok");
    $("consumer-form").reset();
    await loadKeys();
    $("key-consumer").value = body.id;
  } catch (e) {
    notice(`Could not create the consumer: ${e.message}`);
  }
}

async function copySecret() {
  const secret = $("secret-value").textContent;
  try {
    await navigator.clipboard.writeText(secret);
  } catch (_) {
    // Plain-HTTP pages have no clipboard API: select the text for a manual copy.
    const range = document.createRange();
    range.selectNodeContents($("secret-value"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    document.execCommand("copy");
  }
  $("secret-copy").textContent = "Copied";
}

function streamCell(s) {
  if (!s) return el("td", { class: "muted" }, "–");
  const heard = s.heard_ms_ago === null ? "never" : s.heard_ms_ago < 1000 ? "now" : `${(s.heard_ms_ago / 1000).toFixed(1)} s ago`;
  return el("td", { class: s.stale ? "bad-text" : "" }, `${heard} · seq ${num(s.applied)}${s.behind ? ` · ${num(s.behind)} behind` : ""}`);
}

async function loadCluster() {
  const c = await api("/v1/cluster");
  const detail = $("cluster-detail");
  if (c.mode === "single") {
    $("cluster-cards").replaceChildren(card("Mode", "single node", "no [cluster] section", "mode"), card("Node", c.node, "", "node"));
    detail.replaceChildren(el("div", { class: "card muted" }, "This node keeps its state in its own SQLite file. Global mode (docs/multi-region.md) shares keys, plans and quotas across nodes and regions through NATS JetStream."));
    return;
  }
  const stale = c.regions.filter((r) => (r.usage && r.usage.stale) || (r.catalog && r.catalog.stale));
  $("cluster-cards").replaceChildren(
    card("Node", c.node, `region ${c.region}`, "node"),
    card("NATS", c.connected ? "connected" : "disconnected", c.attached ? "attached" : "serving from disk", "connected"),
    card("Live nodes", c.live_nodes, `${new Set(c.nodes.map((n) => n.region)).size} regions with nodes`, "live-nodes"),
    card("Regions", c.regions.length, stale.length ? `${stale.length} stale: ${stale.map((r) => r.region).join(", ")}` : "all fresh", "regions"),
    card("Outbox", num(c.outbox_slots), "usage slots not yet acknowledged", "outbox"),
  );
  const nodes = el("table", { class: "table" });
  table(nodes, ["Node", "Region", "Last heartbeat"], c.nodes.map((n) => el("tr", { "data-node": n.node }, el("td", {}, n.node + (n.node === c.node ? " (this node)" : "")), el("td", {}, n.region), el("td", {}, n.node === c.node ? "–" : `${n.last_seen_ms} ms ago`))));
  const regions = el("table", { class: "table" });
  table(regions, ["Region", "Usage stream", "Catalog stream"], c.regions.map((r) => el("tr", { "data-region": r.region }, el("td", {}, r.region), streamCell(r.usage), streamCell(r.catalog))));
  detail.replaceChildren(el("div", { class: "grid2" }, el("div", { class: "card" }, el("h3", {}, "Nodes"), nodes), el("div", { class: "card" }, el("h3", {}, "Regions (replication lag)"), regions)));
}

// ---------- shell ----------

async function refresh() {
  const view = views[state.view];
  if (!view) return;
  try {
    await view.load();
    $("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
    if ($("notice").classList.contains("error") && !$("notice").dataset.sticky) notice("");
  } catch (e) {
    if (e.status !== 401) notice(`Could not load ${state.view}: ${e.message}`);
  }
}

function show(name) {
  if (!views[name]) name = "traffic";
  state.view = name;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== "view-" + name;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.view === name);
  clearInterval(state.timer);
  refresh();
  if (views[name].every) state.timer = setInterval(refresh, views[name].every);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  clearInterval(state.timer);
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN, $("token").value);
  try {
    const cluster = await api("/v1/cluster");
    $("node").textContent = "node " + cluster.node;
    $("login").hidden = true;
    $("app").hidden = false;
    $("login-error").textContent = "";
    show(location.hash.slice(1));
  } catch (e) {
    if (e.status !== 401) {
      sessionStorage.removeItem(TOKEN);
      $("login-error").textContent = "The admin API did not answer: " + e.message;
    }
  }
}

function start() {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  $("traffic-route").addEventListener("change", drawTraffic);
  $("traffic-minutes").addEventListener("change", refresh);
  $("usage-kind").addEventListener("change", refresh);
  $("detail-form").addEventListener("submit", (ev) => { ev.preventDefault(); if ($("detail-id").value.trim()) showDetail($("detail-kind").value, $("detail-id").value.trim()); });
  $("key-form").addEventListener("submit", createKey);
  $("consumer-form").addEventListener("submit", createConsumer);
  $("key-search").addEventListener("input", renderKeys);
  $("secret-copy").addEventListener("click", copySecret);
  $("secret-done").addEventListener("click", () => { $("secret").hidden = true; $("secret-value").textContent = ""; $("secret-copy").textContent = "Copy"; });
  window.addEventListener("hashchange", () => { if (!$("app").hidden) show(location.hash.slice(1)); });
  if (sessionStorage.getItem(TOKEN) !== null) {
    $("token").value = sessionStorage.getItem(TOKEN);
    signIn(new Event("submit"));
  } else {
    signOut("");
  }
}

start();
