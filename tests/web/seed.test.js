// seed.test.js — a seed-tutorial page (tests/web/fixtures/seed-page.html: a raw
// `new WebSocket(server + '/ws/' + name)`, `JSON.parse` on every frame, each printed as
// "from_user: msg") served from an origin of its own, as a tutorial is, in real headless
// Chromium against a real Pigeon server in open mode (the tutorials have no passwords).
// Files sent from the Pigeon web client reach it as readable JSON notices naming the
// file with a working download link — online, and stored while it was away — and never
// as a binary frame its JSON.parse would throw on. The page can connect because its
// origin is in `[auth] allowed_origins` (PIGEON_AUTH_ALLOWED_ORIGINS); without that the
// upgrade is refused and the server's log names the setting.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PigeonServer, launchBrowser, openClient, signIn, openChat, send, sleep, freePort } from './harness.js';

const fixtures = path.join(path.dirname(new URL(import.meta.url).pathname), 'fixtures');
const clip = readFileSync(path.join(fixtures, 'clip-4s.webm'));

let pages;   // the tutorial's own little web server
let pageOrigin;
let server;
let browser;

before(async () => {
  const port = await freePort();
  pages = createServer((req, res) => {
    if (new URL(req.url, 'http://x').pathname !== '/seed-page.html') { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(readFileSync(path.join(fixtures, 'seed-page.html')));
  });
  await new Promise((r) => pages.listen(port, '127.0.0.1', r));
  pageOrigin = `http://127.0.0.1:${port}`;
  server = new PigeonServer({ auth: 'open', env: { PIGEON_AUTH_ALLOWED_ORIGINS: pageOrigin } });
  await server.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
  pages?.close();
});

/** Opens the seed page as `user` against `srv`; records every WebSocket frame it receives. */
async function openSeedPage(user, srv = server) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.errors = [];
  page.frames = [];
  page.on('pageerror', (e) => page.errors.push(String(e)));
  page.on('websocket', (ws) => ws.on('framereceived', (f) => page.frames.push(f.payload)));
  const wsUrl = srv.url.replace('http://', 'ws://');
  await page.goto(`${pageOrigin}/seed-page.html?server=${encodeURIComponent(wsUrl)}&user=${user}`);
  return { context, page };
}

const lines = (page) => page.locator('#messages li').allTextContents();

/** The line naming `name`, once the page shows it. */
async function noticeFor(page, name) {
  await page.locator('#messages li', { hasText: name }).waitFor({ timeout: 15000 });
  return (await lines(page)).find((l) => l.includes(name));
}

/** Checks a notice line: sender, file name, type, size and a link that downloads the bytes. */
async function checkNotice(line, { from, name, mime, bytes }) {
  const m = line.match(/^(\S+): \[file (.+) \(([^,]+), (\d+) bytes\)\] (\S+)$/);
  assert.ok(m, `a readable file notice: ${line}`);
  assert.deepEqual(m.slice(1, 5), [from, name, mime, String(bytes.length)]);
  const link = new URL(m[5]);
  assert.equal(link.origin, server.url, 'an absolute link to the Pigeon server (the page is elsewhere)');
  const res = await fetch(link);
  assert.equal(res.status, 200);
  assert.ok(Buffer.from(await res.arrayBuffer()).equals(bytes), 'the link gives the file');
}

test('a seed-tutorial page gets files from the web client as readable notices, online and offline', async () => {
  const sam = await openSeedPage('sam');
  const alice = await openClient(browser, server);
  try {
    await sam.page.locator('#status', { hasText: 'open' }).waitFor();
    await signIn(alice.page, 'alice');
    await openChat(alice.page, 'sam');
    await send(alice.page, 'a video for you');
    await alice.page.setInputFiles('#file-input', { name: 'clip.webm', mimeType: 'video/webm', buffer: clip });
    await checkNotice(await noticeFor(sam.page, 'clip.webm'), { from: 'alice', name: 'clip.webm', mime: 'video/webm', bytes: clip });
    assert.equal((await lines(sam.page))[0], 'alice: a video for you');

    // eve has never been online: the file is stored and arrives when her page opens.
    await openChat(alice.page, 'eve');
    const notes = Buffer.from('shopping: milk, eggs\n');
    await alice.page.setInputFiles('#file-input', { name: 'notes.txt', mimeType: 'text/plain', buffer: notes });
    await alice.page.locator('#messages li.msg[data-status="stored"]').waitFor({ timeout: 15000 });
    const eve = await openSeedPage('eve');
    try {
      await checkNotice(await noticeFor(eve.page, 'notes.txt'), { from: 'alice', name: 'notes.txt', mime: 'text/plain', bytes: notes });
      // The page can answer in its own dialect, and the web client shows it.
      await eve.page.fill('#to', 'alice');
      await eve.page.fill('#text', 'thanks!');
      await eve.page.click('#form button');
      await alice.page.locator('#messages li.msg[data-dir="in"] .body', { hasText: 'thanks!' }).waitFor();
      for (const p of [sam.page, eve.page]) {
        assert.deepEqual(p.errors, [], 'JSON.parse never threw');
        assert.ok(p.frames.length >= 1 && p.frames.every((f) => typeof f === 'string'), 'only text frames');
      }
      assert.ok(eve.page.frames.some((f) => JSON.parse(f).offline === true), 'the stored file is marked offline');
    } finally {
      await eve.context.close();
    }
  } finally {
    await sam.context.close();
    await alice.context.close();
  }
});

test('without [auth] allowed_origins the page cannot connect, and the log says what to set', async () => {
  const closed = new PigeonServer({ auth: 'open' });
  await closed.start();
  const page = await openSeedPage('sam', closed);
  try {
    await page.page.locator('#status', { hasText: 'closed' }).waitFor({ timeout: 10000 });
    assert.equal(await page.page.textContent('#status'), 'closed 1006', 'a refused upgrade is all a page sees');
    for (let i = 0; i < 50 && !closed.log.includes('PIGEON_AUTH_ALLOWED_ORIGINS'); i += 1) await sleep(100);
    assert.match(closed.log, /\[auth\] allowed_origins/);
    assert.ok(closed.log.includes(pageOrigin), 'the log names the refused origin');
  } finally {
    await page.context.close();
    await closed.stop();
  }
});
