// chat.test.js — end-to-end tests of the web client (static/) against a real Pigeon
// server (password mode, accounts made with `pigeon user add`) in real headless Chromium:
// chatting both ways, offline catch-up, text never becoming HTML, being kicked by a
// second sign-in, and resuming after a server restart.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import {
  PigeonServer, launchBrowser, openClient, signIn, openChat, send, bodies, sleep,
  ensureResultsDir,
} from './harness.js';

let server;
let browser;

before(async () => {
  server = new PigeonServer();
  await server.addUsers(['alice', 'bob', 'carlos', 'dora', 'carol', 'mallory', 'victim', 'erin', 'frank', 'grace', 'heidi']);
  await server.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const msgItem = (page, text) => page.locator('#messages li.msg', { has: page.locator('.body', { hasText: text }) });

test('two people chat both ways, with unread counts and delivery status', async () => {
  const a = await openClient(browser, server);
  const b = await openClient(browser, server);
  try {
    await signIn(a.page, 'alice');
    await signIn(b.page, 'bob');

    await openChat(a.page, 'bob');
    await send(a.page, 'Hi Bob! Are we still on for lunch?');
    await send(a.page, 'The new place on 5th street 🌮');
    // bob is online: the server hands it over live ("delivered"), and once bob's page has
    // acknowledged it the server's receipt turns it into "received".
    await msgItem(a.page, 'The new place').and(a.page.locator('[data-status="delivered"],[data-status="received"]')).waitFor();
    await msgItem(a.page, 'The new place').and(a.page.locator('[data-status="received"]')).waitFor();
    assert.equal(await msgItem(a.page, 'The new place').locator('.status-text').textContent(), 'Received');

    // bob has not opened the conversation: it is listed with 2 unread.
    const conv = b.page.locator('#conversations li[data-peer="alice"]');
    await conv.locator('.badge').filter({ hasText: '2' }).waitFor();
    assert.equal(await b.page.title(), '(2) Pigeon');
    await conv.click();
    assert.equal(await conv.locator('.badge').count(), 0, 'opening the conversation clears its unread count');
    assert.deepEqual(await bodies(b.page), ['Hi Bob! Are we still on for lunch?', 'The new place on 5th street 🌮']);
    assert.equal(await b.page.locator('#messages li.msg[data-dir="in"] .sender').first().textContent(), 'alice');

    // Shift+Enter is a newline, Enter sends.
    await b.page.fill('#composer-input', 'Yes!');
    await b.page.press('#composer-input', 'Shift+Enter');
    await b.page.type('#composer-input', 'See you at 12:30');
    assert.equal(await b.page.locator('#messages li.msg').count(), 2, 'Shift+Enter did not send');
    await b.page.press('#composer-input', 'Enter');
    assert.equal(await b.page.inputValue('#composer-input'), '', 'Enter sent and cleared the composer');

    await msgItem(a.page, 'See you at').waitFor();
    assert.deepEqual(await bodies(a.page, 'in'), ['Yes!\nSee you at 12:30']);
    await msgItem(b.page, 'See you at').and(b.page.locator('[data-status="delivered"],[data-status="received"]')).waitFor();
    await send(a.page, 'Great, I booked a table by the window.');
    await msgItem(b.page, 'booked a table').waitFor();
    await send(b.page, 'Perfect 👍');
    await msgItem(a.page, 'Perfect').waitFor();
    // alice is looking at the conversation, so nothing counts as unread for her.
    assert.equal(await a.page.locator('#conversations .badge').count(), 0);

    // Someone else writes while alice has bob's conversation open: a second entry with
    // its own unread count, on top of the list, and bob's conversation stays on screen.
    const c = await openClient(browser, server);
    try {
      await signIn(c.page, 'carlos');
      await openChat(c.page, 'alice');
      await send(c.page, 'Are you coming to the board games night on Friday?');
      await send(c.page, 'Bring snacks 🍿');
      const other = a.page.locator('#conversations li[data-peer="carlos"]');
      await other.locator('.badge').filter({ hasText: '2' }).waitFor();
      assert.deepEqual(await a.page.locator('#conversations li').evaluateAll((l) => l.map((e) => e.dataset.peer)), ['carlos', 'bob']);
      assert.equal(await a.page.textContent('#peer-name'), 'bob');
      assert.equal(await bodies(a.page).then((x) => x.length), 5);
    } finally {
      await c.context.close();
    }

    await sleep(300); // let the last status land before the picture
    const dir = ensureResultsDir();
    const shot = path.join(dir, 'conversation.png');
    await a.page.screenshot({ path: shot });
    assert.deepEqual(a.page.errors, []);
    assert.deepEqual(b.page.errors, []);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});

test('messages sent to an offline user arrive at sign-in, marked offline and in order', async () => {
  const a = await openClient(browser, server);
  try {
    await signIn(a.page, 'dora');
    await openChat(a.page, 'carol');
    const sent = ['first while you were out', 'second', 'third, last one'];
    for (const t of sent) await send(a.page, t);
    // carol has never signed in: each is stored, not delivered.
    await a.page.waitForFunction(() => {
      const s = [...document.querySelectorAll('#messages li.msg[data-dir="out"]')].map((li) => li.dataset.status);
      return s.length === 3 && s.every((x) => x === 'stored');
    });

    const c = await openClient(browser, server, { viewport: { width: 390, height: 760 } });
    try {
      await signIn(c.page, 'carol');
      const conv = c.page.locator('#conversations li[data-peer="dora"]');
      await conv.locator('.badge').filter({ hasText: '3' }).waitFor();
      await conv.click();
      assert.deepEqual(await bodies(c.page), sent);
      const items = c.page.locator('#messages li.msg');
      const seqs = (await items.evaluateAll((els) => els.map((e) => Number(e.dataset.seq))));
      assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), 'in seq order');
      assert.equal(await c.page.locator('#messages li.msg[data-offline="true"]').count(), 3);
      assert.equal(await c.page.locator('#messages li.msg .offline-tag').first().textContent(), 'while you were away');

      // Live traffic after the catch-up is not marked offline.
      await send(a.page, 'and now live');
      await msgItem(c.page, 'and now live').waitFor();
      assert.equal(await msgItem(c.page, 'and now live').getAttribute('data-offline'), null);
      await msgItem(a.page, 'and now live').and(a.page.locator('[data-status="delivered"],[data-status="received"]')).waitFor();
      await c.page.screenshot({ path: path.join(ensureResultsDir(), 'phone-offline-catch-up.png') });

      // The client acked what it showed: a reload (remembered sign-in) shows each once.
      await c.page.reload();
      await c.page.waitForSelector('#conn-pill[data-state="online"]');
      await sleep(300);
      await openChat(c.page, 'dora');
      assert.deepEqual(await bodies(c.page), [...sent, 'and now live']);
      assert.deepEqual(c.page.errors, []);
    } finally {
      await c.context.close();
    }
    // The acks reached the server: a new device (empty localStorage) finds the mailbox
    // empty, so the messages were not left to pile up there.
    const fresh = await openClient(browser, server);
    try {
      // (A new device first tries the name alone, hears auth_required, then uses the password.)
      const welcomes = [];
      fresh.page.on('websocket', (ws) => ws.on('framereceived', (f) => {
        const x = JSON.parse(f.payload);
        if (x.type === 'welcome') welcomes.push(x);
      }));
      await signIn(fresh.page, 'carol');
      assert.equal(welcomes.length, 1);
      assert.equal(welcomes[0].pending, 0);
      assert.equal(await fresh.page.locator('#conversations li').count(), 0);
    } finally {
      await fresh.context.close();
    }
  } finally {
    await a.context.close();
  }
});

test('message text is shown as text, never as HTML', async () => {
  const a = await openClient(browser, server);
  const b = await openClient(browser, server);
  try {
    await signIn(a.page, 'mallory');
    await signIn(b.page, 'victim');
    const evil = '<img src=x onerror=alert(1)>';
    const evil2 = '<b>bold?</b><script>alert(2)</script>';
    await openChat(a.page, 'victim');
    await send(a.page, evil);
    await send(a.page, evil2);
    await b.page.locator('#conversations li[data-peer="mallory"]').waitFor();
    // The list preview shows the raw text too.
    await b.page.locator('#conversations li[data-peer="mallory"] .conv-preview').filter({ hasText: '<b>bold?</b>' }).waitFor();
    await openChat(b.page, 'mallory');
    await msgItem(b.page, 'bold?').waitFor();
    await sleep(500); // give any onerror handler time to fire
    for (const p of [a.page, b.page]) {
      assert.deepEqual(await bodies(p), [evil, evil2]);
      assert.equal(await p.locator('#messages img, #messages b, #messages script, #conversations img').count(), 0);
      assert.deepEqual(p.dialogs, [], 'no alert fired');
    }
    // The name shown in the header is text as well.
    assert.equal(await b.page.textContent('#peer-name'), 'mallory');
  } finally {
    await a.context.close();
    await b.context.close();
  }
});

test('a second sign-in kicks the first page, which says so and stays disconnected', async () => {
  const first = await openClient(browser, server);
  const second = await openClient(browser, server);
  const peer = await openClient(browser, server);
  try {
    await signIn(first.page, 'erin');
    let sockets = 0;
    first.page.on('websocket', () => { sockets += 1; });
    await signIn(second.page, 'erin');

    await first.page.waitForSelector('#banner[data-state="kicked"]:not([hidden])');
    assert.match(await first.page.textContent('#banner-text'), /signed in to Pigeon somewhere else/);
    assert.equal(await first.page.getAttribute('#conn-pill', 'data-state'), 'kicked');

    // Well past the first backoff steps: no new socket from the kicked page, and the new
    // session is still the live one (a reconnect would have kicked it back).
    await sleep(3000);
    assert.equal(sockets, 0, 'the kicked page did not reconnect');
    assert.equal(await second.page.getAttribute('#conn-pill', 'data-state'), 'online');

    await signIn(peer.page, 'frank');
    await openChat(peer.page, 'erin');
    await send(peer.page, 'who has erin now?');
    await second.page.locator('#conversations li[data-peer="frank"]').waitFor();
    await sleep(200);
    assert.equal(await first.page.locator('#conversations li[data-peer="frank"]').count(), 0);
    await first.page.screenshot({ path: path.join(ensureResultsDir(), 'kicked.png') });

    // Taking the session back is the person's explicit choice, and it works.
    await first.page.click('#banner-action');
    await first.page.waitForSelector('#conn-pill[data-state="online"]');
    await second.page.waitForSelector('#banner[data-state="kicked"]:not([hidden])');
    assert.deepEqual(first.page.errors, []);
  } finally {
    await first.context.close();
    await second.context.close();
    await peer.context.close();
  }
});

test('after a server restart both sides resume: nothing lost, nothing doubled', async () => {
  const a = await openClient(browser, server);
  const b = await openClient(browser, server);
  // Tap both sockets so the test controls what gets lost when the server dies:
  // bob's acks are swallowed (so the server must redeliver what he already has), and the
  // `sent` answer to one of grace's messages is swallowed (so her client must resend it).
  let dropAcks = true;
  const loseConfirmationOf = new Set(['two: confirmation lost']); // bodies
  const dropSentFor = new Set(); // ids
  const graceSends = [];
  const heidiMsgs = [];
  await b.context.routeWebSocket(/\/ws/, (ws) => {
    const srv = ws.connectToServer();
    ws.onMessage((m) => {
      if (dropAcks && JSON.parse(m).type === 'ack') return;
      srv.send(m);
    });
    srv.onMessage((m) => { const f = JSON.parse(m); if (f.type === 'msg') heidiMsgs.push(f); ws.send(m); });
  });
  await a.context.routeWebSocket(/\/ws/, (ws) => {
    const srv = ws.connectToServer();
    ws.onMessage((m) => {
      const f = JSON.parse(m);
      if (f.type === 'send') {
        graceSends.push(f);
        if (loseConfirmationOf.has(f.body)) dropSentFor.add(f.id); // before the server can answer
      }
      srv.send(m);
    });
    srv.onMessage((m) => {
      const f = JSON.parse(m);
      if (f.type === 'sent' && dropSentFor.has(f.id)) return;
      ws.send(m);
    });
  });
  try {
    await signIn(a.page, 'grace');
    await signIn(b.page, 'heidi');
    await openChat(a.page, 'heidi');
    await send(a.page, 'one: before the restart');
    await b.page.locator('#conversations li[data-peer="grace"]').waitFor();
    await openChat(b.page, 'grace');
    await msgItem(b.page, 'one: before').waitFor();

    // The next message reaches heidi, but grace never hears that the server took it.
    await send(a.page, 'two: confirmation lost');
    await msgItem(b.page, 'two: confirmation').waitFor();
    await sleep(300);
    assert.equal(await msgItem(a.page, 'two: confirmation').getAttribute('data-status'), 'sending');
    const [lostId] = dropSentFor;

    await server.kill('SIGKILL');
    await a.page.waitForSelector('#banner[data-state="waiting"]:not([hidden])');
    await b.page.waitForSelector('#conn-pill[data-state="waiting"]');
    await send(a.page, 'three: written while the server was down');
    assert.equal(await msgItem(a.page, 'three: written').getAttribute('data-status'), 'sending');
    await a.page.screenshot({ path: path.join(ensureResultsDir(), 'reconnecting.png') });

    dropAcks = false;
    loseConfirmationOf.clear();
    dropSentFor.clear();
    await server.start();
    await a.page.waitForSelector('#conn-pill[data-state="online"]', { timeout: 30000 });
    await b.page.waitForSelector('#conn-pill[data-state="online"]', { timeout: 30000 });
    await msgItem(b.page, 'three: written').waitFor();
    await a.page.waitForFunction(() =>
      [...document.querySelectorAll('#messages li.msg[data-dir="out"]')].every((li) => ['delivered', 'stored', 'received'].includes(li.dataset.status)));
    await sleep(500);

    const expected = ['one: before the restart', 'two: confirmation lost', 'three: written while the server was down'];
    assert.deepEqual(await bodies(b.page), expected, 'heidi sees each message exactly once, in order');
    assert.deepEqual(await bodies(a.page, 'out'), expected);
    // The test really exercised both mechanisms:
    const resent = graceSends.filter((s) => s.id === lostId);
    assert.equal(resent.length, 2, 'the unconfirmed message was sent again after the restart…');
    assert.equal(resent[1].body, 'two: confirmation lost', '…with the same id and body');
    const seqsSeen = heidiMsgs.map((m) => m.seq);
    assert.ok(seqsSeen.length > new Set(seqsSeen).size, `the server redelivered seqs heidi already had (${seqsSeen})`);
    assert.ok(heidiMsgs.some((m) => m.offline), 'redelivered after reconnect as offline');

    // A graceful restart (SIGTERM: the server says 1001 "going away") resumes as well.
    await server.kill('SIGTERM');
    await b.page.waitForSelector('#conn-pill[data-state="waiting"]');
    await send(b.page, 'four: heidi wrote this during a graceful restart');
    await server.start();
    await msgItem(a.page, 'four: heidi').waitFor({ timeout: 30000 });
    await send(a.page, 'five: after both restarts');
    await msgItem(b.page, 'five: after').waitFor();
    await sleep(300);
    assert.deepEqual(await bodies(b.page), [...expected, 'four: heidi wrote this during a graceful restart', 'five: after both restarts']);
    assert.deepEqual(await bodies(a.page, 'in'), ['four: heidi wrote this during a graceful restart']);
    assert.deepEqual(a.page.errors, []);
    assert.deepEqual(b.page.errors, []);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});
