// Drives the dashboard in headless Chromium for tests/it/dashboard.rs. Talks to the Rust test over
// stdout (one event per line) and stdin (one go-ahead per line).
//   node dashboard.mjs URL TOKEN SCREENSHOT_DIR
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [url, token, shots] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (what) => console.log(what);
const problems = [];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
  page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") problems.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`requestfailed: ${r.url()}`));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("banner").textContent !== "Connecting…");
  if ((await page.content()).includes(token)) throw new Error("the token is in the page");
  say("LOADED");

  // A wrong token is refused.
  await page.fill("#token", "not-the-token");
  await page.fill("#alias", "FROM-THE-PAGE");
  await page.click("#start");
  await page.waitForFunction(() => document.getElementById("message").textContent.includes("Refused"));
  say("REFUSED " + (await page.textContent("#message")));
  // Chromium logs the deliberate 401 as a console error: that one is expected, nothing else.
  const i = problems.findIndex((p) => p.includes("status of 401"));
  if (i >= 0) problems.splice(i, 1);

  // A chip check first: its card appears, and the reads the test writes show up in it.
  await page.fill("#token", token);
  await page.fill("#alias", "CHECK");
  await page.click("#check");
  await page.waitForFunction(() => document.getElementById("check-card").className !== "hidden");
  say("CHECKING");
  const reads = Number((await lines.next()).value);
  await page.waitForFunction((n) => document.querySelectorAll("#check-reads tr").length >= n, reads, { timeout: 20000 });
  const checked = await page.$$eval("#check-reads tr td:nth-child(3)", (tds) => tds.map((td) => td.textContent));
  say("CHECKED " + checked.join(","));
  await page.screenshot({ path: `${shots}/dashboard-chipcheck.png`, fullPage: true });

  // The right one starts a session (which ends the chip check).
  await page.fill("#alias", "FROM-THE-PAGE");
  await page.click("#start");
  await page.waitForFunction(() => document.getElementById("message").textContent === "Done.");
  await page.waitForFunction(() => document.getElementById("session-alias").textContent.includes("FROM-THE-PAGE"));
  await page.waitForFunction(() => document.getElementById("check-card").className === "hidden");
  say("STARTED");

  // The test writes reads through the pseudo-terminal; they appear live.
  const want = Number((await lines.next()).value);
  await page.waitForFunction((n) => document.querySelectorAll("tr.passing").length >= n, want, { timeout: 20000 });
  // Let the status cards catch up too (they poll every 2 s) before the screenshots.
  await page.waitForFunction((n) => document.getElementById("queue-delivered").textContent === String(n)
    && document.getElementById("uplink-state").textContent === "online"
    && document.querySelectorAll("#chart rect[height]:not([height='0'])").length > 0, want, { timeout: 20000 });
  const rows = await page.$$eval("tr.passing td:nth-child(2)", (tds) => tds.map((td) => td.textContent));
  say("ROWS " + rows.join(","));
  await page.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.screenshot({ path: `${shots}/dashboard-laptop.png`, fullPage: true });
  say("PROBLEMS " + JSON.stringify(problems));
} finally {
  await browser.close();
}
