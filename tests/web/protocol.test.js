// protocol.test.js — unit tests of static/js/protocol.js with a scripted fake WebSocket
// (no browser, no server): login frame, dedupe by seq, cumulative acks, resend with the
// same id, backoff, and no reconnect after a kick or an invalid name.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PigeonConnection, validUsername, backoffDelay } from '../../static/js/protocol.js';

class FakeSocket {
  static all = [];
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; FakeSocket.all.push(this); }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code = 1000) { if (this.readyState === 3) return; this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  // server side
  open() { this.readyState = 1; this.onopen?.(); }
  recv(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  drop(code = 1006) { this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  frames(type) { return this.sent.filter((f) => f.type === type); }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

function setup({ seen = new Set(), outbox = [] } = {}) {
  FakeSocket.all = [];
  const journal = { isDuplicate: (m) => seen.has(m.seq), unconfirmed: () => outbox };
  const conn = new PigeonConnection({ user: 'ann', journal, url: 'ws://x/ws', WebSocketImpl: FakeSocket, backoff: () => 5 });
  const events = [];
  for (const t of ['state', 'message', 'sent', 'failed', 'synced']) conn.addEventListener(t, (e) => events.push([t, e.detail]));
  return { conn, events, seen, outbox, sock: () => FakeSocket.all.at(-1) };
}

test('usernames follow the server rule', () => {
  for (const ok of ['alice', 'Zoë', 'a.b-c_d', '李雷', 'x'.repeat(32)]) assert.ok(validUsername(ok), ok);
  for (const bad of ['', 'a b', '<img>', 'x'.repeat(33), 'a#b']) assert.ok(!validUsername(bad), bad);
});

test('backoff grows and is capped', () => {
  const mid = (n) => backoffDelay(n) / 1; // jitter is ±20 %
  assert.ok(mid(0) >= 400 && mid(0) <= 600);
  assert.ok(mid(3) >= 3200 && mid(3) <= 4800);
  assert.ok(mid(30) <= 18000);
});

test('logs in with a frame, takes each seq once, acks cumulatively', async () => {
  const { conn, events, seen, sock } = setup();
  conn.start();
  sock().open();
  assert.deepEqual(sock().sent, [{ type: 'login', user: 'ann' }]);
  sock().recv({ type: 'welcome', user: 'ann', pending: 2 });
  for (const seq of [1, 2]) {
    sock().recv({ type: 'msg', seq, from: 'bo', to: 'ann', body: `m${seq}`, offline: true });
    seen.add(seq);
  }
  sock().recv({ type: 'synced' });
  assert.equal(conn.state, 'online');
  assert.deepEqual(sock().frames('ack'), [{ type: 'ack', upto: 2 }]);
  // A redelivered seq is not shown again, but is acked again.
  sock().drop();
  await tick(20);
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 1 });
  sock().recv({ type: 'msg', seq: 2, from: 'bo', to: 'ann', body: 'm2', offline: true });
  sock().recv({ type: 'synced' });
  assert.deepEqual(events.filter(([t]) => t === 'message').map(([, m]) => m.seq), [1, 2]);
  assert.deepEqual(sock().frames('ack'), [{ type: 'ack', upto: 2 }]);
  conn.stop();
});

test('unconfirmed sends go out again after reconnect, with the same id', async () => {
  const { conn, outbox, sock } = setup();
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  const m = { id: 'w-1', to: 'bo', body: 'hi' };
  outbox.push(m);
  assert.equal(conn.send(m), true);
  assert.equal(conn.send(m), false, 'not twice on one socket');
  sock().drop();
  await tick(20);
  assert.equal(FakeSocket.all.length, 2, 'reconnected');
  sock().open();
  assert.deepEqual(sock().frames('send'), [], 'waits for welcome');
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  assert.deepEqual(sock().frames('send'), [{ type: 'send', id: 'w-1', to: 'bo', body: 'hi' }]);
  conn.stop();
});

test('kicked: says so and never reconnects by itself', async () => {
  const { conn, events, sock } = setup();
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  sock().recv({ type: 'kicked', reason: 'session_replaced', message: 'logged in from another connection' });
  sock().drop(4000);
  await tick(30);
  assert.equal(conn.state, 'kicked');
  assert.equal(FakeSocket.all.length, 1);
  assert.ok(events.some(([t, d]) => t === 'state' && d.state === 'kicked'));
  // A bare close 4000 (no frame) means the same.
  const s2 = setup();
  s2.conn.start();
  s2.sock().open();
  s2.sock().drop(4000);
  await tick(30);
  assert.equal(s2.conn.state, 'kicked');
  assert.equal(FakeSocket.all.length, 1);
});

test('an invalid name is refused without retrying', async () => {
  const { conn, sock } = setup();
  conn.start();
  sock().open();
  sock().recv({ type: 'error', code: 'invalid_user', message: 'nope' });
  await tick(30);
  assert.equal(conn.state, 'rejected');
  assert.equal(FakeSocket.all.length, 1);
});

test('a refused send is reported with its id', () => {
  const { conn, events, sock } = setup();
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  sock().recv({ type: 'synced' });
  conn.send({ id: 'w-2', to: 'bo', body: 'x' });
  sock().recv({ type: 'error', code: 'mailbox_full', message: 'full', id: 'w-2' });
  assert.deepEqual(events.filter(([t]) => t === 'failed').map(([, d]) => d.code), ['mailbox_full']);
  conn.stop();
});
