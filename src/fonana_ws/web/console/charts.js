// Tiny line charts on <canvas>: one or two series of the last POINTS samples, no library.

export const POINTS = 60; // a minute at one sample a second

const COLORS = ["#2f7de1", "#e0642f"];

export class Chart {
  constructor(canvas, title, seriesNames, unit = "") {
    this.canvas = canvas;
    this.title = title;
    this.names = seriesNames;
    this.unit = unit;
    this.series = seriesNames.map(() => []);
  }

  // One sample per series (null: no value this second, drawn as a gap).
  push(values) {
    values.forEach((value, i) => {
      const series = this.series[i];
      series.push(value);
      if (series.length > POINTS) series.shift();
    });
    this.draw();
  }

  latest() {
    return this.series.map((series) => (series.length ? series[series.length - 1] : null));
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 300;
    const height = canvas.clientHeight || 120;
    if (canvas.width !== width * ratio) {
      canvas.width = width * ratio;
      canvas.height = height * ratio;
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const top = 22;
    const bottom = height - 6;
    const all = this.series.flat().filter((v) => v !== null && Number.isFinite(v));
    const max = Math.max(1e-9, ...all) * 1.15;
    g.strokeStyle = "#e3e6eb";
    g.lineWidth = 1;
    for (let i = 0; i <= 2; i++) {
      const y = top + ((bottom - top) * i) / 2;
      g.beginPath();
      g.moveTo(0, y);
      g.lineTo(width, y);
      g.stroke();
    }
    this.series.forEach((series, s) => {
      g.strokeStyle = COLORS[s % COLORS.length];
      g.lineWidth = 2;
      g.beginPath();
      let drawing = false;
      series.forEach((value, i) => {
        if (value === null || !Number.isFinite(value)) {
          drawing = false;
          return;
        }
        const x = width - (series.length - 1 - i) * (width / (POINTS - 1));
        const y = bottom - (value / max) * (bottom - top);
        if (drawing) g.lineTo(x, y);
        else g.moveTo(x, y);
        drawing = true;
      });
      g.stroke();
    });
    g.fillStyle = "#1d2330";
    g.font = "12px system-ui, sans-serif";
    const shown = this.latest()
      .map((v, i) => `${this.names[i]} ${v === null ? "–" : format(v)}${this.unit}`)
      .join("   ");
    g.fillText(`${this.title}: ${shown}`, 6, 15);
  }
}

export function format(value) {
  if (Math.abs(value) >= 100 || Number.isInteger(value)) return String(Math.round(value));
  if (Math.abs(value) >= 1) return value.toFixed(1);
  return value.toPrecision(2);
}

// The q-quantile's upper bound from Prometheus-style cumulative buckets {le: count} (null: no samples).
export function quantile(buckets, q) {
  const entries = Object.entries(buckets).sort((a, b) => bound(a[0]) - bound(b[0]));
  const total = entries.length ? entries[entries.length - 1][1] : 0;
  if (!total) return null;
  for (const [le, count] of entries) {
    if (count >= q * total) return bound(le);
  }
  return null;
}

function bound(le) {
  return le === "+Inf" ? Infinity : Number(le);
}

// Buckets of the observations between two cumulative snapshots.
export function bucketDelta(now, before) {
  const out = {};
  for (const [le, count] of Object.entries(now)) out[le] = count - ((before && before[le]) || 0);
  return out;
}
