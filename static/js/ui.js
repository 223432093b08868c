// ui.js — owns the DOM: sign-in form, conversation list, conversation view, composer and
// the connection banner. It only renders what it is given and reports what the person
// did through the `on*` callbacks; it never talks to the server or to storage.
// Message text is always put in with textContent, never as HTML.

const $ = (id) => document.getElementById(id);

const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

/** A stable pleasant colour per name. */
function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h % 360;
}

function fillAvatar(node, name) {
  node.textContent = [...name][0]?.toUpperCase() ?? '?';
  node.style.setProperty('--h', hue(name));
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', day: 'numeric', month: 'long' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const shortDayFmt = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short' });

function dayLabel(ts) {
  const d = new Date(ts); const now = new Date();
  const startOf = (x) => new Date(x.getFullYear(), x.getMonth(), x.getDate()).getTime();
  const diff = Math.round((startOf(now) - startOf(d)) / 86400000);
  if (diff === 0) return 'Today';
  if (diff === 1) return 'Yesterday';
  return dayFmt.format(d);
}

function listTime(ts) {
  const d = new Date(ts);
  return dayLabel(ts) === 'Today' ? timeFmt.format(d) : shortDayFmt.format(d);
}

/** Text of a body: strings as they are, other JSON values as compact JSON. */
export function bodyText(body) {
  return typeof body === 'string' ? body : JSON.stringify(body);
}

const STATUS = {
  sending: { icon: '◷', text: 'Sending', title: 'Waiting for the server to confirm' },
  stored: { icon: '✓', text: 'Stored', title: 'On the server; delivered when they come online' },
  delivered: { icon: '✓✓', text: 'Delivered', title: 'Delivered to their device' },
  failed: { icon: '!', text: 'Not sent', title: 'The server refused this message' },
};

export class ChatView {
  constructor() {
    this.on = {}; // callbacks: signIn, signOut, open, back, newChat, send, retry, banner, draft
    this.activePeer = null;
    this.#bind();
  }

  #bind() {
    $('signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      this.on.signIn?.({ user: $('signin-name').value.trim(), password: $('signin-password').value });
    });
    $('signout').addEventListener('click', () => this.on.signOut?.());
    $('banner-signout').addEventListener('click', () => this.on.signOut?.());
    $('banner-action').addEventListener('click', () => this.on.banner?.($('banner-action').dataset.action));
    $('new-chat').addEventListener('submit', (e) => {
      e.preventDefault();
      this.on.newChat?.($('new-chat-name').value.trim());
    });
    $('new-chat-name').addEventListener('input', () => this.newChatError(null));
    $('conversations').addEventListener('click', (e) => {
      const li = e.target.closest('li[data-peer]');
      if (li) this.on.open?.(li.dataset.peer);
    });
    $('back').addEventListener('click', () => this.on.back?.());
    $('messages').addEventListener('click', (e) => {
      const b = e.target.closest('button[data-retry]');
      if (b) this.on.retry?.(b.dataset.retry);
    });
    const input = $('composer-input');
    $('composer').addEventListener('submit', (e) => { e.preventDefault(); this.#submit(); });
    input.addEventListener('keydown', (e) => {
      // Enter sends, Shift+Enter is a newline; leave IME composition alone.
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.#submit(); }
    });
    input.addEventListener('input', () => { this.#grow(); this.on.draft?.(input.value); });
  }

  #submit() {
    const input = $('composer-input');
    const text = input.value;
    if (!text.trim()) return;
    if (this.on.send?.(text) !== false) {
      input.value = '';
      this.#grow();
      this.on.draft?.('');
    }
    input.focus();
  }

  #grow() {
    const t = $('composer-input');
    t.style.height = 'auto';
    t.style.height = Math.min(t.scrollHeight, 160) + 'px';
  }

  // ---- sign in ----

  showSignIn({ user = '', error = null } = {}) {
    $('app').hidden = true;
    $('signin').hidden = false;
    $('signin-name').value = user;
    this.signInError(error);
    $('signin-name').focus();
  }

  signInError(msg) {
    $('signin-error').hidden = !msg;
    $('signin-error').textContent = msg ?? '';
  }

  showApp(user) {
    $('signin').hidden = true;
    $('app').hidden = false;
    $('me-name').textContent = user;
    fillAvatar($('me-avatar'), user);
    this.activePeer = null;
    this.showConversation(null);
  }

  newChatError(msg) {
    $('new-chat-error').hidden = !msg;
    $('new-chat-error').textContent = msg ?? '';
  }

  clearNewChat() { $('new-chat-name').value = ''; }

  // ---- conversation list ----

  renderConversations(convs) {
    const ul = $('conversations');
    ul.replaceChildren();
    for (const c of convs) {
      const li = el('li', 'conv');
      li.dataset.peer = c.peer;
      if (c.peer === this.activePeer) li.classList.add('active');
      if (c.unread) li.classList.add('unread');
      if (c.presence) li.dataset.presence = c.presence;
      const av = el('span', 'avatar');
      fillAvatar(av, c.peer);
      av.append(el('span', 'presence-dot')); // visible only when data-presence is set
      const main = el('div', 'conv-main');
      const top = el('div', 'conv-top');
      top.append(el('span', 'conv-name', c.peer));
      const last = c.messages[c.messages.length - 1];
      if (last) top.append(el('time', 'conv-time', listTime(last.ts)));
      const bottom = el('div', 'conv-bottom');
      const preview = last ? (last.dir === 'out' ? 'You: ' : '') + bodyText(last.body).replace(/\s+/g, ' ') : 'No messages yet';
      bottom.append(el('span', 'conv-preview', preview));
      if (c.unread) {
        const badge = el('span', 'badge', c.unread > 99 ? '99+' : String(c.unread));
        badge.setAttribute('aria-label', `${c.unread} unread`);
        bottom.append(badge);
      }
      main.append(top, bottom);
      li.append(av, main);
      ul.append(li);
    }
    $('conv-empty').hidden = convs.length > 0;
    const unread = convs.reduce((n, c) => n + (c.unread || 0), 0);
    document.title = unread ? `(${unread}) Pigeon` : 'Pigeon';
  }

  /** Presence hook: state is 'online' | 'offline' | null (unknown: nothing shown). */
  setPresence(peer, state) {
    const li = $('conversations').querySelector(`li[data-peer="${CSS.escape(peer)}"]`);
    if (li) { if (state) li.dataset.presence = state; else delete li.dataset.presence; }
    if (peer === this.activePeer) {
      $('peer-presence').hidden = !state;
      $('peer-presence').textContent = state ?? '';
    }
  }

  // ---- conversation view ----

  showConversation(conv, { me, draft = '' } = {}) {
    const app = $('app');
    if (!conv) {
      this.activePeer = null;
      $('chat-pane').hidden = true;
      $('chat-empty').hidden = false;
      app.classList.remove('show-chat');
      return;
    }
    const changed = this.activePeer !== conv.peer;
    this.activePeer = conv.peer;
    $('chat-empty').hidden = true;
    $('chat-pane').hidden = false;
    app.classList.add('show-chat');
    $('peer-name').textContent = conv.peer;
    fillAvatar($('peer-avatar'), conv.peer);
    $('peer-presence').hidden = true;
    for (const li of $('conversations').children) li.classList.toggle('active', li.dataset.peer === conv.peer);
    if (changed) {
      $('composer-input').value = draft;
      this.#grow();
    }
    this.renderMessages(conv, me, { jump: changed });
    if (changed) $('composer-input').focus();
  }

  renderMessages(conv, me, { jump = false } = {}) {
    const ol = $('messages');
    const nearBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 80;
    ol.replaceChildren();
    let lastDay = null; let prev = null;
    for (const m of conv.messages) {
      const day = dayLabel(m.ts);
      if (day !== lastDay) {
        ol.append(el('li', 'day', day));
        lastDay = day; prev = null;
      }
      // Group consecutive messages of one sender within 5 minutes under one name.
      const grouped = prev && prev.from === m.from && m.ts - prev.ts < 5 * 60000 && !!prev.offline === !!m.offline;
      ol.append(this.#message(m, me, grouped));
      prev = m;
    }
    if (jump || nearBottom) ol.scrollTop = ol.scrollHeight;
  }

  #message(m, me, grouped) {
    const mine = m.dir === 'out';
    const li = el('li', `msg ${mine ? 'out' : 'in'}${grouped ? ' grouped' : ''}`);
    li.dataset.dir = m.dir;
    if (m.id) li.dataset.id = m.id;
    if (m.seq) li.dataset.seq = m.seq;
    if (m.offline) li.dataset.offline = 'true';
    if (mine) li.dataset.status = m.status;
    const bubble = el('div', 'bubble');
    const head = el('div', 'msg-head');
    head.append(el('span', 'sender', mine ? 'You' : m.from));
    if (m.offline) {
      const tag = el('span', 'offline-tag', 'while you were away');
      tag.title = 'Stored on the server while you were signed out';
      head.append(tag);
    }
    bubble.append(head);
    const text = typeof m.body === 'string' ? el('div', 'body', m.body) : el('pre', 'body json', JSON.stringify(m.body, null, 2));
    bubble.append(text);
    const meta = el('div', 'msg-meta');
    const t = el('time', 'msg-time', timeFmt.format(new Date(m.ts)));
    t.dateTime = new Date(m.ts).toISOString();
    t.title = fullFmt.format(new Date(m.ts));
    meta.append(t);
    if (mine) {
      const s = STATUS[m.status] ?? STATUS.sending;
      const st = el('span', `status status-${m.status}`);
      st.title = m.error ? `${s.title}: ${m.error.message}` : s.title;
      st.append(el('span', 'status-icon', s.icon), el('span', 'status-text', s.text));
      meta.append(st);
    }
    bubble.append(meta);
    if (mine && m.status === 'failed') {
      const row = el('div', 'failed-row');
      row.append(el('span', 'failed-reason', m.error?.message ?? 'Not sent'));
      const b = el('button', 'btn-small', 'Retry');
      b.type = 'button';
      b.dataset.retry = m.id;
      row.append(b);
      bubble.append(row);
    }
    li.append(bubble);
    return li;
  }

  // ---- connection banner ----

  /**
   * Shows the connection state: a small pill next to the user's name, and a banner over
   * the conversation when something needs attention.
   */
  setConnection({ state, retryAt, reason }) {
    const pill = $('conn-pill');
    pill.dataset.state = state;
    pill.textContent = { connecting: 'Connecting…', syncing: 'Catching up…', online: 'Online',
      waiting: 'Offline', kicked: 'Signed out here', rejected: 'Refused', closed: 'Offline' }[state] ?? state;
    clearInterval(this.countdown);
    const banner = $('banner'); const action = $('banner-action');
    banner.dataset.state = state;
    $('banner-signout').hidden = state !== 'kicked';
    const show = (text, act, label) => {
      banner.hidden = false;
      $('banner-text').textContent = text;
      action.hidden = !act;
      if (act) { action.dataset.action = act; action.textContent = label; }
    };
    if (state === 'waiting') {
      const tick = () => {
        const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
        show(`Connection lost. Reconnecting in ${s}s… Messages you write now are sent then.`, 'retry', 'Retry now');
      };
      tick();
      this.countdown = setInterval(tick, 1000);
    } else if (state === 'kicked') {
      show('You signed in to Pigeon somewhere else, so this page was disconnected. It will not reconnect by itself.', 'reconnect', 'Use Pigeon here');
    } else if (state === 'connecting' && this.wasOnline) {
      show('Reconnecting…', null);
    } else {
      banner.hidden = true;
    }
    if (state === 'online') this.wasOnline = true;
    if (state === 'closed') this.wasOnline = false;
  }
}
