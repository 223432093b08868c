// auth.test.js — end-to-end tests of signing in to the web client against a real Pigeon
// server in real headless Chromium: the password row appears when the server needs one,
// a wrong password is refused without connecting, repeated failures are throttled, only a
// token (never the password) is remembered, a stale token sends the person back to the
// form; and on an open server (PIGEON_AUTH_MODE=open) the name alone still works.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { PigeonServer, PASSWORD, launchBrowser, openClient, signIn, openChat, send, bodies, sleep } from './harness.js';

let server;
let browser;

before(async () => {
  server = new PigeonServer(); // password mode, as config.toml ships
  await server.addUsers(['nina', 'olga', 'pia']);
  await server.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const submit = (page) => page.click('#signin-form button[type=submit]');
const errorText = (page) => page.locator('#signin-error:not([hidden])').textContent();

test('a wrong password shows the error and does not connect; the right one signs in and only a token is kept', async () => {
  const { context, page } = await openClient(browser, server);
  try {
    assert.equal(await page.isVisible('#signin-password-row'), false, 'no password asked before the server wants one');
    await page.fill('#signin-name', 'nina');
    await submit(page);
    await page.waitForSelector('#signin-password-row:not([hidden])');
    assert.match(await errorText(page), /needs a password/);

    let sockets = 0;
    page.on('websocket', () => { sockets += 1; });
    await page.fill('#signin-password', 'not her password');
    await submit(page);
    await page.locator('#signin-error:not([hidden])', { hasText: 'Wrong name or password.' }).waitFor();
    await sleep(500);
    assert.equal(sockets, 0, 'no WebSocket was opened with the wrong password');
    assert.equal(await page.isVisible('#app'), false);
    assert.equal(await page.isVisible('#signin'), true);

    await page.fill('#signin-password', PASSWORD);
    await submit(page);
    await page.waitForSelector('#conn-pill[data-state="online"]');
    const kept = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
    assert.ok(!kept.includes(PASSWORD), 'the password is not stored');
    const session = await page.evaluate(() => JSON.parse(localStorage.getItem('pigeon:v1:session')));
    assert.equal(session.user, 'nina');
    assert.match(session.token, /^[\w-]+\.\d+\.[\w-]+$/);

    // A reload reconnects with the token: straight back online, no form.
    await page.reload();
    await page.waitForSelector('#conn-pill[data-state="online"]');
    assert.equal(await page.isVisible('#signin'), false);

    // A token the server does not accept sends the person back to the form, with the
    // password row ready.
    await page.evaluate(() => {
      const s = JSON.parse(localStorage.getItem('pigeon:v1:session'));
      s.token = s.token.slice(0, -4) + (s.token.endsWith('AAAA') ? 'BBBB' : 'AAAA');
      localStorage.setItem('pigeon:v1:session', JSON.stringify(s));
    });
    await page.reload();
    await page.waitForSelector('#signin:not([hidden]) #signin-password-row:not([hidden])');
    assert.match(await errorText(page), /no longer valid/);
    assert.equal(await page.inputValue('#signin-name'), 'nina');

    // An expired token is not even tried.
    await signIn(page, 'nina');
    sockets = 0;
    await page.evaluate(() => {
      const s = JSON.parse(localStorage.getItem('pigeon:v1:session'));
      s.expiresAt = Math.floor(Date.now() / 1000) - 10;
      localStorage.setItem('pigeon:v1:session', JSON.stringify(s));
    });
    await page.reload();
    await page.waitForSelector('#signin:not([hidden])');
    assert.match(await errorText(page), /expired/);
    assert.equal(sockets, 0);
    assert.deepEqual(page.errors.filter((e) => !/401|Failed to load resource/.test(e)), []);
  } finally {
    await context.close();
  }
});

test('repeated wrong passwords are throttled, and the form says for how long', async () => {
  const { context, page } = await openClient(browser, server);
  try {
    await page.fill('#signin-name', 'olga');
    await submit(page);
    await page.waitForSelector('#signin-password-row:not([hidden])');
    // config.toml: limits.login_max_failures = 5.
    for (let i = 0; i < 5; i++) {
      await page.fill('#signin-password', `guess ${i}`);
      await submit(page);
      await page.locator('#signin-error', { hasText: 'Wrong name or password.' }).waitFor();
      await page.waitForSelector('#signin-form button[type=submit]:not([disabled])');
      await page.evaluate(() => { document.getElementById('signin-error').textContent = ''; });
    }
    // Now even the right password is refused for a while.
    await page.fill('#signin-password', PASSWORD);
    await submit(page);
    const msg = await page.locator('#signin-error', { hasText: 'Too many failed sign-ins' }).textContent();
    assert.match(msg, /Try again in \d+ s\./);
    assert.equal(await page.isVisible('#app'), false);
  } finally {
    await context.close();
  }
});

test('on an open server (PIGEON_AUTH_MODE=open) the name alone signs in and chatting works', async () => {
  const open = new PigeonServer({ auth: 'open' });
  await open.start();
  const a = await openClient(browser, open);
  const b = await openClient(browser, open);
  try {
    await a.page.fill('#signin-name', 'quinn');
    await submit(a.page);
    await a.page.waitForSelector('#conn-pill[data-state="online"]');
    assert.equal(await a.page.evaluate(() => localStorage.getItem('pigeon:v1:needs-password')), null);
    assert.equal(await a.page.evaluate(() => JSON.parse(localStorage.getItem('pigeon:v1:session')).token), undefined);
    await signIn(b.page, 'rosa');
    await openChat(a.page, 'rosa');
    await send(a.page, 'no accounts here');
    await b.page.locator('#conversations li[data-peer="quinn"]').click();
    await b.page.locator('#messages li.msg .body', { hasText: 'no accounts here' }).waitFor();
    assert.deepEqual(await bodies(b.page), ['no accounts here']);
    assert.deepEqual(a.page.errors, []);
    assert.deepEqual(b.page.errors, []);
  } finally {
    await a.context.close();
    await b.context.close();
    await open.stop();
  }
});
