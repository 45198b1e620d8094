// p2pdl dashboard: polls api/swarm on the peer that served this page and draws the swarm.
// Hand-written, no dependencies, nothing loaded from elsewhere (works offline).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STATE_COLOURS = { alive: "#2da44e", suspect: "#d4a72c", dead: "#cf222e", left: "#999999" };
const LINK_COLOURS = ["#2da44e", "#d4a72c", "#cf222e"]; // up, connecting, down
const PALETTE = ["#0969da", "#8250df", "#bf3989", "#1a7f37", "#9a6700", "#cf222e", "#0550ae", "#6e7781",
  "#e16f24", "#116329", "#a475f9", "#4d2d00"];
const state = { updates: 0, failures: 0, colours: {}, timer: null };

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function colourOf(name) {
  if (!(name in state.colours)) {
    state.colours[name] = PALETTE[Object.keys(state.colours).length % PALETTE.length];
  }
  return state.colours[name];
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (Math.abs(value) >= 1000) return value.toFixed(0);
  return value.toFixed(digits);
}

function drawGraph(data) {
  const svg = document.getElementById("graph");
  clear(svg);
  const members = data.members;
  const cx = 210, cy = 175, radius = members.length > 1 ? 140 : 0;
  const at = {};
  members.forEach((m, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, members.length) - Math.PI / 2;
    at[m.name] = [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)];
  });
  // One edge per pair, the worse health of the two ends' reports; width grows with throughput.
  const edges = {};
  for (const m of members) {
    if (!m.figures) continue;
    for (const link of m.figures.links) {
      if (!(link.neighbor in at)) continue;
      const key = [m.name, link.neighbor].sort().join("\u0000");
      const stale = m.state === "dead" || m.state === "left";
      const edge = edges[key] || { a: m.name, b: link.neighbor, health: 0, rate: null, stale: false };
      edge.health = Math.max(edge.health, stale ? 2 : link.health);
      edge.stale = edge.stale || stale;
      if (link.kilobytes_per_second !== null) edge.rate = (edge.rate || 0) + link.kilobytes_per_second;
      edges[key] = edge;
    }
  }
  for (const edge of Object.values(edges)) {
    const [x1, y1] = at[edge.a], [x2, y2] = at[edge.b];
    const width = edge.rate === null ? 2.5 : 1.5 + Math.min(6, Math.log10(1 + edge.rate));
    const line = el("line", { x1, y1, x2, y2, stroke: LINK_COLOURS[edge.health], "stroke-width": width }, svg);
    if (edge.stale) line.setAttribute("stroke-dasharray", "5 4");
    const title = el("title", {}, line);
    title.textContent = `${edge.a} – ${edge.b}` + (edge.rate === null ? "" : `: ${edge.rate.toFixed(1)} kB/s`);
  }
  for (const m of members) {
    const [x, y] = at[m.name];
    const group = el("g", { "data-name": m.name, "data-state": m.state }, svg);
    const ring = m.name === data.self ? "#1d2330" : "#ffffff";
    el("circle", { cx: x, cy: y, r: 16, fill: STATE_COLOURS[m.state] || "#999", stroke: ring, "stroke-width": 3 }, group);
    const label = el("text", { x, y: y + 32, class: "node-label" }, group);
    label.textContent = m.figures ? `${m.name} · ${m.figures.step}` : m.name;
    const title = el("title", {}, group);
    title.textContent = `${m.name} (${m.state}) ${m.address}`;
  }
}

function drawTable(data) {
  const body = document.querySelector("#members tbody");
  clear(body);
  let metricName = "";
  for (const m of data.members) {
    const f = m.figures;
    if (f && f.metric_name) metricName = f.metric_name;
    const row = document.createElement("tr");
    row.dataset.name = m.name;
    row.dataset.state = m.state;
    row.dataset.step = f ? String(f.step) : "";
    if (m.state === "dead" || m.state === "left") row.className = "stale"; // its last reported figures
    if (m.name === data.self) row.title = "the peer serving this page";
    const cells = [
      m.name + (m.name === data.self ? " *" : ""),
      m.state,
      f ? String(f.step) : "–",
      f ? fmt(f.steps_per_second, 2) : "–",
      f ? fmt(f.loss, 4) : "–",
      f ? fmt(f.metric, 4) : "–",
      f ? String(f.rounds_partial) : "–",
      f ? String(f.refused) : "–",
    ];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (i === 1) cell.className = `state-${m.state}`;
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
  document.getElementById("metric-head").textContent = metricName || "metric";
  document.getElementById("metric-title").textContent = metricName || "Headline metric";
}

function drawChart(svgId, history, column, names) {
  const svg = document.getElementById(svgId);
  clear(svg);
  const left = 46, right = 410, top = 10, bottom = 180;
  let tMin = Infinity, tMax = -Infinity, vMin = Infinity, vMax = -Infinity;
  for (const name of names) {
    for (const point of history[name] || []) {
      const v = point[column];
      if (v === null || v === undefined) continue;
      tMin = Math.min(tMin, point[0]); tMax = Math.max(tMax, point[0]);
      vMin = Math.min(vMin, v); vMax = Math.max(vMax, v);
    }
  }
  el("line", { x1: left, y1: bottom, x2: right, y2: bottom, class: "axis" }, svg);
  el("line", { x1: left, y1: top, x2: left, y2: bottom, class: "axis" }, svg);
  if (!isFinite(tMin)) return;
  if (vMax === vMin) { vMax += 0.5; vMin -= 0.5; }
  if (tMax === tMin) tMax = tMin + 1;
  const x = (t) => left + ((t - tMin) / (tMax - tMin)) * (right - left);
  const y = (v) => bottom - ((v - vMin) / (vMax - vMin)) * (bottom - top);
  for (const [value, ty] of [[vMax, top + 8], [vMin, bottom]]) {
    el("text", { x: 2, y: ty, class: "tick" }, svg).textContent = fmt(value, 3);
  }
  el("text", { x: right - 60, y: bottom + 15, class: "tick" }, svg).textContent =
    `last ${Math.round(tMax - tMin)} s`;
  for (const name of names) {
    const points = (history[name] || []).filter((p) => p[column] !== null && p[column] !== undefined);
    if (points.length === 0) continue;
    const line = el("polyline", {
      points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[column]).toFixed(1)}`).join(" "),
      fill: "none", stroke: colourOf(name), "stroke-width": 1.6,
    }, svg);
    el("title", {}, line).textContent = name;
    const last = points[points.length - 1];
    el("text", { x: Math.min(x(last[0]) + 3, right - 20), y: y(last[column]) - 3, "font-size": 10,
      fill: colourOf(name) }, svg).textContent = name;
  }
}

function drawTimeline(data) {
  const svg = document.getElementById("timeline");
  clear(svg);
  const span = 600, now = data.time, left = 10, right = 410;
  el("line", { x1: left, y1: 40, x2: right, y2: 40, class: "axis" }, svg);
  el("text", { x: left, y: 56, class: "tick" }, svg).textContent = "−10 min";
  el("text", { x: right - 20, y: 56, class: "tick" }, svg).textContent = "now";
  const colours = { death: "#cf222e", partition: "#cf222e", suspect: "#d4a72c", leave: "#999999",
    join: "#2da44e", rejoin: "#2da44e", heal: "#2da44e" };
  const list = document.getElementById("events");
  clear(list);
  for (const event of data.events) {
    const age = now - event.time;
    if (age <= span) {
      const ex = right - (age / span) * (right - left);
      const mark = el("line", { x1: ex, y1: 12, x2: ex, y2: 40, stroke: colours[event.kind] || "#555",
        "stroke-width": 3 }, svg);
      el("title", {}, mark).textContent = `${event.kind}: ${event.members.join(", ")}`;
    }
  }
  for (const event of data.events.slice().reverse()) {
    const item = document.createElement("li");
    item.className = event.kind;
    const when = new Date(event.time * 1000).toLocaleTimeString();
    item.textContent = `${when} ${event.kind}: ${event.members.join(", ")}`;
    list.appendChild(item);
  }
}

function render(data) {
  const names = data.members.map((m) => m.name);
  names.forEach(colourOf);
  const live = data.members.filter((m) => m.state === "alive" || m.state === "suspect").length;
  const steps = data.members.filter((m) => m.figures).map((m) => m.figures.step);
  const rate = data.members.filter((m) => m.figures && (m.state === "alive" || m.state === "suspect"))
    .reduce((sum, m) => sum + m.figures.steps_per_second, 0);
  const summary = document.getElementById("summary");
  summary.textContent = `${live} live of ${data.members.length} · max step ${steps.length ? Math.max(...steps) : 0}` +
    ` · ${rate.toFixed(1)} steps/s in all · digest ${data.digest_bytes} B`;
  summary.dataset.live = String(live);
  document.getElementById("source").textContent = `as seen by ${data.self}`;
  document.body.classList.remove("stale");
  drawGraph(data);
  drawTable(data);
  drawChart("loss-chart", data.history, 2, names);
  drawChart("metric-chart", data.history, 3, names);
  drawChart("rate-chart", data.history, 4, names);
  drawTimeline(data);
}

async function poll() {
  let delay = 1000;
  try {
    const response = await fetch("api/swarm", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    render(data);
    state.updates += 1;
    state.failures = 0;
    delay = Math.max(500, Math.min(5000, 1000 * data.interval));
  } catch (error) {
    state.failures += 1;
    document.getElementById("summary").textContent = `peer unreachable (${error.message}); retrying`;
    document.body.classList.add("stale");
    delay = Math.min(10000, 1000 * 2 ** Math.min(state.failures, 4));
  }
  document.body.dataset.updates = String(state.updates);
  state.timer = setTimeout(poll, delay);
}

document.addEventListener("DOMContentLoaded", poll);
