// The reconnect storm: N clients (the built clients/js client on the `ws` package) connected to a real
// fonana-ws, the server restarted on the same port, and the connection attempts per second that hit it
// counted, with full jitter and without. 127.0.0.1 only; bounded by a deadline.
//   node bench/reconnect_storm.mjs [clients=2000] [downMs=1000]
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { FonanaRealtime } from '../clients/js/dist/index.js';

const require = createRequire(new URL('../clients/js/package.json', import.meta.url));
const WS = require('ws');
const N = Number(process.argv[2] ?? 2000);
const DOWN_MS = Number(process.argv[3] ?? 1000);
const SECRET = 'bench-secret-' + process.pid;
const DEADLINE_MS = 120_000;

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
function token(user) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ userId: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}
const freePort = () =>
  new Promise((ok) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });

async function startServer(port, dir) {
  const env = {
    ...process.env, WS_PORT: String(port), JWT_SECRET: SECRET, WS_API_KEY: 'bench-api-key-0123456789', FONANA_WS_DATA_DIR: dir,
    WS_MAX_CONNECTIONS_PER_USER: String(N + 10), LOG_LEVEL: 'WARNING',
  };
  const proc = spawn('.venv/bin/python', ['-m', 'fonana_ws', 'serve'], { env, stdio: 'ignore' });
  for (let i = 0; i < 400; i++) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) return proc;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  proc.kill('SIGKILL');
  throw new Error('server did not start');
}
const stopServer = (proc) => new Promise((ok) => { proc.once('exit', ok); proc.kill('SIGTERM'); });

async function storm(jitter) {
  const dir = mkdtempSync(join(tmpdir(), 'storm-'));
  const port = await freePort();
  let server = await startServer(port, dir);
  const attempts = [];
  let counting = false;
  class CountingWS extends WS {
    constructor(url) {
      super(url);
      if (counting) attempts.push(performance.now());
    }
  }
  let connected = 0;
  const clients = [];
  const tok = token('demo-subscriber');
  for (let i = 0; i < N; i++) {
    const c = new FonanaRealtime({ url: `ws://127.0.0.1:${port}/ws`, getToken: () => tok, WebSocket: CountingWS,
      backoff: { base: 500, cap: 30000, jitter } });
    c.on('connected', () => connected++);
    clients.push(c);
  }
  const t0 = performance.now();
  while (connected < N) {
    if (performance.now() - t0 > DEADLINE_MS) throw new Error(`only ${connected}/${N} connected at start`);
    await new Promise((r) => setTimeout(r, 50));
  }
  connected = 0;
  counting = true;
  const killed = performance.now();
  await stopServer(server);
  await new Promise((r) => setTimeout(r, DOWN_MS));
  const restartAt = performance.now();
  server = await startServer(port, dir);
  const up = performance.now();
  while (connected < N && performance.now() - killed < DEADLINE_MS) await new Promise((r) => setTimeout(r, 50));
  const allBack = performance.now();
  for (const c of clients) c.close();
  await stopServer(server);
  // attempts per second: the largest count in any sliding 1 s window, and per whole second after the kill
  const times = attempts.map((t) => t - killed).sort((a, b) => a - b);
  let peak = 0;
  for (let i = 0, j = 0; i < times.length; i++) {
    while (times[i] - times[j] >= 1000) j++;
    peak = Math.max(peak, i - j + 1);
  }
  let peak100 = 0;
  for (let i = 0, j = 0; i < times.length; i++) {
    while (times[i] - times[j] >= 100) j++;
    peak100 = Math.max(peak100, i - j + 1);
  }
  const perSecond = [];
  for (const t of times) perSecond[Math.floor(t / 1000)] = (perSecond[Math.floor(t / 1000)] ?? 0) + 1;
  return {
    jitter, clients: N, downMs: Math.round(restartAt - killed), serverUpAfterMs: Math.round(up - killed),
    reconnected: connected, allBackAfterMs: Math.round(allBack - killed), attempts: times.length,
    peakAttemptsPerSecond: peak, peakAttemptsPer100ms: peak100,
    attemptsPerSecondAfterKill: Array.from(perSecond, (v) => v ?? 0),
  };
}

for (const jitter of [true, false]) console.log(JSON.stringify(await storm(jitter)));
process.exit(0);
