// Drives Debian's Chromium through the operator console of a running gateway and prints
// what it saw as one JSON line; tests/console.rs starts the gateway, makes the traffic,
// runs this and checks the numbers against the admin API. Every request the page makes to
// anything but the gateway is refused and recorded (the console must work offline).
//
// Environment: ADMIN_URL, PROXY_URL, TOKEN, CONSUMER (for the new key), PAGE_KEY (a
// key's secret for the customer usage page), SHOTS (a directory for screenshots).
import { chromium } from "playwright-core";

const { ADMIN_URL, PROXY_URL, TOKEN, CONSUMER, PAGE_KEY, SHOTS } = process.env;
const result = { errors: [], external: [] };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const timeout = 15000;
try {
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  context.setDefaultTimeout(timeout);
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(ADMIN_URL) || url.startsWith(PROXY_URL) || url.startsWith("data:")) return route.continue();
    result.external.push(url);
    return route.abort();
  });
  const page = await context.newPage();
  page.on("console", (message) => {
    // A refused token answers 401 on purpose (the login test); the browser reports that
    // failed load as a console error, which is the test's doing, not the page's.
    if (message.type() === "error" && !message.text().includes("401")) result.errors.push(message.text());
  });
  page.on("pageerror", (error) => result.errors.push(String(error)));
  page.on("dialog", (dialog) => dialog.accept());
  const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
  const texts = (selector) => page.$$eval(selector, (nodes) => nodes.map((n) => n.textContent.trim()));

  // Login: a wrong token is refused on the form; the right one opens the console and is
  // kept in the tab's session storage, never in the URL.
  await page.goto(`${ADMIN_URL}/console`);
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#token", "not-the-token");
  await page.click("#sign-in");
  await page.waitForFunction(() => document.querySelector("#login-error").textContent.length > 0);
  result.wrong_token = { message: await page.textContent("#login-error"), app_hidden: await page.$eval("#app", (n) => n.hidden) };
  await shot("login");
  await page.fill("#token", TOKEN);
  await page.click("#sign-in");
  await page.waitForSelector("#app:not([hidden])");
  result.signed_in = { url_has_token: page.url().includes(TOKEN), stored: await page.evaluate(() => sessionStorage.getItem("tollgate.token")) === TOKEN };

  // Traffic: the charts have points, and the routes table its counts.
  await page.waitForFunction(() => Number(document.querySelector("#chart-rps svg")?.dataset.points || 0) > 0);
  await page.waitForSelector("#routes-table tr[data-route]");
  result.traffic = {
    points: Number(await page.$eval("#chart-rps svg", (n) => n.dataset.points)),
    latency_series: await page.$$eval("#chart-latency polyline.series, #chart-latency circle", (n) => n.length),
    routes: Object.fromEntries(await page.$$eval("#routes-table tr[data-route]", (rows) => rows.map((r) => [r.dataset.route, Number(r.querySelector("[data-requests]").dataset.requests)]))),
    cards: await texts("#traffic-cards .stat-value"),
  };
  await shot("traffic");

  // Upstreams: every endpoint with its state.
  await page.click("#nav a[data-view=upstreams]");
  await page.waitForSelector("[data-pool] tr[data-endpoint]");
  result.upstreams = await page.$$eval("[data-pool]", (pools) => pools.map((p) => ({
    pool: p.dataset.pool,
    endpoints: [...p.querySelectorAll("tr[data-endpoint]")].map((r) => ({ address: r.dataset.endpoint, status: r.querySelector(".pill").textContent })),
  })));
  await shot("upstreams");

  // Usage: top lists, then one key's 30 days with its plan's daily quota line.
  await page.click("#nav a[data-view=usage]");
  await page.waitForSelector("#top-day tr[data-name]");
  await page.waitForSelector("#top-consumers-month tr[data-name]");
  const rows = (id) => page.$$eval(`#${id} tr[data-name]`, (rs) => rs.map((r) => ({ name: r.dataset.name, requests: Number(r.querySelector("[data-requests]").dataset.requests) })));
  result.usage = { top_day: await rows("top-day"), top_month: await rows("top-month"), consumers_day: await rows("top-consumers-day") };
  await page.click("#top-day tr[data-name] a");
  await page.waitForSelector("#detail-chart svg[data-bars]");
  result.usage.detail = {
    bars: await page.$$eval("#detail-chart rect.bar", (bars) => bars.map((b) => Number(b.dataset.value))),
    quota: await page.$$eval("#detail-chart line.quota-line", (lines) => lines.map((l) => Number(l.dataset.quota))),
    cards: await texts("#detail .stat"),
  };
  await shot("usage");

  // Keys: create one (the secret is shown once), use it through the proxy, revoke it in
  // the table and see the proxy refuse it.
  await page.click("#nav a[data-view=keys]");
  await page.waitForSelector("#keys-table tr[data-key]");
  result.keys = { before: await page.$$eval("#keys-table tr[data-key]", (rs) => rs.length), plans: await page.$$eval("#plans-table tr[data-plan]", (rs) => rs.map((r) => r.dataset.plan)) };
  await page.fill("#key-search", CONSUMER);
  await page.selectOption("#key-consumer", CONSUMER);
  await page.click("#key-form button[type=submit]");
  await page.waitForSelector("#secret:not([hidden])");
  const secret = (await page.textContent("#secret-value")).trim();
  const id = await page.$eval("#secret", (n) => n.dataset.key);
  await page.click("#secret-copy");
  await page.waitForFunction(() => document.querySelector("#secret-copy").textContent === "Copied");
  await page.waitForSelector(`#keys-table tr[data-key="${id}"]`);
  await shot("keys");
  const call = async () => (await fetch(`${PROXY_URL}/v1/geo`, { headers: { "x-api-key": secret } })).status;
  result.keys.created = { id, secret_prefix: secret.slice(0, 8), listed: true, status_before: await call() };
  await page.click(`[data-revoke="${id}"]`);
  await page.waitForSelector(`#keys-table tr[data-key="${id}"] .pill.bad`);
  result.keys.created.status_after = await call();
  await page.click("#secret-done");
  result.keys.secret_hidden = await page.$eval("#secret", (n) => n.hidden);

  // Cluster.
  await page.click("#nav a[data-view=cluster]");
  await page.waitForSelector("#cluster-cards .stat");
  result.cluster = await texts("#cluster-cards .stat-value");
  await shot("cluster");

  // A reload keeps the session; signing out forgets the token.
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  result.session_kept = true;
  await page.click("#sign-out");
  await page.waitForSelector("#login:not([hidden])");
  result.signed_out = { stored: await page.evaluate(() => sessionStorage.getItem("tollgate.token")) };

  // The customer usage page, as a customer's browser opens it.
  const customer = await context.newPage();
  customer.on("pageerror", (error) => result.errors.push(String(error)));
  await customer.goto(`${PROXY_URL}/usage?api_key=${encodeURIComponent(PAGE_KEY)}`);
  await customer.waitForSelector("svg[data-bars]");
  result.customer = {
    today: Number(await customer.$eval("#today [data-used]", (n) => n.dataset.used)),
    month: Number(await customer.$eval("#month [data-used]", (n) => n.dataset.used)),
    bars: await customer.$$eval("rect[data-requests]", (bars) => bars.length),
    plan: (await customer.textContent("#plan h2")).trim(),
  };
  await customer.screenshot({ path: `${SHOTS}/customer-usage.png`, fullPage: true });
} catch (error) {
  result.failed = String(error && error.stack ? error.stack : error);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
