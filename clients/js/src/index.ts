/**
 * FonanaRealtime: the browser client of fonana-ws (docs/protocol.md). Dependency-free.
 *
 * Why a client at all: the hard parts of real-time live on both ends. This one reconnects forever with
 * full-jitter backoff (so a deploy does not make every tab reconnect in the same second), resubscribes
 * with `since` from the last offset seen (§7.8), refreshes the token before `expiresAt` (§7.6), and
 * throttles typing to the server's rule (§7.2).
 */

export type Channel =
  | { type: 'notifications'; userId: string }
  | { type: 'feed'; userId: string }
  | { type: 'creator'; id: string }
  | { type: 'post'; postId: string }
  | { type: 'conversation'; id: string }
  | { type: 'status'; userId: string };

/** A frame from the server: `type` plus whatever it carries. */
export interface Frame {
  type: string;
  [field: string]: any;
}

/** The minimal WebSocket surface used, so that Node's `ws` package or a fake can be injected. */
export interface SocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}
export type SocketCtor = new (url: string) => SocketLike;

export interface BackoffOptions {
  /** First delay ceiling in ms (default 500). */
  base?: number;
  /** Largest delay ceiling in ms (default 30000). */
  cap?: number;
  /** Full jitter: a uniform delay in [0, ceiling) (default true). Off only to measure why it is on. */
  jitter?: boolean;
}

export interface Options {
  /** `ws://host:3002/ws` or `wss://host/ws`; the token is added as `?token=`. */
  url: string;
  /** Called before every connect and every refresh: the app's current JWT. */
  getToken: () => string | Promise<string>;
  /** Injected WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: SocketCtor;
  backoff?: BackoffOptions;
  /** Refresh this many ms before `expiresAt` (default 30000; never later than half the lifetime). */
  refreshMargin?: number;
  /** Minimum ms between two `isTyping: true` frames per conversation (server rule §7.2: 2000). */
  typingInterval?: number;
  /** Give up after this many failed attempts in a row (default: never) and emit `gaveup`. */
  maxAttempts?: number;
  /** ms to wait for a presence answer (default 10000). */
  requestTimeout?: number;
  /** Connect in the constructor (default true). */
  autoConnect?: boolean;
  /** Random source in [0, 1), for tests. */
  random?: () => number;
}

export interface SubscribedInfo {
  channel: Channel;
  channelKey: string;
  offset?: number;
  epoch?: string;
  /** Set when the subscribe carried `since`: false means events were missed; refetch over REST. */
  recovered?: boolean;
}

export interface SubscribeOptions {
  /** Every event of this channel (frames carrying its `channelKey`, or typing/presence for it). */
  onEvent?: (event: Frame) => void;
  /** Ask for presence_join/leave/count frames (§7.4). */
  presence?: boolean;
  /** Resume from the last offset after a reconnect (default true). */
  recover?: boolean;
  onSubscribed?: (info: SubscribedInfo) => void;
  /** Called with false when a resubscribe could not replay what was missed (refetch), true when it did. */
  onRecovery?: (recovered: boolean, info: SubscribedInfo) => void;
  onError?: (error: Frame) => void;
}

export interface Subscription {
  readonly channel: Channel;
  readonly channelKey: string;
  /** The last offset seen (events and `subscribed`), the `since` of the next resubscribe. */
  readonly offset: number | undefined;
  unsubscribe(): void;
}

export type State = 'idle' | 'connecting' | 'connected' | 'waiting' | 'stopped' | 'closed';

type Listener = (payload: any) => void;

/** The `frame` event's payload: one text frame exactly as it crossed the wire. */
export interface WireFrame {
  direction: 'in' | 'out';
  text: string;
}

interface Sub {
  channel: Channel;
  key: string;
  opts: SubscribeOptions;
  offset?: number;
  epoch?: string;
  sentSince: boolean;
}

const OPEN = 1;
/** Close codes after which retrying with the same credentials is pointless (§7.10). */
const STOP_CODES = new Set([1008, 4003]);

/** The channel's key, as the server names it (§2). */
export function channelKey(channel: Channel): string {
  switch (channel.type) {
    case 'notifications':
    case 'feed':
    case 'status':
      return `${channel.type}_${channel.userId}`;
    case 'post':
      return `post_${channel.postId}`;
    default:
      return `${channel.type}_${(channel as { id: string }).id}`;
  }
}

/** Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)). */
export function backoffDelay(attempt: number, opts: BackoffOptions = {}, random: () => number = Math.random): number {
  const base = opts.base ?? 500;
  const cap = opts.cap ?? 30000;
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return opts.jitter === false ? ceiling : Math.floor(random() * ceiling);
}

export class FonanaRealtime {
  state: State = 'idle';
  userId: string | undefined;
  expiresAt: Date | undefined;
  private readonly opts: Options;
  private ws: SocketLike | null = null;
  private attempt = 0;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly subs = new Map<string, Sub>();
  private queue: string[] = [];
  private readonly typingSent = new Map<string, { at: number; open: boolean }>();
  private readonly pending = new Map<string, Array<{ resolve: (f: Frame) => void; reject: (e: Error) => void }>>();

  constructor(opts: Options) {
    this.opts = opts;
    if (opts.autoConnect !== false) this.connect();
  }

  /** Listen to a client event (`connected`, `disconnected`, `reconnecting`, `error`, `refreshed`,
   * `stopped`, `gaveup`, `recovery`, `message`, `frame`) or to any server frame type. Returns the remover.
   * `frame` gets every text frame in and out as a {@link WireFrame}, for tools that show the wire. */
  on(name: string, fn: Listener): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn);
    return () => this.off(name, fn);
  }

  off(name: string, fn: Listener): void {
    this.listeners.get(name)?.delete(fn);
  }

  get connected(): boolean {
    return this.state === 'connected';
  }

  /** Start (or restart after `stopped`, `gaveup` or `close()`). */
  connect(): void {
    if (this.state === 'connecting' || this.state === 'connected') return;
    clearTimeout(this.retryTimer);
    this.attempt = 0;
    void this.open();
  }

  /** Close for good; `connect()` starts again with the same subscriptions. */
  close(): void {
    this.state = 'closed';
    clearTimeout(this.retryTimer);
    clearTimeout(this.refreshTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      this.detach(ws);
      try {
        ws.close(1000, 'client closed');
      } catch {
        /* already closing */
      }
    }
    this.rejectPending(new Error('closed'));
  }

  subscribe(channel: Channel, opts: SubscribeOptions = {}): Subscription {
    const key = channelKey(channel);
    const existing = this.subs.get(key);
    const sub: Sub = { channel, key, opts, offset: existing?.offset, epoch: existing?.epoch, sentSince: false };
    this.subs.set(key, sub);
    if (this.state === 'connected') this.sendSubscribe(sub);
    const client = this;
    return {
      channel,
      channelKey: key,
      get offset() {
        return sub.offset;
      },
      unsubscribe() {
        if (client.subs.get(key) !== sub) return;
        client.subs.delete(key);
        if (client.state === 'connected') client.raw({ type: 'unsubscribe', channel });
      },
    };
  }

  /** A user's online status (§7.3): `fn` gets every `user_status` frame. */
  status(userId: string, fn: (status: { userId: string; online: boolean; lastSeen: string | null }) => void): Subscription {
    return this.subscribe({ type: 'status', userId }, {
      onEvent: (f) => {
        if (f.type === 'user_status') fn(f as any);
      },
    });
  }

  /** Who is in a channel the connection joined (§7.4): the `presence` answer's data. */
  presence(channel: Channel): Promise<Frame> {
    const key = channelKey(channel);
    return new Promise((resolve, reject) => {
      const list = this.pending.get(key) ?? [];
      this.pending.set(key, list);
      const entry = {
        resolve: (f: Frame) => {
          clearTimeout(timer);
          resolve(f);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        const i = list.indexOf(entry);
        if (i >= 0) list.splice(i, 1);
        reject(new Error(`presence ${key}: no answer`));
      }, this.opts.requestTimeout ?? 10000);
      list.push(entry);
      this.send({ type: 'presence', channel });
    });
  }

  /** Tell the other participant that the user types; throttled here to the server's rule (§7.2), so the
   * app may call it on every keystroke. Dropped while not connected: a stale "typing" helps nobody. */
  typing(conversationId: string, isTyping = true): boolean {
    if (this.state !== 'connected') return false;
    const now = Date.now();
    const last = this.typingSent.get(conversationId);
    if (isTyping) {
      if (last && now - last.at < (this.opts.typingInterval ?? 2000)) return false;
      this.typingSent.set(conversationId, { at: now, open: true });
    } else {
      if (!last || !last.open) return false;
      last.open = false;
    }
    this.raw({ type: 'typing', conversationId, isTyping });
    return true;
  }

  /** Send any frame; queued until `connected`, then sent in order. */
  send(frame: Frame): void {
    const text = JSON.stringify(frame);
    if (this.state === 'connected' && this.ws && this.ws.readyState === OPEN) this.write(this.ws, text);
    else this.queue.push(text);
  }

  // -- internals ---------------------------------------------------------------------------------------

  private emit(name: string, payload?: unknown): void {
    for (const fn of [...(this.listeners.get(name) ?? [])]) {
      try {
        fn(payload);
      } catch (err) {
        if (name !== 'error') this.emit('error', err);
      }
    }
  }

  private raw(frame: Frame): void {
    if (this.ws) this.write(this.ws, JSON.stringify(frame));
  }

  /** The one place a frame reaches the wire, so that `frame` listeners see all of them, in order. */
  private write(ws: SocketLike, text: string): void {
    ws.send(text);
    this.emit('frame', { direction: 'out', text } as WireFrame);
  }

  private async open(): Promise<void> {
    this.state = 'connecting';
    let token: string;
    try {
      token = await this.opts.getToken();
    } catch (err) {
      this.emit('error', err);
      this.scheduleRetry(0, 'getToken failed');
      return;
    }
    if (this.state !== 'connecting') return; // closed meanwhile
    const Ctor = this.opts.WebSocket ?? (globalThis as any).WebSocket;
    const sep = this.opts.url.includes('?') ? '&' : '?';
    let ws: SocketLike;
    try {
      ws = new Ctor(`${this.opts.url}${sep}token=${encodeURIComponent(token)}`);
    } catch (err) {
      this.emit('error', err);
      this.scheduleRetry(0, 'constructor failed');
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => this.onFrame(ev.data);
    ws.onerror = () => {
      /* the close event that follows carries the code */
    };
    ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
  }

  private detach(ws: SocketLike): void {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  private onFrame(data: unknown): void {
    const text = typeof data === 'string' ? data : String(data);
    // Before parsing: a frame the client ignores (not JSON, no type) is still on the wire.
    this.emit('frame', { direction: 'in', text } as WireFrame);
    let frame: Frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (!frame || typeof frame.type !== 'string') return;
    switch (frame.type) {
      case 'connected':
        return this.onConnected(frame);
      case 'refreshed':
        this.setExpiry(frame.data?.expiresAt);
        this.emit('message', frame);
        this.emit('refreshed', frame.data);
        return;
      case 'subscribed':
        this.onSubscribed(frame);
        break;
      case 'error':
        this.onError(frame);
        break;
      case 'presence': {
        const list = this.pending.get(frame.data?.channelKey);
        list?.shift()?.resolve(frame.data);
        break;
      }
      default:
        if (!this.routeEvent(frame)) return; // a duplicate
    }
    this.emit('message', frame);
    this.emit(frame.type, frame);
  }

  private onConnected(frame: Frame): void {
    this.state = 'connected';
    this.attempt = 0;
    this.userId = frame.data?.userId;
    this.setExpiry(frame.data?.expiresAt);
    for (const sub of this.subs.values()) this.sendSubscribe(sub);
    const queued = this.queue;
    this.queue = [];
    for (const text of queued) if (this.ws) this.write(this.ws, text);
    this.emit('connected', frame.data);
    this.emit('message', frame);
  }

  private sendSubscribe(sub: Sub): void {
    const frame: Frame = { type: 'subscribe', channel: sub.channel };
    if (sub.opts.presence) frame.presence = true;
    sub.sentSince = sub.opts.recover !== false && sub.offset !== undefined && sub.epoch !== undefined;
    if (sub.sentSince) frame.since = { offset: sub.offset, epoch: sub.epoch };
    this.raw(frame);
  }

  private onSubscribed(frame: Frame): void {
    const d = frame.data ?? {};
    const sub = this.subs.get(d.channelKey);
    if (!sub) return;
    const info: SubscribedInfo = { channel: sub.channel, channelKey: sub.key, offset: d.offset, epoch: d.epoch };
    if (sub.sentSince) {
      info.recovered = d.recovered === true;
      sub.sentSince = false;
      // Recovered: the replay that follows moves the offset. Not recovered: go on live from the server's.
      if (!info.recovered) {
        sub.offset = d.offset;
        sub.epoch = d.epoch;
      }
      sub.opts.onRecovery?.(info.recovered, info);
      this.emit('recovery', info);
    } else if (typeof d.offset === 'number') {
      sub.offset = d.offset;
      sub.epoch = d.epoch;
    }
    sub.opts.onSubscribed?.(info);
  }

  private onError(frame: Frame): void {
    const ch = frame.data?.channel;
    if (ch && typeof ch === 'object') {
      let key: string | undefined;
      try {
        key = channelKey(ch);
      } catch {
        key = undefined;
      }
      const sub = key ? this.subs.get(key) : undefined;
      if (sub && frame.data?.message === 'Access denied to channel' && ch.type !== 'conversation') {
        this.subs.delete(sub.key); // never resubscribe what the server refused
      }
      sub?.opts.onError?.(frame);
      if (key && this.pending.has(key)) this.pending.get(key)?.shift()?.reject(new Error(frame.data.message));
    }
  }

  /** Hand an event to its subscription; false for a replayed event already seen. */
  private routeEvent(frame: Frame): boolean {
    let key: string | undefined = frame.channelKey ?? frame.data?.channelKey;
    if (!key && frame.type === 'typing') key = `conversation_${frame.conversationId}`;
    if (!key && frame.type === 'user_status') key = `status_${frame.userId}`;
    const sub = key ? this.subs.get(key) : undefined;
    if (!sub) return true;
    if (frame.type === 'unsubscribed' && frame.data?.reason) this.subs.delete(sub.key);
    if (typeof frame.offset === 'number') {
      if (sub.offset !== undefined && frame.offset <= sub.offset) return false;
      sub.offset = frame.offset;
    }
    sub.opts.onEvent?.(frame);
    return true;
  }

  private setExpiry(iso: unknown): void {
    clearTimeout(this.refreshTimer);
    if (typeof iso !== 'string') return;
    const at = Date.parse(iso);
    if (Number.isNaN(at)) return;
    this.expiresAt = new Date(at);
    const left = at - Date.now();
    const margin = this.opts.refreshMargin ?? 30000;
    const delay = Math.max(250, Math.max(left - margin, left / 2));
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  private async refresh(): Promise<void> {
    if (this.state !== 'connected') return;
    try {
      const token = await this.opts.getToken();
      if (this.state === 'connected') this.raw({ type: 'refresh', token });
    } catch (err) {
      this.emit('error', err);
    }
  }

  private onClose(ws: SocketLike, code: number, reason: string): void {
    if (ws !== this.ws) return;
    this.detach(ws);
    this.ws = null;
    clearTimeout(this.refreshTimer);
    const was = this.state;
    this.rejectPending(new Error(`disconnected (${code})`));
    if (was === 'closed') return;
    if (STOP_CODES.has(code)) {
      this.state = 'stopped';
      this.emit('disconnected', { code, reason, willReconnect: false });
      this.emit('stopped', { code, reason });
      return;
    }
    // 4001: the token expired; the next connect fetches a fresh one, at once.
    this.scheduleRetry(code, reason, code === 4001 && this.attempt === 0 ? 0 : undefined);
  }

  private scheduleRetry(code: number, reason: string, delay?: number): void {
    const max = this.opts.maxAttempts;
    if (max !== undefined && this.attempt >= max) {
      this.state = 'stopped';
      this.emit('disconnected', { code, reason, willReconnect: false });
      this.emit('gaveup', { attempts: this.attempt });
      return;
    }
    const wait = delay ?? backoffDelay(this.attempt, this.opts.backoff, this.opts.random);
    this.attempt += 1;
    this.state = 'waiting';
    this.emit('disconnected', { code, reason, willReconnect: true, delay: wait });
    this.emit('reconnecting', { attempt: this.attempt, delay: wait });
    this.retryTimer = setTimeout(() => void this.open(), wait);
  }

  private rejectPending(err: Error): void {
    for (const list of this.pending.values()) for (const p of list.splice(0)) p.reject(err);
  }
}

export default FonanaRealtime;
