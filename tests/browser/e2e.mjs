// End-to-end check of MQTT over WebSockets in a real browser.
//
//   node tests/browser/e2e.mjs --ws ws://127.0.0.1:PORT/mqtt --tcp mqtt://127.0.0.1:PORT \
//        [--status http://127.0.0.1:PORT/] [--chromium /usr/bin/chromium]
//
// Launches Debian's Chromium (never a browser downloaded by Playwright) headless through
// playwright-core, serves a tiny page from 127.0.0.1 (so the page has a real http origin),
// injects MQTT.js's browser bundle and, for MQTT 5.0 and then 3.1.1:
//   - the page connects over --ws and subscribes to a fresh topic;
//   - a Node MQTT.js client over plain TCP (--tcp) publishes to it; the page must get the same
//     payload, also a large one that the broker has to split over several WebSocket frames;
//   - the page publishes a reply that the TCP client must receive.
// With --status it loads that page and checks HTTP 200, a title containing "Tern" and an
// element #connections whose text becomes a number within 5 s; after a burst to an offline
// persistent session, the queued chart's line rises to the burst (drawn by the page's own
// script as inline SVG) and the session is ranked first among the slowest consumers.
//
// Prints one line per check; exits 0 only if every check passed, 1 when a check failed,
// 2 on the overall time limit, 3 when Chromium or node_modules are missing, 64 on bad usage.
// E2E_DEBUG=1 prints progress details (publish times, clean-up steps).

import { spawnSync } from "node:child_process";
import { constants as fsConstants } from "node:fs";
import { access, mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const TOTAL_LIMIT_MS = 55_000;
const STEP_MS = 10_000;
const BIG_PAYLOAD = 150_000; // > 64 KiB: arrives in more than one WebSocket frame
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const T0 = Date.now();
const elapsed = () => `${((Date.now() - T0) / 1000).toFixed(1)}s`;
let passed = 0;
let failed = 0;
let step = "starting";
const cleanups = [];

function ok(what) {
  passed += 1;
  console.log(`ok   [${elapsed()}] ${what}`);
}

function bad(what, detail) {
  failed += 1;
  console.log(`FAIL [${elapsed()}] ${what}${detail ? `: ${detail}` : ""}`);
}

async function cleanup() {
  while (cleanups.length) {
    const f = cleanups.pop();
    if (process.env.E2E_DEBUG) console.log(`     [${elapsed()}] cleanup ${f.toString().slice(0, 60)}`);
    try {
      await withTimeout(Promise.resolve().then(f), 5_000, "cleanup");
    } catch {
      // best effort
    }
  }
}

async function finish(code, message) {
  if (message) console.log(message);
  await cleanup();
  console.log(`e2e: ${passed} passed, ${failed} failed (${elapsed()})`);
  process.exit(code);
}

/** The message of an error without the stack that page.evaluate appends. */
function short(e) {
  const text = e && e.message ? e.message : String(e);
  return text.split("\n").filter((l) => !/^\s+at /.test(l)).join(" | ");
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function usage(msg) {
  console.log(`usage error: ${msg}`);
  console.log(
    "usage: node e2e.mjs --ws ws://HOST:PORT/PATH --tcp mqtt://HOST:PORT [--status http://HOST:PORT/] [--chromium PATH]",
  );
  process.exit(64);
}

function parseArgs(argv) {
  const opts = { chromium: "/usr/bin/chromium" };
  for (let i = 0; i < argv.length; i += 1) {
    const key = argv[i];
    const value = argv[i + 1];
    if (!["--ws", "--tcp", "--status", "--chromium"].includes(key)) usage(`unknown argument ${key}`);
    if (value === undefined || value.startsWith("--")) usage(`${key} needs a value`);
    opts[key.slice(2)] = value;
    i += 1;
  }
  if (!opts.ws || !/^wss?:\/\//.test(opts.ws)) usage("--ws ws://... is required");
  if (!opts.tcp || !/^mqtts?:\/\//.test(opts.tcp)) usage("--tcp mqtt://... is required");
  if (opts.status && !/^https?:\/\//.test(opts.status)) usage("--status must be an http URL");
  return opts;
}

function unique(prefix) {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

function bigPayload() {
  const b = Buffer.alloc(BIG_PAYLOAD);
  for (let i = 0; i < b.length; i += 1) b[i] = (i * 31 + 7) % 251;
  return b;
}

function checksum(bytes) {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 1) sum = (sum * 33 + bytes[i]) >>> 0;
  return sum;
}

/** A loopback HTTP server for the test page, so it has a real origin (http://127.0.0.1:N). */
async function servePage() {
  const html =
    "<!doctype html><html><head><meta charset=utf-8><title>Tern WebSocket e2e</title></head>" +
    "<body><p id=state>loaded</p></body></html>";
  const server = createServer((req, res) => {
    if (req.url === "/favicon.ico") {
      res.writeHead(204);
      res.end();
    } else if (req.url === "/" || req.url === "/index.html") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(html);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  cleanups.push(
    () =>
      new Promise((resolve) => {
        server.close(resolve);
        server.closeAllConnections(); // Chromium keeps its connection alive
      }),
  );
  return `http://127.0.0.1:${server.address().port}/`;
}

/** One round: MQTT `version` (5 or 4) between the page (WebSocket) and Node (TCP). */
async function round(page, mqtt, opts, version) {
  const label = `MQTT ${version === 5 ? "5.0" : "3.1.1"}`;
  const id = unique(`e2e-v${version}`);
  const down = `tern-e2e/${id}/down`;
  const up = `tern-e2e/${id}/up`;

  step = `${label}: page connects over ${opts.ws}`;
  const connected = await page.evaluate(
    async ({ url, version, clientId, topic, stepMs }) => {
      const received = [];
      const waiters = [];
      window.__e2e = { received, waiters };
      const client = window.mqtt.connect(url, {
        protocolVersion: version,
        clientId,
        clean: true,
        reconnectPeriod: 0,
        connectTimeout: stepMs,
        keepalive: 30,
      });
      window.__e2e.client = client;
      client.on("message", (t, payload) => {
        const bytes = new Uint8Array(payload);
        received.push({ topic: t, bytes });
        for (const w of waiters.splice(0)) w();
      });
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no CONNACK")), stepMs);
        client.once("connect", () => {
          clearTimeout(timer);
          resolve();
        });
        client.once("error", (e) => {
          clearTimeout(timer);
          reject(new Error(`connect error: ${e && e.message}`));
        });
        client.once("close", () => reject(new Error("connection closed before CONNACK")));
      });
      const granted = await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no SUBACK")), stepMs);
        client.subscribe(topic, { qos: 1 }, (err, g) => {
          clearTimeout(timer);
          if (err) reject(new Error(`subscribe failed: ${err.message}`));
          else resolve(g);
        });
      });
      return { granted };
    },
    { url: opts.ws, version, clientId: `${id}-page`, topic: down, stepMs: STEP_MS },
  );
  const qos = connected.granted && connected.granted[0] && connected.granted[0].qos;
  if (qos !== 1) throw new Error(`${label}: SUBACK granted ${JSON.stringify(connected.granted)}`);
  ok(`${label}: page connected over WebSocket and subscribed (QoS ${qos})`);

  step = `${label}: TCP client connects to ${opts.tcp}`;
  const tcp = await withTimeout(
    mqtt.connectAsync(opts.tcp, {
      protocolVersion: version,
      clientId: `${id}-tcp`,
      clean: true,
      reconnectPeriod: 0,
      connectTimeout: STEP_MS,
    }),
    STEP_MS,
    step,
  );
  cleanups.push(() => (tcp.disconnected || tcp.disconnecting ? null : tcp.endAsync(true)));
  const upMessages = [];
  let upWaiter = null;
  tcp.on("message", (topic, payload) => {
    upMessages.push({ topic, payload });
    if (upWaiter) upWaiter();
  });
  await withTimeout(tcp.subscribeAsync(up, { qos: 1 }), STEP_MS, `${label}: TCP subscribe`);

  // TCP -> page: a small text payload, then a large binary one.
  const text = `hello from TCP, ${label}, ${id} — ünïcödé`;
  const big = bigPayload();
  for (const [what, payload] of [
    ["the TCP client's message", Buffer.from(text, "utf8")],
    [`a ${BIG_PAYLOAD}-byte message (several WebSocket frames)`, big],
  ]) {
    step = `${label}: page receives ${what}`;
    await withTimeout(tcp.publishAsync(down, payload, { qos: 1 }), STEP_MS, `${label}: TCP publish`);
    if (process.env.E2E_DEBUG) console.log(`     [${elapsed()}] published`);
    const got = await page.evaluate(
      async ({ stepMs }) => {
        const e2e = window.__e2e;
        const deadline = Date.now() + stepMs;
        while (e2e.received.length === 0 && Date.now() < deadline) {
          await new Promise((resolve) => {
            e2e.waiters.push(resolve);
            setTimeout(resolve, 100);
          });
        }
        const m = e2e.received.shift();
        if (!m) return null;
        let sum = 0;
        for (let i = 0; i < m.bytes.length; i += 1) sum = (sum * 33 + m.bytes[i]) >>> 0;
        const head = new TextDecoder().decode(m.bytes.slice(0, 200));
        return { topic: m.topic, length: m.bytes.length, sum, head };
      },
      { stepMs: STEP_MS },
    );
    if (!got) {
      bad(`${label}: page receives ${what}`, "nothing arrived");
    } else if (got.topic !== down || got.length !== payload.length || got.sum !== checksum(payload)) {
      bad(
        `${label}: page receives ${what}`,
        `got topic ${got.topic} length ${got.length} (want ${payload.length}) starting ${JSON.stringify(got.head.slice(0, 40))}`,
      );
    } else {
      ok(`${label}: page received ${what}, payload intact`);
    }
  }

  // page -> TCP
  step = `${label}: TCP client receives the page's reply`;
  const reply = `reply from the browser, ${label}, ${id}`;
  await page.evaluate(
    async ({ topic, reply, stepMs }) => {
      const client = window.__e2e.client;
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no PUBACK")), stepMs);
        client.publish(topic, reply, { qos: 1 }, (err) => {
          clearTimeout(timer);
          if (err) reject(new Error(`publish failed: ${err.message}`));
          else resolve();
        });
      });
    },
    { topic: up, reply, stepMs: STEP_MS },
  );
  const deadline = Date.now() + STEP_MS;
  while (upMessages.length === 0 && Date.now() < deadline) {
    await new Promise((resolve) => {
      upWaiter = resolve;
      setTimeout(resolve, 100);
    });
  }
  const m = upMessages.shift();
  if (!m) bad(`${label}: TCP client receives the page's reply`, "nothing arrived");
  else if (m.topic !== up || m.payload.toString("utf8") !== reply)
    bad(`${label}: TCP client receives the page's reply`, `got ${m.topic}: ${m.payload.toString("utf8").slice(0, 80)}`);
  else ok(`${label}: TCP client received the page's reply`);

  step = `${label}: disconnect`;
  await page.evaluate(
    ({ stepMs }) =>
      new Promise((resolve) => {
        const timer = setTimeout(resolve, stepMs);
        window.__e2e.client.end(false, {}, () => {
          clearTimeout(timer);
          resolve();
        });
      }),
    { stepMs: 5_000 },
  );
  await withTimeout(tcp.endAsync(), 5_000, `${label}: TCP disconnect`);
}

/// Makes something for the status page to show, over TCP: an offline persistent session with
/// a burst of QUEUED messages waiting, and HOT messages on one topic (a quiet broker counts
/// every message in its topic rates).
const QUEUED = 150;
const HOT = 64;
async function statusTraffic(mqtt, opts, id) {
  const queueClient = `${id}-status-queue`;
  const queueTopic = `e2e/${id}/queue`;
  const hotTopic = `e2e/${id}/hot`;
  const common = { protocolVersion: 5, reconnectPeriod: 0, connectTimeout: STEP_MS };
  step = "status traffic: offline persistent session";
  const sub = await withTimeout(
    mqtt.connectAsync(opts.tcp, {
      ...common,
      clientId: queueClient,
      clean: false,
      properties: { sessionExpiryInterval: 300 },
    }),
    STEP_MS,
    step,
  );
  await withTimeout(sub.subscribeAsync(queueTopic, { qos: 1 }), STEP_MS, step);
  await withTimeout(sub.endAsync(), STEP_MS, step);
  step = "status traffic: publishing";
  const pub = await withTimeout(
    mqtt.connectAsync(opts.tcp, { ...common, clientId: `${id}-status-pub`, clean: true }),
    STEP_MS,
    step,
  );
  const burst = [];
  for (let i = 0; i < QUEUED; i += 1) burst.push(pub.publishAsync(queueTopic, `queued ${i}`, { qos: 1 }));
  await withTimeout(Promise.all(burst), STEP_MS, step);
  for (let i = 0; i < HOT; i += 1) {
    await withTimeout(pub.publishAsync(hotTopic, `hot ${i}`, { qos: 1 }), STEP_MS, step);
  }
  await withTimeout(pub.endAsync(), STEP_MS, step);
  ok(`status traffic: ${QUEUED} messages queued for ${queueClient}, ${HOT} on ${hotTopic}`);
  return { queueClient, hotTopic };
}

async function checkStatus(page, url, traffic) {
  step = `status page ${url}`;
  const response = await page.goto(url, { waitUntil: "domcontentloaded", timeout: STEP_MS });
  const status = response ? response.status() : 0;
  if (status === 200) ok(`status page: HTTP 200 from ${url}`);
  else bad("status page: HTTP 200", `got ${status || "no response"} from ${url}`);
  const title = await page.title();
  if (/Tern/.test(title)) ok(`status page: title ${JSON.stringify(title)}`);
  else bad('status page: title contains "Tern"', `title is ${JSON.stringify(title)}`);
  try {
    await page.waitForFunction(
      () => {
        const el = document.getElementById("connections");
        return !!el && /^\s*\d+\s*$/.test(el.textContent || "");
      },
      null,
      { timeout: 5_000, polling: 100 },
    );
    const text = await page.$eval("#connections", (el) => el.textContent.trim());
    ok(`status page: #connections shows ${text}`);
  } catch {
    const text = await page
      .$eval("#connections", (el) => el.textContent)
      .catch(() => "(no element with id connections)");
    bad("status page: #connections becomes a number within 5 s", `it shows ${JSON.stringify(text)}`);
  }
  // Rows are rendered with textContent from /status.json: the broker's own numbers.
  const rowWith = async (tbody, text, what) => {
    try {
      await page.waitForFunction(
        ({ tbody, text }) =>
          Array.from(document.querySelectorAll(`#${tbody} tr`)).some((tr) =>
            tr.textContent.includes(text),
          ),
        { tbody, text },
        { timeout: 5_000, polling: 100 },
      );
      const cells = await page.$$eval(
        `#${tbody} tr`,
        (rows, text) =>
          rows
            .map((tr) => Array.from(tr.children).map((td) => td.textContent))
            .find((cells) => cells[0] === text) || [],
        text,
      );
      ok(`status page: ${what}: ${JSON.stringify(cells)}`);
      return cells;
    } catch {
      const shown = await page.$eval(`#${tbody}`, (el) => el.textContent).catch(() => "(missing)");
      bad(`status page: ${what}`, `#${tbody} shows ${JSON.stringify(shown)}`);
      return [];
    }
  };
  if (traffic) {
    const topic = await rowWith("topics", traffic.hotTopic, `top topics list ${traffic.hotTopic}`);
    if (topic.length && !(Number(topic[1]) > 0)) {
      bad("status page: the hot topic has a rate above 0", JSON.stringify(topic));
    }
    const queue = await rowWith("queues", traffic.queueClient, `queue of ${traffic.queueClient}`);
    if (queue.length) {
      if (Number(queue[1]) === QUEUED && queue[3] === "offline") {
        ok(`status page: ${traffic.queueClient} has ${QUEUED} queued, offline`);
      } else {
        bad(`status page: ${traffic.queueClient} has ${QUEUED} queued, offline`, JSON.stringify(queue));
      }
    }
    await checkLag(page, traffic);
  }
}

/// The burst on the page: the slowest consumer's row, and the queued chart's line rising to it.
/// The broker takes a chart point every 5 s: up to 15 s for the one after the burst.
async function checkLag(page, traffic) {
  step = "status page: slowest consumers";
  try {
    await page.waitForFunction(
      ({ name, queued }) => {
        const first = document.querySelector("#slowest-age tr");
        if (!first) return false;
        const cells = Array.from(first.children).map((td) => td.textContent);
        return cells[0] === "session" && cells[1] === name && Number(cells[2]) === queued &&
          cells[6] === "offline";
      },
      { name: traffic.queueClient, queued: QUEUED },
      { timeout: 8_000, polling: 200 },
    );
    ok(`status page: ${traffic.queueClient} ranked first among the slowest consumers`);
  } catch {
    const shown = await page.$eval("#slowest-age", (el) => el.textContent).catch(() => "(missing)");
    bad("status page: the offline session ranked first among the slowest consumers", JSON.stringify(shown));
  }
  step = "status page: queued chart";
  try {
    const line = await page.waitForFunction(
      (queued) => {
        const l = document.querySelector('#chart-queued polyline[data-series="queued"]');
        if (!l || Number(l.getAttribute("data-last")) < queued) return false;
        // SVG y grows downwards: the line ends higher than it started (it rose).
        const ys = l.getAttribute("points").trim().split(/\s+/).map((p) => Number(p.split(",")[1]));
        return ys.length >= 2 && ys[ys.length - 1] < ys[0] ? { points: ys.length, last: l.getAttribute("data-last") } : false;
      },
      QUEUED,
      { timeout: 15_000, polling: 250 },
    );
    const v = await line.jsonValue();
    ok(`status page: the queued chart rises to ${v.last} over ${v.points} points`);
    const others = await page.$$eval("#chart-rates polyline, #chart-connections polyline", (ls) => ls.length);
    if (others === 3) ok("status page: the rates (in, out) and connections charts are drawn");
    else bad("status page: the rates and connections charts are drawn", `${others} lines`);
  } catch {
    const shown = await page.$eval("#chart-queued", (el) => el.outerHTML).catch(() => "(missing)");
    bad("status page: the queued chart rises to the burst within 15 s", shown.slice(0, 400));
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const watchdog = setTimeout(() => {
    bad("whole run within 55 s", `still at step: ${step}`);
    finish(2).catch(() => process.exit(2));
  }, TOTAL_LIMIT_MS);

  try {
    await access(opts.chromium, fsConstants.X_OK);
  } catch {
    clearTimeout(watchdog);
    bad("browser", `chromium not found at ${opts.chromium} (run \`make browser-deps\`, or apt-get install chromium)`);
    return finish(3);
  }
  let chromium;
  let mqtt;
  try {
    ({ chromium } = await import("playwright-core"));
    mqtt = (await import("mqtt")).default;
  } catch (e) {
    clearTimeout(watchdog);
    bad("node modules", `${e.message} (run \`make browser-deps\`: npm ci --prefix tests/browser)`);
    return finish(3);
  }
  const bundle = join(HERE, "node_modules", "mqtt", "dist", "mqtt.min.js");
  try {
    await access(bundle, fsConstants.R_OK);
  } catch {
    clearTimeout(watchdog);
    bad("node modules", `${bundle} missing (run \`make browser-deps\`)`);
    return finish(3);
  }

  step = "launching chromium";
  const version = spawnSync(opts.chromium, ["--version"], { encoding: "utf8", timeout: 10_000 });
  const profile = await mkdtemp(join(tmpdir(), "tern-e2e-chromium-"));
  cleanups.push(() => rm(profile, { recursive: true, force: true }));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: opts.chromium,
      headless: true,
      chromiumSandbox: false,
      args: CHROMIUM_ARGS,
      timeout: 20_000,
    });
  } catch (e) {
    clearTimeout(watchdog);
    bad(`launch ${opts.chromium}`, e.message.split("\n").slice(0, 12).join("\n"));
    return finish(3);
  }
  cleanups.push(() => context.close());
  ok(`launched ${(version.stdout || opts.chromium).trim()} headless`);

  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_MS);
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") pageErrors.push(`console: ${m.text()}`);
  });

  try {
    step = "loading the test page";
    const pageUrl = await servePage();
    await page.goto(pageUrl, { waitUntil: "load", timeout: STEP_MS });
    await page.addScriptTag({ path: bundle });
    const hasMqtt = await page.evaluate(() => typeof window.mqtt?.connect === "function");
    if (!hasMqtt) throw new Error("MQTT.js browser bundle did not define window.mqtt.connect");
    ok(`page ${pageUrl} loaded with MQTT.js`);

    for (const v of [5, 4]) {
      try {
        await round(page, mqtt, opts, v);
      } catch (e) {
        bad(step, short(e));
      }
    }
    if (opts.status) {
      const traffic = await statusTraffic(mqtt, opts, `st${Date.now().toString(36)}`);
      await checkStatus(page, opts.status, traffic);
    }
  } catch (e) {
    bad(step, short(e));
  }
  if (failed && pageErrors.length) {
    for (const line of pageErrors.slice(0, 10)) console.log(`     ${line}`);
  }
  clearTimeout(watchdog);
  return finish(failed ? 1 : 0);
}

main().catch(async (e) => {
  bad(step, e && e.stack ? e.stack : String(e));
  await finish(1);
});
