// ui.js — owns the DOM: sign-in form (name, password when the server wants one),
// conversation list, conversation view with file bubbles (image/video/audio previews,
// download links, progress bars), composer with attach and drag-and-drop, and the
// connection banner. It only renders what it is given and reports what the person did
// through the `on*` callbacks; it never talks to the server or to storage.
// Message text, names, ids and file names are always put in with textContent (or as
// attribute values), never as HTML; what a file may show inline is decided in files.js.

import { knownUrl, formatSize, kindOf, linkUsable } from './files.js';

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
  received: { icon: '✓✓', text: 'Received', title: 'Their device confirmed it has it' },
  failed: { icon: '!', text: 'Not sent', title: 'The server refused this message' },
};

/** One line about a message for the conversation list. */
export function previewText(m) {
  if (m.file) return `📎 ${m.file.name || 'file'}`;
  return bodyText(m.body).replace(/\s+/g, ' ');
}

const ABORT_TEXT = {
  sender_gone: 'The sender went offline before the file was complete; it comes again when they resend it.',
  connection_lost: 'Interrupted: the connection dropped. The server keeps the file and sends it again.',
  cancelled: 'The sender cancelled this file.',
  duplicate: 'This file was already received.',
  checksum_mismatch: 'The file arrived damaged (checksum mismatch) and was discarded.',
  overflow: 'The sender sent more bytes than announced; the file was discarded.',
  refused: 'The server refused this file (the mailbox may be full).',
  unavailable: 'The server could not read this stored file.',
  store_unavailable: 'The server could not store this file.',
};

export class ChatView {
  constructor() {
    // callbacks: signIn, signOut, open, back, newChat, send, retry, banner, draft,
    // files (File[] picked or dropped), cancelFile (id), needFile (key: load its bytes),
    // mediaFailed (transfer key: its server link did not play, use the local copy)
    this.on = {};
    this.activePeer = null;
    this.progress = new Map(); // transfer key -> {done, total}
    this.media = new Map();    // object URL -> its <img>/<video>/<audio>, kept across renders
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
      const c = e.target.closest('button[data-cancel]');
      if (c) this.on.cancelFile?.(c.dataset.cancel);
    });
    // Files: the paperclip opens the picker; dropping files anywhere on the chat sends them.
    $('attach').hidden = false;
    $('attach').addEventListener('click', () => $('file-input').click());
    $('file-input').addEventListener('change', () => {
      const files = [...$('file-input').files];
      $('file-input').value = '';
      if (files.length) this.on.files?.(files);
    });
    const pane = $('chat-pane');
    let depth = 0;
    const hasFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes('Files');
    pane.addEventListener('dragenter', (e) => { if (hasFiles(e)) { depth += 1; pane.classList.add('dropping'); } });
    pane.addEventListener('dragleave', () => { depth = Math.max(0, depth - 1); if (!depth) pane.classList.remove('dropping'); });
    pane.addEventListener('dragover', (e) => { if (hasFiles(e)) { e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; } });
    pane.addEventListener('drop', (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      depth = 0;
      pane.classList.remove('dropping');
      const files = [...e.dataTransfer.files];
      if (files.length) this.on.files?.(files);
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

  showSignIn({ user = '', error = null, password = false } = {}) {
    $('app').hidden = true;
    $('signin').hidden = false;
    $('signin-name').value = user;
    $('signin-password').value = '';
    this.showPassword(password);
    this.signInBusy(false);
    this.signInError(error);
    (password && user ? $('signin-password') : $('signin-name')).focus();
  }

  /** The password row: shown once the server said it needs one. */
  showPassword(show) {
    $('signin-password-row').hidden = !show;
    $('signin-password').required = show;
  }

  signInBusy(busy) {
    const b = $('signin-form').querySelector('button[type=submit]');
    b.disabled = busy;
    b.textContent = busy ? 'Signing in…' : 'Sign in';
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
      const preview = last ? (last.dir === 'out' ? 'You: ' : '') + previewText(last) : 'No messages yet';
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
    if (m.file) bubble.append(this.#file(m));
    else {
      const text = typeof m.body === 'string' ? el('div', 'body', m.body) : el('pre', 'body json', JSON.stringify(m.body, null, 2));
      bubble.append(text);
    }
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

  /** The key a transfer's progress is reported under: the id going out, the transfer key coming in. */
  static transferKey(m) { return m.dir === 'out' ? m.id : m.file.tkey; }

  #file(m) {
    const f = m.file;
    const box = el('div', 'file');
    const tkey = ChatView.transferKey(m);
    box.dataset.fkey = tkey ?? '';
    box.dataset.kind = kindOf(f.mime);
    const local = f.key ? knownUrl(f.key) : null;
    if (f.key && !local) this.on.needFile?.(f.key, f.mime);
    const done = m.dir === 'out' || f.state === 'done';
    // A received video or audio plays from the server (Range requests: it streams and
    // seeks) while its link lasts; files.js only gives `remote` to previewed types.
    const remote = m.dir === 'in' && f.remoteReady && linkUsable(f.remote) ? f.remote.src : null;
    const url = remote ?? (done ? local : null);
    if (url) {
      const kind = kindOf(f.mime);
      let media = this.media.get(url);
      if (!media && kind !== 'file') {
        media = el(kind === 'image' ? 'img' : kind, `file-${kind}`);
        if (kind === 'image') { media.alt = f.name; media.decoding = 'async'; } else {
          media.controls = true;
          media.preload = 'metadata';
          if (kind === 'video') media.playsInline = true;
        }
        if (url === remote) {
          // Expired, or the server no longer has it: the copy in this browser takes over.
          media.addEventListener('error', () => this.on.mediaFailed?.(f.tkey), { once: true });
        }
        media.src = url;
        this.media.set(url, media);
      }
      if (media) {
        if (kind === 'image') {
          // Only raster images get here (files.js), and their URL is typed as the image.
          const a = el('a', 'file-preview');
          a.href = url; a.target = '_blank'; a.rel = 'noopener noreferrer';
          a.append(media);
          box.append(a);
        } else box.append(media);
      }
    }
    const row = el('div', 'file-row');
    row.append(el('span', 'file-icon', { image: '🖼', video: '🎬', audio: '🎵' }[kindOf(f.mime)] ?? '📄'));
    const info = el('div', 'file-info');
    info.append(el('span', 'file-name', f.name || 'file'), el('span', 'file-size', formatSize(f.size)));
    row.append(info);
    const saveUrl = local ?? remote;
    if (saveUrl && done) {
      // A download, never a page: `download` here, and the URL of anything not previewed
      // is typed application/octet-stream (files.js; the server does the same), so even
      // opened in a tab it is saved.
      const a = el('a', 'file-download', 'Download');
      a.href = saveUrl;
      a.download = f.name || 'file';
      a.rel = 'noopener noreferrer';
      row.append(a);
    }
    box.append(row);
    const moving = (m.dir === 'out' && m.status === 'sending') || f.state === 'receiving';
    if (moving) {
      const p = this.progress.get(tkey);
      const bar = el('progress', 'file-progress');
      bar.max = f.size || 1;
      if (p) bar.value = p.done;
      const label = el('span', 'file-progress-text');
      const line = el('div', 'file-progress-row');
      line.append(bar, label);
      if (m.dir === 'out') {
        const c = el('button', 'btn-small ghost file-cancel', 'Cancel');
        c.type = 'button';
        c.dataset.cancel = m.id;
        line.append(c);
      }
      box.append(line);
      this.#progressLabel(box, m.dir, p?.done ?? 0, f.size);
    }
    if (f.state === 'aborted') {
      box.append(el('div', 'file-error', ABORT_TEXT[f.reason] ?? `The transfer stopped (${f.reason}).`));
    }
    return box;
  }

  #progressLabel(box, dir, done, total) {
    const pct = total ? Math.min(100, Math.floor((done / total) * 100)) : 0;
    const label = box.querySelector('.file-progress-text');
    if (label) label.textContent = `${dir === 'out' ? (done >= total ? 'Finishing' : 'Uploading') : 'Receiving'} ${pct} %`;
  }

  /** Progress of a transfer, straight into its bar (no re-render: cheap at many updates a second). */
  setProgress(tkey, done, total) {
    this.progress.set(tkey, { done, total });
    const box = $('messages').querySelector(`.file[data-fkey="${CSS.escape(tkey)}"]`);
    const bar = box?.querySelector('progress');
    if (!bar) return;
    bar.max = total || 1;
    bar.value = done;
    this.#progressLabel(box, box.closest('li.msg')?.dataset.dir, done, total);
  }

  clearProgress(tkey) { this.progress.delete(tkey); }

  /** A passing remark (a few seconds), e.g. the server dropped a frame for going too fast. */
  notice(text) {
    const t = $('toast');
    t.textContent = text;
    t.hidden = false;
    clearTimeout(this.toastTimer);
    this.toastTimer = setTimeout(() => { t.hidden = true; }, 6000);
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
