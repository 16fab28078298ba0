"use strict";
// Users and passwords: every change is one JSON POST with the session's CSRF token.
const $ = (s) => document.querySelector(s);
let me = null;

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}

async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json", "x-csrf-token": me.csrf }, body: JSON.stringify(body) });
  if (r.status === 401) { location.href = "/login"; return false; }
  const text = await r.text();
  $("#msg").textContent = r.ok ? T("users.saved") : text.trim();
  $("#msg").className = r.ok ? "" : "error";
  return r.ok;
}

async function loadUsers() {
  const r = await fetch("/api/users");
  if (!r.ok) return;
  const rows = (await r.json()).map((u) => {
    const role = el("select", { "aria-label": `role of ${u.name}` });
    for (const name of ["operator", "engineer", "admin"]) role.append(el("option", name === u.role ? { selected: "" } : {}, name));
    role.addEventListener("change", async () => { await post(`/api/users/${encodeURIComponent(u.name)}`, { role: role.value }); loadUsers(); });
    const pw = el("input", { type: "password", minlength: "8", "aria-label": `new password for ${u.name}`, autocomplete: "new-password" });
    const setPw = el("button", { type: "button" }, T("users.set_password"));
    setPw.addEventListener("click", async () => { if (await post(`/api/users/${encodeURIComponent(u.name)}`, { password: pw.value })) pw.value = ""; });
    const toggle = el("button", { type: "button", "data-user": u.name, class: "toggle" }, u.disabled ? T("users.enable") : T("users.disable"));
    toggle.addEventListener("click", async () => { await post(`/api/users/${encodeURIComponent(u.name)}`, { disabled: !u.disabled }); loadUsers(); });
    const tr = el("tr", { "data-user": u.name });
    tr.append(el("td", {}, u.name), el("td", {}, role), el("td", {}, u.disabled ? T("users.disabled") : T("users.active")),
      el("td", {}, pw, setPw), el("td", {}, toggle));
    return tr;
  });
  $("#users tbody").replaceChildren(...rows);
}

async function start() {
  const r = await fetch("/api/me");
  if (r.status === 401) { location.href = "/login"; return; }
  me = await r.json();
  $("#who").textContent = `${me.user} (${me.role})`;
  if (me.can.includes("admin")) { $("#users-section").hidden = false; loadUsers(); }
  $("#add-user").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    if (await post("/api/users", Object.fromEntries(f))) { ev.target.reset(); loadUsers(); }
  });
  $("#my-password").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (await post("/api/me/password", Object.fromEntries(new FormData(ev.target)))) ev.target.reset();
  });
}

start();
