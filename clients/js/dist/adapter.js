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
export class WebSocketService {
    constructor(options = {}) {
        this.client = null;
        this.handlers = new Map();
        this.subs = new Map();
        this.options = options;
    }
    /** Connect, with a token (as the old client took it) or the `getToken` given at construction. */
    connect(token, options = {}) {
        var _a, _b;
        Object.assign(this.options, options);
        if (token !== undefined)
            this.token = token;
        if (this.client) {
            this.client.connect();
            return;
        }
        const url = (_a = this.options.url) !== null && _a !== void 0 ? _a : defaultUrl();
        const getToken = (_b = this.options.getToken) !== null && _b !== void 0 ? _b : (() => { var _a; return (_a = this.token) !== null && _a !== void 0 ? _a : ''; });
        const client = new FonanaRealtime({ url, getToken, WebSocket: this.options.WebSocket, backoff: this.options.backoff, autoConnect: false });
        client.on('connected', (d) => this.emit('connected', d));
        client.on('disconnected', (d) => this.emit('disconnected', d));
        client.on('error', (e) => this.emit('error', e));
        client.on('gaveup', (d) => this.emit('max_reconnect_attempts', d));
        client.on('message', (frame) => {
            if (frame.type === 'connected')
                return; // emitted above with its data
            // Error frames reach 'error' handlers as before; other frames by their type.
            this.emit(frame.type, frame.type === 'error' ? frame.data : frame);
        });
        this.client = client;
        client.connect();
    }
    disconnect() {
        var _a;
        (_a = this.client) === null || _a === void 0 ? void 0 : _a.close();
    }
    isConnected() {
        var _a, _b;
        return (_b = (_a = this.client) === null || _a === void 0 ? void 0 : _a.connected) !== null && _b !== void 0 ? _b : false;
    }
    subscribe(channel) {
        var _a;
        if (!this.client)
            this.connect();
        const key = channelKey(channel);
        (_a = this.subs.get(key)) === null || _a === void 0 ? void 0 : _a.unsubscribe();
        this.subs.set(key, this.client.subscribe(channel, { recover: true }));
    }
    unsubscribe(channel) {
        var _a;
        const key = channelKey(channel);
        (_a = this.subs.get(key)) === null || _a === void 0 ? void 0 : _a.unsubscribe();
        this.subs.delete(key);
    }
    subscribeToNotifications(userId) {
        this.subscribe({ type: 'notifications', userId });
    }
    subscribeToFeed(userId) {
        this.subscribe({ type: 'feed', userId });
    }
    subscribeToCreator(creatorId) {
        this.subscribe({ type: 'creator', id: creatorId });
    }
    subscribeToPost(postId) {
        this.subscribe({ type: 'post', postId });
    }
    subscribeToConversation(conversationId) {
        this.subscribe({ type: 'conversation', id: conversationId });
    }
    unsubscribeFromPost(postId) {
        this.unsubscribe({ type: 'post', postId });
    }
    unsubscribeFromCreator(creatorId) {
        this.unsubscribe({ type: 'creator', id: creatorId });
    }
    /** Any frame; queued until connected. */
    send(message) {
        if (!this.client)
            this.connect();
        this.client.send(message);
    }
    on(event, handler) {
        let set = this.handlers.get(event);
        if (!set)
            this.handlers.set(event, (set = new Set()));
        set.add(handler);
    }
    off(event, handler) {
        var _a;
        (_a = this.handlers.get(event)) === null || _a === void 0 ? void 0 : _a.delete(handler);
    }
    emit(event, data) {
        var _a;
        for (const h of [...((_a = this.handlers.get(event)) !== null && _a !== void 0 ? _a : [])]) {
            try {
                h(data);
            }
            catch (err) {
                console.error(`[ws] handler for ${event} failed`, err);
            }
        }
    }
    /** The underlying client, for Stage 2 features (typing, presence, status). */
    get realtime() {
        return this.client;
    }
}
function defaultUrl() {
    const g = globalThis;
    if (g.FONANA_WS_URL)
        return g.FONANA_WS_URL;
    const loc = g.location;
    if (!loc)
        return 'ws://127.0.0.1:3002/ws';
    return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.hostname}:3002/ws`;
}
export const wsService = new WebSocketService();
export default wsService;
