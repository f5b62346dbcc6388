/**
 * A drop-in for the web app's old client (lib/services/websocket.ts): the same singleton shape, event
 * names and subscribe helpers, on top of FonanaRealtime. Switching is one import:
 * `import { wsService } from '@fonana/realtime/adapter'`.
 *
 * The surface was inferred from the protocol (docs/protocol.md) and API_INTEGRATION_GUIDE.md: `connect`,
 * `disconnect`, `subscribe`/`unsubscribe` with a channel object, `on`/`off`/`emit` by event type
 * (`connected`, `disconnected`, `error` and every server frame type), `send`, `isConnected`, and
 * `subscribeToNotifications/Feed/Creator/Post` (plus `subscribeToConversation` for Stage 2).
 */
import { FonanaRealtime, channelKey } from './index.js';
import type { Channel, Frame, Options, SocketCtor, Subscription } from './index.js';

export type Handler = (data: any) => void;

export interface AdapterOptions {
  /** Default: `NEXT_PUBLIC_WS_URL`-style global `window.FONANA_WS_URL`, else `ws://<host>:3002/ws`. */
  url?: string;
  getToken?: () => string | Promise<string>;
  WebSocket?: SocketCtor;
  backoff?: Options['backoff'];
}

export class WebSocketService {
  private client: FonanaRealtime | null = null;
  private readonly handlers = new Map<string, Set<Handler>>();
  private readonly subs = new Map<string, Subscription>();
  private token: string | undefined;
  private readonly options: AdapterOptions;

  constructor(options: AdapterOptions = {}) {
    this.options = options;
  }

  /** Connect, with a token (as the old client took it) or the `getToken` given at construction. */
  connect(token?: string, options: AdapterOptions = {}): void {
    Object.assign(this.options, options);
    if (token !== undefined) this.token = token;
    if (this.client) {
      this.client.connect();
      return;
    }
    const url = this.options.url ?? defaultUrl();
    const getToken = this.options.getToken ?? (() => this.token ?? '');
    const client = new FonanaRealtime({ url, getToken, WebSocket: this.options.WebSocket, backoff: this.options.backoff, autoConnect: false });
    client.on('connected', (d) => this.emit('connected', d));
    client.on('disconnected', (d) => this.emit('disconnected', d));
    client.on('error', (e) => this.emit('error', e));
    client.on('gaveup', (d) => this.emit('max_reconnect_attempts', d));
    client.on('message', (frame: Frame) => {
      if (frame.type === 'connected') return; // emitted above with its data
      // Error frames reach 'error' handlers as before; other frames by their type.
      this.emit(frame.type, frame.type === 'error' ? frame.data : frame);
    });
    this.client = client;
    client.connect();
  }

  disconnect(): void {
    this.client?.close();
  }

  isConnected(): boolean {
    return this.client?.connected ?? false;
  }

  subscribe(channel: Channel): void {
    if (!this.client) this.connect();
    const key = channelKey(channel);
    this.subs.get(key)?.unsubscribe();
    this.subs.set(key, this.client!.subscribe(channel, { recover: true }));
  }

  unsubscribe(channel: Channel): void {
    const key = channelKey(channel);
    this.subs.get(key)?.unsubscribe();
    this.subs.delete(key);
  }

  subscribeToNotifications(userId: string): void {
    this.subscribe({ type: 'notifications', userId });
  }

  subscribeToFeed(userId: string): void {
    this.subscribe({ type: 'feed', userId });
  }

  subscribeToCreator(creatorId: string): void {
    this.subscribe({ type: 'creator', id: creatorId });
  }

  subscribeToPost(postId: string): void {
    this.subscribe({ type: 'post', postId });
  }

  subscribeToConversation(conversationId: string): void {
    this.subscribe({ type: 'conversation', id: conversationId });
  }

  unsubscribeFromPost(postId: string): void {
    this.unsubscribe({ type: 'post', postId });
  }

  unsubscribeFromCreator(creatorId: string): void {
    this.unsubscribe({ type: 'creator', id: creatorId });
  }

  /** Any frame; queued until connected. */
  send(message: Frame): void {
    if (!this.client) this.connect();
    this.client!.send(message);
  }

  on(event: string, handler: Handler): void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(handler);
  }

  off(event: string, handler: Handler): void {
    this.handlers.get(event)?.delete(handler);
  }

  emit(event: string, data?: unknown): void {
    for (const h of [...(this.handlers.get(event) ?? [])]) {
      try {
        h(data);
      } catch (err) {
        console.error(`[ws] handler for ${event} failed`, err);
      }
    }
  }

  /** The underlying client, for Stage 2 features (typing, presence, status). */
  get realtime(): FonanaRealtime | null {
    return this.client;
  }
}

function defaultUrl(): string {
  const g = globalThis as any;
  if (g.FONANA_WS_URL) return g.FONANA_WS_URL;
  const loc = g.location;
  if (!loc) return 'ws://127.0.0.1:3002/ws';
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.hostname}:3002/ws`;
}

export const wsService = new WebSocketService();
export default wsService;
