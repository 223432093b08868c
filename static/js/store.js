// store.js — owns this browser's copy of one user's chats: conversations, messages
// (text, and file descriptions: the bytes live in IndexedDB, see files.js; a streamed
// file also keeps the server's link to its bytes, `file.remote` {src, expires}), unread
// counts, the outbox of unconfirmed sends, and the seqs already taken in.
// Kept in localStorage (one key per user) so history and unsent messages survive a
// reload. It is also the `journal` the connection asks about duplicates and resends.

const PREFIX = 'pigeon:v1:';
const MAX_PER_CONVERSATION = 1000;

/** Identity of a received message apart from its seq (the server's ts may differ by a ms on redelivery). */
const fingerprint = (m) => `${m.from}\u0000${m.id ?? ''}\u0000${m.file ? `file:${m.file.name}:${m.file.size}`
  : typeof m.body === 'string' ? m.body : JSON.stringify(m.body)}`;

export class ChatStore extends EventTarget {
  constructor(user, storage = globalThis.localStorage) {
    super();
    this.user = user;
    this.storage = storage;
    this.key = PREFIX + 'user:' + user;
    this.load();
  }

  load() {
    let data = null;
    try { data = JSON.parse(this.storage?.getItem(this.key) ?? 'null'); } catch { data = null; }
    this.convs = data?.convs ?? {};      // peer -> {peer, messages: [], unread, lastTs}
    this.seen = new Map();               // seq -> fingerprint, rebuilt from history
    for (const c of Object.values(this.convs)) {
      for (const m of c.messages) if (m.seq && m.dir === 'in') this.seen.set(m.seq, fingerprint(m));
    }
  }

  save() {
    try {
      this.storage?.setItem(this.key, JSON.stringify({ convs: this.convs }));
    } catch (e) {
      // Quota: drop the oldest half of the longest conversation and try once more.
      const longest = Object.values(this.convs).sort((a, b) => b.messages.length - a.messages.length)[0];
      if (longest && longest.messages.length > 10) {
        longest.messages.splice(0, longest.messages.length >> 1);
        try { this.storage?.setItem(this.key, JSON.stringify({ convs: this.convs })); } catch {}
      }
    }
  }

  conversation(peer, create = true) {
    let c = this.convs[peer];
    if (!c && create) c = this.convs[peer] = { peer, messages: [], unread: 0, lastTs: Date.now() };
    return c;
  }

  /** Conversations, most recent first. */
  list() {
    return Object.values(this.convs).sort((a, b) => b.lastTs - a.lastTs);
  }

  // ---- journal interface (used by PigeonConnection) ----

  isDuplicate(msg) {
    const f = this.seen.get(msg.seq);
    // Same seq and same content: a redelivery. Same seq but other content means the
    // server's mailbox started over (data reset), so it is a new message.
    return f !== undefined && f === fingerprint(msg);
  }

  unconfirmed() {
    const out = [];
    for (const c of Object.values(this.convs)) {
      for (const m of c.messages) if (m.dir === 'out' && m.status === 'sending' && !m.file) out.push(m);
    }
    return out.sort((a, b) => a.ts - b.ts).map(({ id, to, body }) => ({ id, to, body }));
  }

  /** Files sent here and not yet confirmed (they go out again after a reload). */
  unconfirmedFiles() {
    const out = [];
    for (const c of Object.values(this.convs)) {
      for (const m of c.messages) if (m.dir === 'out' && m.status === 'sending' && m.file) out.push(m);
    }
    return out.sort((a, b) => a.ts - b.ts);
  }

  // ---- changes ----

  /** A message from the server. Returns the stored record. */
  addIncoming(msg, { activePeer } = {}) {
    const own = msg.from === this.user;
    const peer = own ? msg.to : msg.from;
    const c = this.conversation(peer);
    // Our own message to ourselves comes back as a msg: fold it into the outgoing one.
    if (own && msg.id) {
      const mine = c.messages.find((m) => m.dir === 'out' && m.id === msg.id);
      if (mine) { this.seen.set(msg.seq, fingerprint(msg)); this.#changed(peer); return mine; }
    }
    const rec = {
      dir: 'in', seq: msg.seq, id: msg.id ?? null, from: msg.from, to: msg.to,
      body: msg.body, ts: typeof msg.ts === 'number' ? msg.ts : Date.now(), offline: !!msg.offline,
    };
    c.messages.push(rec);
    if (c.messages.length > MAX_PER_CONVERSATION) c.messages.splice(0, c.messages.length - MAX_PER_CONVERSATION);
    c.lastTs = Math.max(c.lastTs, rec.ts);
    if (peer !== activePeer) c.unread += 1;
    this.seen.set(msg.seq, fingerprint(msg));
    this.#changed(peer);
    return rec;
  }

  /** A message typed here; it stays `sending` until the server confirms it. */
  addOutgoing({ id, to, body }) {
    const c = this.conversation(to);
    const rec = { dir: 'out', id, from: this.user, to, body, ts: Date.now(), status: 'sending' };
    c.messages.push(rec);
    c.lastTs = rec.ts;
    this.#changed(to);
    return rec;
  }

  /** A file picked here: `file` is {name, mime, size, key}; `sending` until confirmed. */
  addOutgoingFile({ id, to, file }) {
    const c = this.conversation(to);
    const rec = { dir: 'out', id, from: this.user, to, body: null, file, ts: Date.now(), status: 'sending' };
    c.messages.push(rec);
    c.lastTs = rec.ts;
    this.#changed(to);
    return rec;
  }

  #findIn(peer, tkey) {
    return this.convs[peer]?.messages.find((m) => m.dir === 'in' && m.file && m.file.tkey === tkey) ?? null;
  }

  /**
   * A file started arriving (`blob-start`): a record in state `receiving`, or the earlier
   * record of the same transfer if an earlier attempt was cut off. Null if it is already here.
   */
  fileStarted(t) {
    const own = t.from === this.user;
    if (own && t.id && this.#findOut(t.id)[1]) return null; // a file to ourselves
    const peer = own ? t.to : t.from;
    const old = this.#findIn(peer, t.key);
    if (old?.file.state === 'done') return null;
    // `remoteReady`: the server already has every byte (a file from the mailbox), so its
    // link plays while the copy for this browser is still arriving.
    const file = { name: t.name, mime: t.mime, size: t.size, sha256: t.sha256 ?? null, tkey: t.key, state: 'receiving',
      remote: t.remote ?? null, remoteReady: !!(t.remote && t.offline) };
    if (old) { old.file = file; this.#changed(peer); return old; }
    const c = this.conversation(peer);
    const rec = { dir: 'in', seq: null, id: t.id ?? null, from: t.from, to: t.to, body: null, file,
      ts: Date.now(), offline: !!t.offline };
    c.messages.push(rec);
    this.#changed(peer);
    return rec;
  }

  /** The whole file is here (`blob`): it becomes a message; `key` is where its bytes are kept. */
  fileDone(t, key, { activePeer } = {}) {
    const own = t.from === this.user;
    if (own && t.id) { // a file to ourselves: the outgoing record already shows it
      const [c, mine] = this.#findOut(t.id);
      if (mine) { this.seen.set(t.seq, fingerprint(t)); this.#drop(t.to, t.key); this.#changed(c.peer); return null; }
    }
    const peer = own ? t.to : t.from;
    let rec = this.#findIn(peer, t.key);
    if (!rec) rec = this.fileStarted(t);
    const c = this.conversation(peer);
    Object.assign(rec, { seq: t.seq, ts: typeof t.ts === 'number' ? t.ts : Date.now(), offline: !!t.offline });
    const remote = t.remote ?? rec.file?.remote ?? null;
    rec.file = { name: t.name, mime: t.mime, size: t.size, sha256: t.sha256 ?? null, key, tkey: t.key, state: 'done',
      remote, remoteReady: !!remote };
    // It takes its place in the conversation when its last byte arrived (its seq).
    c.messages.splice(c.messages.indexOf(rec), 1);
    c.messages.push(rec);
    c.lastTs = Math.max(c.lastTs, rec.ts);
    if (peer !== activePeer) c.unread += 1;
    this.seen.set(t.seq, fingerprint(rec));
    this.#changed(peer);
    return rec;
  }

  /** A file stopped arriving; `reason` is the server's (or `connection_lost`). */
  fileAborted(t, reason) {
    for (const c of Object.values(this.convs)) {
      const m = c.messages.find((x) => x.dir === 'in' && x.file?.tkey === t.key && x.file.state !== 'done');
      if (m) { m.file.state = 'aborted'; m.file.reason = reason; this.#changed(c.peer); return m; }
    }
    return null;
  }

  /** The server's link of a received file failed (expired, or its bytes are gone): stop using it. */
  remoteFailed(tkey) {
    for (const c of Object.values(this.convs)) {
      const m = c.messages.find((x) => x.dir === 'in' && x.file?.tkey === tkey);
      if (m?.file.remote && !m.file.remote.failed) { m.file.remote.failed = true; this.#changed(c.peer); return m; }
    }
    return null;
  }

  #drop(peer, tkey) {
    const c = this.convs[peer];
    const i = c?.messages.findIndex((m) => m.dir === 'in' && m.file?.tkey === tkey && m.file.state !== 'done') ?? -1;
    if (i >= 0) c.messages.splice(i, 1);
  }

  #findOut(id) {
    for (const c of Object.values(this.convs)) {
      const m = c.messages.find((x) => x.dir === 'out' && x.id === id);
      if (m) return [c, m];
    }
    return [null, null];
  }

  /** The server's `sent`: status stored | delivered. */
  confirm({ id, seq, status, duplicate }) {
    const [c, m] = this.#findOut(id);
    if (!m) return null;
    // A duplicate answer says "stored" even if the first copy was delivered: keep the better one.
    if (!(duplicate && m.status === 'delivered')) m.status = status === 'delivered' ? 'delivered' : 'stored';
    m.seq = seq;
    delete m.error;
    this.#changed(c.peer);
    return m;
  }

  /**
   * The server's `receipt`: `from` has every message up to its seq `upto`, so this
   * user's messages to `from` with a seq at or below it are received.
   */
  received({ from, upto }) {
    const c = this.convs[from];
    if (!c || typeof upto !== 'number') return 0;
    let n = 0;
    for (const m of c.messages) {
      if (m.dir === 'out' && m.seq && m.seq <= upto && (m.status === 'stored' || m.status === 'delivered')) {
        m.status = 'received';
        n++;
      }
    }
    if (n) this.#changed(from);
    return n;
  }

  fail({ id, code, message }) {
    const [c, m] = this.#findOut(id);
    if (!m) return null;
    m.status = 'failed';
    m.error = { code, message };
    this.#changed(c.peer);
    return m;
  }

  /** Puts a failed message back into the outbox (same id, so a retry can never double it). */
  retry(id) {
    const [c, m] = this.#findOut(id);
    if (!m || m.status !== 'failed') return null;
    m.status = 'sending';
    delete m.error;
    this.#changed(c.peer);
    return m;
  }

  markRead(peer) {
    const c = this.conversation(peer, false);
    if (c && c.unread) { c.unread = 0; this.#changed(peer); }
  }

  setDraft(peer, text) {
    const c = this.conversation(peer, false);
    if (c) { c.draft = text; this.save(); }
  }

  #changed(peer) {
    this.save();
    this.dispatchEvent(new CustomEvent('change', { detail: { peer } }));
  }
}
