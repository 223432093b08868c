// protocol.js — owns the connection to a Pigeon server: the Pigeon JSON protocol
// (docs/PROTOCOL.md), logging in (name only, password or token), reconnect with backoff,
// heartbeat, resending unconfirmed sends with their original id, dropping redelivered
// messages by seq, cumulative acks, and blob transfers (files: chunked upload with
// backpressure and pacing, download reassembly, or handing chunks to a sink the app
// chooses, e.g. IndexedDB for a video played from the server). Also `POST /api/login`.
// No DOM and no storage here: the app injects a `journal` (what was already received,
// what is still unconfirmed) and listens to events.

/** Same rule as the server (docs/PROTOCOL.md, "User names"): NFKC, lowercase, then
 * 1–32 of `a-z 0-9 _ . -`. `canonicalUsername` gives that form, or null. */
export const USERNAME_RE = /^[a-z0-9_.-]{1,32}$/;
export function canonicalUsername(name) {
  if (typeof name !== 'string' || name.length === 0 || name.length > 128) return null;
  const folded = name.normalize('NFKC').toLowerCase();
  return USERNAME_RE.test(folded) ? folded : null;
}
export const validUsername = (name) => canonicalUsername(name) !== null;

export const CLOSE_KICKED = 4000;
export const CLOSE_INVALID_USER = 4001;
export const CLOSE_PROTOCOL_ERROR = 4002;
export const CLOSE_AUTH = 4003;
export const CLOSE_TAKEOVER_LOOP = 4009;

/** Error codes that end a login for good: retrying the same credentials cannot help. */
export const AUTH_ERRORS = new Set(['auth_required', 'bad_credentials', 'token_expired', 'too_many_attempts', 'invalid_user', 'takeover_loop']);

/** Payload bytes per binary blob frame (the server takes up to limits.max_message_bytes). */
export const CHUNK_BYTES = 256 * 1024;
/** Upload waits while more than this is queued in the socket (ws.bufferedAmount). */
export const HIGH_WATER = 1024 * 1024;

/**
 * `POST /api/login`: a token for user + password. Resolves to {user, token, expires_at};
 * rejects with an Error carrying `code` (bad_credentials, too_many_attempts, ...),
 * `status` and, when throttled, `tryAgainIn` (seconds).
 */
export async function fetchToken(user, password, { base = '', fetchImpl = globalThis.fetch } = {}) {
  let res;
  try {
    res = await fetchImpl(`${base}/api/login`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ user, password }), cache: 'no-store', credentials: 'omit',
    });
  } catch (e) {
    throw Object.assign(new Error('cannot reach the server'), { code: 'network', status: 0 });
  }
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  if (res.ok && body && typeof body.token === 'string') return body;
  const err = new Error(body?.message ?? `HTTP ${res.status}`);
  err.code = body?.error ?? (res.status === 429 ? 'too_many_connections' : 'http_' + res.status);
  err.status = res.status;
  const retry = body?.try_again_in ?? Number(res.headers?.get?.('retry-after'));
  if (Number.isFinite(retry) && retry > 0) err.tryAgainIn = retry;
  throw err;
}

/** A binary blob frame: 4-byte big-endian stream number, then the payload. */
export function chunkFrame(stream, bytes) {
  const frame = new Uint8Array(4 + bytes.byteLength);
  new DataView(frame.buffer).setUint32(0, stream);
  frame.set(bytes, 4);
  return frame;
}

/** The URL of the server's Pigeon JSON endpoint for a page served from `loc`. */
export function socketUrl(loc = globalThis.location) {
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${loc.host}/ws`;
}

/**
 * Client message ids: unique per sender for at least the server's dedupe window.
 * crypto.randomUUID is missing on plain-http LAN origins, getRandomValues is not.
 */
export function newMessageId() {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  let s = '';
  for (const x of b) s += x.toString(16).padStart(2, '0');
  return `w-${Date.now().toString(36)}-${s}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Backoff for the nth consecutive failed attempt (0-based), in ms, with ±20 % jitter. */
export function backoffDelay(attempt, { base = 500, max = 15000 } = {}) {
  const d = Math.min(max, base * 2 ** Math.min(attempt, 10));
  return Math.round(d * (0.8 + Math.random() * 0.4));
}

/**
 * One signed-in user's connection. Events (CustomEvent, payload in `detail`):
 *  - `state`   {state, attempt?, retryAt?, reason?}  state ∈ connecting | syncing | online |
 *              waiting (reconnect scheduled) | kicked | rejected | closed
 *  - `welcome` the server's welcome frame
 *  - `message` {seq, from, to, id, body, ts, offline} — each seq at most once
 *  - `synced`  the login flush is over
 *  - `sent`    {id, to, seq, status, duplicate}
 *  - `failed`  {id, code, message} — a send the server refused
 *  - `error`   {code, message} — an error frame not tied to a send
 *  - `frame`   any frame of a type this module does not know (future: presence)
 *  Files (see sendFile):
 *  - `upload`  {id, to, sent, size} — bytes of an upload that left this browser
 *  - `blob-start`    {key, stream, from, to, id, name, mime, size, offline, blobKey, url} — a
 *              file is coming; `url` is the server's signed link to its bytes over HTTP
 *  - `blob-progress` {key, received, size}
 *  - `blob`    {key, seq, from, to, id, name, mime, size, sha256, ts, offline, blobKey, url,
 *              blob, stored, storedKey, waitUntil} — a complete file, each seq at most once;
 *              `blob` holds its bytes, or is null when a sink took them (then `stored` is
 *              the sink's finish() promise and `storedKey` its key); call waitUntil(promise)
 *              to hold back its ack until the promise settles (e.g. it is stored)
 *  - `blob-abort`    {key, reason} — a file stopped arriving (`connection_lost` when this
 *              side dropped: the server keeps it and sends it again after reconnecting)
 *
 * `journal` is asked, never mutated:
 *  - `isDuplicate(msg)`: true when this message (by seq) was already taken in
 *  - `unconfirmed()`: [{id, to, body}] sends not yet answered by `sent`/`error`, oldest first
 *
 * `credentials` is {password} or {token} (or nothing, on an open server); it goes into the
 * `login` frame. A refused login ends in state `rejected` with the server's error code.
 *
 * `sinkFor(start)` (optional) is asked at each `blob-start` (its detail): it returns null
 * (the chunks are collected into a Blob here) or a sink {key, write(bytes), finish(mime) →
 * promise, discard()} that takes each chunk as it arrives, so the file is not held here.
 */
export class PigeonConnection extends EventTarget {
  constructor({ user, credentials = {}, journal, url = socketUrl(), WebSocketImpl = globalThis.WebSocket,
    pingEveryMs = 25000, pongTimeoutMs = 10000, backoff = backoffDelay, framesPerSec = 30, sinkFor = null } = {}) {
    super();
    this.user = user;
    this.credentials = credentials; // {password} | {token} | {}
    this.journal = journal;
    this.url = url;
    this.WebSocketImpl = WebSocketImpl;
    this.pingEveryMs = pingEveryMs;
    this.pongTimeoutMs = pongTimeoutMs;
    this.backoff = backoff;
    this.sinkFor = sinkFor;
    this.state = 'closed';
    this.ws = null;
    this.attempt = 0;        // consecutive failed attempts, for backoff
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.ackTimer = null;
    this.maxSeq = 0;         // highest seq taken in during this session
    this.ackedSeq = 0;       // highest seq acked during this session
    this.inFlight = new Set(); // ids sent on this socket, waiting for `sent`/`error`
    this.stopped = true;
    // Files going out, by transfer id; they survive reconnects and are announced again
    // (same id) after each login until the server answers `sent` or refuses them.
    this.uploads = new Map();
    this.downloads = new Map(); // stream -> incoming file on this socket
    this.takeChain = Promise.resolve(); // seqs whose local storage is still in progress
    this.pendingTakes = 0;
    // The server counts every frame against limits.rate_per_sec and drops the excess:
    // a dropped blob chunk would spoil the transfer, so chunks wait for a token here.
    this.framesPerSec = framesPerSec;
    this.tokens = framesPerSec;
    this.tokensAt = Date.now();
  }

  /** Opens (or reopens) the connection; reconnects on its own until stop() or a kick. */
  start() {
    this.stopped = false;
    this.attempt = 0;
    this.#open();
  }

  /** Closes for good (sign out). */
  stop() {
    this.stopped = true;
    this.#clearTimers();
    if (this.ws) { const ws = this.ws; this.ws = null; this.#detach(ws); ws.close(1000, 'bye'); }
    this.#setState('closed');
  }

  /** Skips the backoff wait (e.g. the browser came back online, or "retry now"). */
  retryNow() {
    if (this.state === 'waiting') { clearTimeout(this.retryTimer); this.#open(); }
  }

  get online() { return this.state === 'online' || this.state === 'syncing'; }

  /**
   * Sends now if the session is up; otherwise it goes out on the next login, because
   * the caller has put it into the journal's unconfirmed list before calling this.
   */
  send({ id, to, body }) {
    if (!this.online || this.inFlight.has(id)) return false;
    this.inFlight.add(id);
    return this.#write({ type: 'send', id, to, body });
  }

  /**
   * Sends a file (a Blob/File) as a blob transfer; `id` makes retries idempotent. Progress
   * comes as `upload` events, the outcome as `sent` or `failed` with this id. If the socket
   * drops, the file is sent again from its first byte after the next login.
   */
  sendFile({ id, to, file, name = file.name ?? '', mime = file.type || 'application/octet-stream', sha256 = null }) {
    if (this.uploads.has(id)) return false;
    const up = { id, to, file, name, mime, size: file.size, sha256, stream: null, sent: 0, ws: null };
    this.uploads.set(id, up);
    this.#announce(up);
    return true;
  }

  /** Gives up on an upload (the server deletes what it has of it). */
  cancelFile(id) {
    const up = this.uploads.get(id);
    if (!up) return false;
    this.uploads.delete(id);
    if (up.stream !== null && up.ws === this.ws) this.#write({ type: 'blob_abort', stream: up.stream });
    return true;
  }

  #announce(up) {
    if (!this.online || up.ws === this.ws) return;
    up.ws = this.ws;
    up.stream = null;
    up.sent = 0;
    const frame = { type: 'blob', id: up.id, to: up.to, name: up.name, mime: up.mime, size: up.size };
    if (up.sha256) frame.sha256 = up.sha256;
    this.#write(frame);
  }

  async #pump(up) {
    const ws = up.ws;
    const alive = () => this.ws === ws && ws.readyState === 1 && this.uploads.get(up.id) === up;
    while (up.sent < up.size) {
      // Backpressure: the server stops reading while the recipient is slow, so the
      // socket's buffer fills; wait for it to drain, and for a frame-rate token.
      while (alive() && (ws.bufferedAmount > HIGH_WATER || !this.#takeToken())) await sleep(20);
      if (!alive()) return;
      const end = Math.min(up.size, up.sent + CHUNK_BYTES);
      const bytes = new Uint8Array(await up.file.slice(up.sent, end).arrayBuffer());
      if (!alive()) return;
      try { ws.send(chunkFrame(up.stream, bytes)); } catch { return; }
      up.sent = end;
      this.#emit('upload', { id: up.id, to: up.to, sent: Math.max(0, up.sent - (ws.bufferedAmount ?? 0)), size: up.size });
    }
    // Report the socket draining, so the bar reaches the end before `sent` arrives.
    while (alive() && ws.bufferedAmount > 0) {
      await sleep(50);
      this.#emit('upload', { id: up.id, to: up.to, sent: up.size - ws.bufferedAmount, size: up.size });
    }
  }

  #takeToken() {
    const now = Date.now();
    this.tokens = Math.min(this.framesPerSec, this.tokens + (now - this.tokensAt) * this.framesPerSec / 1000);
    this.tokensAt = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Ack everything taken in so far (the app calls this once it has stored the messages). */
  ackNow() {
    clearTimeout(this.ackTimer); this.ackTimer = null;
    if (this.online && this.maxSeq > this.ackedSeq) {
      if (this.#write({ type: 'ack', upto: this.maxSeq })) this.ackedSeq = this.maxSeq;
    }
  }

  #open() {
    this.#clearTimers();
    this.#setState('connecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new this.WebSocketImpl(this.url);
    } catch (e) {
      this.#scheduleRetry(String(e));
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.maxSeq = 0;
    this.ackedSeq = 0;
    this.inFlight.clear();
    this.kickedFrame = false;
    this.takeChain = Promise.resolve();
    this.pendingTakes = 0;
    ws.onopen = () => {
      const { password, token } = this.credentials ?? {};
      const login = { type: 'login', user: this.user };
      if (token) login.token = token; else if (password) login.password = password;
      this.#write(login);
    };
    ws.onmessage = (ev) => (typeof ev.data === 'string' ? this.#onFrame(ev.data) : this.#onChunk(ev.data));
    ws.onclose = (ev) => this.#onClose(ws, ev.code, ev.reason);
    ws.onerror = () => { /* onclose follows and decides */ };
  }

  #detach(ws) { ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null; }

  #write(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
      this.#takeToken() || (this.tokens -= 1); // text frames never wait, but they count
      return true;
    } catch { return false; }
  }

  /** A binary frame: a chunk of an incoming file. */
  #onChunk(data) {
    if (!(data instanceof ArrayBuffer) || data.byteLength < 5) return;
    const stream = new DataView(data).getUint32(0);
    const d = this.downloads.get(stream);
    if (!d) return;
    if (d.sink) d.sink.write(new Uint8Array(data, 4));
    else d.chunks.push(new Uint8Array(data, 4));
    d.received += data.byteLength - 4;
    this.#emit('blob-progress', { key: d.key, received: d.received, size: d.meta.size });
  }

  #blobStart(f) {
    if (typeof f.stream !== 'number') return;
    const key = `${f.from}/${f.id ?? 's' + f.stream + '-' + Date.now()}`;
    const meta = { from: f.from, to: f.to, id: f.id ?? null, name: f.name ?? '', mime: f.mime || 'application/octet-stream',
      size: f.size, sha256: f.sha256 ?? null, offline: !!f.offline,
      blobKey: typeof f.key === 'string' ? f.key : null, url: typeof f.url === 'string' ? f.url : null };
    this.#dropDownload(f.stream);
    let sink = null;
    try { sink = this.sinkFor?.({ key, stream: f.stream, ...meta }) ?? null; } catch { sink = null; }
    this.downloads.set(f.stream, { key, meta, chunks: [], received: 0, sink });
    this.#emit('blob-start', { key, stream: f.stream, ...meta });
  }

  /** Forgets an incoming file on `stream` (its sink's chunks too); gives what it was. */
  #dropDownload(stream) {
    const d = this.downloads.get(stream);
    if (!d) return null;
    this.downloads.delete(stream);
    d.sink?.discard();
    return d;
  }

  #blobEnd(f) {
    const d = this.downloads.get(f.stream);
    if (!d || typeof f.seq !== 'number') return;
    this.downloads.delete(f.stream);
    const { meta } = d;
    if (d.received !== meta.size) {
      d.sink?.discard();
      this.#emit('blob-abort', { key: d.key, reason: `size_mismatch (${d.received} of ${meta.size} bytes)` });
      return; // not acked: the server keeps it and offers it again next login
    }
    const msg = { seq: f.seq, ts: f.ts, ...meta, file: { name: meta.name, mime: meta.mime, size: meta.size } };
    if (this.journal?.isDuplicate(msg)) { d.sink?.discard(); this.#takeIn(f.seq); return; }
    const waits = [];
    const blob = d.sink ? null : new Blob(d.chunks, { type: meta.mime });
    const stored = d.sink ? d.sink.finish(meta.mime) : null;
    this.#emit('blob', { key: d.key, ...msg, blob, stored, storedKey: d.sink?.key ?? null,
      waitUntil: (p) => waits.push(p) });
    this.#takeIn(f.seq, waits.length ? Promise.allSettled(waits) : null);
  }

  /**
   * Marks `seq` as taken in, so that it is acknowledged; when `pending` is a promise the
   * ack waits for it (and so do later seqs: acks are cumulative).
   */
  #takeIn(seq, pending = null) {
    if (!pending && this.pendingTakes === 0) {
      if (seq > this.maxSeq) this.maxSeq = seq;
      this.#scheduleAck();
      return;
    }
    const ws = this.ws;
    this.pendingTakes += 1;
    this.takeChain = this.takeChain.then(() => pending).catch(() => {}).then(() => {
      if (this.ws !== ws) return;
      this.pendingTakes -= 1;
      if (seq > this.maxSeq) this.maxSeq = seq;
      this.#scheduleAck();
    });
  }

  #onFrame(text) {
    let f;
    try { f = JSON.parse(text); } catch { return; }
    if (!f || typeof f !== 'object') return;
    this.#armHeartbeat();
    switch (f.type) {
      case 'welcome':
        this.attempt = 0;
        this.#setState('syncing', { pending: f.pending });
        this.#emit('welcome', f);
        this.#resendUnconfirmed();
        for (const up of this.uploads.values()) this.#announce(up);
        break;
      case 'msg':
        if (typeof f.seq !== 'number') return;
        // Redelivery after a reconnect: already taken in, only needs acking again.
        if (!this.journal?.isDuplicate(f)) this.#emit('message', f);
        this.#takeIn(f.seq);
        break;
      case 'blob_accepted': {
        const up = this.uploads.get(f.id);
        if (!up || up.ws !== this.ws || typeof f.stream !== 'number') break;
        up.stream = f.stream;
        this.#pump(up);
        break;
      }
      case 'blob_start':
        this.#blobStart(f);
        break;
      case 'blob_end':
        this.#blobEnd(f);
        break;
      case 'blob_abort': {
        const d = this.#dropDownload(f.stream);
        if (d) this.#emit('blob-abort', { key: d.key, reason: f.reason ?? 'aborted' });
        break;
      }
      case 'synced':
        this.#setState('online');
        this.#emit('synced', f);
        this.ackNow();
        break;
      case 'sent':
        this.inFlight.delete(f.id);
        this.uploads.delete(f.id);
        this.#emit('sent', f);
        break;
      case 'error':
        if (f.id) { this.inFlight.delete(f.id); this.uploads.delete(f.id); this.#emit('failed', f); }
        else if (this.state === 'connecting' && AUTH_ERRORS.has(f.code)) {
          this.#reject(f.code, f.message, { tryAgainIn: f.try_again_in });
        } else {
          if (f.code === 'rate_limited') this.#afterRateLimit();
          this.#emit('error', f);
        }
        break;
      case 'kicked':
        this.kickedFrame = true;
        // The account's password changed or it was deleted: a sign-in is needed again.
        if (f.reason === 'credentials_changed' || f.reason === 'account_deleted') this.#reject(f.reason, f.message);
        else this.#kicked(f.message);
        break;
      case 'pong':
        break;
      default:
        this.#emit('frame', f);
    }
  }

  /**
   * The server dropped a frame for going over its rate; if it was a file chunk that
   * transfer is spoilt: abort the uploads on the wire and announce them again (same id).
   */
  #afterRateLimit() {
    // The refusal names no frame: a dropped `send` would wait for an answer forever, so
    // everything unanswered goes again (same ids: the server keeps one copy).
    this.inFlight.clear();
    clearTimeout(this.rateTimer);
    this.rateTimer = setTimeout(() => { if (this.online) this.#resendUnconfirmed(); }, 1000);
    for (const up of this.uploads.values()) {
      if (up.ws !== this.ws || up.stream === null) continue;
      this.#write({ type: 'blob_abort', stream: up.stream });
      up.ws = null;
      setTimeout(() => this.#announce(up), 1000);
    }
  }

  #resendUnconfirmed() {
    for (const m of this.journal?.unconfirmed() ?? []) this.send(m);
  }

  #scheduleAck() {
    if (!this.ackTimer) this.ackTimer = setTimeout(() => this.ackNow(), 50);
  }

  #armHeartbeat() {
    clearTimeout(this.pongTimer); this.pongTimer = null;
    clearTimeout(this.pingTimer);
    this.pingTimer = setTimeout(() => {
      if (!this.#write({ type: 'ping' })) return;
      // No answer at all: the network is gone without a close; drop and reconnect.
      this.pongTimer = setTimeout(() => this.ws?.close(4100, 'heartbeat timeout'), this.pongTimeoutMs);
    }, this.pingEveryMs);
  }

  #onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.#detach(ws);
    this.#clearTimers();
    // Files half-received on this socket: the server keeps them and sends them again.
    for (const d of this.downloads.values()) {
      d.sink?.discard();
      this.#emit('blob-abort', { key: d.key, reason: 'connection_lost' });
    }
    this.downloads.clear();
    if (this.stopped) return;
    if (code === CLOSE_KICKED) return this.#kicked();
    if (code === CLOSE_INVALID_USER) return this.#reject('invalid_user', reason || 'invalid username');
    if (code === CLOSE_AUTH) return this.#reject(reason || 'bad_credentials', 'the server refused the sign-in');
    if (code === CLOSE_TAKEOVER_LOOP) return this.#reject('takeover_loop', 'signed in and out too often: wait a minute');
    this.#scheduleRetry(code === 1001 ? 'server restarting' : `connection lost (${code})`);
  }

  #kicked(message) {
    this.stopped = true;
    this.#clearTimers();
    if (this.ws) { const ws = this.ws; this.ws = null; this.#detach(ws); try { ws.close(); } catch {} }
    this.#setState('kicked', { reason: message || 'signed in from another place' });
  }

  #reject(code, message, extra = {}) {
    this.stopped = true;
    this.#clearTimers();
    if (this.ws) { const ws = this.ws; this.ws = null; this.#detach(ws); ws.close(); }
    this.#setState('rejected', { code, reason: message, ...extra });
  }

  #scheduleRetry(reason) {
    const delay = this.backoff(this.attempt);
    this.attempt += 1;
    this.#setState('waiting', { reason, retryAt: Date.now() + delay, attempt: this.attempt });
    this.retryTimer = setTimeout(() => this.#open(), delay);
  }

  #clearTimers() {
    for (const t of ['retryTimer', 'pingTimer', 'pongTimer', 'ackTimer', 'rateTimer']) { clearTimeout(this[t]); this[t] = null; }
  }

  #setState(state, extra = {}) {
    this.state = state;
    this.#emit('state', { state, ...extra });
  }

  #emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
}
