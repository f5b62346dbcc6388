// Unit tests of the client's logic against a fake WebSocket, with node:test's fake timers.
import { test, beforeEach, afterEach, mock } from 'node:test';
import assert from 'node:assert/strict';
import { FonanaRealtime, backoffDelay, channelKey } from '../dist/index.js';

let sockets;
class FakeSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    sockets.push(this);
  }
  send(text) {
    if (this.readyState !== 1) throw new Error('send before open');
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = '') {
    this.readyState = 3;
    this.closedWith = code;
  }
  // test side
  accept(userId = 'u1', expiresInMs = 600000) {
    this.readyState = 1;
    this.onopen?.({});
    this.push({ type: 'connected', data: { userId, message: 'ok', expiresAt: new Date(Date.now() + expiresInMs).toISOString() } });
  }
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

const tick = () => new Promise((r) => setImmediate(r)); // lets the awaited getToken() resolve
let tokens;
function make(extra = {}) {
  return new FonanaRealtime({ url: 'ws://x/ws', getToken: () => `t${++tokens}`, WebSocket: FakeSocket, random: () => 0.5, ...extra });
}
const last = () => sockets[sockets.length - 1];

beforeEach(() => {
  sockets = [];
  tokens = 0;
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_700_000_000_000 });
});
afterEach(() => mock.timers.reset());

test('channel keys follow the protocol', () => {
  assert.equal(channelKey({ type: 'post', postId: 'p1' }), 'post_p1');
  assert.equal(channelKey({ type: 'creator', id: 'c1' }), 'creator_c1');
  assert.equal(channelKey({ type: 'notifications', userId: 'u' }), 'notifications_u');
  assert.equal(channelKey({ type: 'conversation', id: 'cv' }), 'conversation_cv');
});

test('backoff: full jitter under an exponential ceiling with a cap', () => {
  const opts = { base: 100, cap: 1000 };
  assert.equal(backoffDelay(0, opts, () => 0.999), 99);
  assert.equal(backoffDelay(3, opts, () => 0.5), 400);
  assert.equal(backoffDelay(20, opts, () => 0.999), 999);
  assert.equal(backoffDelay(0, opts, () => 0), 0);
  assert.equal(backoffDelay(5, { ...opts, jitter: false }), 1000);
});

test('reconnects forever with growing delays, token fetched each time', async () => {
  const c = make({ backoff: { base: 100, cap: 800 } });
  await tick();
  const delays = [];
  c.on('reconnecting', (d) => delays.push(d.delay));
  for (let i = 0; i < 12; i++) {
    last().drop(1006);
    mock.timers.tick(delays[delays.length - 1]);
    await tick();
  }
  assert.deepEqual(delays, [50, 100, 200, 400, 400, 400, 400, 400, 400, 400, 400, 400]);
  assert.equal(sockets.length, 13);
  assert.match(last().url, /\?token=t13$/);
  last().accept();
  assert.equal(c.state, 'connected');
  last().drop(1012);
  assert.equal(delays.at(-1), 50, 'a successful connect resets the backoff');
});

test('resubscribes with since = last offset seen, skips replayed duplicates, surfaces recovered:false', async () => {
  const c = make();
  await tick();
  const seen = [];
  const recoveries = [];
  c.subscribe({ type: 'post', postId: 'p1' }, { onEvent: (e) => seen.push(e.offset), onRecovery: (r) => recoveries.push(r) });
  last().accept();
  assert.deepEqual(last().sent, [{ type: 'subscribe', channel: { type: 'post', postId: 'p1' } }]);
  last().push({ type: 'subscribed', data: { channelKey: 'post_p1', offset: 4, epoch: 'E' } });
  last().push({ type: 'post_liked', channelKey: 'post_p1', offset: 5 });
  last().push({ type: 'post_liked', channelKey: 'post_p1', offset: 6 });
  last().drop(1012);
  mock.timers.tick(1000);
  await tick();
  last().accept();
  assert.deepEqual(last().sent[0], { type: 'subscribe', channel: { type: 'post', postId: 'p1' }, since: { offset: 6, epoch: 'E' } });
  last().push({ type: 'subscribed', data: { channelKey: 'post_p1', offset: 8, epoch: 'E', recovered: true } });
  for (const o of [6, 7, 8, 9]) last().push({ type: 'post_liked', channelKey: 'post_p1', offset: o });
  assert.deepEqual(seen, [5, 6, 7, 8, 9]);
  assert.deepEqual(recoveries, [true]);
  last().drop(1006);
  mock.timers.tick(1000);
  await tick();
  last().accept();
  last().push({ type: 'subscribed', data: { channelKey: 'post_p1', offset: 2, epoch: 'F', recovered: false } });
  last().push({ type: 'post_liked', channelKey: 'post_p1', offset: 3 });
  assert.deepEqual(recoveries, [true, false]);
  assert.deepEqual(seen, [5, 6, 7, 8, 9, 3], 'a new epoch starts again from its own offsets');
});

test('recover:false never sends since; unsubscribe forgets the channel', async () => {
  const c = make();
  await tick();
  const s = c.subscribe({ type: 'creator', id: 'c1' }, { recover: false });
  const t = c.subscribe({ type: 'feed', userId: 'u1' });
  last().accept();
  last().push({ type: 'subscribed', data: { channelKey: 'creator_c1', offset: 3, epoch: 'E' } });
  t.unsubscribe();
  last().drop(1006);
  mock.timers.tick(1000);
  await tick();
  last().accept();
  assert.deepEqual(last().sent, [{ type: 'subscribe', channel: { type: 'creator', id: 'c1' } }]);
  assert.equal(s.offset, 3);
});

test('frames sent while connecting are queued and flushed in order after connected', async () => {
  const c = make();
  c.send({ type: 'ping', n: 1 });
  c.subscribe({ type: 'post', postId: 'p' });
  c.send({ type: 'ping', n: 2 });
  await tick();
  assert.deepEqual(last().sent, []);
  last().accept();
  assert.deepEqual(last().sent.map((f) => f.n ?? f.type), ['subscribe', 1, 2]);
});

test('refresh a margin before expiresAt, with a fresh token, no reconnect', async () => {
  const c = make({ refreshMargin: 1000 });
  await tick();
  const refreshed = [];
  c.on('refreshed', (d) => refreshed.push(d));
  last().accept('u1', 10_000);
  mock.timers.tick(8_999);
  await tick();
  assert.deepEqual(last().sent, []);
  mock.timers.tick(1);
  await tick();
  assert.deepEqual(last().sent, [{ type: 'refresh', token: 't2' }]);
  last().push({ type: 'refreshed', data: { expiresAt: new Date(Date.now() + 3000).toISOString() } });
  mock.timers.tick(1999);
  await tick();
  assert.equal(last().sent.length, 1);
  mock.timers.tick(1);
  await tick();
  assert.deepEqual(last().sent[1], { type: 'refresh', token: 't3' });
  assert.equal(sockets.length, 1);
  assert.equal(sockets.length, 1);
});

test('a short token is refreshed at half its lifetime', async () => {
  make({ refreshMargin: 30_000 });
  await tick();
  last().accept('u1', 3000);
  mock.timers.tick(1499);
  await tick();
  assert.equal(last().sent.length, 0);
  mock.timers.tick(1);
  await tick();
  assert.equal(last().sent[0].type, 'refresh');
});

test('4001 reconnects at once with a fresh token; 1008 and 4003 stop until connect()', async () => {
  const c = make();
  await tick();
  last().accept();
  last().drop(4001, 'Token expired');
  await tick();
  mock.timers.tick(0);
  await tick();
  assert.equal(sockets.length, 2);
  assert.match(last().url, /token=t2/);
  last().accept();
  const stops = [];
  c.on('stopped', (d) => stops.push(d.code));
  last().drop(4003, 'Disconnected by the server');
  mock.timers.tick(120_000);
  await tick();
  assert.equal(sockets.length, 2);
  assert.equal(c.state, 'stopped');
  c.connect();
  await tick();
  assert.equal(sockets.length, 3);
  last().drop(1008, 'Unauthorized: token expired');
  mock.timers.tick(120_000);
  await tick();
  assert.equal(sockets.length, 3);
  assert.deepEqual(stops, [4003, 1008]);
});

test('gaveup only when maxAttempts is asked for', async () => {
  const c = make({ maxAttempts: 2, backoff: { base: 10 } });
  await tick();
  let gave = 0;
  c.on('gaveup', () => gave++);
  for (let i = 0; i < 3; i++) {
    last().drop(1006);
    mock.timers.tick(1000);
    await tick();
  }
  assert.equal(gave, 1);
  assert.equal(sockets.length, 3);
});

test('typing: one true per 2 s per conversation, one false after a true', async () => {
  const c = make();
  await tick();
  assert.equal(c.typing('cv'), false, 'dropped while not connected');
  last().accept();
  const sent = () => last().sent.filter((f) => f.type === 'typing').map((f) => `${f.conversationId}:${f.isTyping}`);
  c.typing('cv');
  c.typing('cv');
  c.typing('other');
  mock.timers.tick(1999);
  c.typing('cv');
  c.typing('cv', false);
  c.typing('cv', false);
  mock.timers.tick(1);
  c.typing('cv');
  assert.deepEqual(sent(), ['cv:true', 'other:true', 'cv:false', 'cv:true']);
});

test('presence resolves with the answer, status routes user_status', async () => {
  const c = make();
  await tick();
  const st = [];
  c.status('u9', (s) => st.push(s.online));
  const p = c.presence({ type: 'post', postId: 'p1' });
  last().accept();
  assert.deepEqual(last().sent.map((f) => f.type), ['subscribe', 'presence']);
  last().push({ type: 'user_status', userId: 'u9', online: true, lastSeen: null });
  last().push({ type: 'presence', data: { channelKey: 'post_p1', count: 2, users: [] } });
  assert.equal((await p).count, 2);
  assert.deepEqual(st, [true]);
});

test('close() stops for good and a late close event does nothing', async () => {
  const c = make();
  await tick();
  const ws = last();
  ws.accept();
  c.close();
  assert.equal(ws.closedWith, 1000);
  ws.onclose?.({ code: 1000, reason: '' });
  mock.timers.tick(60_000);
  await tick();
  assert.equal(sockets.length, 1);
  assert.equal(c.state, 'closed');
});

test('frame: every text frame in and out, in wire order, queued ones when they are sent', async () => {
  const c = make();
  const wire = [];
  c.on('frame', ({ direction, text }) => wire.push(`${direction} ${text}`));
  c.send({ type: 'ping' });
  c.subscribe({ type: 'post', postId: 'p' });
  await tick();
  assert.deepEqual(wire, [], 'nothing is reported before it reaches the wire');
  last().accept();
  last().onmessage?.({ data: 'not json' });
  assert.equal(c.typing('cv'), true);
  assert.equal(c.typing('cv'), false, 'throttled: never reaches the wire, never reported');
  const connected = wire[0];
  assert.match(connected, /^in \{"type":"connected"/);
  assert.deepEqual(wire.slice(1), [
    'out {"type":"subscribe","channel":{"type":"post","postId":"p"}}',
    'out {"type":"ping"}',
    'in not json',
    'out {"type":"typing","conversationId":"cv","isTyping":true}',
  ]);
  const sentTexts = wire.filter((w) => w.startsWith('out ')).map((w) => JSON.parse(w.slice(4)));
  assert.deepEqual(sentTexts, last().sent, 'reported exactly what the socket was given');
  c.on('frame', () => {
    throw new Error('a bad listener');
  });
  const errors = [];
  c.on('error', (e) => errors.push(e.message));
  last().push({ type: 'pong' });
  assert.equal(wire.at(-1), 'in {"type":"pong"}');
  assert.deepEqual(errors, ['a bad listener'], 'a throwing listener is reported, the client goes on');
  assert.equal(c.state, 'connected');
});
