"use strict";
// History and review queue: filters, paging, thumbnails, keyboard-only review. No framework, no build.
const $ = (s) => document.querySelector(s);
const H = { me: null, rows: [], sel: -1, page: 1, perPage: 25, total: 0, classes: [] };

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmtTime(t) { return new Date(t * 1000).toLocaleString("sv-SE", { timeZone: H.zone, timeZoneName: "short" }); }
function pct(x) { return (100 * x).toFixed(1) + "%"; }
function snapUrl(r) { return r.snapshot ? `/snapshots/${encodeURIComponent(r.station)}/${encodeURIComponent(r.snapshot)}` : ""; }
function reviewText(r) {
  if (!r.review_action) return T("rv.to_review");
  return `${T("rv." + r.review_action)}${r.review_label ? " " + r.review_label : ""} ${T("rv.by")} ${r.review_user}`;
}

function query() {
  const f = new FormData($("#filters"));
  const q = new URLSearchParams();
  for (const [k, v] of f) {
    if (!v) continue;
    q.set(k, (k === "from" || k === "to") ? v.trim().replace(" ", "T") : v);  // naive line time, zone in tz
  }
  q.set("tz", H.zone);
  q.set("page", H.page); q.set("per_page", H.perPage);
  return q;
}

async function load(keepSel) {
  const r = await fetch(`/api/history?${query()}`);
  if (r.status === 401) { location.href = "/login"; return; }
  if (!r.ok) { $("#d-msg").textContent = await r.text(); return; }
  const body = await r.json();
  H.rows = body.rows; H.total = body.total; H.classes = body.classes;
  const st = $("#filters [name=station]");
  if (st.options.length === 1) for (const s of body.stations) st.append(el("option", {}, s));
  const cl = $("#filters [name=class]");
  if (cl.options.length === 1) for (const c of body.classes) cl.append(el("option", {}, c));
  $("#rows tbody").replaceChildren(...H.rows.map((row, i) => {
    const tr = el("tr", { "data-uid": row.uid, "data-i": i, class: `row ${row.verdict}` });
    const img = el("img", { class: "thumb", alt: "", loading: "lazy" });
    if (snapUrl(row)) img.src = snapUrl(row);
    const td = el("td"); td.append(img);
    tr.append(td, el("td", {}, fmtTime(row.captured_at)), el("td", {}, `${row.station}/${row.camera}`),
      el("td", {}, row.source || `#${row.seq}`), el("td", { class: "v" }, row.verdict),
      el("td", {}, row.defect_class || row.top_class), el("td", {}, pct(row.confidence)),
      el("td", { class: "rv", "data-action": row.review_action || "" }, reviewText(row)));
    tr.addEventListener("click", () => select(i));
    return tr;
  }));
  const pages = Math.max(1, Math.ceil(H.total / H.perPage));
  $("#pageinfo").textContent = T("pager.info", { page: H.page, pages, total: H.total });
  select(Math.min(keepSel ?? -1, H.rows.length - 1));
}

function select(i) {
  H.sel = i;
  document.querySelectorAll("#rows tr.selected").forEach((t) => t.classList.remove("selected"));
  $("#detail").hidden = i < 0;
  if (i < 0) return;
  const row = H.rows[i];
  const tr = document.querySelector(`#rows tr[data-i="${i}"]`);
  tr.classList.add("selected");
  tr.scrollIntoView({ block: "nearest" });
  $("#d-img").src = snapUrl(row);
  $("#d-title").textContent = `${row.station} / ${row.camera}: ${row.verdict.toUpperCase()}`;
  $("#d-info").textContent = `part ${row.source || "#" + row.seq} · ${row.defect_class || row.top_class} ${pct(row.confidence)} · model ${row.model_name || "?"} ${row.model_version || "?"} · ${fmtTime(row.captured_at)} · ${reviewText(row)}`;
  const opts = H.classes.map((c, k) => el("option", { value: c }, `${k + 1}: ${c}`));
  if (row.verdict === "uncertain") opts.unshift(el("option", { value: "" }, T("review.choose")));
  $("#d-class").replaceChildren(...opts);
  $("#d-confirm").textContent = row.verdict === "uncertain" ? "Confirm as class (c)" : "Confirm (c)";
  $("#d-msg").textContent = "";
  $("#d-actions").hidden = !H.me.can.includes("review");
}

async function review(action) {
  if (H.sel < 0 || !H.me.can.includes("review")) return;
  const row = H.rows[H.sel];
  const body = { action };
  if (action === "relabel" || (action === "confirm" && row.verdict === "uncertain")) {
    body.label = $("#d-class").value;
    if (!body.label) { $("#d-msg").textContent = "choose the class first (keys 1-9), then confirm"; return; }
  }
  const r = await fetch(`/api/verdicts/${encodeURIComponent(row.uid)}/review`, {
    method: "POST", headers: { "content-type": "application/json", "x-csrf-token": H.me.csrf }, body: JSON.stringify(body),
  });
  if (!r.ok) { $("#d-msg").textContent = `not saved: ${r.status} ${await r.text()}`; return; }
  const saved = await r.json();
  Object.assign(row, { review_action: saved.action, review_label: saved.label, review_user: saved.user });
  const cell = document.querySelector(`#rows tr[data-i="${H.sel}"] .rv`);
  cell.textContent = reviewText(row); cell.dataset.action = saved.action;
  $("#d-msg").textContent = "";
  if (H.sel < H.rows.length - 1) select(H.sel + 1);  // the queue moves on by itself
}

function keys(ev) {
  if (ev.target.closest("#filters") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  if (k === "j" || k === "ArrowDown") select(Math.min(H.sel + 1, H.rows.length - 1));
  else if (k === "k" || k === "ArrowUp") select(Math.max(H.sel - 1, 0));
  else if (k === "c") review("confirm");
  else if (k === "r") review("reject");
  else if (k === "l") review("relabel");
  else if (k === "n") { if (H.page * H.perPage < H.total) { H.page++; load(0); } }
  else if (k === "p") { if (H.page > 1) { H.page--; load(0); } }
  else if (/^[1-9]$/.test(k)) {
    const sel = $("#d-class"), want = H.classes[+k - 1];
    if (want !== undefined) sel.value = want;
  } else return;
  ev.preventDefault();
}

async function start() {
  const r = await fetch("/api/me");
  if (r.status === 401) { location.href = "/login"; return; }
  H.me = await r.json();
  $("#who").textContent = H.me.kiosk ? "kiosk (read-only)" : `${H.me.user} (${H.me.role})`;
  H.zone = H.me.time_zone || Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  $("#zone").textContent = `times: ${H.zone}`;
  $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); H.page = 1; load(0); });
  $("#d-confirm").addEventListener("click", () => review("confirm"));
  $("#d-reject").addEventListener("click", () => review("reject"));
  $("#d-relabel").addEventListener("click", () => review("relabel"));
  $("#prev").addEventListener("click", () => keys({ key: "p", target: document.body, preventDefault() {} }));
  $("#next").addEventListener("click", () => keys({ key: "n", target: document.body, preventDefault() {} }));
  document.addEventListener("keydown", keys);
  await load(-1);
  document.body.dataset.ready = "1";
}

start();
