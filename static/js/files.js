// files.js — owns the bytes of files in this browser: received and sent files are kept
// in IndexedDB (localStorage only holds their descriptions, see store.js), object URLs
// to show or download them, SHA-256 of a file, and sizes for people. Also the preview
// policy: which sender-claimed types are shown inline (raster images, audio, video) and
// that every other file's object URL is plain bytes (application/octet-stream), so no
// file a sender chose (SVG, HTML, XML, PDF, ...) ever runs in Pigeon's origin.

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
