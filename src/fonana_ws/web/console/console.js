// The console page: the client tab (a connection of one's own: the JS client, through socket.js) and the server tab
// (charts from /stats, once a second). The API key lives only in this module's memory: it is read from
// its field when a request needs it, and is gone with the tab.

import {Chart, bucketDelta, format, quantile} from "./charts.js";
import {openSocket} from "./socket.js";

const $ = (id) => document.getElementById(id);
const MAX_FRAMES = 500;
const STATS_EVERY_MS = 1000;
const LATENCY_WINDOW = 10; // seconds of publishes the p50/p99 are read over

// What the page saw, for a person and for the browser test (read through window.fonanaConsole).
const seen = {frames: [], closes: [], samples: 0, statsError: null, charts: {}};
window.fonanaConsole = seen;

function apiHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

// -- tabs ------------------------------------------------------------------------------------------

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) other.classList.toggle("active", other === tab);
    for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== tab.dataset.tab;
    for (const chart of Object.values(charts)) chart.draw(); // a hidden canvas had no size
  });
}

// -- client tab ------------------------------------------------------------------------------------

let socket = null;

function addFrame(direction, text) {
  const time = new Date();
  const size = new TextEncoder().encode(text).length;
  seen.frames.push({direction, text, size, time: time.toISOString()});
  if (seen.frames.length > MAX_FRAMES) seen.frames.shift();
  const row = document.createElement("tr");
  row.className = direction;
  const arrow = {in: "←", out: "→", note: "·"}[direction];
  for (const cell of [time.toLocaleTimeString([], {hour12: false}) + "." + String(time.getMilliseconds()).padStart(3, "0"), arrow, direction === "note" ? "" : String(size), text]) {
    const td = document.createElement("td");
    td.textContent = cell;
    row.appendChild(td);
  }
  const body = $("frames");
  body.insertBefore(row, body.firstChild);
  while (body.children.length > MAX_FRAMES) body.removeChild(body.lastChild);
}

function setState(text, kind = "") {
  const state = $("socket-state");
  state.textContent = text;
  state.className = `state ${kind}`;
}

// Frames go out only while connected; Disconnect also stops a client waiting to reconnect.
function setButtons(state) {
  for (const id of ["subscribe", "unsubscribe", "presence", "ping", "typing-on", "typing-off"]) {
    $(id).disabled = state !== "connected";
  }
  $("disconnect").disabled = state === "stopped";
  $("connect").disabled = state !== "stopped";
}

const subscribed = new Set();
function showSubscribed() {
  const box = $("subscribed");
  box.replaceChildren(...[...subscribed].map((key) => Object.assign(document.createElement("span"), {textContent: key})));
}

function onFrame(direction, text) {
  addFrame(direction, text);
  if (direction !== "in") return;
  let frame;
  try {
    frame = JSON.parse(text);
  } catch {
    return;
  }
  if (frame.type === "subscribed" && frame.data) subscribed.add(frame.data.channelKey);
  if (frame.type === "unsubscribed" && frame.data) subscribed.delete(frame.data.channelKey);
  showSubscribed();
}

$("connect").addEventListener("click", () => {
  const token = $("token").value.trim();
  if (!token) {
    setState("paste or mint a token first", "bad");
    return;
  }
  setState("connecting…");
  setButtons("connecting");
  socket = openSocket(token, {onFrame, onState, onNote: (text) => addFrame("note", text)});
});

// The client's own reports: connected, a close it will retry after a delay, or one it will not.
function onState(state, detail) {
  setButtons(state);
  if (state === "connected") {
    setState(`connected as ${detail.userId}`, "good");
    return;
  }
  seen.closes.push({code: detail.code, reason: detail.reason, willReconnect: state === "waiting"});
  let text = `closed: ${detail.code}${detail.reason ? ` ${detail.reason}` : ""}`;
  if (state === "waiting") text += ` (the client reconnects in ${(detail.delay / 1000).toFixed(1)} s)`;
  setState(text, detail.code === 1000 ? "" : "bad");
  addFrame("note", text);
  subscribed.clear(); // the client resubscribes by itself after a reconnect; the chips follow its frames
  showSubscribed();
  if (state === "stopped") socket = null;
}

$("disconnect").addEventListener("click", () => socket && socket.close());

function channel() {
  const type = $("channel-type").value;
  const field = {notifications: "userId", feed: "userId", creator: "id", post: "postId", conversation: "id", status: "userId"}[type];
  return {type, [field]: $("channel-id").value.trim()};
}

$("subscribe").addEventListener("click", () => socket && socket.subscribe(channel(), $("channel-presence").checked));
$("unsubscribe").addEventListener("click", () => socket && socket.unsubscribe(channel()));
$("presence").addEventListener("click", () => socket && socket.presence(channel()));
$("ping").addEventListener("click", () => socket && socket.send({type: "ping"}));
for (const [id, isTyping] of [["typing-on", true], ["typing-off", false]]) {
  $(id).addEventListener("click", () => socket && socket.typing($("typing-conversation").value.trim(), isTyping));
}
$("clear-frames").addEventListener("click", () => {
  seen.frames.length = 0;
  $("frames").replaceChildren();
});

$("mint").addEventListener("click", async () => {
  const note = $("mint-note");
  note.textContent = "";
  const response = await fetch("/console/token", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({userId: $("mint-user").value.trim()}),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    note.textContent = body.error || `refused (${response.status})`;
    return;
  }
  $("token").value = body.token;
  note.textContent = `minted, valid ${Math.round(body.expiresIn / 60)} min`;
});

$("publish").addEventListener("click", async () => {
  const result = $("publish-result");
  let event;
  try {
    event = JSON.parse($("publish-event").value);
  } catch (error) {
    result.textContent = `the event is not JSON: ${error.message}`;
    return;
  }
  const response = await fetch("/api/publish", {
    method: "POST",
    headers: apiHeaders({"Content-Type": "application/json"}),
    body: JSON.stringify({channel: $("publish-channel").value.trim(), event}),
  });
  const text = await response.text();
  result.textContent = `${response.status} ${text.slice(0, 200)}`;
});

// -- server tab ------------------------------------------------------------------------------------

const charts = {
  connections: new Chart($("chart-connections"), "connections", ["now"]),
  subscriptions: new Chart($("chart-subscriptions"), "subscriptions", ["now"]),
  deliveries: new Chart($("chart-deliveries"), "deliveries/s", ["rate"]),
  latency: new Chart($("chart-latency"), `publish latency (last ${LATENCY_WINDOW} s)`, ["p50", "p99"], " ms"),
  slow: new Chart($("chart-slow"), "slow-consumer cuts", ["total"]),
  broker: new Chart($("chart-broker"), "broker up", ["1 up / 0 down"]),
};
for (const [name, chart] of Object.entries(charts)) seen.charts[name] = chart.series;

const history = []; // the last snapshots, {at, stats}, for rates and the latency window

function sum(values) {
  return Object.values(values).reduce((a, b) => a + b, 0);
}

function render(stats, at) {
  const before = history.length ? history[history.length - 1] : null;
  history.push({at, stats});
  if (history.length > LATENCY_WINDOW + 1) history.shift();
  const totals = stats.totals;
  charts.connections.push([stats.connections]);
  charts.subscriptions.push([sum(stats.subscriptions)]);
  charts.deliveries.push([
    before ? (totals.events_delivered - before.stats.totals.events_delivered) / ((at - before.at) / 1000) : null,
  ]);
  const window = bucketDelta(stats.publish_seconds.buckets, history[0].stats.publish_seconds.buckets);
  const ms = (q) => {
    const seconds = quantile(history.length > 1 ? window : stats.publish_seconds.buckets, q);
    return seconds === null || !Number.isFinite(seconds) ? null : seconds * 1000;
  };
  charts.latency.push([ms(0.5), ms(0.99)]);
  charts.slow.push([totals.slow_consumer_disconnects]);
  charts.broker.push([stats.broker.up ? 1 : 0]);

  const rows = (stats.top_channels || []).map(({channel, subscribers}) => [channel, String(subscribers)]);
  fill($("top-channels"), rows.length ? rows : [["no channel has a subscriber here", ""]]);
  $("stats-state").textContent =
    `${stats.connections} connection(s), ${stats.connected_users} user(s), ` +
    `${format(totals.events_delivered)} deliveries, ${format(totals.events_published)} published`;
  $("stats-state").className = "state";
}

function fill(body, rows) {
  body.replaceChildren(
    ...rows.map((cells) => {
      const row = document.createElement("tr");
      for (const cell of cells) row.appendChild(Object.assign(document.createElement("td"), {textContent: cell}));
      return row;
    }),
  );
}

async function poll() {
  try {
    const response = await fetch("/stats", {headers: apiHeaders(), cache: "no-store"});
    if (response.status === 401) {
      seen.statsError = "401";
      $("stats-state").textContent = "/stats answers loopback only: type the API key above";
      $("stats-state").className = "state bad";
      return;
    }
    const stats = await response.json();
    seen.statsError = null;
    seen.samples += 1;
    render(stats, Date.now());
    await pollProcesses();
  } catch (error) {
    seen.statsError = String(error);
    $("stats-state").textContent = `the server does not answer (${error.message})`;
    $("stats-state").className = "state bad";
  }
}

// The processes behind a shared broker: each one's summary, asked over the broker's control channel.
async function pollProcesses() {
  const response = await fetch("/console/processes", {headers: apiHeaders(), cache: "no-store"});
  if (!response.ok) return;
  const {shared, processes} = await response.json();
  seen.processes = processes;
  fill(
    $("processes"),
    processes.map((p) => [
      p.self ? `${p.id} (this one)` : p.id,
      `${p.broker} ${p.up ? "up" : "DOWN"}`,
      String(p.connections),
      String(p.subscriptions),
      String(p.tasks),
    ]),
  );
  $("processes-note").textContent = shared
    ? `${processes.length} process(es) answered over the shared broker in the last 5 s.`
    : "One process: the memory broker is not shared.";
}

async function loop() {
  await poll();
  setTimeout(loop, STATS_EVERY_MS);
}
loop();
