// files.js — owns the bytes of files in this browser: received and sent files are kept
// in IndexedDB (localStorage only holds their descriptions, see store.js), object URLs
// to show or download them, SHA-256 of a file, and sizes for people. Also the preview
// policy: which sender-claimed types are shown inline (raster images, audio, video) and
// that every other file's object URL is plain bytes (application/octet-stream), so no
// file a sender chose (SVG, HTML, XML, PDF, ...) ever runs in Pigeon's origin.
// Received videos and audio are streamed from the server (`GET /api/blobs/{key}`, by the
// signed link of their `blob_start`) while that link lasts; their bytes are kept here too,
// a chunk at a time (never whole in memory), for when it has expired (see chunkSink).

const DB_NAME = 'pigeon-files';
const STORE = 'blobs';

let dbPromise = null;

function db() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      if (!globalThis.indexedDB) { reject(new Error('no IndexedDB')); return; }
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(STORE);
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    dbPromise.catch(() => { dbPromise = null; });
  }
  return dbPromise;
}

function run(mode, fn) {
  return db().then((d) => new Promise((resolve, reject) => {
    const tx = d.transaction(STORE, mode);
    const req = fn(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req?.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error('aborted'));
  }));
}

/** Keeps `blob` under `key` (a File is kept as a Blob of the same type). */
export const putFile = (key, blob) => run('readwrite', (s) => s.put(blob, key));
/** The Blob kept under `key`, or undefined. */
export const getFile = (key) => run('readonly', (s) => s.get(key)).catch(() => undefined);
export const deleteFile = (key) => run('readwrite', (s) => s.delete(key)).catch(() => {});

/**
 * Deletes the chunks of streamed files (see chunkSink) that a page closed mid-file left
 * under `prefix`; called before a session starts receiving, so none of them is in use.
 */
export const dropStaleParts = (prefix) => run('readwrite', (s) => {
  const req = s.openKeyCursor();
  req.onsuccess = () => {
    const c = req.result;
    if (!c) return;
    const k = String(c.key);
    if (k.startsWith(prefix) && k.includes('#part-')) s.delete(c.key);
    c.continue();
  };
  return null;
}).catch(() => {});

const urls = new Map(); // key -> object URL

/**
 * An object URL for `blob`, remembered under `key` for later renders. Its type comes from
 * the preview policy for `mime` (what the sender claimed), never from the blob itself.
 */
export function urlFor(key, blob, mime) {
  let u = urls.get(key);
  if (!u && blob) { u = URL.createObjectURL(new Blob([blob], { type: safeMime(mime) })); urls.set(key, u); }
  return u ?? null;
}

/** The remembered object URL for `key`, if the bytes were already loaded. */
export const knownUrl = (key) => urls.get(key) ?? null;

/** Loads `key` from IndexedDB and gives its object URL (null when it is not there). */
export async function loadUrl(key, mime) {
  if (urls.has(key)) return urls.get(key);
  const blob = await getFile(key);
  return blob ? urlFor(key, blob, mime) : null;
}

export function forgetUrls() {
  for (const u of urls.values()) URL.revokeObjectURL(u);
  urls.clear();
}

/**
 * Hex SHA-256 of a Blob, or null where it cannot be had cheaply: crypto.subtle exists only
 * in secure contexts (https, localhost), and it digests whole buffers, so big files are skipped.
 */
export async function sha256Hex(blob, maxBytes = 64 * 1024 * 1024) {
  if (!globalThis.crypto?.subtle || blob.size > maxBytes) return null;
  const d = await crypto.subtle.digest('SHA-256', await blob.arrayBuffer());
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

export function formatSize(n) {
  if (!Number.isFinite(n)) return '';
  if (n < 1024) return `${n} B`;
  const units = ['KB', 'MB', 'GB'];
  let v = n; let i = -1;
  do { v /= 1024; i += 1; } while (v >= 1024 && i < units.length - 1);
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

// The only types previewed: raster images (an <img> runs no script, and opened in a tab
// they are only pictures), audio and video in <audio>/<video>. SVG is not here (it is a
// document that can carry script), nor HTML, XML, PDF or anything unknown: download-only.
const PREVIEWED = new Map([
  ['image/png', 'image'], ['image/jpeg', 'image'], ['image/gif', 'image'], ['image/webp', 'image'],
  ['video/mp4', 'video'], ['video/webm', 'video'], ['video/ogg', 'video'],
  ['audio/mpeg', 'audio'], ['audio/ogg', 'audio'], ['audio/wav', 'audio'], ['audio/x-wav', 'audio'],
  ['audio/webm', 'audio'], ['audio/mp4', 'audio'], ['audio/aac', 'audio'], ['audio/flac', 'audio'],
]);

/** The type a file's bytes are handed to the browser as: a previewed type, or plain bytes. */
export function safeMime(mime = '') {
  const base = String(mime ?? '').split(';')[0].trim().toLowerCase();
  return PREVIEWED.has(base) ? base : 'application/octet-stream';
}

/** How a file is shown: 'image' | 'video' | 'audio' | 'file' (download only). */
export function kindOf(mime = '') {
  return PREVIEWED.get(safeMime(mime)) ?? 'file';
}

// Played from the server by its link: the previewed audio and video types that the server
// also serves as themselves (src/downloads.rs); the others are played from the local copy.
const STREAMED = new Set(['video/mp4', 'video/webm', 'video/ogg',
  'audio/mpeg', 'audio/ogg', 'audio/webm', 'audio/mp4']);

/** True when a received file of this claimed type is played from the server's link. */
export const streamable = (mime) => STREAMED.has(safeMime(mime));

const BLOB_PATH = /^\/api\/blobs\/[A-Za-z0-9-]{1,128}$/;

/**
 * The server's signed link of a file (`blob_start`'s `url`) as this page uses it:
 * {src, expires} with `src` a path on this page's own origin (whatever host the server
 * wrote into the link: behind a proxy it may not be the one the page came from) and
 * `expires` in seconds since 1970. Null for anything but a download link.
 */
export function serverLink(url, base = globalThis.location?.href) {
  if (typeof url !== 'string' || url.length > 2048) return null;
  let u;
  try { u = new URL(url, base); } catch { return null; }
  const expires = Number(u.searchParams.get('expires'));
  if (!BLOB_PATH.test(u.pathname) || !Number.isFinite(expires)) return null;
  return { src: u.pathname + u.search, expires };
}

/** How long before its expiry a link is no longer handed to a <video> (a failing one falls back anyway). */
export const LINK_MARGIN_MS = 30 * 1000;

/** True while a server link is worth using (not known to fail, not about to expire). */
export const linkUsable = (remote, now = Date.now()) =>
  !!remote && !remote.failed && remote.expires * 1000 > now + LINK_MARGIN_MS;

/**
 * Where a streamed file's bytes are kept as they arrive: each chunk is written to
 * IndexedDB as it comes (a Blob of its own), and `finish` joins them under `key` (Blobs
 * read back from IndexedDB are on disk: the file is never whole in memory). The
 * connection (protocol.js) calls write(bytes) per chunk, then finish(mime) or discard().
 */
export function chunkSink(key) {
  let n = 0;
  let writes = [];
  // Parts are named per sink: a discarded attempt's late deletes never hit the next one's.
  const tag = `${Date.now().toString(36)}.${Math.random().toString(36).slice(2, 8)}`;
  const part = (i) => `${key}#part-${tag}-${i}`;
  const dropParts = (count) => Promise.all(Array.from({ length: count }, (_, i) => deleteFile(part(i))));
  return {
    key,
    write(bytes) {
      writes.push(putFile(part(n), new Blob([bytes])));
      n += 1;
    },
    /** Resolves (never rejects) once the whole file is kept under `key`, or could not be. */
    async finish(mime) {
      const count = n;
      try {
        await Promise.all(writes);
        const parts = [];
        for (let i = 0; i < count; i += 1) {
          const p = await getFile(part(i));
          if (!p) throw new Error('a chunk is missing');
          parts.push(p);
        }
        await putFile(key, new Blob(parts, { type: mime }));
        return true;
      } catch {
        return false;
      } finally {
        writes = [];
        await dropParts(count);
      }
    },
    discard() {
      const count = n;
      Promise.allSettled(writes).then(() => dropParts(count));
      writes = [];
    },
  };
}
