/**
 * FonanaRealtime: the browser client of fonana-ws (docs/protocol.md). Dependency-free.
 *
 * Why a client at all: the hard parts of real-time live on both ends. This one reconnects forever with
 * full-jitter backoff (so a deploy does not make every tab reconnect in the same second), resubscribes
 * with `since` from the last offset seen (§7.8), refreshes the token before `expiresAt` (§7.6), and
 * throttles typing to the server's rule (§7.2).
 */
const OPEN = 1;
/** Close codes after which retrying with the same credentials is pointless (§7.10). */
const STOP_CODES = new Set([1008, 4003]);
/** The channel's key, as the server names it (§2). */
export function channelKey(channel) {
    switch (channel.type) {
        case 'notifications':
        case 'feed':
        case 'status':
            return `${channel.type}_${channel.userId}`;
        case 'post':
            return `post_${channel.postId}`;
        default:
            return `${channel.type}_${channel.id}`;
    }
}
/** Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)). */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
    var _a, _b;
    const base = (_a = opts.base) !== null && _a !== void 0 ? _a : 500;
    const cap = (_b = opts.cap) !== null && _b !== void 0 ? _b : 30000;
    const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
    return opts.jitter === false ? ceiling : Math.floor(random() * ceiling);
}
export class FonanaRealtime {
    constructor(opts) {
        this.state = 'idle';
        this.ws = null;
        this.attempt = 0;
        this.listeners = new Map();
        this.subs = new Map();
        this.queue = [];
        this.typingSent = new Map();
        this.pending = new Map();
        this.opts = opts;
        if (opts.autoConnect !== false)
            this.connect();
    }
    /** Listen to a client event (`connected`, `disconnected`, `reconnecting`, `error`, `refreshed`,
     * `stopped`, `gaveup`, `recovery`, `message`, `frame`) or to any server frame type. Returns the remover.
     * `frame` gets every text frame in and out as a {@link WireFrame}, for tools that show the wire. */
    on(name, fn) {
        let set = this.listeners.get(name);
        if (!set)
            this.listeners.set(name, (set = new Set()));
        set.add(fn);
        return () => this.off(name, fn);
    }
    off(name, fn) {
        var _a;
        (_a = this.listeners.get(name)) === null || _a === void 0 ? void 0 : _a.delete(fn);
    }
    get connected() {
        return this.state === 'connected';
    }
    /** Start (or restart after `stopped`, `gaveup` or `close()`). */
    connect() {
        if (this.state === 'connecting' || this.state === 'connected')
            return;
        clearTimeout(this.retryTimer);
        this.attempt = 0;
        void this.open();
    }
    /** Close for good; `connect()` starts again with the same subscriptions. */
    close() {
        this.state = 'closed';
        clearTimeout(this.retryTimer);
        clearTimeout(this.refreshTimer);
        const ws = this.ws;
        this.ws = null;
        if (ws) {
            this.detach(ws);
            try {
                ws.close(1000, 'client closed');
            }
            catch {
                /* already closing */
            }
        }
        this.rejectPending(new Error('closed'));
    }
    subscribe(channel, opts = {}) {
        const key = channelKey(channel);
        const existing = this.subs.get(key);
        const sub = { channel, key, opts, offset: existing === null || existing === void 0 ? void 0 : existing.offset, epoch: existing === null || existing === void 0 ? void 0 : existing.epoch, sentSince: false };
        this.subs.set(key, sub);
        if (this.state === 'connected')
            this.sendSubscribe(sub);
        const client = this;
        return {
            channel,
            channelKey: key,
            get offset() {
                return sub.offset;
            },
            unsubscribe() {
                if (client.subs.get(key) !== sub)
                    return;
                client.subs.delete(key);
                if (client.state === 'connected')
                    client.raw({ type: 'unsubscribe', channel });
            },
        };
    }
    /** A user's online status (§7.3): `fn` gets every `user_status` frame. */
    status(userId, fn) {
        return this.subscribe({ type: 'status', userId }, {
            onEvent: (f) => {
                if (f.type === 'user_status')
                    fn(f);
            },
        });
    }
    /** Who is in a channel the connection joined (§7.4): the `presence` answer's data. */
    presence(channel) {
        const key = channelKey(channel);
        return new Promise((resolve, reject) => {
            var _a, _b;
            const list = (_a = this.pending.get(key)) !== null && _a !== void 0 ? _a : [];
            this.pending.set(key, list);
            const entry = {
                resolve: (f) => {
                    clearTimeout(timer);
                    resolve(f);
                },
                reject: (e) => {
                    clearTimeout(timer);
                    reject(e);
                },
            };
            const timer = setTimeout(() => {
                const i = list.indexOf(entry);
                if (i >= 0)
                    list.splice(i, 1);
                reject(new Error(`presence ${key}: no answer`));
            }, (_b = this.opts.requestTimeout) !== null && _b !== void 0 ? _b : 10000);
            list.push(entry);
            this.send({ type: 'presence', channel });
        });
    }
    /** Tell the other participant that the user types; throttled here to the server's rule (§7.2), so the
     * app may call it on every keystroke. Dropped while not connected: a stale "typing" helps nobody. */
    typing(conversationId, isTyping = true) {
        var _a;
        if (this.state !== 'connected')
            return false;
        const now = Date.now();
        const last = this.typingSent.get(conversationId);
        if (isTyping) {
            if (last && now - last.at < ((_a = this.opts.typingInterval) !== null && _a !== void 0 ? _a : 2000))
                return false;
            this.typingSent.set(conversationId, { at: now, open: true });
        }
        else {
            if (!last || !last.open)
                return false;
            last.open = false;
        }
        this.raw({ type: 'typing', conversationId, isTyping });
        return true;
    }
    /** Send any frame; queued until `connected`, then sent in order. */
    send(frame) {
        const text = JSON.stringify(frame);
        if (this.state === 'connected' && this.ws && this.ws.readyState === OPEN)
            this.write(this.ws, text);
        else
            this.queue.push(text);
    }
    // -- internals ---------------------------------------------------------------------------------------
    emit(name, payload) {
        var _a;
        for (const fn of [...((_a = this.listeners.get(name)) !== null && _a !== void 0 ? _a : [])]) {
            try {
                fn(payload);
            }
            catch (err) {
                if (name !== 'error')
                    this.emit('error', err);
            }
        }
    }
    raw(frame) {
        if (this.ws)
            this.write(this.ws, JSON.stringify(frame));
    }
    /** The one place a frame reaches the wire, so that `frame` listeners see all of them, in order. */
    write(ws, text) {
        ws.send(text);
        this.emit('frame', { direction: 'out', text });
    }
    async open() {
        var _a;
        this.state = 'connecting';
        let token;
        try {
            token = await this.opts.getToken();
        }
        catch (err) {
            this.emit('error', err);
            this.scheduleRetry(0, 'getToken failed');
            return;
        }
        if (this.state !== 'connecting')
            return; // closed meanwhile
        const Ctor = (_a = this.opts.WebSocket) !== null && _a !== void 0 ? _a : globalThis.WebSocket;
        const sep = this.opts.url.includes('?') ? '&' : '?';
        let ws;
        try {
            ws = new Ctor(`${this.opts.url}${sep}token=${encodeURIComponent(token)}`);
        }
        catch (err) {
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
    detach(ws) {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    onFrame(data) {
        var _a, _b, _c;
        const text = typeof data === 'string' ? data : String(data);
        // Before parsing: a frame the client ignores (not JSON, no type) is still on the wire.
        this.emit('frame', { direction: 'in', text });
        let frame;
        try {
            frame = JSON.parse(text);
        }
        catch {
            return;
        }
        if (!frame || typeof frame.type !== 'string')
            return;
        switch (frame.type) {
            case 'connected':
                return this.onConnected(frame);
            case 'refreshed':
                this.setExpiry((_a = frame.data) === null || _a === void 0 ? void 0 : _a.expiresAt);
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
                const list = this.pending.get((_b = frame.data) === null || _b === void 0 ? void 0 : _b.channelKey);
                (_c = list === null || list === void 0 ? void 0 : list.shift()) === null || _c === void 0 ? void 0 : _c.resolve(frame.data);
                break;
            }
            default:
                if (!this.routeEvent(frame))
                    return; // a duplicate
        }
        this.emit('message', frame);
        this.emit(frame.type, frame);
    }
    onConnected(frame) {
        var _a, _b;
        this.state = 'connected';
        this.attempt = 0;
        this.userId = (_a = frame.data) === null || _a === void 0 ? void 0 : _a.userId;
        this.setExpiry((_b = frame.data) === null || _b === void 0 ? void 0 : _b.expiresAt);
        for (const sub of this.subs.values())
            this.sendSubscribe(sub);
        const queued = this.queue;
        this.queue = [];
        for (const text of queued)
            if (this.ws)
                this.write(this.ws, text);
        this.emit('connected', frame.data);
        this.emit('message', frame);
    }
    sendSubscribe(sub) {
        const frame = { type: 'subscribe', channel: sub.channel };
        if (sub.opts.presence)
            frame.presence = true;
        sub.sentSince = sub.opts.recover !== false && sub.offset !== undefined && sub.epoch !== undefined;
        if (sub.sentSince)
            frame.since = { offset: sub.offset, epoch: sub.epoch };
        this.raw(frame);
    }
    onSubscribed(frame) {
        var _a, _b, _c, _d, _e;
        const d = (_a = frame.data) !== null && _a !== void 0 ? _a : {};
        const sub = this.subs.get(d.channelKey);
        if (!sub)
            return;
        const info = { channel: sub.channel, channelKey: sub.key, offset: d.offset, epoch: d.epoch };
        if (sub.sentSince) {
            info.recovered = d.recovered === true;
            sub.sentSince = false;
            // Recovered: the replay that follows moves the offset. Not recovered: go on live from the server's.
            if (!info.recovered) {
                sub.offset = d.offset;
                sub.epoch = d.epoch;
            }
            (_c = (_b = sub.opts).onRecovery) === null || _c === void 0 ? void 0 : _c.call(_b, info.recovered, info);
            this.emit('recovery', info);
        }
        else if (typeof d.offset === 'number') {
            sub.offset = d.offset;
            sub.epoch = d.epoch;
        }
        (_e = (_d = sub.opts).onSubscribed) === null || _e === void 0 ? void 0 : _e.call(_d, info);
    }
    onError(frame) {
        var _a, _b, _c, _d, _e, _f;
        const ch = (_a = frame.data) === null || _a === void 0 ? void 0 : _a.channel;
        if (ch && typeof ch === 'object') {
            let key;
            try {
                key = channelKey(ch);
            }
            catch {
                key = undefined;
            }
            const sub = key ? this.subs.get(key) : undefined;
            if (sub && ((_b = frame.data) === null || _b === void 0 ? void 0 : _b.message) === 'Access denied to channel' && ch.type !== 'conversation') {
                this.subs.delete(sub.key); // never resubscribe what the server refused
            }
            (_d = sub === null || sub === void 0 ? void 0 : (_c = sub.opts).onError) === null || _d === void 0 ? void 0 : _d.call(_c, frame);
            if (key && this.pending.has(key))
                (_f = (_e = this.pending.get(key)) === null || _e === void 0 ? void 0 : _e.shift()) === null || _f === void 0 ? void 0 : _f.reject(new Error(frame.data.message));
        }
    }
    /** Hand an event to its subscription; false for a replayed event already seen. */
    routeEvent(frame) {
        var _a, _b, _c, _d, _e;
        let key = (_a = frame.channelKey) !== null && _a !== void 0 ? _a : (_b = frame.data) === null || _b === void 0 ? void 0 : _b.channelKey;
        if (!key && frame.type === 'typing')
            key = `conversation_${frame.conversationId}`;
        if (!key && frame.type === 'user_status')
            key = `status_${frame.userId}`;
        const sub = key ? this.subs.get(key) : undefined;
        if (!sub)
            return true;
        if (frame.type === 'unsubscribed' && ((_c = frame.data) === null || _c === void 0 ? void 0 : _c.reason))
            this.subs.delete(sub.key);
        if (typeof frame.offset === 'number') {
            if (sub.offset !== undefined && frame.offset <= sub.offset)
                return false;
            sub.offset = frame.offset;
        }
        (_e = (_d = sub.opts).onEvent) === null || _e === void 0 ? void 0 : _e.call(_d, frame);
        return true;
    }
    setExpiry(iso) {
        var _a;
        clearTimeout(this.refreshTimer);
        if (typeof iso !== 'string')
            return;
        const at = Date.parse(iso);
        if (Number.isNaN(at))
            return;
        this.expiresAt = new Date(at);
        const left = at - Date.now();
        const margin = (_a = this.opts.refreshMargin) !== null && _a !== void 0 ? _a : 30000;
        const delay = Math.max(250, Math.max(left - margin, left / 2));
        this.refreshTimer = setTimeout(() => void this.refresh(), delay);
    }
    async refresh() {
        if (this.state !== 'connected')
            return;
        try {
            const token = await this.opts.getToken();
            if (this.state === 'connected')
                this.raw({ type: 'refresh', token });
        }
        catch (err) {
            this.emit('error', err);
        }
    }
    onClose(ws, code, reason) {
        if (ws !== this.ws)
            return;
        this.detach(ws);
        this.ws = null;
        clearTimeout(this.refreshTimer);
        const was = this.state;
        this.rejectPending(new Error(`disconnected (${code})`));
        if (was === 'closed')
            return;
        if (STOP_CODES.has(code)) {
            this.state = 'stopped';
            this.emit('disconnected', { code, reason, willReconnect: false });
            this.emit('stopped', { code, reason });
            return;
        }
        // 4001: the token expired; the next connect fetches a fresh one, at once.
        this.scheduleRetry(code, reason, code === 4001 && this.attempt === 0 ? 0 : undefined);
    }
    scheduleRetry(code, reason, delay) {
        const max = this.opts.maxAttempts;
        if (max !== undefined && this.attempt >= max) {
            this.state = 'stopped';
            this.emit('disconnected', { code, reason, willReconnect: false });
            this.emit('gaveup', { attempts: this.attempt });
            return;
        }
        const wait = delay !== null && delay !== void 0 ? delay : backoffDelay(this.attempt, this.opts.backoff, this.opts.random);
        this.attempt += 1;
        this.state = 'waiting';
        this.emit('disconnected', { code, reason, willReconnect: true, delay: wait });
        this.emit('reconnecting', { attempt: this.attempt, delay: wait });
        this.retryTimer = setTimeout(() => void this.open(), wait);
    }
    rejectPending(err) {
        for (const list of this.pending.values())
            for (const p of list.splice(0))
                p.reject(err);
    }
}
export default FonanaRealtime;
