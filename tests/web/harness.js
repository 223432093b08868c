// harness.js — test plumbing for the web client's end-to-end tests: starts and stops the
// Pigeon server (binary from $PIGEON_BIN, cwd = repo root so config.toml applies: password
// mode) on a free port with a temp data dir, creates accounts with the real CLI
// (`pigeon user add`), launches Debian's headless Chromium through playwright-core, and
// offers page helpers.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '../..');
export const resultsDir = path.join(here, 'test-results');
export const pigeonBin = path.resolve(here, process.env.PIGEON_BIN ?? '../../target/release/pigeon');
export const chromiumPath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The password every test account gets (tests that need another one say so). */
export const PASSWORD = 'correct horse battery';

/**
 * One Pigeon server process; restartable on the same port and data dir. `auth` is
 * 'password' (what the shipped config.toml says) or 'open' (PIGEON_AUTH_MODE=open);
 * `env` adds environment variables (configuration, e.g. PIGEON_AUTH_ALLOWED_ORIGINS).
 */
export class PigeonServer {
  constructor({ auth = 'password', env = {} } = {}) {
    this.dataDir = mkdtempSync(path.join(tmpdir(), 'pigeon-web-'));
    this.auth = auth;
    this.env = env;
    this.port = 0;
    this.proc = null;
    this.log = '';
  }

  /**
   * Creates accounts with the real CLI: `echo PASSWORD | pigeon user add NAME --data-dir DIR`.
   * One at a time: several processes creating a fresh database at once can find it locked.
   */
  async addUsers(names, password = PASSWORD) {
    for (const name of names) await this.#addUser(name, password);
  }

  #addUser(name, password) {
    return new Promise((resolve, reject) => {
      const p = spawn(pigeonBin, ['user', 'add', name, '--data-dir', this.dataDir], {
        cwd: repoRoot, env: { ...process.env, RUST_LOG: 'warn' }, stdio: ['pipe', 'pipe', 'pipe'],
      });
      let out = '';
      p.stdout.on('data', (d) => { out += d; });
      p.stderr.on('data', (d) => { out += d; });
      p.on('error', reject);
      p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`pigeon user add ${name} failed (${code}): ${out}`))));
      p.stdin.end(password + '\n');
    });
  }

  get url() { return `http://127.0.0.1:${this.port}`; }

  async start() {
    if (!existsSync(pigeonBin)) throw new Error(`Pigeon binary not found at ${pigeonBin} (set PIGEON_BIN)`);
    if (!this.port) this.port = await freePort();
    this.proc = spawn(pigeonBin, ['serve', '--bind', `127.0.0.1:${this.port}`, '--data-dir', this.dataDir], {
      cwd: repoRoot,
      env: { ...process.env, PIGEON_SERVER_STATIC_DIR: path.join(repoRoot, 'static'), PIGEON_AUTH_MODE: this.auth,
        RUST_LOG: process.env.RUST_LOG ?? 'warn', ...this.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const keep = (d) => { this.log = (this.log + d).slice(-20000); };
    this.proc.stdout.on('data', keep);
    this.proc.stderr.on('data', keep);
    const deadline = Date.now() + 15000;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`pigeon exited early (${this.proc.exitCode}):\n${this.log}`);
      try {
        const r = await fetch(`${this.url}/healthz`);
        if (r.ok) return;
      } catch { /* not up yet */ }
      await sleep(100);
    }
    throw new Error(`pigeon did not become healthy:\n${this.log}`);
  }

  /** Kills the process (SIGKILL by default: like a crash, no goodbye to the clients). */
  async kill(signal = 'SIGKILL') {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await exited;
    this.proc = null;
  }

  async stop() {
    await this.kill('SIGTERM');
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

export async function launchBrowser() {
  if (!existsSync(chromiumPath)) throw new Error(`Chromium not found at ${chromiumPath}`);
  // playwright gives launch() a fresh temporary --user-data-dir of its own (and refuses
  // one passed in args), removed again when the browser closes.
  const args = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'];
  return chromium.launch({ executablePath: chromiumPath, args, headless: true });
}

/**
 * A fresh browser context (its own localStorage: a separate "device") with one page.
 * Collects page errors and dialogs so a test can assert none happened.
 */
export async function openClient(browser, server, { viewport = { width: 1100, height: 720 } } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.errors = [];
  page.dialogs = [];
  page.on('pageerror', (e) => page.errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') page.errors.push(m.text()); });
  page.on('dialog', (d) => { page.dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  await page.goto(server.url + '/');
  return { context, page };
}

/**
 * Signs in like a person: the name first; if the server asks for a password (the row
 * appears), the password too. Waits until the page is online.
 */
export async function signIn(page, user, password = PASSWORD) {
  await page.fill('#signin-name', user);
  if (await page.isHidden('#signin-password-row')) {
    await page.click('#signin-form button[type=submit]');
    await page.waitForSelector('#conn-pill[data-state="online"], #signin-password-row:not([hidden])');
  }
  if (await page.isVisible('#signin-password-row')) {
    await page.fill('#signin-password', password);
    await page.click('#signin-form button[type=submit]');
  }
  await page.waitForSelector('#conn-pill[data-state="online"]');
}

export async function openChat(page, peer) {
  const existing = page.locator(`#conversations li[data-peer="${peer}"]`);
  if (await existing.count()) await existing.click();
  else {
    await page.fill('#new-chat-name', peer);
    await page.press('#new-chat-name', 'Enter');
  }
  await page.waitForSelector(`#peer-name:text-is("${peer}")`);
}

export async function send(page, text) {
  await page.fill('#composer-input', text);
  await page.press('#composer-input', 'Enter');
}

/** Message bodies in the open conversation, top to bottom. */
export async function bodies(page, dir) {
  const sel = dir ? `#messages li.msg[data-dir="${dir}"] .body` : '#messages li.msg .body';
  return page.locator(sel).allTextContents();
}

export function ensureResultsDir() {
  mkdirSync(resultsDir, { recursive: true });
  return resultsDir;
}

export { sleep };
