/**
 * FonanaRealtime: the browser client of fonana-ws (docs/protocol.md). Dependency-free.
 *
 * Why a client at all: the hard parts of real-time live on both ends. This one reconnects forever with
 * full-jitter backoff (so a deploy does not make every tab reconnect in the same second), resubscribes
 * with `since` from the last offset seen (§7.8), refreshes the token before `expiresAt` (§7.6), and
 * throttles typing to the server's rule (§7.2).
 */
export type Channel = {
    type: 'notifications';
    userId: string;
} | {
    type: 'feed';
    userId: string;
} | {
    type: 'creator';
    id: string;
} | {
    type: 'post';
    postId: string;
} | {
    type: 'conversation';
    id: string;
} | {
    type: 'status';
    userId: string;
};
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
    onmessage: ((ev: {
        data: any;
    }) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
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
/** The channel's key, as the server names it (§2). */
export declare function channelKey(channel: Channel): string;
/** Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)). */
export declare function backoffDelay(attempt: number, opts?: BackoffOptions, random?: () => number): number;
export declare class FonanaRealtime {
    state: State;
    userId: string | undefined;
    expiresAt: Date | undefined;
    private readonly opts;
    private ws;
    private attempt;
    private retryTimer;
    private refreshTimer;
    private readonly listeners;
    private readonly subs;
    private queue;
    private readonly typingSent;
    private readonly pending;
    constructor(opts: Options);
    /** Listen to a client event (`connected`, `disconnected`, `reconnecting`, `error`, `refreshed`,
     * `stopped`, `gaveup`, `recovery`, `message`, `frame`) or to any server frame type. Returns the remover.
     * `frame` gets every text frame in and out as a {@link WireFrame}, for tools that show the wire. */
    on(name: string, fn: Listener): () => void;
    off(name: string, fn: Listener): void;
    get connected(): boolean;
    /** Start (or restart after `stopped`, `gaveup` or `close()`). */
    connect(): void;
    /** Close for good; `connect()` starts again with the same subscriptions. */
    close(): void;
    subscribe(channel: Channel, opts?: SubscribeOptions): Subscription;
    /** A user's online status (§7.3): `fn` gets every `user_status` frame. */
    status(userId: string, fn: (status: {
        userId: string;
        online: boolean;
        lastSeen: string | null;
    }) => void): Subscription;
    /** Who is in a channel the connection joined (§7.4): the `presence` answer's data. */
    presence(channel: Channel): Promise<Frame>;
    /** Tell the other participant that the user types; throttled here to the server's rule (§7.2), so the
     * app may call it on every keystroke. Dropped while not connected: a stale "typing" helps nobody. */
    typing(conversationId: string, isTyping?: boolean): boolean;
    /** Send any frame; queued until `connected`, then sent in order. */
    send(frame: Frame): void;
    private emit;
    private raw;
    /** The one place a frame reaches the wire, so that `frame` listeners see all of them, in order. */
    private write;
    private open;
    private detach;
    private onFrame;
    private onConnected;
    private sendSubscribe;
    private onSubscribed;
    private onError;
    /** Hand an event to its subscription; false for a replayed event already seen. */
    private routeEvent;
    private setExpiry;
    private refresh;
    private onClose;
    private scheduleRetry;
    private rejectPending;
}
export default FonanaRealtime;
