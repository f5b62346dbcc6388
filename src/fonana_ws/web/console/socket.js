// The console's connection: the browser client of clients/js (FonanaRealtime, the global `Fonana` of
// fonana.iife.min.js, a byte-for-byte copy of clients/js/dist loaded by index.html), so that the page
// exercises the same reconnect, resubscribe and stop rules as the web app. This module only adapts the
// client's events to what the page shows:
//
//   const socket = openSocket(token, {onFrame(direction, text), onState(state, detail), onNote(text)})
//   socket.subscribe(channel, presence) / socket.unsubscribe(channel)
//   socket.presence(channel) / socket.typing(conversationId, isTyping) / socket.send(frame)
//   socket.close()
//
// onState gets "connected" {userId}, "waiting" {code, reason, delay} (the client reconnects by itself),
// and "stopped" {code, reason} when it will not (1008/4003: a refused token is not retried, §7.10) or
// after close(). The token lives only in this closure.

/** The socket URL of this page's own server: /ws on the same host, ws: or wss: as the page was loaded. */
export function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

export function openSocket(token, handlers) {
  const client = new Fonana.FonanaRealtime({url: socketUrl(), getToken: () => token, autoConnect: false});
  const subscriptions = new Map(); // channelKey -> the client's Subscription
  const note = (text) => handlers.onNote(text);
  let sent = 0; // frames out so far: tells whether a client call reached the wire

  client.on("frame", ({direction, text}) => {
    if (direction === "out") sent += 1;
    handlers.onFrame(direction, text);
  });
  client.on("connected", (data) => handlers.onState("connected", {userId: data && data.userId}));
  client.on("disconnected", ({code, reason, willReconnect, delay}) =>
    handlers.onState(willReconnect ? "waiting" : "stopped", {code, reason, delay}),
  );
  client.on("error", (error) => note(`client error: ${error && error.message ? error.message : error}`));
  client.connect();

  return {
    subscribe(channel, presence) {
      subscriptions.set(Fonana.channelKey(channel), client.subscribe(channel, {presence}));
    },
    unsubscribe(channel) {
      const key = Fonana.channelKey(channel);
      const before = sent;
      if (subscriptions.has(key)) subscriptions.get(key).unsubscribe();
      subscriptions.delete(key);
      // The client held nothing to unsubscribe (never subscribed, or refused by the server, which the
      // client then forgets, §7.10): send the frame by hand, so the page still shows the server's answer.
      if (sent === before) client.send({type: "unsubscribe", channel});
    },
    presence(channel) {
      client.presence(channel).catch((error) => note(`presence: ${error.message}`));
    },
    typing(conversationId, isTyping) {
      if (client.typing(conversationId, isTyping)) return;
      note(
        isTyping
          ? "typing not sent: the client sends one isTyping:true per 2 s per conversation (§7.2)"
          : "stop typing not sent: the client sends isTyping:false only after an isTyping:true",
      );
    },
    send(frame) {
      client.send(frame);
    },
    close() {
      // close() detaches the socket, so the client reports no close of its own: the page is told here.
      client.close();
      handlers.onState("stopped", {code: 1000, reason: "client closed"});
    },
  };
}
