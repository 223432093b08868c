// app.js — the web client's entry point: wires the connection (protocol.js), this
// browser's history (store.js) and the page (ui.js) together, and owns the session
// lifecycle (sign in, remembered sign-in, sign out, "use here" after a kick).

import { PigeonConnection, newMessageId, validUsername } from './protocol.js';
import { ChatStore } from './store.js';
import { ChatView } from './ui.js';

const SESSION_KEY = 'pigeon:v1:session';

const ui = new ChatView();
let store = null;
let conn = null;
let me = null;
let renderQueued = false;

function remembered() {
  try { return JSON.parse(localStorage.getItem(SESSION_KEY) ?? 'null'); } catch { return null; }
}

function signIn({ user, password }) {
  if (!validUsername(user)) {
    ui.signInError(user ? `“${user}” is not a valid name: use 1–32 letters, digits, _ . or -` : 'Enter your name.');
    return;
  }
  me = user;
  store = new ChatStore(user);
  store.addEventListener('change', scheduleRender);
  // Accounts are not implemented on the server yet; once they are, the password goes
  // into the login frame here (never into the URL, which ends up in logs).
  const credentials = {}; // later: { password }
  void password;
  conn = new PigeonConnection({ user, credentials, journal: store });
  conn.addEventListener('state', (e) => onState(e.detail));
  conn.addEventListener('message', (e) => {
    const rec = store.addIncoming(e.detail, { activePeer: visiblePeer() });
    if (rec && e.detail.from !== me) document.dispatchEvent(new CustomEvent('pigeon:message', { detail: rec }));
  });
  conn.addEventListener('sent', (e) => store.confirm(e.detail));
  conn.addEventListener('failed', (e) => store.fail(e.detail));
  conn.addEventListener('frame', (e) => onOtherFrame(e.detail));
  try { localStorage.setItem(SESSION_KEY, JSON.stringify({ user })); } catch {}
  ui.showApp(user);
  render();
  conn.start();
}

function signOut({ error = null } = {}) {
  conn?.stop();
  conn = null;
  try { localStorage.removeItem(SESSION_KEY); } catch {}
  ui.setConnection({ state: 'closed' });
  ui.showSignIn({ user: me ?? '', error });
  store = null;
}

function onState(detail) {
  ui.setConnection(detail);
  if (detail.state === 'rejected') signOut({ error: `The server refused “${me}”: ${detail.reason}` });
}

/** Frames protocol.js does not know yet. Presence will arrive here once the server has it. */
function onOtherFrame(frame) {
  if (frame.type === 'presence' && typeof frame.user === 'string') {
    ui.setPresence(frame.user, frame.online ? 'online' : 'offline');
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
  if (!store) return;
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

ui.on.signIn = signIn;
ui.on.signOut = () => signOut();
ui.on.open = open;
ui.on.back = () => { ui.showConversation(null); render(); };
ui.on.newChat = (name) => {
  if (!validUsername(name)) {
    ui.newChatError(name ? `“${name}” is not a valid name` : 'Type a name to start a conversation.');
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
ui.on.retry = (id) => {
  const m = store?.retry(id);
  if (m) conn?.send({ id: m.id, to: m.to, body: m.body });
};
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

const session = remembered();
if (session?.user && validUsername(session.user)) signIn({ user: session.user });
else ui.showSignIn();
