// protocol.test.js — unit tests of static/js/protocol.js with a scripted fake WebSocket
// (no browser, no server): login frame (name, password, token), dedupe by seq, cumulative
// acks, resend with the same id, backoff, no reconnect after a kick, an invalid name or a
// refused login, blob uploads (frame layout, backpressure) and downloads (ack held back
// until the file is kept; chunks handed to a sink instead of gathered, for streamed files).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PigeonConnection, canonicalUsername, validUsername, backoffDelay, CHUNK_BYTES } from '../../static/js/protocol.js';

class FakeSocket {
  static all = [];
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; this.binary = []; this.bufferedAmount = 0; FakeSocket.all.push(this); }
  send(data) { if (typeof data === 'string') this.sent.push(JSON.parse(data)); else this.binary.push(data); }
  recvBinary(stream, bytes) {
    const buf = new Uint8Array(4 + bytes.length);
    new DataView(buf.buffer).setUint32(0, stream);
    buf.set(bytes, 4);
    this.onmessage?.({ data: buf.buffer });
  }
  close(code = 1000) { if (this.readyState === 3) return; this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  // server side
  open() { this.readyState = 1; this.onopen?.(); }
  recv(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  drop(code = 1006) { this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  frames(type) { return this.sent.filter((f) => f.type === type); }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

function setup({ seen = new Set(), outbox = [], credentials = {}, framesPerSec = 30, sinkFor = null } = {}) {
  FakeSocket.all = [];
  const journal = { isDuplicate: (m) => seen.has(m.seq), unconfirmed: () => outbox };
  const conn = new PigeonConnection({ user: 'ann', journal, url: 'ws://x/ws', WebSocketImpl: FakeSocket, backoff: () => 5, credentials, framesPerSec, sinkFor });
  const events = [];
  for (const t of ['state', 'message', 'sent', 'failed', 'synced', 'upload', 'blob-start', 'blob', 'blob-abort']) conn.addEventListener(t, (e) => events.push([t, e.detail]));
  return { conn, events, seen, outbox, sock: () => FakeSocket.all.at(-1) };
}

test('usernames follow the server rule', () => {
  for (const ok of ['alice', 'Alice', 'ａｌｉｃｅ', 'a.b-c_d', 'x'.repeat(32)]) assert.ok(validUsername(ok), ok);
  for (const bad of ['', 'a b', '<img>', 'x'.repeat(33), 'a#b', 'Zoë', '李雷', '\u0430lice']) assert.ok(!validUsername(bad), bad);
  assert.equal(canonicalUsername('ＡＬＩＣＥ'), 'alice');
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

test('a password change or deletion on the server asks for a sign-in, without retrying', async () => {
  for (const reason of ['credentials_changed', 'account_deleted']) {
    const { conn, events, sock } = setup();
    conn.start();
    sock().open();
    sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
    sock().recv({ type: 'kicked', reason, message: 'changed' });
    sock().drop(4003);
    await tick(30);
    assert.equal(conn.state, 'rejected', reason);
    assert.equal(FakeSocket.all.length, 1);
    assert.ok(events.some(([t, d]) => t === 'state' && d.state === 'rejected' && d.code === reason), reason);
  }
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

test('logs in with a token or a password; a refused login does not retry', async () => {
  const t = setup({ credentials: { token: 'T.1.x' } });
  t.conn.start();
  t.sock().open();
  assert.deepEqual(t.sock().sent, [{ type: 'login', user: 'ann', token: 'T.1.x' }]);
  t.sock().recv({ type: 'error', code: 'token_expired', message: 'expired' });
  t.sock().drop(4003);
  await tick(30);
  assert.equal(t.conn.state, 'rejected');
  assert.equal(t.events.filter(([e, d]) => e === 'state' && d.state === 'rejected')[0][1].code, 'token_expired');
  assert.equal(FakeSocket.all.length, 1, 'no reconnect with a refused token');

  const p = setup({ credentials: { password: 'pw' } });
  p.conn.start();
  p.sock().open();
  assert.deepEqual(p.sock().sent, [{ type: 'login', user: 'ann', password: 'pw' }]);
  p.sock().recv({ type: 'error', code: 'too_many_attempts', message: 'slow down', try_again_in: 42 });
  await tick(30);
  const rejected = p.events.find(([e, d]) => e === 'state' && d.state === 'rejected')[1];
  assert.equal(rejected.code, 'too_many_attempts');
  assert.equal(rejected.tryAgainIn, 42);
  assert.equal(FakeSocket.all.length, 1);

  // A close 4003 without an error frame means the same.
  const q = setup();
  q.conn.start();
  q.sock().open();
  q.sock().drop(4003);
  await tick(30);
  assert.equal(q.conn.state, 'rejected');
  assert.equal(FakeSocket.all.length, 1);
});

test('a file goes out as 4-byte stream + chunk frames, waits on bufferedAmount, and is announced again after a reconnect', async () => {
  const { conn, events, sock } = setup({ framesPerSec: 1000 });
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  const bytes = new Uint8Array(CHUNK_BYTES * 2 + 10).map((_, i) => i % 251);
  conn.sendFile({ id: 'f-1', to: 'bo', file: new Blob([bytes], { type: 'video/mp4' }), name: 'a.mp4' });
  assert.deepEqual(sock().frames('blob'), [{ type: 'blob', id: 'f-1', to: 'bo', name: 'a.mp4', mime: 'video/mp4', size: bytes.length }]);
  sock().bufferedAmount = 10 * 1024 * 1024; // the socket is full: nothing may be sent
  sock().recv({ type: 'blob_accepted', id: 'f-1', stream: 7 });
  await tick(80);
  assert.equal(sock().binary.length, 0, 'waits while bufferedAmount is high');
  sock().bufferedAmount = 0;
  await tick(150);
  assert.equal(sock().binary.length, 3);
  const joined = new Uint8Array(bytes.length);
  let at = 0;
  for (const f of sock().binary) {
    assert.equal(new DataView(f.buffer).getUint32(0), 7);
    assert.ok(f.length - 4 <= CHUNK_BYTES);
    joined.set(f.subarray(4), at);
    at += f.length - 4;
  }
  assert.equal(at, bytes.length);
  assert.ok(Buffer.from(joined).equals(Buffer.from(bytes)), 'the chunks put together are the file');
  assert.ok(events.some(([t, d]) => t === 'upload' && d.sent === bytes.length));

  // Dropped before `sent`: announced again (same id) after the next welcome.
  sock().drop();
  await tick(20);
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  assert.equal(sock().frames('blob')[0].id, 'f-1');
  sock().recv({ type: 'sent', id: 'f-1', to: 'bo', seq: 3, status: 'stored' });
  sock().drop();
  await tick(20);
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  assert.deepEqual(sock().frames('blob'), [], 'confirmed: not sent again');
  conn.stop();
});

test('chunks are paced under the frame rate', async () => {
  const { conn, sock } = setup({ framesPerSec: 20 });
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  const size = CHUNK_BYTES * 40;
  conn.sendFile({ id: 'f-2', to: 'bo', file: new Blob([new Uint8Array(size)]), name: 'z' });
  sock().recv({ type: 'blob_accepted', id: 'f-2', stream: 1 });
  await tick(500);
  // A bucket of 20 (less the login and blob frames), then 20 a second: about 28 by now, never 40.
  assert.ok(sock().binary.length >= 20 && sock().binary.length <= 32, `sent ${sock().binary.length} chunks in 0.5 s`);
  conn.stop();
});

test('a received file is put together from its chunks, and acked only once it is kept', async () => {
  const { conn, events, sock } = setup();
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  sock().recv({ type: 'synced' });
  sock().recv({ type: 'blob_start', stream: 5, from: 'bo', to: 'ann', id: 'f-9', name: 'x.png', mime: 'image/png', size: 6 });
  sock().recvBinary(5, [1, 2, 3]);
  sock().recvBinary(9, [7, 7]); // another stream: ignored
  sock().recvBinary(5, [4, 5, 6]);
  let keep;
  conn.addEventListener('blob', (e) => e.detail.waitUntil(new Promise((r) => { keep = r; })));
  sock().recv({ type: 'blob_end', stream: 5, seq: 11, ts: 1 });
  sock().recv({ type: 'msg', seq: 12, from: 'bo', to: 'ann', body: 'after the file' });
  const got = events.find(([t]) => t === 'blob')[1];
  assert.equal(got.seq, 11);
  assert.equal(got.name, 'x.png');
  assert.deepEqual([...new Uint8Array(await got.blob.arrayBuffer())], [1, 2, 3, 4, 5, 6]);
  await tick(100);
  assert.deepEqual(sock().frames('ack'), [], 'nothing acked while the file is being kept');
  keep();
  await tick(100);
  assert.deepEqual(sock().frames('ack'), [{ type: 'ack', upto: 12 }]);

  // An abort is reported and nothing is acked for it.
  sock().recv({ type: 'blob_start', stream: 6, from: 'bo', to: 'ann', id: 'f-10', name: 'y', mime: 'text/plain', size: 100 });
  sock().recvBinary(6, [1]);
  sock().recv({ type: 'blob_abort', stream: 6, reason: 'sender_gone' });
  assert.deepEqual(events.filter(([t]) => t === 'blob-abort').map(([, d]) => d.reason), ['sender_gone']);
  conn.stop();
});

test('a file the app streams goes chunk by chunk to its sink, never into a Blob here', async () => {
  const sinks = [];
  const sinkFor = (t) => {
    if (!t.mime.startsWith('video/')) return null;
    const sink = { key: `k-${t.id}`, start: t, chunks: [], finished: null, discarded: false,
      write(b) { this.chunks.push([...b]); },
      finish(mime) { this.finished = mime; return Promise.resolve(true); },
      discard() { this.discarded = true; } };
    sinks.push(sink);
    return sink;
  };
  const { conn, events, sock } = setup({ sinkFor });
  conn.start();
  sock().open();
  sock().recv({ type: 'welcome', user: 'ann', pending: 0 });
  sock().recv({ type: 'synced' });
  const url = 'http://x/api/blobs/K1?user=ann&expires=9&sig=s';
  sock().recv({ type: 'blob_start', stream: 5, from: 'bo', to: 'ann', id: 'v-1', name: 'a.webm', mime: 'video/webm', size: 4, key: 'K1', url, offline: true });
  const start = events.find(([t]) => t === 'blob-start')[1];
  assert.equal(start.url, url);
  assert.equal(start.blobKey, 'K1');
  assert.equal(sinks[0].start.url, url, 'the sink is chosen knowing the link');
  sock().recvBinary(5, [1, 2]);
  sock().recvBinary(5, [3, 4]);
  let keep;
  conn.addEventListener('blob', (e) => e.detail.waitUntil(new Promise((r) => { keep = r; })));
  sock().recv({ type: 'blob_end', stream: 5, seq: 3, ts: 1 });
  const got = events.find(([t]) => t === 'blob')[1];
  assert.deepEqual(sinks[0].chunks, [[1, 2], [3, 4]]);
  assert.equal(got.blob, null, 'no Blob assembled');
  assert.equal(got.storedKey, 'k-v-1');
  assert.equal(await got.stored, true);
  assert.equal(sinks[0].finished, 'video/webm');
  assert.equal(got.url, url);
  await tick(100);
  assert.deepEqual(sock().frames('ack'), [], 'acked only once kept');
  keep();
  await tick(100);
  assert.deepEqual(sock().frames('ack'), [{ type: 'ack', upto: 3 }]);

  // An aborted or cut-off stream discards what its sink wrote; a picture gets no sink.
  sock().recv({ type: 'blob_start', stream: 6, from: 'bo', to: 'ann', id: 'v-2', name: 'b.webm', mime: 'video/webm', size: 9 });
  sock().recvBinary(6, [1]);
  sock().recv({ type: 'blob_abort', stream: 6, reason: 'sender_gone' });
  sock().recv({ type: 'blob_start', stream: 7, from: 'bo', to: 'ann', id: 'v-3', name: 'c.webm', mime: 'video/webm', size: 9 });
  sock().drop();
  assert.deepEqual(sinks.map((s) => s.discarded), [false, true, true]);
  assert.equal(sinks.length, 3);
  conn.stop();
});
