"use strict";
// Alarm history: filters, server-side paging, acknowledge (the live banner's rule: roles that may review).
// Everything a station or the store sent is inserted as text (textContent), never as HTML.
const $ = (s) => document.querySelector(s);
const A = { me: null, rows: [], page: 1, perPage: 25, total: 0, zone: "UTC" };

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
// The console's one time format: the line's local time with its zone (as on /history).
function fmtTime(t) { return new Date(t * 1000).toLocaleString("sv-SE", { timeZone: A.zone, timeZoneName: "short" }); }
function kindText(k) { return lookup("kind." + k) !== null ? T("kind." + k) : String(k); }

function query() {
  const q = new URLSearchParams();
  for (const [k, v] of new FormData($("#filters"))) {
    if (!v) continue;
    q.set(k, (k === "from" || k === "to") ? v.trim().replace(" ", "T") : v.trim());  // naive line time, zone in tz
  }
  q.set("tz", A.zone);
  q.set("page", A.page); q.set("per_page", A.perPage);
  return q;
}

function row(a) {
  const tr = el("tr", { "data-alarm": a.id, class: `alarm-row ${a.cleared_at === null ? "open" : "cleared"}` });
  const state = el("td", { class: "state" }, a.cleared_at === null ? T("alarms.open") : T("alarms.cleared"));
  const acked = el("td", { class: "acked-cell" });
  if (a.acked_at !== null) acked.textContent = T("alarm.acked_by", { user: a.acked_by, time: fmtTime(a.acked_at) });
  else if (A.me.can.includes("review")) {
    const b = el("button", { type: "button", class: "ack", "data-ack": a.id }, T("alarm.ack"));
    b.addEventListener("click", () => ack(a.id, b));
    acked.append(b);
  } else acked.textContent = T("alarms.unacked");
  tr.append(el("td", { class: "raised" }, fmtTime(a.raised_at)),
    el("td", { class: "cleared-at" }, a.cleared_at === null ? "—" : fmtTime(a.cleared_at)),
    el("td", { class: "station" }, a.station), el("td", { class: "camera" }, a.camera ?? "—"),
    el("td", { class: "rule" }, `${a.rule} (${kindText(a.kind)})`),
    el("td", { class: "message" }, trField(a, "message")), state, acked);
  return tr;
}

async function load() {
  const r = await fetch(`/api/alarms/history?${query()}`);
  if (r.status === 401) { location.href = "/login"; return; }
  if (!r.ok) { $("#msg").textContent = await r.text(); return; }
  $("#msg").textContent = "";
  const body = await r.json();
  A.rows = body.rows; A.total = body.total;
  const st = $("#filters [name=station]");
  if (st.options.length === 1) for (const s of body.stations) st.append(el("option", { value: s }, s));
  const kd = $("#filters [name=kind]");
  if (kd.options.length === 1) for (const k of body.kinds) kd.append(el("option", { value: k }, kindText(k)));
  $("#alarm-rows tbody").replaceChildren(...A.rows.map(row));
  $("#none").hidden = A.rows.length > 0;
  const pages = Math.max(1, Math.ceil(A.total / A.perPage));
  $("#pageinfo").textContent = T("pager.alarms_info", { page: A.page, pages, total: A.total });
  $("#prev").disabled = A.page <= 1;
  $("#next").disabled = A.page >= pages;
  document.body.dataset.ready = "1";
}

async function ack(id, button) {
  button.disabled = true;
  const r = await fetch(`/api/alarms/${encodeURIComponent(id)}/ack`, { method: "POST", headers: { "x-csrf-token": A.me.csrf } });
  if (r.status === 401) { location.href = "/login"; return; }
  if (!r.ok) { $("#msg").textContent = T("alarms.ack_failed", { error: `${r.status} ${await r.text()}` }); button.disabled = false; return; }
  await load();
  const next = document.querySelector("#alarm-rows button.ack");  // keyboard: on to the next one
  if (next) next.focus();
}

function turn(delta) {
  const pages = Math.max(1, Math.ceil(A.total / A.perPage));
  const want = A.page + delta;
  if (want < 1 || want > pages) return;
  A.page = want;
  load();
}

function keys(ev) {
  if (ev.target.closest("#filters") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.key === "n") turn(1);
  else if (ev.key === "p") turn(-1);
  else return;
  ev.preventDefault();
}

async function start() {
  const r = await fetch("/api/me");
  if (r.status === 401) { location.href = "/login"; return; }
  A.me = await r.json();
  $("#who").textContent = A.me.kiosk ? T("who.kiosk") : `${A.me.user} (${A.me.role})`;
  A.zone = A.me.time_zone || Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  $("#zone").textContent = T("alarms.times", { zone: A.zone });
  $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); A.page = 1; load(); });
  $("#prev").addEventListener("click", () => turn(-1));
  $("#next").addEventListener("click", () => turn(1));
  document.addEventListener("keydown", keys);
  await load();
}

start();
