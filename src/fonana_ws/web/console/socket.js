// All of the console's WebSocket code, behind a tiny interface, so that the JS client library
// (clients/js/) can replace this one file later:
//
//   const socket = openSocket(url, {onOpen(), onFrame(direction, text), onClose({code, reason, wasClean})})
//   socket.send(object)   // JSON-encodes, reports the frame as "out"; false when not open
//   socket.close()
//   socket.isOpen()
//
// The token travels in the query string, as the Fonana client sends it (protocol §1); the page never
// stores it anywhere but this closure.

export function openSocket(url, handlers) {
  const ws = new WebSocket(url);
  const report = (direction, text) => handlers.onFrame && handlers.onFrame(direction, text);
  ws.onopen = () => handlers.onOpen && handlers.onOpen();
  ws.onmessage = (event) => report("in", typeof event.data === "string" ? event.data : "(binary frame)");
  ws.onclose = (event) =>
    handlers.onClose && handlers.onClose({code: event.code, reason: event.reason, wasClean: event.wasClean});
  return {
    send(frame) {
      if (ws.readyState !== WebSocket.OPEN) return false;
      const text = JSON.stringify(frame);
      ws.send(text);
      report("out", text);
      return true;
    },
    close() {
      ws.close(1000, "closed from the console");
    },
    isOpen() {
      return ws.readyState === WebSocket.OPEN;
    },
  };
}

// The socket URL of this page's own server: /ws on the same host, ws: or wss: as the page was loaded.
export function socketUrl(token) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws?token=${encodeURIComponent(token)}`;
}
