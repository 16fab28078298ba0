// DefectScope line console: live tiles over a WebSocket, recent events, review dialog. No framework, no build.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const state = { me: null, tiles: new Map(), events: new Map(), stations: new Map(), review: null };

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function pct(x) { return (100 * x).toFixed(1) + "%"; }
// One time format on every page: the station's local time (this browser's zone) with the zone shown.
// (the line's zone from [shifts] time_zone, else this browser's)
const TZ = { zone: undefined };
function fmtTime(t) {
  return new Date(t * 1000).toLocaleString("sv-SE", { timeZone: TZ.zone, timeZoneName: "short" });
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString("sv-SE", { timeZone: TZ.zone }); }
function snapUrl(v) { return v && v.snapshot ? `/snapshots/${encodeURIComponent(v.station)}/${encodeURIComponent(v.snapshot)}` : null; }

// An image that may not be on disk yet (the daemon's snapshot writer runs behind the verdict): retry a few times.
function loadImg(img, url) {
  let tries = 0;
  img.onerror = () => { if (++tries <= 5) setTimeout(() => { img.src = url + (url.includes("?") ? "&" : "?") + "r=" + tries; }, 400 * tries); };
  img.src = url;
}

function drawBoxes(svg, img, boxes) {
  svg.replaceChildren();
  if (!boxes || !boxes.length) return;
  const draw = () => {
    svg.setAttribute("viewBox", `0 0 ${img.naturalWidth || 1} ${img.naturalHeight || 1}`);
    svg.replaceChildren();
    for (const b of boxes) {
      const [x1, y1, x2, y2] = b.box;
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", x1); r.setAttribute("y", y1);
      r.setAttribute("width", Math.max(0, x2 - x1)); r.setAttribute("height", Math.max(0, y2 - y1));
      r.setAttribute("class", "box");
      svg.appendChild(r);
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", x1); t.setAttribute("y", Math.max(10, y1 - 2)); t.setAttribute("class", "box-label");
      t.textContent = b.class + (b.score !== undefined ? " " + pct(b.score) : "");
      svg.appendChild(t);
    }
  };
  if (img.complete && img.naturalWidth) draw(); else img.addEventListener("load", draw, { once: true });
}

// ---- tiles ----------------------------------------------------------------------------------
// Never stale: a tile shows its verdict only while the feed is up, its station and camera are up and its
// last verdict is younger than stale_after_s; otherwise NO SIGNAL / STALE with the reason, in no verdict colour.
const feed = { up: false, lastMsg: 0, staleAfter: 5 };

function tileEl(t) {
  let node = document.querySelector(`[data-tile="${CSS.escape(t.id)}"]`);
  if (node) return node;
  node = el("article", { class: "tile", "data-tile": t.id });
  const head = el("h3");
  head.append(el("span", { class: "dot" }), el("span", { class: "name" }, `${t.station} / ${t.camera}`),
              el("span", { class: "model" }));
  const frame = el("div", { class: "frame" });
  frame.append(el("img", { alt: "" }), document.createElementNS(SVG, "svg"), el("div", { class: "age" }));
  node.append(head, frame, el("div", { class: "verdict" }, "—"), el("div", { class: "meta" }),
              el("div", { class: "reason" }));
  const tiles = [...$("#tiles").children, node].sort((a, b) => a.dataset.tile.localeCompare(b.dataset.tile));
  $("#tiles").replaceChildren(...tiles);
  layoutTiles();
  return node;
}

function layoutTiles() {  // fill the screen: the squarest grid for the tile count
  const n = Math.max(1, $("#tiles").children.length);
  const box = $("#tiles").getBoundingClientRect();
  const aspect = box.height > 0 ? box.width / box.height : 16 / 9;
  const cols = Math.max(1, Math.min(n, Math.round(Math.sqrt(n * aspect / 1.1))));
  $("#tiles").style.setProperty("--cols", cols);
  $("#tiles").style.setProperty("--rows", Math.ceil(n / cols));
}

function removeTile(id) {
  state.tiles.delete(id);
  const node = document.querySelector(`[data-tile="${CSS.escape(id)}"]`);
  if (node) { node.remove(); layoutTiles(); }
}

function tileAge(t) {  // seconds since the tile's last verdict reached the console, as of now
  return t.age_s === null || t.age_s === undefined ? null : t.age_s + (performance.now() - t.receivedAt) / 1000;
}

function ageText(s) { return s === null ? "" : s < 60 ? T("age.s", { n: s.toFixed(1) }) : s < 3600 ? T("age.min", { n: Math.floor(s / 60) }) : T("age.h", { n: Math.floor(s / 3600) }); }

function paintTile(t) {
  const node = tileEl(t);
  const v = t.last;
  const age = tileAge(t);
  let signal = "live", reason = "";
  if (!feed.up) { signal = "no_signal"; reason = T("reason.feed_lost"); }
  else if (t.status === "no_signal") { signal = "no_signal"; reason = trField(t, "reason") || T("tile.no_signal"); }
  else if (!v) { signal = "waiting"; reason = T("reason.no_verdict_yet"); }
  else if (age !== null && age > feed.staleAfter) { signal = "stale"; reason = T("reason.no_verdict_for", { n: Math.floor(age) }); }
  const live = signal === "live";
  node.dataset.signal = signal;
  node.dataset.up = t.up && feed.up ? "1" : "0";
  node.classList.toggle("down", !live);
  if (live) node.dataset.verdict = v.verdict; else delete node.dataset.verdict;
  node.querySelector(".verdict").textContent = live ? v.verdict.toUpperCase() : signal === "stale" ? T("tile.stale") : signal === "waiting" ? T("tile.waiting") : T("tile.no_signal");
  node.querySelector(".meta").textContent = live ? `${v.defect_class || v.top_class} ${pct(v.confidence)}` : "";
  node.querySelector(".reason").textContent = reason;
  node.querySelector(".age").textContent = age === null ? "" : `${ageText(age)}${v ? ` · #${v.seq} · ${T("tile.defects_per_min", { n: t.defects_per_min })}` : ""}`;
  node.querySelector(".dot").title = live ? T("conn.live") : reason;
  const svg = node.querySelector("svg");
  if (!live && svg.childNodes.length) svg.replaceChildren();  // no boxes of an old verdict either
  return { node, live };
}

function renderTile(t) {
  t.receivedAt = performance.now();
  state.tiles.set(t.id, t);
  const { node, live } = paintTile(t);
  const v = t.last;
  const st = state.stations.get(t.station);
  node.querySelector(".model").textContent = st && st.model ? `${st.model.name} ${st.model.version}` : (v && v.model_version) || "";
  if (v) { node.dataset.captured = v.captured_at; node.dataset.seq = v.seq; }
  node.dataset.updated = Date.now();
  const img = node.querySelector("img"), svg = node.querySelector("svg");
  let url = null;
  if (t.preview_seq !== null && t.preview_seq !== undefined) url = `/preview/${encodeURIComponent(t.station)}/${encodeURIComponent(t.camera)}.jpg?v=${t.preview_seq}`;
  else if (v && v.snapshot) url = snapUrl(v);
  if (url && img.dataset.src !== url) { img.dataset.src = url; loadImg(img, url); }
  if (live) drawBoxes(svg, img, v && v.boxes);
}

function repaint() {
  if (feed.up && performance.now() - feed.lastMsg > 3000) setFeed(false);  // the console keeps us posted every second
  for (const t of state.tiles.values()) paintTile(t);
}

function setFeed(up) {
  feed.up = up;
  $("#conn").textContent = up ? T("conn.live") : T("conn.reconnecting");
  $("#conn").className = up ? "conn up" : "conn down";
  $("#feed-banner").hidden = up;
  document.body.classList.toggle("feed-lost", !up);
  if (!up && state.ws) { try { state.ws.close(); } catch (e) { /* already closed */ } }
  for (const t of state.tiles.values()) paintTile(t);
}

function renderStations(list) {
  const box = $("#stations");
  box.replaceChildren();
  for (const s of list) {
    state.stations.set(s.name, s);
    const word = s.up ? (lookup("state." + s.state) !== null ? T("state." + s.state) : String(s.state)) : T("station.down");
    const pill = el("span", { class: "station " + (s.up ? "up" : "down"), "data-station": s.name, "data-up": s.up ? "1" : "0" },
                    `${s.name}: ${word}`);
    const why = trField(s, "reason");
    if (why) pill.title = why;
    box.append(pill);
  }
}

// ---- events ---------------------------------------------------------------------------------
function eventLabel(e) {
  if (!e.review_action) return "";
  if (e.review_action === "relabel") return T("ev.relabelled", { label: e.review_label, user: e.review_user });
  return T(e.review_action === "reject" ? "ev.rejected" : "ev.confirmed", { user: e.review_user });
}

function renderEvent(e, prepend) {
  const old = document.querySelector(`#events li[data-uid="${CSS.escape(e.uid)}"]`);
  const merged = Object.assign({}, state.events.get(e.uid) || {}, e);
  state.events.set(e.uid, merged);
  const li = el("li", { "data-uid": e.uid, class: "event " + merged.verdict });
  const img = el("img", { class: "thumb", alt: "" });
  const url = snapUrl(merged);
  if (url) loadImg(img, url);
  const text = el("div", { class: "ev-text" });
  text.append(el("strong", {}, `${merged.station}/${merged.camera} ${merged.verdict}`),
              el("span", {}, ` ${merged.defect_class || merged.top_class} ${pct(merged.confidence)} ${clock(merged.captured_at)}`),
              el("span", { class: "review-badge", "data-action": merged.review_action || "" }, eventLabel(merged)));
  li.append(img, text);
  li.addEventListener("click", () => openReview(e.uid));
  if (old) old.replaceWith(li);
  else if (prepend) $("#events").prepend(li);
  else $("#events").append(li);
  while ($("#events").children.length > 100) $("#events").lastChild.remove();
}

// ---- review ---------------------------------------------------------------------------------
async function openReview(uid) {
  const r = await fetch(`/api/verdicts/${encodeURIComponent(uid)}`);
  if (!r.ok) return;
  const v = await r.json();
  state.review = { v, boxes: (v.review_boxes || v.boxes || []).map((b) => Object.assign({}, b)) };
  $("#rv-title").textContent = `${v.station} / ${v.camera} #${v.seq}: ${v.verdict}`;
  $("#rv-info").textContent = `${v.defect_class || v.top_class} ${pct(v.confidence)} · part ${v.source || "#" + v.seq} · model ${v.model_name} ${v.model_version} · ${fmtTime(v.captured_at)}`;
  $("#rv-history").textContent = (v.reviews || []).map((x) => `${x.action}${x.label ? " " + x.label : ""} by ${x.user} at ${new Date(x.created_at * 1000).toLocaleString("sv-SE", { timeZoneName: "short" })}`).join("; ");
  const classes = new Set([...(state.events.get(uid) || {}).classes || [], v.top_class, state.me.good_class]);
  if (v.defect_class) classes.add(v.defect_class);
  const options = [...classes].sort().map((c) => el("option", { value: c }, c));
  if (v.verdict === "uncertain") options.unshift(el("option", { value: "" }, T("review.choose")));
  $("#rv-class").replaceChildren(...options);
  $("#rv-confirm").textContent = v.verdict === "uncertain" ? T("review.confirm_as") : T("review.confirm");
  const img = $("#rv-img");
  loadImg(img, snapUrl(v));
  drawBoxes($("#rv-boxes"), img, state.review.boxes);
  const detector = v.task === "detection";
  $("#rv-draw-hint").hidden = !detector; $("#rv-clear").hidden = !detector;
  $("#rv-actions").hidden = !state.me.can.includes("review");
  $("#rv-error").textContent = "";
  $("#review").showModal();
}

async function submitReview(action) {
  const { v, boxes } = state.review;
  const body = { action };
  if (action === "relabel" || (action === "confirm" && v.verdict === "uncertain")) {
    body.label = $("#rv-class").value;
    if (!body.label) { $("#rv-error").textContent = T("review.need_class"); $("#rv-class").focus(); return; }
  }
  if (v.task === "detection" && action !== "reject") body.boxes = boxes;
  const r = await fetch(`/api/verdicts/${encodeURIComponent(v.uid)}/review`, {
    method: "POST", headers: { "content-type": "application/json", "x-csrf-token": state.me.csrf }, body: JSON.stringify(body),
  });
  if (!r.ok) { $("#rv-error").textContent = `not saved: ${r.status} ${await r.text()}`; return; }
  const saved = await r.json();
  renderEvent({ uid: v.uid, review_action: saved.action, review_label: saved.label, review_user: saved.user }, false);
  $("#review").close();
}

function enableBoxDrawing() {
  const frame = $(".rv-frame"), img = $("#rv-img");
  let start = null;
  const at = (ev) => {
    const r = img.getBoundingClientRect();
    return [(ev.clientX - r.left) * img.naturalWidth / r.width, (ev.clientY - r.top) * img.naturalHeight / r.height];
  };
  frame.addEventListener("pointerdown", (ev) => { if (state.review && state.review.v.task === "detection") { start = at(ev); ev.preventDefault(); } });
  frame.addEventListener("pointerup", (ev) => {
    if (!start) return;
    const end = at(ev);
    const box = [Math.min(start[0], end[0]), Math.min(start[1], end[1]), Math.max(start[0], end[0]), Math.max(start[1], end[1])].map(Math.round);
    start = null;
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) return;
    state.review.boxes.push({ box, class: $("#rv-class").value });
    drawBoxes($("#rv-boxes"), img, state.review.boxes);
  });
  $("#rv-clear").addEventListener("click", () => { state.review.boxes = []; drawBoxes($("#rv-boxes"), img, []); });
}

// ---- alarms ---------------------------------------------------------------------------------
const alarmState = { list: [], sound: false, audio: null };

function renderAlarms(msg) {
  alarmState.list = msg.alarms;
  alarmState.sound = msg.sound;
  const canAck = state.me.can.includes("review");
  $("#alarms").replaceChildren(...msg.alarms.map((a) => {
    const li = el("li", { "data-alarm": a.id, class: a.active ? "active" : "cleared" });
    const when = `${clock(a.raised_at)}${a.active ? "" : `, ${T("alarm.cleared", { time: clock(a.cleared_at) })}`}`;
    li.append(el("strong", { class: "alarm-message" }, trField(a, "message")), el("span", {}, ` ${when}`));
    if (a.acked_at) li.append(el("span", { class: "acked" }, ` ${T("alarm.acked_by", { user: a.acked_by, time: clock(a.acked_at) })}`));
    else if (canAck) {
      const b = el("button", { type: "button", class: "ack", "data-ack": a.id }, T("alarm.ack"));
      b.addEventListener("click", () => ackAlarm(a.id));
      li.append(b);
    }
    return li;
  }));
  $("#alarm-banner").hidden = msg.alarms.length === 0;
}

async function ackAlarm(id) {
  const r = await fetch(`/api/alarms/${id}/ack`, { method: "POST", headers: { "x-csrf-token": state.me.csrf } });
  if (r.status === 401) location.href = "/login";
}

function beep() {  // while an alarm is unacknowledged (browsers allow sound after the first click on the page)
  if (!alarmState.sound || !alarmState.list.some((a) => !a.acked_at)) return;
  try {
    alarmState.audio = alarmState.audio || new AudioContext();
    const o = alarmState.audio.createOscillator(), g = alarmState.audio.createGain();
    o.frequency.value = 880; g.gain.value = 0.2;
    o.connect(g).connect(alarmState.audio.destination);
    o.start(); o.stop(alarmState.audio.currentTime + 0.3);
    document.body.dataset.beeped = String(+(document.body.dataset.beeped || 0) + 1);
  } catch (e) { /* no audio device */ }
}

// ---- feed -----------------------------------------------------------------------------------
function apply(msg) {
  feed.lastMsg = performance.now();
  if (msg.type === "tick") return;
  if (msg.type === "alarms") { renderAlarms(msg); return; }
  renderStations(msg.stations || []);
  if (msg.type === "full") {
    if (msg.stale_after_s) feed.staleAfter = msg.stale_after_s;
    const ids = new Set(msg.tiles.map((t) => t.id));
    for (const id of [...state.tiles.keys()]) if (!ids.has(id)) removeTile(id);
  }
  for (const id of msg.removed || []) removeTile(id);
  for (const t of msg.tiles) renderTile(t);
  const evs = msg.type === "full" ? [...msg.events].reverse() : msg.events;
  for (const e of evs) if (!document.querySelector(`#events li[data-uid="${CSS.escape(e.uid)}"]`)) renderEvent(e, true);
}

function connect() {
  const ws = state.ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  let opened = false;
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (!opened) { opened = true; feed.lastMsg = performance.now(); feed.up = true; }  // before painting the full state
    apply(msg);
    if (!$("#feed-banner").hidden || !$("#conn").classList.contains("up")) setFeed(true);
  };
  ws.onclose = async () => {
    if (state.ws !== ws) return;
    state.ws = null;
    setFeed(false);
    try {  // an expired or ended session goes to the login page; anything else: retry
      const r = await fetch("/api/me", { cache: "no-store" });
      if (r.status === 401) { location.href = "/login"; return; }
    } catch (e) { /* the console is down: keep trying */ }
    setTimeout(connect, 1000);
  };
}

async function loadRates() {  // the running shift per camera: OK / defect / uncertain and yield
  const r = await fetch("/api/shifts?count=1");
  if (!r.ok) return;
  const shift = (await r.json()).shifts[0];
  if (!shift) return;
  $("#shift-name").textContent = T("shift.since", { name: shift.name, time: clock(shift.start) });
  $("#rates tbody").replaceChildren(...shift.cameras.map((c) => {
    const tr = el("tr", { "data-camera": `${c.station}/${c.camera}` });
    tr.append(el("td", {}, `${c.station}/${c.camera}`), el("td", {}, c.ok), el("td", {}, c.defect), el("td", {}, c.uncertain),
              el("td", {}, c.yield === null ? "—" : pct(c.yield)));
    return tr;
  }));
}

async function start() {
  $("#conn").textContent = T("conn.connecting");
  const r = await fetch("/api/me");
  if (r.status === 401) { location.href = "/login"; return; }
  state.me = await r.json();
  $("#who").textContent = state.me.kiosk ? T("who.kiosk") : `${state.me.user} (${state.me.role})`;
  $("#nav-export").hidden = !state.me.can.includes("export");
  $("#logout").hidden = state.me.kiosk;
  $("#nav-admin").hidden = !state.me.can.includes("admin");
  $("#nav-account").hidden = state.me.kiosk;
  $("#logout-csrf").value = state.me.csrf;
  if (state.me.time_zone) TZ.zone = state.me.time_zone;
  const ev = await fetch("/api/events?limit=50");
  if (ev.ok) for (const e of await ev.json()) renderEvent(e, false);
  $("#rv-confirm").addEventListener("click", () => submitReview("confirm"));
  $("#rv-reject").addEventListener("click", () => submitReview("reject"));
  $("#rv-relabel").addEventListener("click", () => submitReview("relabel"));
  enableBoxDrawing();
  connect();
  setInterval(repaint, 250);
  window.addEventListener("resize", layoutTiles);
  setInterval(beep, 2000);
  loadRates();
  setInterval(loadRates, 5000);
}

start();
