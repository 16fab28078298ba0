"use strict";
// Shifts and yield: a table and an inline SVG trend chart (no CDN, no library).
const $ = (s) => document.querySelector(s);
const SVGNS = "http://www.w3.org/2000/svg";
const COLOURS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#90a4ae", "#f06292"];

function el(tag, attrs = {}, text) {
  const e = tag === "svg" || ["polyline", "line", "text", "circle"].includes(tag) ? document.createElementNS(SVGNS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const pct = (x) => x === null ? "—" : (100 * x).toFixed(1) + "%";

function chart(shifts) {  // x: shifts oldest -> newest, y: yield 0..100 %
  const svg = $("#chart"), W = 900, H = 300, L = 40, B = 30;
  svg.replaceChildren();
  for (const y of [0, 0.5, 1]) {
    const py = H - B - y * (H - B - 10);
    svg.append(el("line", { x1: L, x2: W, y1: py, y2: py, class: "grid" }), el("text", { x: 2, y: py + 4, class: "axis" }, `${y * 100}%`));
  }
  const order = [...shifts].reverse();
  const cams = [...new Set(order.flatMap((s) => s.cameras.map((c) => `${c.station}/${c.camera}`)))].sort();
  const x = (i) => L + (order.length < 2 ? (W - L) / 2 : i * (W - L - 10) / (order.length - 1));
  order.forEach((s, i) => svg.append(el("text", { x: x(i) - 20, y: H - 8, class: "axis" }, s.name)));
  $("#legend").replaceChildren();
  cams.forEach((cam, k) => {
    const pts = [];
    order.forEach((s, i) => {
      const c = s.cameras.find((c) => `${c.station}/${c.camera}` === cam);
      if (c && c.yield !== null) pts.push(`${x(i).toFixed(1)},${(H - B - c.yield * (H - B - 10)).toFixed(1)}`);
    });
    const colour = COLOURS[k % COLOURS.length];
    svg.append(el("polyline", { points: pts.join(" "), fill: "none", stroke: colour, "stroke-width": 3, "data-camera": cam }));
    const item = document.createElement("span");
    item.className = "legend-item"; item.style.color = colour; item.textContent = `■ ${cam}`;
    $("#legend").append(item);
  });
}

async function start() {
  const me = await fetch("/api/me");
  if (me.status === 401) { location.href = "/login"; return; }
  const r = await fetch("/api/shifts?count=9");
  const body = await r.json();
  const fmt = (t) => new Date(t * 1000).toLocaleString("sv-SE", { timeZone: body.time_zone, timeZoneName: "short" });
  $("#zone").textContent = T("shifts.times_in", { zone: body.time_zone });
  $("#shift-table tbody").replaceChildren(...body.shifts.flatMap((s) => s.cameras.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.shift = `${s.date} ${s.name}`; tr.dataset.camera = `${c.station}/${c.camera}`;
    for (const v of [s.name, fmt(s.start), `${c.station}/${c.camera}`, c.total, c.ok, c.defect, c.uncertain, pct(c.yield)]) tr.append(el("td", {}, v));
    return tr;
  })));
  chart(body.shifts);
  document.body.dataset.ready = "1";
}

start();
