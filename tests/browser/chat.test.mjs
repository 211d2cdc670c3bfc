// Real-browser test of the chat page (src/page.html) against the real server.
//
// Debian's Chromium, driven by playwright-core (no browser download), opens
// the page the server serves at GET / as two users: alice on a desktop-sized
// window, bob on a phone-sized one. The tests run in order and share the
// server and the two pages; each test's name says what it demonstrates.
//
// Run it through `bash .ci/browser.sh` (installs Chromium, builds the server).
// Environment:
//   LOOPCHAT_BIN        server binary (default: target/release/loopchat)
//   LOOPCHAT_SERVER     a whole server command instead, e.g. "node mock.js"
//   LOOPCHAT_PERSIST    "data-dir" (default) or "no-persist"
//   CHROMIUM            browser binary (default: /usr/bin/chromium)
//   SCREENSHOT_DIR      default: target/browser-screenshots
//
// Every wait below has a deadline (WAIT_MS); nothing sleeps to wait for
// something that can be awaited.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.LOOPCHAT_BIN || path.join(ROOT, 'target', 'release', 'loopchat');
const SERVER_CMD = process.env.LOOPCHAT_SERVER ? process.env.LOOPCHAT_SERVER.split(' ') : [BIN];
const PERSIST = process.env.LOOPCHAT_PERSIST || 'data-dir';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOT_DIR || path.join(ROOT, 'target', 'browser-screenshots');

/** Deadline of every single wait: generous for a loaded 2-core CI machine. */
const WAIT_MS = 15_000;
/** Deadline for the server to print its listening line. */
const START_MS = 20_000;
/** The XSS probe: must be shown as these characters, never become an element. */
const XSS = '<img src=x onerror=alert(1)>';

const tmp = mkdtempSync(path.join(tmpdir(), 'loopchat-browser-'));
const dataDir = path.join(tmp, 'data');

let server = null;      // { child, port, log }
let browser = null;
let alice = null;       // desktop page, in its own browser context
let bob = null;         // phone-sized page, in its own browser context
let raw = null;         // a page used only as a raw WebSocket client (own context)
const dialogs = [];     // any alert()/confirm() that fired: must stay empty
const pageErrors = [];  // uncaught exceptions in the pages: must stay empty
const requested = [];   // every URL a page asked for (no /favicon.ico among them)

// ---- the server process --------------------------------------------------

/**
 * Start the server on `port` (0 = any) and resolve with the port it printed
 * in its "listening on ws://127.0.0.1:PORT/ws" stderr line.
 */
function startServer(port) {
  const persist = PERSIST === 'data-dir' ? ['--data-dir', dataDir] : ['--no-persist'];
  const args = [...SERVER_CMD.slice(1), '--listen', `127.0.0.1:${port}`, ...persist];
  const child = spawn(SERVER_CMD[0], args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  const log = [];
  return new Promise((resolve, reject) => {
    let buffered = '';
    let done = false;
    const fail = (why) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(new Error(`${why}\n--- server output ---\n${log.join('\n')}`));
    };
    const timer = setTimeout(() => fail(`server did not print its listening line within ${START_MS} ms`), START_MS);
    const onData = (chunk) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop();
      for (const line of lines) {
        log.push(line);
        if (log.length > 500) log.shift();
        const m = /listening on ws:\/\/127\.0\.0\.1:(\d+)\/ws/.exec(line);
        if (m && !done) {
          done = true;
          clearTimeout(timer);
          resolve({ child, port: Number(m[1]), log });
        }
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (e) => fail(`could not start ${SERVER_CMD[0]}: ${e.message}`));
    child.on('exit', (code, signal) => fail(`server exited early (code ${code}, signal ${signal})`));
  });
}

/** Kill the server (SIGKILL: a crash, the hardest case for resume) and await its exit. */
async function killServer() {
  if (!server) return;
  const { child } = server;
  server = null;
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await withDeadline(exited, WAIT_MS, 'server did not exit after SIGKILL');
}

function withDeadline(promise, ms, what) {
  let timer;
  const deadline = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what)), ms); });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

// The server must not outlive the test, whatever happens.
process.on('exit', () => { if (server) server.child.kill('SIGKILL'); });

// ---- page helpers --------------------------------------------------------

const url = () => `http://127.0.0.1:${server.port}/`;

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: false });
}

/** A page in a context of its own: separate users do not share a network switch. */
async function newPage({ phone = false } = {}) {
  const context = await browser.newContext({
    viewport: phone ? { width: 390, height: 780 } : { width: 1100, height: 700 },
    isMobile: phone,
    hasTouch: phone,
  });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('dialog', async (d) => { dialogs.push(d.message()); await d.dismiss(); });
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('request', (r) => requested.push(r.url()));
  if (process.env.TRACE_FRAMES) {
    // TRACE_FRAMES=1 prints every WebSocket frame of every page (debugging aid).
    const id = Math.random().toString(36).slice(2, 6);
    page.on('websocket', (ws) => {
      ws.on('framesent', (f) => console.log(`[${id}] -> ${String(f.payload).slice(0, 200)}`));
      ws.on('framereceived', (f) => console.log(`[${id}] <- ${String(f.payload).slice(0, 200)}`));
      ws.on('close', () => console.log(`[${id}] closed`));
    });
  }
  return page;
}

async function login(page, name) {
  await page.goto(url());
  await page.fill('#username', name);
  await page.click('#connect');
  await page.locator('#status[data-state="online"]').waitFor();
}

/** Wait until the active view shows a message whose text is exactly `content`. */
async function waitForMessage(page, content) {
  await page.waitForFunction(
    (c) => [...document.querySelectorAll('#messages li.msg .content')].some((e) => e.textContent === c),
    content, { timeout: WAIT_MS });
}

async function sendMessage(page, content) {
  await page.fill('#input', content);
  await page.click('#send');
}

/** The message ids shown in the active view, in document order. */
function shownIds(page) {
  return page.$$eval('#messages li.msg', (lis) => lis.map((li) => Number(li.dataset.id)));
}

/** How many times each content appears in the active view. */
function shownContents(page) {
  return page.$$eval('#messages li.msg .content', (els) => els.map((e) => e.textContent));
}

/** Click something in the sidebar; on a phone it sits in a drawer behind #menu. */
async function inSidebar(page, selector) {
  if (await page.locator('#menu').isVisible() && !(await page.locator('aside').isVisible())) {
    await page.click('#menu');
  }
  await page.click(selector);
}

/** The notice lines (join/leave/error) of the active view. */
function shownNotices(page) {
  return page.$$eval('#messages li.notice', (lis) => lis.map((li) => li.textContent));
}

/** Limits the server announced in `welcome`, as the page stored them. */
function limitsOf(page) {
  return page.evaluate(() => state.limits);
}

/**
 * A scripted protocol client running in the `raw` page: connects as `username`
 * to `room`, sends each of `messages` (waiting for its echo; on rate_limited
 * it waits one token and resends), then asks for the room's history and
 * closes. Resolves with the ids of the sent messages and of the history.
 */
function rawClient({ username, room, messages = [], rate = 10 }) {
  return raw.evaluate(async ({ wsUrl, username, room, messages, rate, waitMs }) => {
    const ws = new WebSocket(`${wsUrl}?username=${username}&room=${room}`);
    const queue = [];
    const waiters = [];
    ws.onmessage = (e) => {
      const ev = JSON.parse(e.data);
      const i = waiters.findIndex((w) => w.match(ev));
      if (i >= 0) waiters.splice(i, 1)[0].resolve(ev); else queue.push(ev);
    };
    const next = (match, what) => new Promise((resolve, reject) => {
      const i = queue.findIndex(match);
      if (i >= 0) return resolve(queue.splice(i, 1)[0]);
      const t = setTimeout(() => reject(new Error(`raw client: no ${what} within ${waitMs} ms`)), waitMs);
      waiters.push({ match, resolve: (ev) => { clearTimeout(t); resolve(ev); } });
    });
    const closed = new Promise((resolve) => { ws.onclose = resolve; });
    await Promise.race([
      next((ev) => ev.type === 'joined' && ev.room === room, 'joined'),
      closed.then((e) => { throw new Error(`raw client closed before joined (code ${e.code})`); }),
    ]);
    const sentIds = [];
    for (let i = 0; i < messages.length; i++) {
      const ref = `r${i}`;
      for (;;) {
        ws.send(JSON.stringify({ type: 'message', room, content: messages[i], ref }));
        // Sent one at a time, so an error without a ref is about this one too
        // (a server may check the rate before it reads the command's ref).
        const ev = await next((e) => e.ref === ref || (e.type === 'error' && e.ref === undefined), `echo of ${ref}`);
        if (ev.type === 'message') { sentIds.push(ev.id); break; }
        if (ev.code !== 'rate_limited') throw new Error(`raw client: ${JSON.stringify(ev)}`);
        // The server's token bucket refills at `rate` per second: wait one token.
        await new Promise((r) => setTimeout(r, Math.ceil(1000 / rate)));
      }
    }
    let hist;
    for (;;) {
      ws.send(JSON.stringify({ type: 'history', room, limit: 500, ref: 'h' }));
      hist = await next((e) => (e.type === 'history' && e.room === room) || e.ref === 'h'
        || (e.type === 'error' && e.ref === undefined), 'history');
      if (hist.type === 'history') break;
      if (hist.code !== 'rate_limited') throw new Error(`raw client: ${JSON.stringify(hist)}`);
      await new Promise((r) => setTimeout(r, Math.ceil(1000 / rate)));
    }
    ws.close(1000);
    await closed;
    return { sentIds, historyIds: hist.messages.map((m) => m.id) };
  }, { wsUrl: `ws://127.0.0.1:${server.port}/ws`, username, room, messages, rate, waitMs: WAIT_MS });
}

function assertStrictlyIncreasing(ids, who) {
  for (let i = 1; i < ids.length; i++) {
    assert.ok(ids[i] > ids[i - 1], `${who}: ids not strictly increasing at ${i}: ${ids.join(',')}`);
  }
}

// ---- setup and teardown ------------------------------------------------------

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  mkdirSync(dataDir, { recursive: true });
  server = await startServer(0);
  // playwright-core starts Chromium on a fresh temporary --user-data-dir of
  // its own (and refuses one in `args`); it deletes it on close.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    timeout: START_MS,
  });
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  await killServer().catch(() => {});
  rmSync(tmp, { recursive: true, force: true });
});

/**
 * A test whose failure leaves evidence: screenshots of both pages
 * (FAILED-*.png), what each page shows, and the end of the server's log.
 */
function step(name, fn) {
  test(name, async (t) => {
    try {
      await fn(t);
    } catch (err) {
      const n = name.replace(/[^a-z0-9]+/gi, '-').slice(0, 40);
      for (const [who, page] of [['alice', alice], ['bob', bob]]) {
        if (!page || page.isClosed()) continue;
        await shot(page, `FAILED-${n}-${who}`).catch(() => {});
        const seen = await page.evaluate(() => ({
          status: document.getElementById('status').textContent,
          view: document.getElementById('room-title').textContent,
          lines: [...document.querySelectorAll('#messages li')].map((li) =>
            `${li.dataset.id ? `#${li.dataset.id} ` : ''}${li.textContent}`),
        })).catch((e) => `(page unreadable: ${e.message})`);
        t.diagnostic(`${who}: ${JSON.stringify(seen)}`);
      }
      if (server) t.diagnostic(`server log (last 30 lines):\n${server.log.slice(-30).join('\n')}`);
      throw err;
    }
  });
}

// ---- the tests --------------------------------------------------------------

step('the server serves the page at / and two users connect', async () => {
  alice = await newPage();
  bob = await newPage({ phone: true });
  raw = await newPage();
  await raw.goto(url());
  await login(alice, 'alice');
  await login(bob, 'bob');
  // alice learns of bob through the join notice; her member list shows both.
  await alice.locator('#members li[data-user="bob"]').waitFor();
  await alice.locator('#members li[data-user="alice"]').waitFor();
  assert.equal(await alice.textContent('#room-title'), '#default');
  // Each user sees their own join too, and others' joins.
  assert.ok((await shownNotices(alice)).includes('you (alice) joined'), `${await shownNotices(alice)}`);
  assert.ok((await shownNotices(alice)).includes('bob joined'));
  assert.ok((await shownNotices(bob)).includes('you (bob) joined'));
  await shot(alice, '01-alice-joined');
});

step('the icon is inline: no /favicon.ico request, and the SVG decodes', async () => {
  const href = await alice.getAttribute('link[rel="icon"]', 'href');
  assert.ok(href.startsWith('data:image/svg+xml,'), href);
  const size = await alice.evaluate((src) => new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve([img.naturalWidth, img.naturalHeight]);
    img.onerror = () => reject(new Error('the icon does not decode'));
    img.src = src;
  }), href);
  assert.ok(size[0] > 0 && size[1] > 0, `icon size ${size}`);
  assert.deepEqual(requested.filter((u) => u.endsWith('/favicon.ico')), []);
});

step('an empty username gets a guest name', async () => {
  const guest = await newPage();
  await guest.goto(url());
  await guest.fill('#username', '');
  await guest.click('#connect');
  await guest.locator('#status[data-state="online"]').waitFor();
  const status = await guest.textContent('#status');
  const m = /^online as (guest-\d+)$/.exec(status);
  assert.ok(m, `status: ${status}`);
  await guest.locator(`#members li[data-user="${m[1]}"]`).waitFor();
  assert.ok((await shownNotices(guest)).includes(`you (${m[1]}) joined`));
  await shot(guest, '01b-guest');
  await guest.context().close();
});

step('a message each way', async () => {
  await sendMessage(alice, 'hello bob, from alice');
  await waitForMessage(bob, 'hello bob, from alice');
  await sendMessage(bob, 'hi alice — bob here (on a phone)');
  await waitForMessage(alice, 'hi alice — bob here (on a phone)');
  await waitForMessage(bob, 'hi alice — bob here (on a phone)');
  await shot(alice, '02-chat-alice');
  await shot(bob, '02-chat-bob-phone');
});

step('user content is shown as text, never as HTML (XSS)', async () => {
  await sendMessage(alice, XSS);
  await waitForMessage(bob, XSS);
  await waitForMessage(alice, XSS);
  for (const page of [alice, bob]) {
    assert.equal(await page.locator('#messages img').count(), 0, 'an <img> element appeared in #messages');
  }
  // The bogus image would have fired onerror by now; give it no excuse: also
  // check that no dialog ever opened (the handler records them all).
  assert.deepEqual(dialogs, []);
  await shot(bob, '03-xss-bob-phone');
});

step('a direct message reaches only its recipient, shown in the Direct view', async () => {
  await alice.fill('#dm-to', 'bob');
  await sendMessage(alice, 'psst, just for you');
  // bob gets an unread badge on "Direct messages", opens it and reads it.
  await bob.locator('#direct-view .unread').waitFor({ state: 'attached' });
  await inSidebar(bob, '#direct-view');
  await bob.waitForFunction(() => [...document.querySelectorAll('#messages li.direct')]
    .some((li) => li.dataset.from === 'alice' && li.querySelector('.content').textContent === 'psst, just for you'));
  await shot(bob, '04-direct-bob-phone');
  // Nothing of it in the room.
  await inSidebar(bob, '#rooms li[data-room="default"] .name');
  assert.ok(!(await shownContents(bob)).includes('psst, just for you'));
  await alice.click('#dm-clear');
});

step('a refused name says why: taken, or breaking the rule', async () => {
  const third = await newPage();
  await third.goto(url());
  await third.fill('#username', 'alice');
  await third.click('#connect');
  await third.locator('#status[data-state="failed"]').waitFor({ state: 'attached' });
  assert.equal(await third.textContent('#login-error'),
    'the name alice is taken: someone connected uses it; pick another');
  await shot(third, '05-name-taken');
  // The page's own check of the rule, before asking the server.
  await third.fill('#username', 'no spaces!');
  await third.click('#connect');
  assert.match(await third.textContent('#login-error'), /^invalid name: use 1–32 letters/);
  // The server's check, asked directly as the page does: the same reasons.
  const answers = await third.evaluate(async () => {
    const ask = async (q) => (await fetch(`/name-check?${q}`)).json();
    return [await ask('username=alice'), await ask('username=no%20spaces'),
            await ask('username=zed&room=a%2Fb'), await ask('username=zed')];
  });
  assert.deepEqual(answers.map((a) => a.ok ? 'ok' : a.reason), ['taken', 'invalid', 'bad_room', 'ok']);
  await third.context().close();
});

step('an error event is shown as a readable message (too_long)', async () => {
  const limits = await limitsOf(alice);
  assert.ok(limits && limits.max_content_bytes > 0, `welcome.limits: ${JSON.stringify(limits)}`);
  const long = 'x'.repeat(limits.max_content_bytes + 1);
  await sendMessage(alice, long);
  await alice.locator('#errors').waitFor();
  assert.match(await alice.textContent('#errors-text'), /message too long.*\[too_long\]/);
  // The refused text is handed back for editing.
  assert.equal(await alice.inputValue('#input'), long);
  await shot(alice, '06-error-too-long');
  await alice.fill('#input', '');
  await alice.click('#errors-close');
});

step('after a server restart the pages reconnect and resume: no gap, no duplicate', async () => {
  const port = server.port;
  // Hold the pages offline so that messages are certainly sent while they are
  // away; the page reconnects itself once the browser is back online.
  for (const page of [alice, bob]) await page.context().setOffline(true);
  await killServer();
  for (const page of [alice, bob]) await page.locator('#status[data-state="reconnecting"]').waitFor();
  await shot(alice, '07-reconnecting-alice');

  server = await startServer(port);  // the same port: the pages use the URL they had
  const missed = ['missed one', 'missed two', 'missed three'];
  const carol = await rawClient({ username: 'carol', room: 'default', messages: missed });
  for (const page of [alice, bob]) {
    assert.equal(await page.getAttribute('#status', 'data-state'), 'reconnecting', 'a page came back while offline');
  }
  for (const page of [alice, bob]) await page.context().setOffline(false);

  for (const page of [alice, bob]) {
    await page.locator('#status[data-state="online"]').waitFor();
    for (const m of missed) await waitForMessage(page, m);
  }
  await sendMessage(alice, 'alice is back');
  await sendMessage(bob, 'bob is back');
  for (const page of [alice, bob]) {
    await waitForMessage(page, 'alice is back');
    await waitForMessage(page, 'bob is back');
  }

  // The server's own history of the room is the truth: every page shows
  // exactly those ids, in order, each once.
  const check = await rawClient({ username: 'checker', room: 'default' });
  const truth = check.historyIds;
  assert.ok(carol.sentIds.every((id) => truth.includes(id)));
  for (const [name, page] of [['alice', alice], ['bob', bob]]) {
    const ids = await shownIds(page);
    assertStrictlyIncreasing(ids, name);
    assert.deepEqual(ids, truth, `${name} shows ids ${ids} but the server holds ${truth}`);
    const contents = await shownContents(page);
    for (const c of [...missed, 'alice is back', 'bob is back', 'hello bob, from alice', XSS]) {
      assert.equal(contents.filter((x) => x === c).length, 1, `${name}: "${c}" shown ${contents.filter((x) => x === c).length} times`);
    }
  }
  await shot(alice, '08-resumed-alice');
  await shot(bob, '08-resumed-bob-phone');
});

step('joining a room shows its backlog and "Load older" pages further back', async (t) => {
  const limits = await limitsOf(alice);
  const backlog = limits.history_limit;
  if (!(backlog > 0 && backlog <= 300)) {
    t.skip(`history_limit ${backlog} too large to fill in a test`);
    return;
  }
  const total = backlog + 12;
  const lines = Array.from({ length: total }, (_, i) => `paging line ${i + 1}`);
  // bob joins first (through the phone drawer) and stays, so the room is
  // never empty (a server may drop an empty room); he sees the lines live.
  await bob.click('#menu');
  await bob.fill('#join-room', 'paging');
  await bob.click('#join');
  await bob.locator('#room-title', { hasText: '#paging' }).waitFor();
  const filler = await rawClient({ username: 'filler', room: 'paging', messages: lines, rate: limits.rate_per_s || 10 });
  assert.equal(filler.sentIds.length, total);

  await alice.fill('#join-room', 'paging');
  await alice.click('#join');
  await alice.locator('#room-title', { hasText: '#paging' }).waitFor();
  await waitForMessage(alice, `paging line ${total}`);
  const first = await shownIds(alice);
  assert.ok(first.length <= backlog, `joined.history holds ${first.length} > history_limit ${backlog}`);

  // Page back until the server has nothing older (bounded: each click brings
  // up to min(50, history_limit) messages; the last one brings none).
  for (let i = 0; i < Math.ceil(total / Math.min(50, backlog)) + 3; i++) {
    if (await alice.locator('#older').isDisabled()) break;
    await alice.click('#older');
    await alice.waitForFunction(() => !document.getElementById('older').textContent.startsWith('Loading'));
  }
  // Nothing older left: the button is gone, not merely disabled.
  assert.ok(await alice.locator('#older').isHidden(), '"Load older" still shown');
  const ids = await shownIds(alice);
  const truth = (await rawClient({ username: 'checker2', room: 'paging' })).historyIds;
  assertStrictlyIncreasing(ids, 'alice #paging');
  // Everything the server keeps for the room is reachable from the page.
  assert.deepEqual(ids.slice(-truth.length), truth);
  await alice.evaluate(() => { document.getElementById('scroller').scrollTop = 0; });
  await shot(alice, '09-paging-alice');
  // The room list shows both rooms with member counts.
  await alice.locator('#rooms li[data-room="paging"][data-joined="true"]').waitFor();
  await alice.locator('#rooms li[data-room="default"] .count').waitFor();
  await waitForMessage(bob, `paging line ${total}`);
  assertStrictlyIncreasing(await shownIds(bob), 'bob #paging');
  await inSidebar(bob, '#rooms li[data-room="default"] .name');
});

step('"Load older" is hidden where nothing older exists', async () => {
  // A new room has no history at all.
  await alice.fill('#join-room', 'quiet');
  await alice.click('#join');
  await alice.locator('#room-title', { hasText: '#quiet' }).waitFor();
  assert.ok(await alice.locator('#older').isHidden(), '"Load older" shown in an empty room');
  await sendMessage(alice, 'first words in quiet');
  await waitForMessage(alice, 'first words in quiet');
  assert.ok(await alice.locator('#older').isHidden(), '"Load older" shown above message #1');
  await shot(alice, '09b-quiet-no-older');
});

step('switching rooms clears the direct-message recipient', async () => {
  // alice picks bob as recipient from #default's member list.
  await alice.click('#rooms li[data-room="default"] .name');
  await alice.locator('#room-title', { hasText: '#default' }).waitFor();
  await alice.click('#members li[data-user="bob"]');
  assert.equal(await alice.inputValue('#dm-to'), 'bob');
  assert.equal(await alice.getAttribute('#input', 'placeholder'), 'Direct message to bob');
  await alice.click('#rooms li[data-room="quiet"] .name');
  await alice.locator('#room-title', { hasText: '#quiet' }).waitFor();
  assert.equal(await alice.inputValue('#dm-to'), '');
  assert.equal(await alice.getAttribute('#input', 'placeholder'), 'Message #quiet');
  // So the next line goes to the room the header shows.
  await sendMessage(alice, 'meant for quiet');
  await waitForMessage(alice, 'meant for quiet');
  await shot(alice, '09c-room-switch-clears-dm');
});

step('the phone layout opens the rooms drawer', async () => {
  await bob.click('#menu');
  await bob.locator('aside').waitFor();
  await bob.click('#rooms-refresh');
  await bob.locator('#rooms li[data-room="paging"] .count').waitFor();
  await shot(bob, '10-drawer-bob-phone');
  await bob.click('#menu');
  assert.deepEqual(dialogs, [], 'a dialog fired');
  assert.deepEqual(pageErrors, [], 'the page threw');
  assert.deepEqual(requested.filter((u) => u.endsWith('/favicon.ico')), [], 'a page asked for /favicon.ico');
});
