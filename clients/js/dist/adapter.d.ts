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
import { FonanaRealtime } from './index.js';
import type { Channel, Frame, Options, SocketCtor } from './index.js';
export type Handler = (data: any) => void;
export interface AdapterOptions {
    /** Default: `NEXT_PUBLIC_WS_URL`-style global `window.FONANA_WS_URL`, else `ws://<host>:3002/ws`. */
    url?: string;
    getToken?: () => string | Promise<string>;
    WebSocket?: SocketCtor;
    backoff?: Options['backoff'];
}
export declare class WebSocketService {
    private client;
    private readonly handlers;
    private readonly subs;
    private token;
    private readonly options;
    constructor(options?: AdapterOptions);
    /** Connect, with a token (as the old client took it) or the `getToken` given at construction. */
    connect(token?: string, options?: AdapterOptions): void;
    disconnect(): void;
    isConnected(): boolean;
    subscribe(channel: Channel): void;
    unsubscribe(channel: Channel): void;
    subscribeToNotifications(userId: string): void;
    subscribeToFeed(userId: string): void;
    subscribeToCreator(creatorId: string): void;
    subscribeToPost(postId: string): void;
    subscribeToConversation(conversationId: string): void;
    unsubscribeFromPost(postId: string): void;
    unsubscribeFromCreator(creatorId: string): void;
    /** Any frame; queued until connected. */
    send(message: Frame): void;
    on(event: string, handler: Handler): void;
    off(event: string, handler: Handler): void;
    emit(event: string, data?: unknown): void;
    /** The underlying client, for Stage 2 features (typing, presence, status). */
    get realtime(): FonanaRealtime | null;
}
export declare const wsService: WebSocketService;
export default wsService;
