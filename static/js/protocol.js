// protocol.js — owns the connection to a Pigeon server: the Pigeon JSON protocol
// (docs/PROTOCOL.md), reconnect with backoff, heartbeat, resending unconfirmed sends
// with their original id, dropping redelivered messages by seq, and cumulative acks.
// No DOM and no storage here: the app injects a `journal` (what was already received,
// what is still unconfirmed) and listens to events.

/** Same rule as the server: 1–32 letters (Unicode Alphabetic), digits, `_`, `.`, `-`. */
export const USERNAME_RE = /^[\p{Alphabetic}\p{N}_.-]{1,32}$/u;
export const validUsername = (name) => typeof name === 'string' && USERNAME_RE.test(name);

export const CLOSE_KICKED = 4000;
export const CLOSE_INVALID_USER = 4001;
export const CLOSE_PROTOCOL_ERROR = 4002;

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
 *  - `frame`   any frame of a type this module does not know (future: presence, files)
 *
 * `journal` is asked, never mutated:
 *  - `isDuplicate(msg)`: true when this message (by seq) was already taken in
 *  - `unconfirmed()`: [{id, to, body}] sends not yet answered by `sent`/`error`, oldest first
 */
export class PigeonConnection extends EventTarget {
  constructor({ user, credentials = {}, journal, url = socketUrl(), WebSocketImpl = globalThis.WebSocket,
    pingEveryMs = 25000, pongTimeoutMs = 10000, backoff = backoffDelay } = {}) {
    super();
    this.user = user;
    this.credentials = credentials; // future: {password} goes into the login frame
    this.journal = journal;
    this.url = url;
    this.WebSocketImpl = WebSocketImpl;
    this.pingEveryMs = pingEveryMs;
    this.pongTimeoutMs = pongTimeoutMs;
    this.backoff = backoff;
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
    this.ws = ws;
    this.maxSeq = 0;
    this.ackedSeq = 0;
    this.inFlight.clear();
    this.kickedFrame = false;
    ws.onopen = () => {
      this.#write({ type: 'login', user: this.user, ...this.credentials });
    };
    ws.onmessage = (ev) => this.#onFrame(ev.data);
    ws.onclose = (ev) => this.#onClose(ws, ev.code, ev.reason);
    ws.onerror = () => { /* onclose follows and decides */ };
  }

  #detach(ws) { ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null; }

  #write(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    try { ws.send(JSON.stringify(frame)); return true; } catch { return false; }
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
        break;
      case 'msg':
        if (typeof f.seq !== 'number') return;
        if (f.seq > this.maxSeq) this.maxSeq = f.seq;
        // Redelivery after a reconnect: already taken in, only needs acking again.
        if (!this.journal?.isDuplicate(f)) this.#emit('message', f);
        this.#scheduleAck();
        break;
      case 'synced':
        this.#setState('online');
        this.#emit('synced', f);
        this.ackNow();
        break;
      case 'sent':
        this.inFlight.delete(f.id);
        this.#emit('sent', f);
        break;
      case 'error':
        if (f.id) { this.inFlight.delete(f.id); this.#emit('failed', f); }
        else if (this.state === 'connecting' && f.code === 'invalid_user') {
          this.#reject(f.code, f.message);
        } else this.#emit('error', f);
        break;
      case 'kicked':
        this.kickedFrame = true;
        this.#kicked(f.message);
        break;
      case 'pong':
        break;
      default:
        this.#emit('frame', f);
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
    if (this.stopped) return;
    if (code === CLOSE_KICKED) return this.#kicked();
    if (code === CLOSE_INVALID_USER) return this.#reject('invalid_user', reason || 'invalid username');
    this.#scheduleRetry(code === 1001 ? 'server restarting' : `connection lost (${code})`);
  }

  #kicked(message) {
    this.stopped = true;
    this.#clearTimers();
    if (this.ws) { const ws = this.ws; this.ws = null; this.#detach(ws); try { ws.close(); } catch {} }
    this.#setState('kicked', { reason: message || 'signed in from another place' });
  }

  #reject(code, message) {
    this.stopped = true;
    this.#clearTimers();
    if (this.ws) { const ws = this.ws; this.ws = null; this.#detach(ws); ws.close(); }
    this.#setState('rejected', { code, reason: message });
  }

  #scheduleRetry(reason) {
    const delay = this.backoff(this.attempt);
    this.attempt += 1;
    this.#setState('waiting', { reason, retryAt: Date.now() + delay, attempt: this.attempt });
    this.retryTimer = setTimeout(() => this.#open(), delay);
  }

  #clearTimers() {
    for (const t of ['retryTimer', 'pingTimer', 'pongTimer', 'ackTimer']) { clearTimeout(this[t]); this[t] = null; }
  }

  #setState(state, extra = {}) {
    this.state = state;
    this.#emit('state', { state, ...extra });
  }

  #emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
}
