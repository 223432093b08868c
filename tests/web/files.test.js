// files.test.js — end-to-end tests of files in the web client against a real Pigeon server
// (password mode) in real headless Chromium: a file arrives byte-identical (SHA-256) with
// progress shown on both sides and survives a reload; a video made in the browser
// (MediaRecorder on a canvas) plays inline, streamed from the server; an image sent to someone offline arrives at
// their sign-in as an <img>. Also takes docs/screenshot.png (PIGEON_UPDATE_SCREENSHOT=1).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, readFileSync } from 'node:fs';
import path from 'node:path';
import {
  PigeonServer, launchBrowser, openClient, signIn, openChat, send, sleep, ensureResultsDir, repoRoot,
} from './harness.js';

let server;
let browser;

before(async () => {
  server = new PigeonServer();
  await server.addUsers(['fiona', 'gus', 'hana', 'ivo', 'jun', 'kim', 'lena', 'milo']);
  await server.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const sha256 = (buf) => createHash('sha256').update(buf).digest('hex');
const fileItem = (page, name) => page.locator('#messages li.msg', { has: page.locator('.file-name', { hasText: name }) });

/** Records every progress label text shown in the page (even ones that last a few ms). */
async function watchProgress(page) {
  await page.evaluate(() => {
    window.progressSeen = [];
    new MutationObserver(() => {
      for (const l of document.querySelectorAll('.file-progress-text')) window.progressSeen.push(l.textContent);
    }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
  });
}

/** SHA-256 (hex) of what a page's link points at, computed in the page. */
const digestInPage = (page, selector) => page.$eval(selector, async (a) => {
  const buf = await (await fetch(a.href)).arrayBuffer();
  const d = await crypto.subtle.digest('SHA-256', buf);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, '0')).join('');
});

/**
 * Drops files made in the page (by `make`, returning [{name, type, blob}]) on the open chat.
 * `make` is evaluated as a string by the test driver (the page's CSP forbids eval inside it).
 */
async function dropMadeFiles(page, make, arg) {
  await page.evaluate(`(${make.toString()})(${JSON.stringify(arg)}).then((m) => { window.__made = m; })`);
  await page.evaluate(() => {
    const made = window.__made;
    delete window.__made;
    const dt = new DataTransfer();
    for (const f of made) dt.items.add(new File([f.blob], f.name, { type: f.type }));
    const pane = document.getElementById('chat-pane');
    for (const type of ['dragenter', 'dragover', 'drop']) {
      pane.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
    }
  });
}

/** A pleasant picture, drawn on a canvas in the page. */
const drawPicture = async ({ w, h, name }) => {
  const c = document.createElement('canvas');
  c.width = w; c.height = h;
  const g = c.getContext('2d');
  const sky = g.createLinearGradient(0, 0, 0, h);
  sky.addColorStop(0, '#ffb199'); sky.addColorStop(0.55, '#ff6f91'); sky.addColorStop(1, '#5f4b8b');
  g.fillStyle = sky; g.fillRect(0, 0, w, h);
  g.fillStyle = '#ffe29a'; g.beginPath(); g.arc(w * 0.68, h * 0.58, h * 0.2, 0, Math.PI * 2); g.fill();
  g.fillStyle = '#2b2d42';
  g.beginPath(); g.moveTo(0, h);
  for (let x = 0; x <= w; x += 4) g.lineTo(x, h * (0.74 + 0.06 * Math.sin(x / 47) + 0.04 * Math.sin(x / 13)));
  g.lineTo(w, h); g.fill();
  g.fillStyle = 'rgba(43,45,66,.85)';
  for (const [x, y, s] of [[0.2, 0.3, 1], [0.3, 0.24, 0.8], [0.4, 0.32, 0.6]]) {
    g.beginPath(); g.moveTo(w * x, h * y);
    g.quadraticCurveTo(w * x + 12 * s, h * y - 10 * s, w * x + 24 * s, h * y);
    g.quadraticCurveTo(w * x + 36 * s, h * y - 10 * s, w * x + 48 * s, h * y);
    g.lineWidth = 3; g.strokeStyle = g.fillStyle; g.stroke();
  }
  const blob = await new Promise((r) => c.toBlob(r, 'image/png'));
  return [{ name, type: 'image/png', blob }];
};

/** A short webm recorded in the page from an animated canvas (MediaRecorder). */
const recordVideo = async ({ ms }) => {
  const c = document.createElement('canvas');
  c.width = 320; c.height = 180;
  const g = c.getContext('2d');
  const stream = c.captureStream(30);
  const type = ['video/webm;codecs=vp8', 'video/webm;codecs=vp9', 'video/webm'].find((t) => MediaRecorder.isTypeSupported(t));
  const rec = new MediaRecorder(stream, { mimeType: type });
  const parts = [];
  rec.ondataavailable = (e) => { if (e.data.size) parts.push(e.data); };
  const done = new Promise((r) => { rec.onstop = r; });
  let t = 0;
  const timer = setInterval(() => {
    t += 1;
    g.fillStyle = `hsl(${(t * 9) % 360} 70% 55%)`; g.fillRect(0, 0, 320, 180);
    g.fillStyle = '#fff'; g.beginPath(); g.arc(20 + ((t * 8) % 280), 90, 24, 0, Math.PI * 2); g.fill();
  }, 33);
  rec.start(100);
  await new Promise((r) => setTimeout(r, ms));
  rec.stop();
  await done;
  clearInterval(timer);
  return [{ name: 'clip.webm', type: 'video/webm', blob: new Blob(parts, { type: 'video/webm' }) }];
};

test('a file sent from one page downloads byte-identical in the other, with progress on both sides', async () => {
  const a = await openClient(browser, server);
  const b = await openClient(browser, server);
  try {
    await signIn(a.page, 'fiona');
    await signIn(b.page, 'gus');
    await openChat(a.page, 'gus');
    await openChat(b.page, 'fiona'); // gus watches the conversation while it arrives
    await watchProgress(a.page);
    await watchProgress(b.page);

    // 12 MiB + a bit: many chunks, the last one short; random so nothing can fake it.
    const bytes = randomBytes(12 * 1024 * 1024 + 12345);
    await a.page.setInputFiles('#file-input', { name: 'data.bin', mimeType: 'application/octet-stream', buffer: bytes });
    await fileItem(a.page, 'data.bin').and(a.page.locator('[data-status="delivered"],[data-status="received"]')).waitFor({ timeout: 30000 });
    const got = fileItem(b.page, 'data.bin');
    await got.locator('a.file-download').waitFor({ timeout: 30000 });
    assert.equal(await got.locator('.file-size').textContent(), '12 MB');
    assert.equal(await got.locator('.file-download').getAttribute('download'), 'data.bin');
    assert.equal(await got.locator('progress').count(), 0, 'no progress bar once complete');

    // Through the browser's download, and computed in the page: both match the original.
    const [download] = await Promise.all([b.page.waitForEvent('download'), got.locator('a.file-download').click()]);
    const saved = path.join(ensureResultsDir(), 'downloaded-data.bin');
    await download.saveAs(saved);
    assert.equal(sha256(readFileSync(saved)), sha256(bytes));
    assert.equal(await digestInPage(b.page, '#messages li.msg .file-download'), sha256(bytes));

    const up = await a.page.evaluate(() => window.progressSeen);
    const down = await b.page.evaluate(() => window.progressSeen);
    assert.ok(up.some((t) => /^Uploading ([1-9]|[1-9]\d) %$/.test(t)), `upload progress shown: ${[...new Set(up)]}`);
    assert.ok(down.some((t) => /^Receiving ([1-9]|[1-9]\d) %$/.test(t)), `download progress shown: ${[...new Set(down)]}`);

    // The bytes were kept (IndexedDB) and acknowledged: after a reload the file is still
    // there, identical, and the server has nothing left to send again.
    const welcomes = [];
    b.page.on('websocket', (ws) => ws.on('framereceived', (f) => {
      if (typeof f.payload === 'string' && JSON.parse(f.payload).type === 'welcome') welcomes.push(JSON.parse(f.payload));
    }));
    await b.page.reload();
    await b.page.waitForSelector('#conn-pill[data-state="online"]');
    await openChat(b.page, 'fiona');
    await fileItem(b.page, 'data.bin').locator('a.file-download').waitFor();
    assert.equal(await digestInPage(b.page, '#messages li.msg .file-download'), sha256(bytes));
    assert.equal(welcomes.length, 1);
    assert.equal(welcomes[0].pending, 0, 'the file was acked, so it is gone from the mailbox');
    assert.equal(await b.page.locator('#messages li.msg').count(), 1);
    assert.deepEqual(a.page.errors, []);
    assert.deepEqual(b.page.errors, []);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});

test('a video recorded in the browser plays inline on the other side', async () => {
  const a = await openClient(browser, server);
  const b = await openClient(browser, server);
  try {
    await signIn(a.page, 'hana');
    await signIn(b.page, 'ivo');
    await openChat(a.page, 'ivo');
    await dropMadeFiles(a.page, recordVideo, { ms: 1200 });
    await fileItem(a.page, 'clip.webm').and(a.page.locator('[data-status="delivered"],[data-status="received"]')).waitFor({ timeout: 20000 });
    // The sender sees its own preview too.
    await a.page.locator('#messages video.file-video').waitFor();

    await b.page.locator('#conversations li[data-peer="hana"] .conv-preview', { hasText: '📎 clip.webm' }).waitFor();
    await openChat(b.page, 'hana');
    const video = b.page.locator('#messages li.msg[data-dir="in"] video.file-video');
    await video.waitFor();
    // Played from the server by its link (streaming.test.js has the details).
    assert.match(await video.getAttribute('src'), /^\/api\/blobs\//);
    // It loads: metadata with the recorded size, and it plays (time moves on).
    await b.page.waitForFunction(() => {
      const v = document.querySelector('#messages video.file-video');
      return v && v.readyState >= 1 && v.videoWidth === 320 && v.videoHeight === 180;
    }, null, { timeout: 10000 });
    await video.evaluate((v) => { v.muted = true; return v.play(); });
    await b.page.waitForFunction(() => document.querySelector('#messages video.file-video').currentTime > 0.2, null, { timeout: 10000 });
    assert.deepEqual(a.page.errors, []);
    assert.deepEqual(b.page.errors, []);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});

test('an image sent to someone offline arrives at their sign-in as a picture', async () => {
  const a = await openClient(browser, server);
  try {
    await signIn(a.page, 'jun');
    await openChat(a.page, 'kim');
    await dropMadeFiles(a.page, drawPicture, { w: 480, h: 300, name: 'sunset <b>1</b>.png' });
    // kim has never signed in: the image is stored on the server.
    await fileItem(a.page, 'sunset').and(a.page.locator('[data-status="stored"]')).waitFor({ timeout: 20000 });
    await send(a.page, 'the view from the roof tonight');
    await a.page.locator('#messages li.msg[data-status="stored"]').nth(1).waitFor();

    const k = await openClient(browser, server);
    try {
      await signIn(k.page, 'kim');
      const conv = k.page.locator('#conversations li[data-peer="jun"]');
      await conv.locator('.badge').filter({ hasText: '2' }).waitFor();
      await conv.click();
      const item = fileItem(k.page, 'sunset');
      assert.equal(await item.getAttribute('data-offline'), 'true');
      // The name is text, never markup.
      assert.equal(await item.locator('.file-name').textContent(), 'sunset <b>1</b>.png');
      assert.equal(await k.page.locator('#messages b').count(), 0);
      const img = item.locator('img.file-image');
      await k.page.waitForFunction(() => {
        const i = document.querySelector('#messages img.file-image');
        return i && i.complete && i.naturalWidth === 480 && i.naturalHeight === 300;
      });
      assert.equal(await img.getAttribute('alt'), 'sunset <b>1</b>.png');
      // In the conversation's order: the image, then the text sent after it.
      assert.deepEqual(await k.page.locator('#messages li.msg').evaluateAll((l) => l.map((e) => (e.querySelector('.file-name') ?? e.querySelector('.body')).textContent)),
        ['sunset <b>1</b>.png', 'the view from the roof tonight']);
      assert.deepEqual(k.page.errors, []);
    } finally {
      await k.context.close();
    }
  } finally {
    await a.context.close();
  }
});

test('screenshot: a conversation with text, a picture and a file', async () => {
  const a = await openClient(browser, server, { viewport: { width: 1100, height: 800 } });
  const b = await openClient(browser, server);
  try {
    await signIn(a.page, 'lena');
    await signIn(b.page, 'milo');
    // Another conversation waiting in the list, with an unread message.
    const c = await openClient(browser, server);
    await signIn(c.page, 'fiona');
    await openChat(c.page, 'lena');
    await send(c.page, 'Coffee tomorrow at 9? ☕');
    await a.page.locator('#conversations li[data-peer="fiona"]').waitFor();
    await c.context.close();
    await openChat(b.page, 'lena');
    await send(b.page, 'Did you make it up the hill before sunset? 🌄');
    await openChat(a.page, 'milo');
    await a.page.locator('#messages li.msg[data-dir="in"]').waitFor();
    await send(a.page, 'Just in time! Look at this:');
    await dropMadeFiles(a.page, drawPicture, { w: 560, h: 320, name: 'hilltop.png' });
    await fileItem(b.page, 'hilltop.png').locator('img.file-image').waitFor();
    await send(b.page, 'Wow. Sending you the route for next time');
    const gpx = Buffer.from('<?xml version="1.0"?>\n<gpx version="1.1" creator="pigeon-test">' + '<trkpt lat="47.1" lon="8.5"/>'.repeat(2000) + '</gpx>\n');
    await b.page.setInputFiles('#file-input', { name: 'hill-route.gpx', mimeType: 'application/gpx+xml', buffer: gpx });
    await fileItem(a.page, 'hill-route.gpx').locator('a.file-download').waitFor();
    await a.page.waitForFunction(() => document.querySelector('#messages img.file-image')?.naturalWidth > 0);
    await sleep(400);
    const shot = path.join(ensureResultsDir(), 'conversation-files.png');
    await a.page.screenshot({ path: shot });
    if (process.env.PIGEON_UPDATE_SCREENSHOT === '1') copyFileSync(shot, path.join(repoRoot, 'docs/screenshot.png'));
    assert.deepEqual(a.page.errors, []);
    assert.deepEqual(b.page.errors, []);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});
