// streaming.test.js — a received video plays from the server, not from bytes assembled in
// the page: against a real Pigeon server (password mode) in real headless Chromium, the
// recipient's <video> loads `/api/blobs/...` (the signed link of its `blob_start`) with
// Range requests, knows its duration and seeks — for a recipient online while it arrives
// and for one who signs in later. The bytes are also kept in the browser, so when the
// link fails (expired, or the server no longer has the file) the page plays its own copy.
// The video is tests/web/fixtures/clip-4s.webm (4 s of VP8, 64x48, 6 KB).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PigeonServer, launchBrowser, openClient, signIn, openChat } from './harness.js';

const clip = readFileSync(path.join(path.dirname(new URL(import.meta.url).pathname), 'fixtures/clip-4s.webm'));
const sha256 = (buf) => createHash('sha256').update(buf).digest('hex');

let server;
let browser;

before(async () => {
  server = new PigeonServer();
  await server.addUsers(['olga', 'pavel', 'quinn', 'rosa', 'sven', 'tara']);
  await server.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const fileItem = (page, name) => page.locator('#messages li.msg', { has: page.locator('.file-name', { hasText: name }) });

/** Every request the page makes for a stored file, with its Range header and answer. */
function watchBlobRequests(page) {
  const seen = [];
  page.on('request', async (r) => {
    if (!new URL(r.url()).pathname.startsWith('/api/blobs/')) return;
    const entry = { url: r.url(), range: (await r.allHeaders()).range ?? null, status: null };
    seen.push(entry);
    const res = await r.response().catch(() => null);
    entry.status = res?.status() ?? null;
  });
  return seen;
}

/** Waits until the page's received video knows its length; gives {src, duration}. */
async function loadedVideo(page) {
  const handle = await page.waitForFunction(() => {
    const v = document.querySelector('#messages li.msg[data-dir="in"] video.file-video');
    return v && v.readyState >= 1 && Number.isFinite(v.duration) && v.duration > 0
      ? { src: v.currentSrc, duration: v.duration } : null;
  }, null, { timeout: 15000 });
  return handle.jsonValue();
}

/** Seeks the received video to `t` seconds; gives the time it landed on. */
const seekTo = (page, t) => page.$eval('#messages li.msg[data-dir="in"] video.file-video', (v, to) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`no seeked event (readyState ${v.readyState})`)), 10000);
  v.addEventListener('seeked', () => { clearTimeout(timer); resolve(v.currentTime); }, { once: true });
  v.currentTime = to;
}), t);

/** SHA-256 of what the file's download link gives, fetched in the page. */
const digestInPage = (page, name) => fileItem(page, name).locator('a.file-download').evaluate(async (a) => {
  const d = await crypto.subtle.digest('SHA-256', await (await fetch(a.href)).arrayBuffer());
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, '0')).join('');
});

/** The keys of the page's file store (IndexedDB, see static/js/files.js). */
const idbKeys = () => new Promise((resolve, reject) => {
  const req = indexedDB.open('pigeon-files');
  req.onerror = () => reject(req.error);
  req.onsuccess = () => {
    const all = req.result.transaction('blobs').objectStore('blobs').getAllKeys();
    all.onsuccess = () => resolve(all.result.map(String));
    all.onerror = () => reject(all.error);
  };
});

async function sendClip(page, to) {
  await openChat(page, to);
  await page.setInputFiles('#file-input', { name: 'clip.webm', mimeType: 'video/webm', buffer: clip });
}

for (const when of ['online', 'offline']) {
  test(`a video streams from the server to an ${when} recipient: Range requests, duration, seeking`, async () => {
    const [from, to] = when === 'online' ? ['olga', 'pavel'] : ['quinn', 'rosa'];
    const a = await openClient(browser, server);
    const b = await openClient(browser, server);
    try {
      const requests = watchBlobRequests(b.page);
      await signIn(a.page, from);
      if (when === 'online') {
        await signIn(b.page, to);
        await openChat(b.page, from);
      }
      await sendClip(a.page, to);
      const status = when === 'online' ? '[data-status="delivered"],[data-status="received"]' : '[data-status="stored"]';
      await fileItem(a.page, 'clip.webm').and(a.page.locator(status)).waitFor({ timeout: 20000 });
      // The sender plays its own copy (the File it picked), not the server's.
      assert.match(await a.page.locator('#messages video.file-video').getAttribute('src'), /^blob:/);
      if (when === 'offline') {
        await signIn(b.page, to);
        await openChat(b.page, from);
        assert.equal(await fileItem(b.page, 'clip.webm').getAttribute('data-offline'), 'true');
      }

      const { src, duration } = await loadedVideo(b.page);
      assert.match(new URL(src).pathname, /^\/api\/blobs\/[A-Za-z0-9-]+$/, `the video plays from the server: ${src}`);
      assert.equal(new URL(src).origin, server.url, 'from the page\'s own origin');
      assert.ok(Math.abs(duration - 4) < 0.3, `duration ${duration}`);
      const landed = await seekTo(b.page, 2.5);
      assert.ok(Math.abs(landed - 2.5) < 0.3, `seeked to ${landed}`);
      const ranged = requests.filter((r) => r.url === src && /^bytes=\d*-\d*$/.test(r.range ?? ''));
      assert.ok(ranged.length >= 1, `Range requests for the video: ${JSON.stringify(requests)}`);
      assert.ok(ranged.every((r) => r.status === null || r.status === 206), `answered 206: ${JSON.stringify(ranged)}`);

      // Its bytes were kept in this browser too (written chunk by chunk), identical.
      await b.page.waitForFunction(() => document.querySelector('#messages li.msg[data-dir="in"] a.file-download')?.href.startsWith('blob:'), null, { timeout: 15000 });
      assert.equal(await digestInPage(b.page, 'clip.webm'), sha256(clip));
      assert.deepEqual(await b.page.evaluate(idbKeys).then((ks) => ks.filter((k) => k.includes('#part-'))), [],
        'the chunks written while it arrived were joined and removed');
      assert.deepEqual(a.page.errors, []);
      assert.deepEqual(b.page.errors, []);
    } finally {
      await a.context.close();
      await b.context.close();
    }
  });
}

test('when the link no longer works, the video plays from the copy kept in the browser', async () => {
  const a = await openClient(browser, server);
  const b = await openClient(browser, server);
  try {
    await signIn(a.page, 'sven');
    await signIn(b.page, 'tara');
    await openChat(b.page, 'sven');
    await sendClip(a.page, 'tara');
    const first = await loadedVideo(b.page);
    assert.match(new URL(first.src).pathname, /^\/api\/blobs\//);
    await b.page.waitForFunction(() => document.querySelector('#messages li.msg[data-dir="in"] a.file-download')?.href.startsWith('blob:'), null, { timeout: 15000 });

    // Chunks a page closed mid-file left behind are cleared at the next start.
    await b.page.evaluate(() => new Promise((resolve, reject) => {
      const req = indexedDB.open('pigeon-files');
      req.onsuccess = () => {
        const tx = req.result.transaction('blobs', 'readwrite');
        tx.objectStore('blobs').put(new Blob(['x']), 'tara/in/sven/gone#part-abc-0');
        tx.oncomplete = resolve;
        tx.onerror = () => reject(tx.error);
      };
    }));
    // As after the link expired, or after the server swept the file: every download fails.
    await b.context.route('**/api/blobs/**', (r) => r.fulfill({ status: 404, contentType: 'application/json', body: '{"error":"not_found"}' }));
    await b.page.reload();
    await b.page.waitForSelector('#conn-pill[data-state="online"]');
    await openChat(b.page, 'sven');
    const again = await b.page.waitForFunction(() => {
      const v = document.querySelector('#messages li.msg[data-dir="in"] video.file-video');
      return v && v.currentSrc.startsWith('blob:') && v.readyState >= 1 && v.duration > 0 ? { src: v.currentSrc, duration: v.duration } : null;
    }, null, { timeout: 15000 }).then((h) => h.jsonValue());
    assert.ok(Math.abs(again.duration - 4) < 0.3, `duration ${again.duration}`);
    const landed = await seekTo(b.page, 3);
    assert.ok(Math.abs(landed - 3) < 0.3, `seeked to ${landed}`);
    assert.equal(await digestInPage(b.page, 'clip.webm'), sha256(clip));
    assert.deepEqual((await b.page.evaluate(idbKeys)).filter((k) => k.includes('#part-')), [], 'stale chunks removed');
    // The failed load is the browser's own console line; nothing else went wrong.
    assert.deepEqual(b.page.errors.filter((e) => !/Failed to load resource.*404/.test(e)), []);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});
