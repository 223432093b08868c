// app.js — the web client's entry point: wires the connection (protocol.js), this
// browser's history (store.js), file bytes (files.js) and the page (ui.js) together, and
// owns the session lifecycle: sign in (name only on an open server; password → token on
// a server with accounts), remembered sign-in by token, sign out, "use here" after a kick,
// and sending and receiving files (a received video or audio plays from the server's link
// while its copy for this browser is written to IndexedDB chunk by chunk).

import { PigeonConnection, canonicalUsername, fetchToken, newMessageId, validUsername } from './protocol.js';
import { ChatStore } from './store.js';
import { ChatView } from './ui.js';
import { putFile, getFile, urlFor, loadUrl, forgetUrls, sha256Hex, streamable, serverLink, chunkSink, dropStaleParts } from './files.js';

// {user, token?, expiresAt?}: never a password. The token is what reconnects use.
const SESSION_KEY = 'pigeon:v1:session';
// Set once this server answered auth_required: the sign-in form then asks for a password.
const NEEDS_PASSWORD_KEY = 'pigeon:v1:needs-password';

const ui = new ChatView();
let store = null;
let conn = null;
let me = null;
let shown = false;      // the chat is on screen (not the sign-in form)
let usingToken = false; // this session logs in with a token (not name only)
let renderQueued = false;
const loading = new Set(); // file keys being read back from IndexedDB

const local = {
  get(k) { try { return JSON.parse(localStorage.getItem(k) ?? 'null'); } catch { return null; } },
  set(k, v) { try { localStorage.setItem(k, JSON.stringify(v)); } catch {} },
  del(k) { try { localStorage.removeItem(k); } catch {} },
};
const needsPassword = () => local.get(NEEDS_PASSWORD_KEY) === true;

/** Words for a refused sign-in: `code` from the HTTP API or from a login frame. */
function authMessage(code, { tryAgainIn, message, name } = {}) {
  switch (code) {
    case 'bad_credentials': return usingToken && !name ? 'Your sign-in is no longer valid (was the password changed?). Enter your password.' : 'Wrong name or password.';
    case 'token_expired': return 'Your sign-in has expired. Enter your password again.';
    case 'credentials_changed': return 'The password of this account was changed. Sign in with the new one.';
    case 'account_deleted': return 'This account was deleted.';
    case 'auth_required': return 'This server needs a password. Enter yours to sign in.';
    case 'too_many_attempts': return `Too many failed sign-ins. Try again in ${tryAgainIn ?? 60} s.`;
    case 'too_many_connections': return 'Too many connections from your address. Try again in a moment.';
    case 'takeover_loop': return 'This account switched devices too often just now. Wait a minute, then sign in again.';
    case 'invalid_user': return `The server refused “${me}”: ${message ?? 'not a valid name'}`;
    case 'network': return 'Cannot reach the server. Check your connection and try again.';
    case 'store_unavailable': return 'The server cannot check passwords right now. Try again later.';
    default: return message ? `Sign-in failed: ${message}` : 'Sign-in failed.';
  }
}

async function submitSignIn({ user: typed, password }) {
  const user = canonicalUsername(typed);
  if (!user) {
    ui.signInError(typed ? `“${typed}” is not a valid name: use 1–32 letters a–z, digits, _ . or -` : 'Enter your name.');
    return;
  }
  if (!password) {
    if (needsPassword()) { ui.showPassword(true); ui.signInError('Enter your password.'); return; }
    startSession({ user }); // an open server needs no more; otherwise it says auth_required
    return;
  }
  ui.signInBusy(true);
  ui.signInError(null);
  try {
    const t = await fetchToken(user, password);
    startSession({ user, token: t.token, expiresAt: t.expires_at });
  } catch (e) {
    ui.signInBusy(false);
    usingToken = false;
    ui.signInError(authMessage(e.code, { tryAgainIn: e.tryAgainIn, message: e.message, name: user }));
    if (e.code === 'bad_credentials') document.getElementById('signin-password').select();
  }
}

function startSession({ user, token = null, expiresAt = null }) {
  me = user;
  usingToken = !!token;
  store = new ChatStore(user);
  store.addEventListener('change', scheduleRender);
  // Videos and audio the server serves by link: their chunks go straight to IndexedDB.
  const sinkFor = (t) => (withRemote(t).remote ? chunkSink(`${user}/in/${t.from}/${t.id ?? 'k-' + (t.blobKey ?? t.key)}`) : null);
  conn = new PigeonConnection({ user, credentials: token ? { token } : {}, journal: store, sinkFor });
  dropStaleParts(`${user}/in/`); // before any chunk of this session is written
  conn.addEventListener('state', (e) => onState(e.detail));
  conn.addEventListener('message', (e) => {
    const rec = store.addIncoming(e.detail, { activePeer: visiblePeer() });
    if (rec && e.detail.from !== me) document.dispatchEvent(new CustomEvent('pigeon:message', { detail: rec }));
  });
  conn.addEventListener('sent', (e) => { store.confirm(e.detail); ui.clearProgress(e.detail.id); });
  conn.addEventListener('failed', (e) => { store.fail(e.detail); ui.clearProgress(e.detail.id); });
  conn.addEventListener('error', (e) => onServerError(e.detail));
  conn.addEventListener('frame', (e) => onOtherFrame(e.detail));
  conn.addEventListener('upload', (e) => ui.setProgress(e.detail.id, e.detail.sent, e.detail.size));
  conn.addEventListener('blob-start', (e) => {
    if (store.fileStarted(withRemote(e.detail))) ui.setProgress(e.detail.key, 0, e.detail.size);
  });
  conn.addEventListener('blob-progress', (e) => ui.setProgress(e.detail.key, e.detail.received, e.detail.size));
  conn.addEventListener('blob', (e) => onFile(e.detail));
  conn.addEventListener('blob-abort', (e) => { store.fileAborted(e.detail, e.detail.reason); ui.clearProgress(e.detail.key); });
  local.set(SESSION_KEY, token ? { user, token, expiresAt } : { user });
  // A remembered or token sign-in shows the chat at once (history works offline); a
  // name-only first sign-in waits to hear whether the server wants a password.
  shown = false;
  if (token || remembered()) showChat();
  else ui.signInBusy(true);
  // Files picked before a reload and not yet confirmed go out again (same id).
  for (const m of store.unconfirmedFiles()) {
    getFile(m.file.key).then((blob) => {
      if (blob && conn && store?.user === user) conn.sendFile({ id: m.id, to: m.to, file: blob, name: m.file.name, mime: m.file.mime, sha256: m.file.sha256 });
      else if (!blob) store?.fail({ id: m.id, code: 'missing', message: 'The file is no longer in this browser' });
    });
  }
  conn.start();
}

let rememberedFlag = false;
const remembered = () => rememberedFlag;

function showChat() {
  if (shown) return;
  shown = true;
  ui.showApp(me);
  render();
}

function signOut({ error = null, keepName = true } = {}) {
  conn?.stop();
  conn = null;
  local.del(SESSION_KEY);
  ui.setConnection({ state: 'closed' });
  ui.showSignIn({ user: keepName ? me ?? '' : '', error, password: needsPassword() });
  store = null;
  shown = false;
  rememberedFlag = false;
  forgetUrls();
  ui.media.clear();
  loading.clear();
}

function onState(detail) {
  if (detail.state === 'syncing' || detail.state === 'online' || detail.state === 'waiting') showChat();
  ui.setConnection(detail);
  if (detail.state === 'rejected') {
    if (['auth_required', 'bad_credentials', 'token_expired', 'credentials_changed'].includes(detail.code)) local.set(NEEDS_PASSWORD_KEY, true);
    signOut({ error: authMessage(detail.code, { tryAgainIn: detail.tryAgainIn, message: detail.reason }) });
  }
}

function onServerError(f) {
  if (f.code === 'rate_limited') ui.notice('Sending too fast: the server dropped something. It is being sent again.');
  else if (f.message) ui.notice(`Server: ${f.message}`);
}

/** Frames protocol.js does not know yet. Presence will arrive here once the server has it. */
function onOtherFrame(frame) {
  if (frame.type === 'receipt' && typeof frame.from === 'string') {
    store.received(frame);
    return;
  }
  if (frame.type === 'presence' && typeof frame.user === 'string') {
    ui.setPresence(frame.user, frame.online ? 'online' : 'offline');
  }
}

/**
 * A received file with `remote`: the server's link to its bytes ({src, expires}, see
 * files.js) when it is a video or audio the page plays from the server; otherwise null.
 */
function withRemote(t) {
  const remote = streamable(t.mime) ? serverLink(t.url) : null;
  return { ...t, remote };
}

/** A whole file arrived: show it now, keep its bytes, and let it be acked once kept. */
function onFile(t) {
  if (t.stored) {
    // Streamed: it plays from the server's link; its bytes are being joined in IndexedDB.
    const key = t.storedKey;
    ui.clearProgress(t.key);
    const rec = store.fileDone(withRemote(t), key, { activePeer: visiblePeer() });
    const s = store;
    t.waitUntil(t.stored.then(() => { loading.delete(key); if (s === store) scheduleRender(); }));
    if (rec && t.from !== me) document.dispatchEvent(new CustomEvent('pigeon:message', { detail: rec }));
    return;
  }
  const key = `${me}/in/${t.from}/${t.id ?? 'seq-' + t.seq}`;
  urlFor(key, t.blob, t.mime);
  ui.clearProgress(t.key);
  const rec = store.fileDone(t, key, { activePeer: visiblePeer() });
  t.waitUntil(putFile(key, t.blob).catch(() => {}));
  if (rec && t.from !== me) document.dispatchEvent(new CustomEvent('pigeon:message', { detail: rec }));
}

async function sendFiles(files) {
  const to = ui.activePeer;
  if (!to || !store) return;
  for (const file of files) {
    if (!file.size) { ui.notice(`“${file.name}” is empty: nothing to send.`); continue; }
    const id = newMessageId();
    const key = `${me}/out/${id}`;
    const meta = { name: file.name || 'file', mime: file.type || 'application/octet-stream', size: file.size, key };
    urlFor(key, file, meta.mime);
    store.addOutgoingFile({ id, to, file: meta }); // on screen (with its preview) at once
    const s = store;
    // Kept so that it can be resent after a reload; an upload needs no more than the File.
    putFile(key, file).catch(() => {});
    meta.sha256 = await sha256Hex(file).catch(() => null);
    if (s !== store) return;
    s.save();
    conn?.sendFile({ id, to, file, name: meta.name, mime: meta.mime, sha256: meta.sha256 });
  }
}

/** The conversation the person is actually looking at (not one behind a hidden tab). */
function visiblePeer() {
  return document.visibilityState === 'visible' ? ui.activePeer : null;
}

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(render, 0);
}

function render() {
  renderQueued = false;
  if (!store || !shown) return;
  const peer = ui.activePeer;
  if (peer && document.visibilityState === 'visible') store.markRead(peer);
  ui.renderConversations(store.list());
  if (peer) ui.renderMessages(store.conversation(peer), me);
}

function open(peer) {
  const conv = store.conversation(peer);
  ui.showConversation(conv, { me, draft: conv.draft ?? '' });
  store.markRead(peer);
  render();
}

ui.on.signIn = submitSignIn;
ui.on.signOut = () => signOut();
ui.on.open = open;
ui.on.back = () => { ui.showConversation(null); render(); };
ui.on.newChat = (typed) => {
  const name = canonicalUsername(typed);
  if (!name) {
    ui.newChatError(typed ? `“${typed}” is not a valid name: use 1–32 letters a–z, digits, _ . or -` : 'Type a name to start a conversation.');
    return;
  }
  ui.clearNewChat();
  open(name);
};
ui.on.send = (text) => {
  const to = ui.activePeer;
  if (!to || !store) return false;
  const msg = { id: newMessageId(), to, body: text };
  store.addOutgoing(msg); // into the outbox first, so a lost connection cannot lose it
  conn?.send(msg);
  return true;
};
ui.on.files = (files) => { sendFiles(files); };
ui.on.cancelFile = (id) => {
  if (conn?.cancelFile(id)) store?.fail({ id, code: 'cancelled', message: 'Cancelled' });
};
ui.on.retry = (id) => {
  const m = store?.retry(id);
  if (!m) return;
  if (!m.file) { conn?.send({ id: m.id, to: m.to, body: m.body }); return; }
  getFile(m.file.key).then((blob) => {
    if (blob) conn?.sendFile({ id: m.id, to: m.to, file: blob, name: m.file.name, mime: m.file.mime, sha256: m.file.sha256 });
    else store?.fail({ id: m.id, code: 'missing', message: 'The file is no longer in this browser' });
  });
};
ui.on.needFile = (key, mime) => {
  if (loading.has(key)) return;
  loading.add(key); // stays in: a file missing from IndexedDB is not asked for again
  loadUrl(key, mime).then((u) => { if (u) scheduleRender(); });
};
ui.on.mediaFailed = (tkey) => { store?.remoteFailed(tkey); };
ui.on.draft = (text) => { if (ui.activePeer) store?.setDraft(ui.activePeer, text); };
ui.on.banner = (action) => {
  if (action === 'retry') conn?.retryNow();
  if (action === 'reconnect' && conn) {
    store.load(); // another tab of this browser may have written history meanwhile
    render();
    conn.start();
  }
};

document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible') render(); });
window.addEventListener('online', () => conn?.retryNow());

const session = local.get(SESSION_KEY);
if (session?.user && validUsername(session.user)) {
  session.user = canonicalUsername(session.user); // saved by an older client as typed
  if (session.token && session.expiresAt && session.expiresAt * 1000 < Date.now()) {
    me = session.user;
    local.del(SESSION_KEY);
    ui.showSignIn({ user: session.user, password: true, error: authMessage('token_expired') });
  } else {
    rememberedFlag = true;
    startSession({ user: session.user, token: session.token ?? null, expiresAt: session.expiresAt ?? null });
  }
} else ui.showSignIn({ password: needsPassword() });
