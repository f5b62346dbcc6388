// PM2 process file for fonana-ws:  pm2 start ecosystem.config.js
//
// No secret lives here. Settings (JWT_SECRET or NEXTAUTH_SECRET, DATABASE_URL, WS_API_KEY, REDIS_URL or
// BROADCAST_URL, ...) come from the environment of the shell that runs `pm2 start`, or from a `.env`
// file in this directory, which the server reads itself (see config/.env.example).
//
// One process per port, fork mode. Several processes share their events through the broker (Redis or
// PostgreSQL): WS_PORTS=3002,3003 starts fonana-ws (3002) and fonana-ws-3003, and nginx balances between
// them (config/nginx/fonana-ws.conf). `pm2 stop fonana-ws` sends SIGINT (PM2's PM2_KILL_SIGNAL; SIGTERM
// works the same): the server closes every socket with 1012 (clients reconnect) and exits 0 within
// WS_SHUTDOWN_TIMEOUT; PM2 kills it only after kill_timeout.
//
// Overrides, all optional: FONANA_WS_BIN (the command; default .venv/bin/fonana-ws here),
// FONANA_WS_LOG_DIR (default ./logs), WS_PORTS / WS_PORT (default 3002).
const path = require("path");

const root = __dirname;
const bin = process.env.FONANA_WS_BIN || path.join(root, ".venv", "bin", "fonana-ws");
const logDir = process.env.FONANA_WS_LOG_DIR || path.join(root, "logs");
const ports = (process.env.WS_PORTS || process.env.WS_PORT || "3002")
  .split(",")
  .map((p) => p.trim())
  .filter(Boolean);
// Seconds the server waits for connections to close; PM2 waits a little longer before SIGKILL.
const shutdownSeconds = Number(process.env.WS_SHUTDOWN_TIMEOUT || 8);

module.exports = {
  apps: ports.map((port, i) => {
    const name = i === 0 ? "fonana-ws" : `fonana-ws-${port}`;
    return {
      name,
      namespace: "fonana-ws",
      cwd: root,
      script: bin,
      args: "serve",
      interpreter: "none",
      exec_mode: "fork",
      instances: 1,
      autorestart: true,
      // A start that fails (bad setting: exit 2) is not retried forever.
      min_uptime: "10s",
      max_restarts: 10,
      restart_delay: 2000,
      kill_timeout: (shutdownSeconds + 4) * 1000,
      out_file: path.join(logDir, `${name}.out.log`),
      error_file: path.join(logDir, `${name}.err.log`),
      merge_logs: true,
      // The server's log lines carry their own time (and are JSON with LOG_JSON=true).
      time: false,
      // Only the port differs between instances; everything else is inherited from the environment.
      env: { WS_PORT: port },
    };
  }),
};
