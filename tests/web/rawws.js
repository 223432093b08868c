// rawws.js — a minimal raw WebSocket client for the web tests (node:net, no browser, no
// web client code): the hostile sender that says whatever it likes (any mime, any bytes).
// Text and binary messages out (masked, as RFC 6455 wants from a client), whole
// unfragmented messages in. Enough to speak Pigeon JSON and upload blobs; nothing more.

import { connect } from 'node:net';
import { randomBytes } from 'node:crypto';

export class RawWs {
  /** Opens `ws://host:port/path` (no Origin header: a non-browser client). */
  static open(url) {
    const u = new URL(url);
    return new Promise((resolve, reject) => {
      const sock = connect(Number(u.port), u.hostname);
      const key = randomBytes(16).toString('base64');
      let head = Buffer.alloc(0);
      const onData = (d) => {
        head = Buffer.concat([head, d]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        sock.off('data', onData);
        const status = head.subarray(0, end).toString().split('\r\n')[0];
        if (!/^HTTP\/1\.1 101/.test(status)) { sock.destroy(); reject(new Error(`upgrade refused: ${status}`)); return; }
        const ws = new RawWs(sock);
        ws.#feed(head.subarray(end + 4));
        resolve(ws);
      };
      sock.on('data', onData);
      sock.once('error', reject);
      sock.once('connect', () => sock.write(`GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\n`
        + `Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${key}\r\n\r\n`));
    });
  }

  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.queue = [];   // received {text} | {binary}
    this.waiters = [];
    sock.on('data', (d) => this.#feed(d));
    sock.on('error', () => {});
  }

  #feed(d) {
    this.buf = Buffer.concat([this.buf, d]);
    for (;;) {
      if (this.buf.length < 2) return;
      const op = this.buf[0] & 0x0f;
      let len = this.buf[1] & 0x7f; let off = 2;
      if (len === 126) { if (this.buf.length < 4) return; len = this.buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (this.buf.length < 10) return; len = Number(this.buf.readBigUInt64BE(2)); off = 10; }
      if (this.buf.length < off + len) return;
      const payload = this.buf.subarray(off, off + len);
      this.buf = this.buf.subarray(off + len);
      if (op === 1) this.#push({ text: payload.toString() });
      else if (op === 2) this.#push({ binary: Buffer.from(payload) });
      else if (op === 9) this.#send(0xa, payload);
      else if (op === 8) this.#push({ close: payload.length >= 2 ? payload.readUInt16BE(0) : 1005 });
    }
  }

  #push(m) {
    const w = this.waiters.shift();
    if (w) w(m); else this.queue.push(m);
  }

  #send(op, payload) {
    const mask = randomBytes(4);
    const len = payload.length;
    const head = len < 126 ? Buffer.from([0x80 | op, 0x80 | len])
      : len < 65536 ? Buffer.from([0x80 | op, 0x80 | 126, len >> 8, len & 0xff])
        : Buffer.concat([Buffer.from([0x80 | op, 0x80 | 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(len)); return b; })()]);
    const body = Buffer.from(payload);
    for (let i = 0; i < body.length; i += 1) body[i] ^= mask[i % 4];
    this.sock.write(Buffer.concat([head, mask, body]));
  }

  sendJson(v) { this.#send(1, Buffer.from(JSON.stringify(v))); }
  sendBinary(b) { this.#send(2, b); }

  /** The next message (waits up to `ms`). */
  next(ms = 10000) {
    const m = this.queue.shift();
    if (m) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no WebSocket message in time')), ms);
      this.waiters.push((x) => { clearTimeout(t); resolve(x); });
    });
  }

  /** The next JSON text frame whose `type` is one of `types`. */
  async expect(...types) {
    for (;;) {
      const m = await this.next();
      if (m.close !== undefined) throw new Error(`closed with ${m.close} while waiting for ${types}`);
      if (m.text === undefined) continue;
      const f = JSON.parse(m.text);
      if (types.includes(f.type)) return f;
      if (f.type === 'error') throw new Error(`error frame: ${m.text}`);
    }
  }

  /** Sends `bytes` as a file with whatever `mime` and `name` the sender claims. */
  async sendFile({ id, to, name, mime, bytes }) {
    this.sendJson({ type: 'blob', id, to, name, mime, size: bytes.length });
    const acc = await this.expect('blob_accepted');
    const frame = Buffer.alloc(4 + bytes.length);
    frame.writeUInt32BE(acc.stream, 0);
    Buffer.from(bytes).copy(frame, 4);
    this.sendBinary(frame);
    return this.expect('sent');
  }

  close() { this.sock.destroy(); }
}
